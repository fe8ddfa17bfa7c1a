"""The bundles shipped in the package (edge/models/default: the 2-pass multi-head engine since session 15, and
edge/models/conditional: the 16-pass conditional engine shipped before it):
each loads and verifies, and its engine, INT8 model and teacher behave like a trained classifier on real PBC cells
(floors well below the measured figures in docs/results.md, so that a broken export fails while honest noise
does not)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge.backends import load_backend
from edge.bundle import load_bundle, packaged_bundles
from edge.cli import main


@pytest.fixture(scope="module", params=["default", "conditional"])
def shipped(request):
    if request.param not in packaged_bundles():
        pytest.skip(f"no {request.param} bundle in edge/models")
    return load_bundle(None if request.param == "default" else request.param)


def test_manifest_contract(shipped):
    m = shipped.manifest
    assert shipped.classes == ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    assert shipped.evals_per_cell == 16 and len(shipped.timesteps) == 2
    assert shipped.crop_size == 64 and set(shipped.engines) == {"fp32", "int8", "fp16"}
    assert shipped.calibration is not None and shipped.calibration["alpha"] == 0.01
    assert all(len(e["sha256"]) == 64 for e in m["files"].values())
    assert (m.get("denoiser") == "multi_head") == (shipped.root.name == "default")  # the 2-pass engine is the default
    if m.get("denoiser") == "multi_head":  # 16 (class, timestep) errors from 2 passes; INT8 measured at export
        assert m["passes_per_cell"] == 2 and m["denoiser"] == "multi_head" and shipped.precision == "fp32"
        assert m["quantization"]["preset"] == "tail+ends" and m["metrics"]["int8_vs_fp32"]["agreement"] >= 0.99


def test_engine_classifies_real_cells(shipped, pbc_cells):
    cells, labels = pbc_cells
    fp32 = load_backend("onnxruntime", shipped, "fp32").infer(cells)
    int8 = load_backend("onnxruntime", shipped, "int8").infer(cells)
    acc = np.mean(fp32["logits"].argmax(1) == labels)
    agree = np.mean(fp32["logits"].argmax(1) == int8["logits"].argmax(1))
    assert acc >= 0.6, f"FP32 engine accuracy {acc:.2f} on {len(labels)} real cells"
    multi = shipped.manifest.get("denoiser") == "multi_head"
    floor = 0.9 if multi else 0.85  # validation: 99.4% / 97.5% (7-bit weights, any x86)
    assert agree >= floor, f"INT8 vs FP32 agreement {agree:.2f}"
    assert np.isfinite(fp32["errors"]).all() and np.isfinite(fp32["anomaly"]).all()


def test_classify_cli_with_no_flags_and_teacher(shipped, pbc_dir, tmp_path):
    imgs = [sorted((pbc_dir / c).glob("*.jpg"))[0] for c in ("neutrophil", "eosinophil")]
    out = tmp_path / "engine.jsonl"
    bundle_args = [] if shipped.root.name == "default" else ["--bundle", shipped.root.name]
    assert main(["classify", *bundle_args, "--out", str(out), *map(str, imgs)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["evals"] for r in rows] == [16, 16]
    assert all(r["state"] in ("accepted", "review", "abnormal") for r in rows)
    pytest.importorskip("torch")
    out_t = tmp_path / "teacher.jsonl"
    assert main(["classify", *bundle_args, "--teacher", "--out", str(out_t), str(imgs[1])]) == 0
    row = json.loads(out_t.read_text())
    assert row["evals"] > 16 and row["label"] in shipped.classes
