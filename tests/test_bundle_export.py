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
