"""``cytoedge export``: the onnx and bundle actions end to end on a tiny random teacher and a tiny crop cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import random_cells, save_tiny_teacher, tiny_model
from edge.cli import main
from edge.bundle import load_bundle
from export.onnx_export import onnx_io

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher folder (teacher.safetensors, teacher.json, splits.npz) and a crop cache of 96 cells."""
    root = tmp_path_factory.mktemp("export_cmd")
    teacher = root / "teacher"
    teacher.mkdir()
    save_tiny_teacher(tiny_model(), teacher)
    n = 96
    labels = np.arange(n) % 8
    np.savez(root / "cache.npz", crops=random_cells(n, seed=3).transpose(0, 2, 3, 1), labels=labels,
             classes=np.array(CLASSES), digest=np.array("synthetic"))
    idx = np.arange(n)
    np.savez(teacher / "splits.npz", train=idx[:64], val=idx[64:80], cal=idx[80:])
    return {"teacher": teacher, "cache": root / "cache.npz", "root": root}


def test_export_onnx_writes_the_graph_contract(run_dirs, tmp_path):
    out = tmp_path / "engine.onnx"
    assert main(["export", "onnx", "--teacher", str(run_dirs["teacher"]), "--timesteps", "100,500",
                 "--noise-seed", "3", "--out", str(out)]) == 0
    io = onnx_io(out)
    assert io["cells"][0] == "UINT8" and io["cells"][1][1:] == [3, 64, 64]
    assert {"logits", "errors", "anomaly"} <= set(io)


def test_export_without_timesteps_or_student_is_a_clear_error(run_dirs, tmp_path, capsys):
    assert main(["export", "onnx", "--teacher", str(run_dirs["teacher"]), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "give the engine's --timesteps and --noise-seed" in capsys.readouterr().err
    assert main(["export", "bundle", "--teacher", str(tmp_path / "none"), "--timesteps", "1", "--noise-seed", "0",
                 "--out", str(tmp_path / "b")]) == 2
    assert "teacher file missing" in capsys.readouterr().err


def test_export_bundle_writes_a_loadable_bundle_and_chooses_a_precision(run_dirs, tmp_path, capsys):
    out = tmp_path / "bundle"
    argv = ["export", "bundle", "--teacher", str(run_dirs["teacher"]), "--cache", str(run_dirs["cache"]),
            "--timesteps", "100,500", "--noise-seed", "3", "--calib-cells", "16", "--precisions", "fp32,int8",
            "--no-calibrate", "--out", str(out)]
    assert main(argv) == 0
    b = load_bundle(out)
    assert b.classes == CLASSES and b.timesteps == [100, 500] and b.noise_seed == 3 and b.evals_per_cell == 16
    assert b.calibration is None and set(b.engines) == {"fp32", "int8"}
    m = b.manifest
    choice = m["metrics"]["int8_vs_fp32"]
    assert b.precision == choice["chosen"] and 0.0 <= choice["agreement"] <= 1.0 and choice["n_cells"] == 16
    assert m["training_data"]["n_train"] == 64 and m["quantization"]["calibration_cells"] == 16
    assert m["teacher"] == {"weights": "teacher.safetensors", "config": "teacher.json"}
    assert not (tmp_path / "bundle.partial").exists()
    err = capsys.readouterr().err
    assert "default precision" in err and "wrote bundle" in err
    assert main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_export_bundle_refuses_calibration_on_a_training_split_before_building(run_dirs, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", "bundle", "--teacher", str(run_dirs["teacher"]), "--cache", str(run_dirs["cache"]),
                 "--timesteps", "100,500", "--noise-seed", "3", "--calibration-splits", "cal,train",
                 "--out", str(out)]) == 2
    assert "cannot calibrate on split(s) train" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "bundle.partial").exists()


def test_export_int8_bundle_requantizes_in_place_with_7_bit_weights(run_dirs, tmp_path, capsys):
    """A bundle whose INT8 engine has 8-bit weights (made here by quantizing without reduce_range, as bundles were
    before) gets a 7-bit one: new hash and bundle id, quantization and the INT8 measurement recorded, FP32 engine,
    calibration set and default precision untouched; then it loads on any CPU."""
    from edge.backends import load_backend
    from edge.bundle import file_sha256, update_bundle_file
    from export.quantize import quantize_int8

    out = tmp_path / "bundle"
    assert main(["export", "bundle", "--teacher", str(run_dirs["teacher"]), "--cache", str(run_dirs["cache"]),
                 "--timesteps", "100,500", "--noise-seed", "3", "--calib-cells", "16", "--precisions", "fp32,int8",
                 "--default-precision", "fp32", "--no-calibrate", "--out", str(out)]) == 0
    old8 = tmp_path / "old8.onnx"
    summary = quantize_int8(out / "engine_fp32.onnx", old8, random_cells(16), reduce_range=False)
    before = load_bundle(out).manifest
    measured = before["metrics"]["int8_vs_fp32"]  # measured even when the config sets the precision
    assert measured["chosen"] == "fp32" and "set by the config: fp32" in measured["reason"] and measured["n_cells"] == 16
    update_bundle_file(out, "engine_int8.onnx", old8.read_bytes(),
                       {"quantization": {**before["quantization"], "weight_type": summary["weight_type"]}})
    old = load_bundle(out).manifest
    assert old["quantization"]["weight_type"] == "int8 per-channel"
    capsys.readouterr()
    cfg = tmp_path / "sample.toml"
    cfg.write_text("choice_cells = 8\n")  # INT8 measured on a stratified sample of the 16 validation cells
    assert main(["export", "int8", "--bundle", str(out), "--teacher", str(run_dirs["teacher"]),
                 "--cache", str(run_dirs["cache"]), "--calib-cells", "16", "--config", str(cfg)]) == 0
    b = load_bundle(out)
    m = b.manifest
    assert m["quantization"]["weight_type"] == "int7 per-channel (reduce_range)"
    assert m["quantization"]["tensorrt"] == old["quantization"]["tensorrt"]
    assert m["quantization"]["calibset_sha256"] == old["quantization"]["calibset_sha256"]  # the same 16 cells
    assert m["files"]["engine_int8.onnx"]["sha256"] == file_sha256(out / "engine_int8.onnx") != old["files"]["engine_int8.onnx"]["sha256"]
    assert m["files"]["engine_fp32.onnx"] == old["files"]["engine_fp32.onnx"] and m["bundle_id"] != old["bundle_id"]
    assert b.precision == "fp32" and "default precision kept: fp32" in m["metrics"]["int8_vs_fp32"]["reason"]
    assert "cpu_vnni" in m["metrics"]["int8_vs_fp32"] and m["metrics"]["int8_vs_fp32"]["n_cells"] == 8
    assert load_backend("onnxruntime", b, "int8").infer(random_cells(2))["logits"].shape == (2, 8)
    assert "re-quantized (int7 per-channel (reduce_range))" in capsys.readouterr().err


def test_export_int8_options_are_checked(run_dirs, tmp_path, capsys):
    t = ["--teacher", str(run_dirs["teacher"]), "--cache", str(run_dirs["cache"])]
    assert main(["export", "int8", "--onnx", str(tmp_path / "a.onnx"), *t]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["export", "int8", "--bundle", str(tmp_path), "--out", str(tmp_path / "x.onnx"), *t]) == 2
    assert "drop --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "int8", "--onnx", "a.onnx", "--bundle", "b", "--out", "x.onnx", *t])


def test_update_bundle_file_refuses_manifest_entries_that_follow_from_the_files(tiny_bundle, tmp_path):
    import shutil

    from edge.bundle import update_bundle_file
    from edge.errors import BundleError

    work = tmp_path / "b"
    shutil.copytree(tiny_bundle, work)
    with pytest.raises(BundleError, match="bundle_id.*cannot be set"):
        update_bundle_file(work, "notes.txt", b"x", {"bundle_id": "0" * 12})
    assert not (work / "notes.txt").exists()
