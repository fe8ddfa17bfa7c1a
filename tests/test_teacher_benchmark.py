"""benchmarks/teacher.py on a tiny teacher: the pruned and unpruned rows, or the pruned row alone, each the
figures that export.diffusion_classifier gives on the same validation cells."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import load_benchmark



def _run(monkeypatch, args: list[str]) -> None:
    mod = load_benchmark("teacher")
    monkeypatch.setattr(sys, "argv", ["teacher.py", *args])
    assert mod.main() == 0


def test_teacher_benchmark_rows_match_the_classifier_with_and_without_the_unpruned_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from conftest import random_cells, save_tiny_teacher, tiny_model
    from export.diffusion_classifier import ClassifierConfig, classify_cells
    from export.teacher import load_teacher

    tdir = tmp_path / "teacher"
    tdir.mkdir()
    save_tiny_teacher(tiny_model(0), tdir)
    teacher = load_teacher(tdir)
    crops = random_cells(16, seed=6).transpose(0, 2, 3, 1).copy()
    labels = np.arange(16) % 8
    np.savez(tmp_path / "cache.npz", crops=crops, labels=labels, classes=np.array(teacher.cfg.classes))
    np.savez(tdir / "splits.npz", train=np.arange(0, 8), cal=np.arange(0, 0), val=np.arange(8, 16))
    common = ["--run", str(tdir), "--cache", str(tmp_path / "cache.npz"), "--cells", "8", "--max-trials", "4",
              "--threads", "1"]
    _run(monkeypatch, common + ["--pruned-only", "--out", str(tmp_path / "pruned")])
    _run(monkeypatch, common + ["--out", str(tmp_path / "both")])
    pruned = json.loads((tmp_path / "pruned" / "teacher.json").read_text())
    both = json.loads((tmp_path / "both" / "teacher.json").read_text())
    assert [r["prune"] for r in pruned["validation"]] == [True] and "prune_agreement" not in pruned
    assert [r["prune"] for r in both["validation"]] == [True, False] and 0.0 <= both["prune_agreement"] <= 1.0
    for rows in (pruned["validation"], both["validation"]):  # the benchmark's order of cells is the split's
        ref = classify_cells(teacher, crops[8:16].transpose(0, 3, 1, 2), ClassifierConfig(max_trials=4))
        assert rows[0]["pred"] == [r.label for r in ref]
        assert rows[0]["accuracy"] == pytest.approx(np.mean([r.label for r in ref] == labels[8:16]))
    assert both["validation"][1]["evals_mean"] == 8 * 4  # no pruning: every class, every trial
