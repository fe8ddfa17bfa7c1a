"""benchmarks/uncertainty.py end to end on synthetic engine outputs with a known abnormal group."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_benchmark

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def engine_outputs(n: int, rng: np.random.Generator, novel: bool = False, margin: float = 2.5):
    """Over-confident logits (x3) of a decent classifier (true class ahead by ``margin`` noise sd); errors = 5 - logits / 12. A novel cell has no
    winning class: its true-class bonus is spread over three classes."""
    labels = rng.integers(0, 8, n)
    bonus = np.eye(8)[labels] * margin
    if novel:
        bonus = (np.eye(8)[labels] + np.eye(8)[(labels + 1) % 8] + np.eye(8)[(labels + 2) % 8]) * 0.9
    logits = 3.0 * (rng.normal(0, 1.0, (n, 8)) + bonus)
    errors = 5.0 - logits / 12 + rng.normal(0, 0.05, (n, 8))
    anomaly = rng.normal(0, 1, n)  # an uninformative engine score: the computed ones must beat it
    return logits.astype(np.float32), errors.astype(np.float32), anomaly.astype(np.float32), labels


def test_crossfit_judges_each_test_fold_by_a_calibration_that_never_saw_it():
    from calibration.fit import fit_calibration
    from edge.postprocess import decide

    bench, rng = load_benchmark("uncertainty"), np.random.default_rng(1)
    d = {"classes": np.asarray(CLASSES)}
    for split, n in (("cal", 900), ("test", 600)):
        d.update(dict(zip((f"{split}_logits", f"{split}_errors", f"{split}_anomaly", f"{split}_labels"),
                          engine_outputs(n, rng, margin=4.0))))
    fold = bench.stratified_folds(d["test_labels"], 3, seed=0)
    for c in range(8):  # every class dealt evenly round the folds
        counts = np.bincount(fold[d["test_labels"] == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    cf = bench.crossfit(d, CLASSES, 3, delta=0.1, false_alarm=0.02, anomaly_score="neg_zeta", class_bias=False)
    assert [f["n_test"] for f in cf["folds"]] == np.bincount(fold).tolist()
    assert [f["n_fit"] for f in cf["folds"]] == [1500 - m for m in np.bincount(fold)]
    # each fold again by hand: calibrated on cal + the other folds, applied to that fold only
    keys = ("logits", "errors", "anomaly")
    total = 0
    for f in range(3):
        held = fold == f
        fit = {k: np.concatenate([d[f"cal_{k}"], d[f"test_{k}"][~held]]) for k in keys}
        cal = fit_calibration(fit["logits"], fit["errors"], fit["anomaly"],
                              np.concatenate([d["cal_labels"], d["test_labels"][~held]]), CLASSES, anomaly_score="neg_zeta")
        assert cf["folds"][f]["review_threshold"] == cal["review_threshold"]
        accepted = sum(c.state == "accepted" for c in decide({k: d[f"test_{k}"][held] for k in keys}, CLASSES, cal))
        assert 0 < accepted < held.sum()
        total += accepted
    assert cf["test_states"]["accepted"] == pytest.approx(total / 600)
    assert cf["selective"][1]["alpha"] == 0.01 and cf["selective"][1]["test_risk"] <= 0.03


def test_uncertainty_benchmark_writes_report_and_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    arrays = {"classes": np.asarray(CLASSES)}
    for split, n in (("cal", 3000), ("test", 3000)):
        arrays.update(dict(zip((f"{split}_logits", f"{split}_errors", f"{split}_anomaly", f"{split}_labels"),
                               engine_outputs(n, rng))))
    lo, er, an, _ = engine_outputs(400, rng, novel=True)
    arrays.update(ood_novel_logits=lo, ood_novel_errors=er, ood_novel_anomaly=an)
    for key, e in (("ood_novel", er), ("ood_novel_normal", arrays["test_errors"]), ("ood_novel_cal", arrays["cal_errors"])):
        arrays[f"{key}_errors_t"] = np.stack([1.4 * e, 0.6 * e], axis=2)  # two timesteps [n, K, T] averaging to e
    np.savez(tmp_path / "outputs.npz", **arrays)

    bench = load_benchmark("uncertainty")
    # a "teacher" that agrees with the truth on the first 2,700 test cells and is off by one class on the rest
    teacher = arrays["test_labels"].copy()
    teacher[2700:] = (teacher[2700:] + 1) % 8
    np.savez(tmp_path / "teacher_val.npz", label=teacher)
    assert bench.main([str(tmp_path / "outputs.npz"), "--out", str(tmp_path / "report"),
                       "--teacher-val", str(tmp_path / "teacher_val.npz"), "--crossfit", "2"]) == 0

    report = json.loads((tmp_path / "report" / "uncertainty.json").read_text())
    assert report["test_ece_after"] < report["test_ece_before"]
    assert report["teacher_accuracy"] == pytest.approx(0.9)
    raw_ok = arrays["test_logits"].argmax(1) == arrays["test_labels"]
    assert report["test_accuracy_raw"] == pytest.approx(raw_ok.mean())
    assert report["teacher_agreement_raw"] == pytest.approx((arrays["test_logits"].argmax(1) == teacher).mean())
    assert len(report["class_bias"]) == 8 and abs(report["test_accuracy"] - report["test_accuracy_raw"]) < 0.02
    for s in report["selective"]:
        assert "refused" in s or s["test_risk"] <= 2 * s["alpha"] + 0.01
    assert [s["alpha"] for s in report["selective"]] == [0.005, 0.01, 0.02, 0.05]
    assert [f["n_fit"] for f in report["crossfit"]["folds"]] == [6000 - f["n_test"] for f in report["crossfit"]["folds"]]
    assert abs(report["crossfit"]["test_accuracy"] - report["test_accuracy"]) < 0.02
    scores = report["anomaly"]["novel"]["scores"]
    assert set(scores) == {"engine", "neg_zeta", "best_error", "error_profile", "timestep_profile"}
    # the timesteps here carry no more than their mean: the per-timestep profile finds what the class profile finds
    assert abs(scores["timestep_profile"]["auroc"] - scores["error_profile"]["auroc"]) < 0.05
    assert abs(scores["engine"]["auroc"] - 0.5) < 0.1  # the uninformative score is measured as such
    assert scores["neg_zeta"]["auroc"] > scores["engine"]["auroc"] + 0.15
    assert "states_with_shipped_calibration" in report["anomaly"]["novel"]
    for png in ("reliability.png", "risk_coverage.png", "anomaly_novel_neg_zeta.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
