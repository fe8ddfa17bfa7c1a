"""The bundle shipped in the package (edge/models/default): it loads and verifies, and its engine, INT8 model
and teacher behave like a trained classifier on real PBC cells (floors well below the measured figures in
docs/results.md, so that a broken export fails while honest noise does not)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge.backends import load_backend
from edge.bundle import default_bundle_dir, load_bundle
from edge.cli import main


@pytest.fixture(scope="module")
def shipped():
    if not (default_bundle_dir() / "manifest.json").exists():
        pytest.skip("no default bundle in edge/models/default")
    return load_bundle()


def test_manifest_contract(shipped):
    m = shipped.manifest
    assert shipped.classes == ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    assert shipped.evals_per_cell == 16 and len(shipped.timesteps) == 2
    assert shipped.crop_size == 64 and set(shipped.engines) == {"fp32", "int8", "fp16"}
    assert shipped.calibration is not None and shipped.calibration["alpha"] == 0.01
    assert all(len(e["sha256"]) == 64 for e in m["files"].values())


def test_engine_classifies_real_cells(shipped, pbc_cells):
    cells, labels = pbc_cells
    fp32 = load_backend("onnxruntime", shipped, "fp32").infer(cells)
    int8 = load_backend("onnxruntime", shipped, "int8").infer(cells)
    acc = np.mean(fp32["logits"].argmax(1) == labels)
    agree = np.mean(fp32["logits"].argmax(1) == int8["logits"].argmax(1))
    assert acc >= 0.6, f"FP32 engine accuracy {acc:.2f} on {len(labels)} real cells"
    assert agree >= 0.85, f"INT8 vs FP32 agreement {agree:.2f}"  # 97.5% of validation (7-bit weights, any x86)
    assert np.isfinite(fp32["errors"]).all() and np.isfinite(fp32["anomaly"]).all()


def test_classify_cli_with_no_flags_and_teacher(shipped, pbc_dir, tmp_path):
    imgs = [sorted((pbc_dir / c).glob("*.jpg"))[0] for c in ("neutrophil", "eosinophil")]
    out = tmp_path / "engine.jsonl"
    assert main(["classify", "--out", str(out), *map(str, imgs)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["evals"] for r in rows] == [16, 16]
    assert all(r["state"] in ("accepted", "review", "abnormal") for r in rows)
    pytest.importorskip("torch")
    out_t = tmp_path / "teacher.jsonl"
    assert main(["classify", "--teacher", "--out", str(out_t), str(imgs[1])]) == 0
    row = json.loads(out_t.read_text())
    assert row["evals"] > 16 and row["label"] in shipped.classes
