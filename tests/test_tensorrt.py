"""TensorRT path: plan naming and the sidecar checks that refuse a plan built elsewhere (CPU, always run), the
ONNX precision checks of the plan builder (CPU), and, on a machine with TensorRT, pycuda and a CUDA GPU
(marked ``gpu``, skipped otherwise): plans built from a tiny bundle, parity with ONNX Runtime at stated
tolerances for batch sizes 1, 3, 64 and 65 (past the profile's maximum of 64), and a plan refused for a
sidecar naming another GPU.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_NOISE_SEED, TINY_TIMESTEPS, random_cells, synthetic_calibration, tiny_model

from edge.backends import load_backend
from edge.backends.tensorrt import (check_sidecar, find_plan, gpu_runtime, parse_version, plan_mismatches,
                                    plan_name, sidecar_name)
from edge.bundle import load_bundle, update_bundle_file
from edge.errors import BackendError, BundleError

HERE = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt": "10.13.3.9"}
ORIN = {"gpu": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}

# Parity with ONNX Runtime on the same ONNX: largest absolute difference of each output, as a fraction of its
# largest |reference value| (at least 1), with logits centred per cell (softmax ignores their shared offset):
# fp32 1e-3; fp16 2e-2 (10-bit mantissa through 16 denoiser evaluations and a reduction); int8 5e-2 (TensorRT
# and ONNX Runtime fuse and round Q/DQ differently). Labels: every cell whose reference top-1 / top-2 logit
# margin exceeds twice the logit tolerance keeps its label.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}


def centred(logits: np.ndarray) -> np.ndarray:
    """Logits [N, K] minus each cell's mean."""
    return logits - logits.mean(1, keepdims=True)


def sidecar(identity: dict, precision: str = "fp32", onnx_sha256: str = "0" * 64) -> dict:
    return {**identity, "precision": precision, "onnx_file": f"engine_{precision}.onnx", "onnx_sha256": onnx_sha256,
            "profile": {"input": "cells", "min": [1, 3, 64, 64], "opt": [16, 3, 64, 64], "max": [64, 3, 64, 64]},
            "built": "2026-01-01T00:00:00+00:00"}


# ---- CPU: naming and sidecar checks ------------------------------------------------------------------------

def test_plan_name_tags_precision_compute_capability_and_tensorrt_major():
    assert plan_name("fp16", "8.7", "10.3.0") == "engine_fp16.sm87.trt10.plan"
    assert plan_name("int8", "9.0", "11.4.0.106") == "engine_int8.sm90.trt11.plan"
    assert sidecar_name("engine_fp16.sm87.trt10.plan") == "engine_fp16.sm87.trt10.plan.json"
    with pytest.raises(BackendError, match="precision"):
        plan_name("bf16", "8.7", "10.3.0")
    with pytest.raises(BackendError, match="MAJOR.MINOR"):
        plan_name("fp16", "8", "10.3.0")


def test_versions_are_compared_as_numbers():
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert parse_version("10.7.0.post1") == (10, 7, 0, ".post1")
    assert parse_version("8.7") < parse_version("8.10")  # a string comparison would say otherwise
    with pytest.raises(BackendError):
        parse_version("ten")


def test_a_plan_from_this_machine_is_accepted():
    assert plan_mismatches(sidecar(HERE), HERE) == []
    check_sidecar(sidecar(HERE), HERE, "fp32", "0" * 64, "plan")


@pytest.mark.parametrize("key,value,named", [
    ("gpu", "NVIDIA H100 80GB HBM3", "GPU"),
    ("compute_capability", "8.7", "compute capability"),
    ("tensorrt", "10.13.3", "TensorRT"),  # same major, other build: plans are not portable
    ("tensorrt", "11.4.0.106", "TensorRT"),
])
def test_a_plan_from_another_gpu_or_tensorrt_is_refused(key, value, named):
    built = sidecar({**HERE, key: value})
    problems = plan_mismatches(built, HERE)
    assert len(problems) == 1 and problems[0].startswith(named) and value in problems[0]
    with pytest.raises(BackendError, match="cannot run here") as err:
        check_sidecar(built, HERE, "fp32", None, "engine_fp32.sm90.trt10.plan")
    assert value in str(err.value) and "cytoedge export tensorrt" in str(err.value)


def test_wrong_precision_stale_model_and_incomplete_sidecar_are_refused():
    with pytest.raises(BackendError, match="precision: plan is 'int8'"):
        check_sidecar(sidecar(HERE, "int8"), HERE, "fp16", None, "plan")
    with pytest.raises(BackendError, match="built from another engine_fp32.onnx"):
        check_sidecar(sidecar(HERE, onnx_sha256="a" * 64), HERE, "fp32", "b" * 64, "plan")
    partial = sidecar(HERE)
    del partial["tensorrt"], partial["built"]
    with pytest.raises(BackendError, match="lacks tensorrt, built"):
        check_sidecar(partial, HERE, "fp32", None, "plan")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def add_plan(root: Path, identity: dict, precision: str = "fp32", side: dict | None = None) -> str:
    """Add a (dummy) plan and its sidecar for ``identity`` to the bundle at ``root`` through the manifest."""
    bundle = load_bundle(root)
    onnx_sha = bundle.manifest["files"][bundle.engines[precision]]["sha256"]
    name = plan_name(precision, identity["compute_capability"], identity["tensorrt"])
    update_bundle_file(root, name, b"not a real plan")
    body = side if side is not None else sidecar(identity, precision, onnx_sha)
    update_bundle_file(root, sidecar_name(name), json.dumps(body).encode())
    return name


def test_find_plan_picks_this_machines_plan_and_checks_its_sidecar(bundle_copy):
    name = add_plan(bundle_copy, HERE)
    path, side = find_plan(load_bundle(bundle_copy), "fp32", HERE)
    assert path == bundle_copy / name and side["gpu"] == HERE["gpu"]


def test_find_plan_refuses_a_bundle_with_plans_for_other_machines_only(bundle_copy):
    with pytest.raises(BackendError, match="has none") as err:
        find_plan(load_bundle(bundle_copy), "fp32", HERE)
    assert "cytoedge export tensorrt --bundle" in str(err.value)
    other = add_plan(bundle_copy, ORIN)
    with pytest.raises(BackendError, match=f"only {other}"):
        find_plan(load_bundle(bundle_copy), "fp32", HERE)


def test_find_plan_refuses_a_sidecar_naming_another_gpu(bundle_copy):
    bundle = load_bundle(bundle_copy)
    onnx_sha = bundle.manifest["files"][bundle.engines["fp32"]]["sha256"]
    add_plan(bundle_copy, HERE, side=sidecar({**HERE, "gpu": "NVIDIA GeForce RTX 4090"}, "fp32", onnx_sha))
    with pytest.raises(BackendError, match="RTX 4090"):
        find_plan(load_bundle(bundle_copy), "fp32", HERE)


def test_find_plan_refuses_a_plan_built_from_another_model(bundle_copy):
    add_plan(bundle_copy, HERE, side=sidecar(HERE, "fp32", "f" * 64))
    with pytest.raises(BackendError, match="built from another engine_fp32.onnx"):
        find_plan(load_bundle(bundle_copy), "fp32", HERE)


def test_find_plan_refuses_a_plan_without_sidecar(bundle_copy):
    name = plan_name("fp32", HERE["compute_capability"], HERE["tensorrt"])
    update_bundle_file(bundle_copy, name, b"not a real plan")
    with pytest.raises(BackendError, match="no sidecar"):
        find_plan(load_bundle(bundle_copy), "fp32", HERE)


def test_tensorrt_backend_never_falls_back(tiny_bundle):
    """Without the GPU stack, asking for TensorRT is an error that keeps the original cause."""
    reason = gpu_missing()
    if reason is None:
        pytest.skip("TensorRT, pycuda and a GPU are present: the GPU tests below cover this machine")
    with pytest.raises(BackendError) as err:
        load_backend("tensorrt", load_bundle(tiny_bundle), "fp16")
    assert err.value.__cause__ is not None or "GPU" in str(err.value)


def test_export_tensorrt_command_without_gpu_stack_fails_and_leaves_the_bundle_alone(bundle_copy, capsys):
    if gpu_missing() is None:
        pytest.skip("TensorRT, pycuda and a GPU are present: the GPU tests build real plans")
    from edge.cli import main

    before = (bundle_copy / "manifest.json").read_bytes()
    assert main(["export", "tensorrt", "--bundle", str(bundle_copy), "--precision", "fp32"]) == 2
    assert "cytoedge export: error:" in capsys.readouterr().err
    assert (bundle_copy / "manifest.json").read_bytes() == before
    assert main(["export", "tensorrt", "--bundle", str(bundle_copy), "--max-batch", "8"]) == 2
    assert "min <= opt <= max" in capsys.readouterr().err


# ---- CPU: which ONNX models can give which plans ---------------------------------------------------------

@pytest.fixture(scope="module")
def symmetric_int8(tiny_bundle) -> Path:
    """The bundle's TensorRT INT8 source (symmetric int8 Q/DQ, float biases), written next to the ORT INT8."""
    return tiny_bundle / load_bundle(tiny_bundle).tensorrt_onnx("int8")


def test_onnx_precision_checks(tiny_bundle, symmetric_int8):
    pytest.importorskip("onnx")
    from export.tensorrt_build import onnx_precision_problems

    fp32, ort_int8 = tiny_bundle / "engine_fp32.onnx", tiny_bundle / "engine_int8.onnx"
    assert onnx_precision_problems(fp32, "fp32") == []
    assert "no float16 weights" in onnx_precision_problems(fp32, "fp16")[0]
    assert "no QuantizeLinear" in onnx_precision_problems(fp32, "int8")[0]
    assert "Q/DQ" in onnx_precision_problems(ort_int8, "fp32")[0]
    # the bundle's INT8 model is made for ONNX Runtime on x86 (uint8 asymmetric activations): TensorRT cannot
    # build it, and the builder says so before TensorRT does
    problem, = onnx_precision_problems(ort_int8, "int8")
    assert "uint8 zero point" in problem and "symmetric int8" in problem
    assert symmetric_int8.name == "engine_int8_symmetric.onnx" and onnx_precision_problems(symmetric_int8, "int8") == []
    bundle = load_bundle(tiny_bundle)
    assert bundle.tensorrt_onnx("fp32") == "engine_fp32.onnx"
    with pytest.raises(BundleError, match="no fp16 ONNX model to build a TensorRT plan from"):
        bundle.tensorrt_onnx("fp16")
    # ONNX Runtime runs the symmetric model too (what TensorRT parity is checked against)
    cells = random_cells(3)
    sym = load_backend("onnxruntime", bundle, "int8", onnx_file=bundle.tensorrt_onnx("int8")).infer(cells)
    f32 = load_backend("onnxruntime", bundle, "fp32").infer(cells)
    np.testing.assert_allclose(sym["errors"], f32["errors"], rtol=0.05)
    with pytest.raises(BundleError, match="not a file of this bundle"):
        load_backend("onnxruntime", bundle, "int8", onnx_file="other.onnx")


def test_build_config_validates_the_profile():
    from export.tensorrt_build import BuildConfig

    assert BuildConfig().max_batch == 64
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BuildConfig(min_batch=1, opt_batch=16, max_batch=8)
    with pytest.raises(ValueError, match="precision"):
        BuildConfig(precision="tf32")


# ---- GPU: real plans -------------------------------------------------------------------------------------

def gpu_missing() -> str | None:
    """None when TensorRT, pycuda and a CUDA GPU are usable here, else why not."""
    try:
        gpu_runtime()
    except BackendError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory) -> Path:
    """A tiny bundle with FP32, FP16 and TensorRT-ready INT8 engines, and a plan of each for this GPU."""
    reason = gpu_missing()
    if reason:
        pytest.skip(f"needs TensorRT, pycuda and a CUDA GPU: {reason}")
    from export.bundle import build_bundle
    from export.tensorrt_build import BuildConfig, export_tensorrt

    model = tiny_model()
    root = tmp_path_factory.mktemp("gpu") / "bundle"
    build_bundle(root, model, None, timesteps=TINY_TIMESTEPS, noise_seed=TINY_NOISE_SEED, weights=None,
                 calib_cells=random_cells(16), precisions=("fp32", "fp16", "int8"), default_precision="fp32",
                 calibration=synthetic_calibration(list(model.cfg.classes)), name="tiny-gpu")
    for precision in ("fp32", "fp16", "int8"):
        export_tensorrt(root, BuildConfig(precision=precision, workspace_mib=1024))
    return root


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_matches_onnxruntime(gpu_bundle, precision):
    bundle = load_bundle(gpu_bundle)
    trt = load_backend("tensorrt", bundle, precision)
    ort = load_backend("onnxruntime", bundle, precision, onnx_file=bundle.tensorrt_onnx(precision))
    assert trt.max_batch == 64 and trt.evals_per_cell == bundle.evals_per_cell
    try:
        for n in (1, 3, 64, 65):
            cells = random_cells(n, seed=n)
            got, want = trt.infer(cells), ort.infer(cells)
            for name in ("logits", "errors", "anomaly"):
                assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
                g, w = (centred(got[name]), centred(want[name])) if name == "logits" else (got[name], want[name])
                tol = TOLERANCE[precision] * max(1.0, float(np.abs(w).max()))
                diff = float(np.abs(g - w).max())
                assert diff <= tol, f"{precision} batch {n}: {name} max abs diff {diff:.3g} > {tol:.3g}"
            w = centred(want["logits"])
            ranked = np.sort(w, axis=1)
            clear = ranked[:, -1] - ranked[:, -2] > 2 * TOLERANCE[precision] * max(1.0, float(np.abs(w).max()))
            same = got["logits"].argmax(1) == want["logits"].argmax(1)
            assert same[clear].all(), f"{precision} batch {n}: labels differ on {int((~same[clear]).sum())} clear cells"
    finally:
        trt.close()
    trt.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        trt.infer(random_cells(1))


@pytest.mark.gpu
def test_plan_with_a_sidecar_naming_another_gpu_is_refused(gpu_bundle, tmp_path):
    root = Path(shutil.copytree(gpu_bundle, tmp_path / "bundle"))
    _, _, running = gpu_runtime()
    name = sidecar_name(plan_name("fp16", running["compute_capability"], running["tensorrt"]))
    side = json.loads((root / name).read_text())
    side["gpu"] = "NVIDIA Imaginary 9000"
    update_bundle_file(root, name, json.dumps(side).encode())
    with pytest.raises(BackendError, match="Imaginary 9000"):
        load_backend("tensorrt", load_bundle(root), "fp16")
