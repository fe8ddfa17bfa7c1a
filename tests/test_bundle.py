"""Model bundle: the loader verifies hashes, format and the engine's I/O; every bad bundle is a clear BundleError."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.backends import load_backend
from edge.bundle import FORMAT, compute_bundle_id, default_bundle_dir, load_bundle, update_bundle_file
from edge.errors import BackendError, BundleError

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


@pytest.fixture()
def bundle_dir(tiny_bundle, tmp_path) -> Path:
    """A private, writable copy of the session's tiny bundle."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def read_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_tiny_bundle_loads_with_its_manifest_fields(tiny_bundle):
    b = load_bundle(tiny_bundle)
    m = read_manifest(tiny_bundle)
    assert b.root == Path(tiny_bundle) and b.classes == CLASSES and b.crop_size == 64
    assert b.evals_per_cell == 16 == len(b.classes) * len(b.timesteps)
    assert b.engines == {"fp32": "engine_fp32.onnx", "int8": "engine_int8.onnx"} and b.precision == "fp32"
    assert len(b.bundle_id) == 12 and b.bundle_id == m["bundle_id"] == compute_bundle_id(m["files"])
    assert b.calibration is not None and b.calibration["classes"] == CLASSES
    assert m["input"] == {"name": "cells", "dtype": "uint8", "layout": "NCHW", "channels": "RGB", "size": 64,
                          "preprocessing": {"module": "edge.preprocess", "version": 1, "crop_size": 64,
                                            "nucleus_fill": 0.42}}
    assert set(m["files"]) == {"engine_fp32.onnx", "engine_int8.onnx", "engine_int8_symmetric.onnx", "calibration.json",
                               "teacher.safetensors", "teacher.json"}
    assert b.tensorrt_sources == {"int8": "engine_int8_symmetric.onnx"}
    for name, entry in m["files"].items():
        assert entry["bytes"] == (Path(tiny_bundle) / name).stat().st_size and len(entry["sha256"]) == 64
    assert m["teacher"] == {"weights": "teacher.safetensors", "config": "teacher.json"}
    assert set(m["versions"]) == {"cytoedge", "onnx_opset", "onnxruntime", "torch"}


def test_missing_file_is_refused_naming_it(bundle_dir):
    (bundle_dir / "engine_int8.onnx").unlink()
    with pytest.raises(BundleError, match=r"engine_int8\.onnx: file listed in the manifest is missing"):
        load_bundle(bundle_dir)


def test_altered_file_is_refused_naming_it(bundle_dir):
    path = bundle_dir / "engine_fp32.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"engine_fp32\.onnx: sha256 .* does not match .*altered"):
        load_bundle(bundle_dir)


def test_truncated_file_is_refused(bundle_dir):
    path = bundle_dir / "calibration.json"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"calibration\.json: \d+ bytes, the manifest says \d+"):
        load_bundle(bundle_dir)


def test_newer_format_is_refused_saying_which_this_runtime_reads(bundle_dir):
    m = read_manifest(bundle_dir)
    m["format"] = FORMAT + 1
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=rf"format {FORMAT + 1} is newer than this runtime supports \(format {FORMAT}\)"):
        load_bundle(bundle_dir)


def test_inconsistent_evals_per_cell_is_refused(bundle_dir):
    m = read_manifest(bundle_dir)
    m["evals_per_cell"] = 4
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"evals_per_cell 4 is not classes x timesteps \(8 x 2\)"):
        load_bundle(bundle_dir)


def test_tensorrt_source_must_be_a_hashed_file_of_a_known_precision(bundle_dir):
    for bad in ({"int8": "elsewhere.onnx"}, {"int4": "engine_int8_symmetric.onnx"}, ["engine_int8_symmetric.onnx"]):
        m = read_manifest(bundle_dir)
        m["tensorrt_sources"] = bad
        (bundle_dir / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match="'tensorrt_sources' must map precisions to ONNX files hashed in 'files'"):
            load_bundle(bundle_dir)


def test_missing_or_broken_manifest_is_refused(bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest is not valid JSON"):
        load_bundle(bundle_dir)
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest missing"):
        load_bundle(bundle_dir)


def test_hand_edited_manifest_is_refused(bundle_dir):
    m = read_manifest(bundle_dir)
    m["files"]["calibration.json"]["sha256"] = "0" * 64
    m["files"]["calibration.json"]["bytes"] = (bundle_dir / "calibration.json").stat().st_size
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="calibration.json: sha256"):
        load_bundle(bundle_dir)


def test_calibration_for_other_classes_is_refused(bundle_dir):
    cal = json.loads((bundle_dir / "calibration.json").read_text())
    cal["classes"] = CLASSES[::-1]
    update_bundle_file(bundle_dir, "calibration.json", json.dumps(cal).encode())
    with pytest.raises(BundleError, match="calibration classes"):
        load_bundle(bundle_dir)


def test_onnx_input_mismatch_is_refused_by_the_backend(bundle_dir, tmp_path):
    """A correctly hashed engine whose input is float32 [N, 3, 32, 32] does not match the manifest."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("cells", TensorProto.FLOAT, ["N", 3, 32, 32])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in ("logits", "errors")]
    outs.append(helper.make_tensor_value_info("anomaly", TensorProto.FLOAT, ["N"]))
    k = helper.make_tensor("w", TensorProto.FLOAT, [3 * 32 * 32, 8], np.zeros(3 * 32 * 32 * 8, np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3 * 32 * 32])
    nodes = [helper.make_node("Reshape", ["cells", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"]),
             helper.make_node("Identity", ["logits"], ["errors"]), helper.make_node("ReduceSum", ["logits"], ["anomaly"], keepdims=0)]
    graph = helper.make_graph(nodes, "wrong", [x], outs, [k, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    update_bundle_file(bundle_dir, "engine_fp32.onnx", model.SerializeToString())
    bundle = load_bundle(bundle_dir)  # hashes are fine...
    with pytest.raises(BundleError, match=r"engine_fp32\.onnx: engine input 'cells' is tensor\(float\)"):
        load_backend("onnxruntime", bundle)  # ...but the graph is not what the manifest describes


def test_update_bundle_file_rehashes_and_keeps_other_checks(bundle_dir):
    before = load_bundle(bundle_dir).bundle_id
    cal = json.loads((bundle_dir / "calibration.json").read_text())
    cal["temperature"] = 2.5
    new_id = update_bundle_file(bundle_dir, "calibration.json", json.dumps(cal).encode())
    b = load_bundle(bundle_dir)
    assert b.calibration["temperature"] == 2.5 and b.bundle_id == new_id != before
    assert not list(bundle_dir.glob(".*.tmp"))  # no temporary files left behind
    (bundle_dir / "teacher.json").write_text("{}")  # an altered file elsewhere still fails
    with pytest.raises(BundleError, match="teacher.json"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="not the manifest"):
        update_bundle_file(bundle_dir, "manifest.json", b"{}")


def test_rewritten_bundle_files_stay_readable_by_other_users(bundle_dir):
    """A daemon running as its own user reads a bundle that `cytoedge calibrate` rewrote: the new files keep the
    old ones' permissions (mkstemp alone would leave them 0600)."""
    (bundle_dir / "calibration.json").chmod(0o644)
    update_bundle_file(bundle_dir, "calibration.json", (bundle_dir / "calibration.json").read_bytes())
    assert (bundle_dir / "calibration.json").stat().st_mode & 0o777 == 0o644
    assert (bundle_dir / "manifest.json").stat().st_mode & 0o044 == 0o044


def test_update_bundle_file_adds_a_calibration_to_an_uncalibrated_bundle(bundle_dir):
    m = read_manifest(bundle_dir)
    data = (bundle_dir / "calibration.json").read_bytes()
    del m["calibration"], m["files"]["calibration.json"]
    m["bundle_id"] = compute_bundle_id(m["files"])
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    (bundle_dir / "calibration.json").unlink()
    assert load_bundle(bundle_dir).calibration is None
    update_bundle_file(bundle_dir, "calibration.json", data)
    assert load_bundle(bundle_dir).calibration is not None


def test_backend_names_and_precisions_never_fall_back(tiny_bundle):
    b = load_bundle(tiny_bundle)
    with pytest.raises(BackendError, match="unknown backend 'triton' \\(known: onnxruntime, tensorrt\\)"):
        load_backend("triton", b)
    with pytest.raises(BundleError, match="no fp16 engine \\(it has: fp32, int8\\)"):
        load_backend("onnxruntime", b, "fp16")
    assert load_backend("onnxruntime", b, "int8").precision == "int8"
    assert load_backend("onnxruntime", b).precision == "fp32"


def test_tensorrt_backend_without_tensorrt_is_a_chained_backend_error(tiny_bundle):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here; this test covers its absence")
    with pytest.raises(BackendError) as info:
        load_backend("tensorrt", load_bundle(tiny_bundle))
    assert info.value.__cause__ is not None  # the original ImportError is kept


def test_default_bundle_dir_is_inside_the_package():
    d = default_bundle_dir()
    assert d.parts[-3:] == ("edge", "models", "default")


def test_packaged_bundle_names_resolve_unless_a_folder_of_that_name_exists(bundle_dir, tmp_path, monkeypatch):
    from edge.bundle import packaged_bundles, resolve_bundle_dir

    names = packaged_bundles()
    if "conditional" not in names:
        pytest.skip("no conditional bundle in edge/models")
    assert "default" in names
    monkeypatch.chdir(tmp_path)
    assert resolve_bundle_dir("conditional") == default_bundle_dir().parent / "conditional"
    assert resolve_bundle_dir(None) == default_bundle_dir()
    (tmp_path / "conditional").mkdir()  # a folder here wins over the packaged name
    assert resolve_bundle_dir("conditional") == Path("conditional")
    with pytest.raises(BundleError, match="manifest missing"):
        load_bundle("conditional")
    with pytest.raises(BundleError, match=r"bundle folder not found \(packaged bundles: conditional, default"):
        load_bundle("quick")
