"""benchmarks/views.py on a tiny teacher and student: one row per dihedral view plus the multi-view averages,
each figure the same as an engine built with that view gives."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import load_benchmark



def test_views_benchmark_scores_every_view_like_an_engine_with_that_view(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from safetensors.torch import save_file

    from conftest import TINY_TIMESTEPS, random_cells, save_tiny_teacher, tiny_model
    from export.distill import engine_errors
    from export.engine import VIEWS, build_engine
    from export.teacher import load_teacher

    tdir, sdir = tmp_path / "teacher", tmp_path / "student"
    tdir.mkdir(), sdir.mkdir()
    save_tiny_teacher(tiny_model(0), tdir)
    teacher = load_teacher(tdir)  # fp16 round trip, as the benchmark loads it
    crops = random_cells(20, seed=3).transpose(0, 2, 3, 1).copy()
    labels = np.arange(20) % 8
    np.savez(tmp_path / "cache.npz", crops=crops, labels=labels, classes=np.array(teacher.cfg.classes))
    np.savez(tdir / "splits.npz", train=np.arange(0, 4), cal=np.arange(4, 12), val=np.arange(12, 20))
    save_file({k: v.contiguous() for k, v in teacher.unet.state_dict().items()}, str(sdir / "student.safetensors"))
    (sdir / "distill.json").write_text(json.dumps({"timesteps": TINY_TIMESTEPS, "noise_seed": 7, "view": 6}))
    teacher_val = (labels[12:20] + 1) % 8
    np.savez(sdir / "teacher_val.npz", label=teacher_val)

    mod = load_benchmark("views")
    monkeypatch.setattr(sys, "argv", ["views.py", "--teacher", str(tdir), "--student", str(sdir), "--cache",
                                      str(tmp_path / "cache.npz"), "--threads", "1", "--out", str(tmp_path / "out")])
    assert mod.main() == 0
    rep = json.loads((tmp_path / "out" / "views.json").read_text())
    assert (tmp_path / "out" / "views.png").stat().st_size > 0
    assert rep["chosen_view"] == "flip_h" and [r["view"] for r in rep["rows"][:8]] == list(VIEWS)
    assert [r["evals_per_cell"] for r in rep["rows"][8:]] == [32, 64, 128]
    engine = build_engine(teacher, None, TINY_TIMESTEPS, 7, view=6)
    pred = engine_errors(engine, crops[12:20]).argmin(1)
    row = rep["rows"][6]
    assert row["val_accuracy"] == pytest.approx(np.mean(pred == labels[12:20]))
    assert row["val_teacher_agreement"] == pytest.approx(np.mean(pred == teacher_val))
    present = [np.mean(pred[labels[12:20] == k] == k) for k in np.unique(labels[12:20])]
    assert row["val_balanced_accuracy"] == pytest.approx(np.mean(present))
