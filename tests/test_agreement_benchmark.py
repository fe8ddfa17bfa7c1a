"""benchmarks/agreement.py: teacher runs against run 0, the ceiling, and engines against the teacher."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark


def test_report_counts_agreement_ceiling_and_where_engines_disagree():
    mod = load_benchmark("agreement")
    truth = np.array([0, 0, 1, 1, 2, 2])

    def errors(labels):  # class errors whose argmin is the given label
        e = np.ones((len(labels), 3))
        e[np.arange(len(labels)), labels] = 0.0
        return e

    runs = {0: errors([0, 0, 1, 1, 2, 0]), 1: errors([0, 0, 1, 2, 2, 2]), 2: errors([0, 0, 1, 2, 2, 2])}
    engine = np.array([0, 1, 1, 2, 2, 0])  # disagrees with run 0 on cell 1 (stable) and cell 3 (runs differ)
    rep = mod.report(runs, {"eng": engine}, truth)
    rows = {r["name"]: r for r in rep["rows"]}
    assert rep["stable_cells"] == 4 and rep["run_pair_agreement"]["min"] == pytest.approx(4 / 6)
    assert rows["teacher run 1"]["agreement_run0"] == pytest.approx(4 / 6)
    assert rows["teacher, mean of runs 1-2"]["disagreements_run0"] == 2  # runs 1 and 2 say 2 on cells 3 and 5
    e = rows["eng"]
    assert e["disagreements_run0"] == 2 and e["disagreements_on_stable"] == 1 and e["disagreements_on_unstable"] == 1
    assert e["agreement_each_run"]["1"] == pytest.approx(4 / 6)
    assert e["accuracy"] == pytest.approx(3 / 6) and e["balanced_accuracy"] == pytest.approx(0.5)
    assert rows["teacher run 2"]["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert e["agreement_run0_ci95"][0] < 4 / 6 < e["agreement_run0_ci95"][1]
    with pytest.raises(ValueError, match="run 0"):
        mod.report({1: runs[1], 2: runs[2]}, {}, truth)
    # a second engine is compared with the first on the same cells
    better = np.array([0, 0, 1, 1, 2, 0])  # agrees with run 0 everywhere: +2 cells over "eng", none the other way
    rep = mod.report(runs, {"eng": engine, "better": better}, truth)
    v = rep["rows"][-1]["vs_first_engine"]
    assert v["only_this_agrees"] == 2 and v["only_first_agrees"] == 0 and v["mcnemar_p"] == pytest.approx(0.5)
    assert "vs_first_engine" not in rep["rows"][-2]


def test_wilson_interval_and_mcnemar_match_scipy():
    from scipy.stats import binomtest

    from calibration.accuracy import mcnemar_p, wilson_interval

    for k, n in ((1313, 1367), (0, 20), (20, 20), (7, 9)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-4)
    for a, b in ((9, 4), (0, 5), (30, 31), (0, 0)):
        ref = binomtest(min(a, b), a + b, 0.5).pvalue if a + b else 1.0
        assert mcnemar_p(a, b) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_agreement_benchmark_runs_the_teacher_and_a_bundle(tmp_path, tiny_bundle):
    pytest.importorskip("torch")
    from conftest import random_cells, save_tiny_teacher, tiny_model

    tdir = tmp_path / "teacher"
    tdir.mkdir()
    save_tiny_teacher(tiny_model(0), tdir)
    crops = random_cells(10, seed=5).transpose(0, 2, 3, 1).copy()
    labels = np.arange(10) % 8
    np.savez(tmp_path / "cache.npz", crops=crops, labels=labels, classes=np.array(tiny_model(0).cfg.classes))
    np.savez(tdir / "splits.npz", train=np.arange(0, 2), cal=np.arange(2, 6), val=np.arange(6, 10))
    mod = load_benchmark("agreement")
    args = ["--teacher", str(tdir), "--seeds", "1", "--bundle", str(tiny_bundle), "--cache", str(tmp_path / "cache.npz"),
            "--runs-dir", str(tmp_path / "runs"), "--threads", "1", "--out", str(tmp_path / "out")]
    assert mod.main(args) == 0
    rep = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert (tmp_path / "out" / "agreement.png").stat().st_size > 0
    assert rep["seeds"] == [0, 1] and rep["n_cells"] == 4
    assert sorted(p.name for p in (tmp_path / "runs").glob("teacher_val*.npz"))[0] == "teacher_val.npz"
    run0 = np.load(tmp_path / "runs" / "teacher_val.npz")
    engine = next(r for r in rep["rows"] if r["kind"] == "engine")
    assert 0 <= engine["disagreements_run0"] <= 4
    assert engine["disagreements_on_stable"] + engine["disagreements_on_unstable"] == engine["disagreements_run0"]
    assert np.array_equal(run0["index"], np.arange(6, 10))
    # a second run reuses the cached teacher runs
    mtime = (tmp_path / "runs" / "teacher_val_seed1.npz").stat().st_mtime_ns
    assert mod.main(args) == 0
    assert (tmp_path / "runs" / "teacher_val_seed1.npz").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit):
        mod.main(args[:2] + ["--seeds", "0,1"] + args[4:])
    assert mod.main(["--teacher", str(tmp_path)] + args[2:]) == 2  # no splits.npz: a message, not a traceback
    assert mod.main(args[:4] + ["--bundle", str(tmp_path / "nothing")] + args[6:]) == 2
