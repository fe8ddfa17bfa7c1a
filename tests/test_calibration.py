"""calibration/: temperature scaling, the risk-controlled review threshold, anomaly scores and thresholds,
calibration sets and the calibration.json fit. Synthetic data where the truth is known; fast, CPU only."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from calibration.anomaly import (anomaly_scores, auroc, best_error_level, conformal_threshold,
                                 crossfit_profile_distance, fit_best_error_stats, fit_profile_stats, min_normal_cells,
                                 profile_distance, score_histograms, zeta)
from calibration.calibset import crops_sha256, stratified_sample
from calibration.fit import apply_anomaly_score, calibrated_probs, check_calibration, fit_calibration
from calibration.risk import (aurc, binom_cdf, ltt_threshold, min_cells, plot_risk_coverage,
                              risk_coverage_curve)
from calibration.temperature import (expected_calibration_error, fit_bias_temperature, fit_temperature, nll, reliability_diagram,
                                     softmax)
from edge.errors import CalibrationError

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def overconfident(n: int, k: int = 8, scale: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(true_logits); the model reports scale * true_logits (over-confident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 1.5, (n, k))
    p = softmax(true_logits)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return scale * true_logits, labels


# ---- temperature ----

def test_temperature_scaling_lowers_ece_of_overconfident_logits():
    logits, labels = overconfident(6000, scale=3.0)
    t = fit_temperature(logits, labels)
    assert 2.5 < t < 3.5  # the truth is 3
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, t), labels)
    assert before > 0.1 and after < 0.03 and after < before / 4
    assert nll(logits, labels, t) < nll(logits, labels)
    assert (softmax(logits, t).argmax(1) == softmax(logits).argmax(1)).all()  # scaling never changes the label


def test_bias_temperature_recovers_class_offsets_and_fixes_labels():
    logits, labels = overconfident(8000, scale=2.0, seed=3)
    shift = np.array([1.5, 0, 0, -1.0, 0, 0, 0, 0])  # the model under-reports class 0 and over-reports class 3
    seen = logits - shift * 2.0
    t, b = fit_bias_temperature(seen, labels)
    assert 1.7 < t < 2.3 and abs(b.mean()) < 1e-9
    assert np.abs((b - b.mean()) - (shift - shift.mean())).max() < 0.25  # the offsets come back (in 1/T units)
    fixed = softmax(seen + b * t, t).argmax(1)
    assert (fixed == labels).mean() > (seen.argmax(1) == labels).mean() + 0.01
    assert nll(seen + b * t, labels, t) < nll(seen, labels, fit_temperature(seen, labels))
    # a class with too few cells gets no offset: plain temperature scaling
    few = labels != 5
    few[np.flatnonzero(labels == 5)[:3]] = True
    t2, b2 = fit_bias_temperature(seen[few], labels[few])
    assert np.all(b2 == 0) and t2 == pytest.approx(fit_temperature(seen[few], labels[few]))


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bin (13/15, 14/15]: 2 cells, conf 0.9, acc 0.5; bin of 0.6: conf 0.6 acc 1; bin of 0.7: conf 0.7 acc 1
    expected = (2 * 0.4 + 0.4 + 0.3) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_fit_temperature_rejects_non_finite():
    with pytest.raises(CalibrationError):
        fit_temperature(np.array([[np.nan, 1.0]]), np.array([0]))


# ---- risk ----

def test_binom_cdf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in [(0, 230, 0.01), (3, 500, 0.01), (10, 200, 0.05), (50, 60, 0.9), (0, 1, 0.5), (7, 7, 0.2)]:
        assert binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)


def test_min_cells_is_the_smallest_n_with_zero_errors_certified():
    for alpha, delta in [(0.01, 0.1), (0.005, 0.1), (0.05, 0.05), (0.02, 0.2)]:
        n = min_cells(alpha, delta)
        assert (1 - alpha) ** n <= delta < (1 - alpha) ** (n - 1)
    assert min_cells(0.01, 0.1) == 230


def synthetic_selective(n: int, rng: np.random.Generator):
    """Confidence ~ U(0, 1), P(wrong | c) = 0.3 (1 - c)^2, so R(lam) = P(wrong | c >= lam) = 0.1 (1 - lam)^2."""
    conf = rng.random(n)
    correct = rng.random(n) >= 0.3 * (1 - conf) ** 2
    return conf, correct


def synthetic_calibrated(n: int, rng: np.random.Generator):
    """Calibrated confidence c = 1 - 0.2 U^2, P(wrong | c) = 1 - c, so R(lam) = (1 - lam) / 3 and the
    coverage at lam is sqrt((1 - lam) / 0.2)."""
    conf = 1.0 - 0.2 * rng.random(n) ** 2
    correct = rng.random(n) < conf
    return conf, correct


@pytest.mark.parametrize("case", ["calibrated", "quadratic"])
def test_ltt_keeps_its_guarantee_over_seeds(case):
    alpha, delta, runs = 0.02, 0.1, 200
    make, true_risk = {"calibrated": (synthetic_calibrated, lambda lam: (1 - lam) / 3),
                       "quadratic": (synthetic_selective, lambda lam: 0.1 * (1 - lam) ** 2)}[case]
    violations, coverages = 0, []
    for seed in range(runs):
        conf, correct = make(2000, np.random.default_rng(seed))
        rt = ltt_threshold(conf, correct, alpha, delta)
        violations += np.isfinite(rt.threshold) and true_risk(rt.threshold) > alpha
        coverages.append(rt.coverage)
    assert violations / runs <= delta + 0.03
    if case == "calibrated":  # and not trivially conservative: the best possible coverage is sqrt(0.3) = 0.548
        assert 0.4 < np.mean(coverages) < 0.548 + 0.02


def test_ltt_result_is_consistent_with_the_data():
    conf, correct = synthetic_selective(3000, np.random.default_rng(1))
    rt = ltt_threshold(conf, correct, 0.02, 0.1)
    acc = conf >= rt.threshold
    assert rt.n_accepted == acc.sum() and rt.n_errors == (~correct[acc]).sum()
    assert rt.coverage == pytest.approx(acc.mean()) and rt.risk <= 0.02


def test_ltt_refuses_too_few_cells_naming_the_minimum():
    conf, correct = synthetic_selective(100, np.random.default_rng(0))
    with pytest.raises(CalibrationError, match="need at least 230"):
        ltt_threshold(conf, correct, alpha=0.01, delta=0.1)


def test_ltt_accepts_nothing_when_every_cell_is_wrong():
    rt = ltt_threshold(np.linspace(0.5, 1.0, 500), np.zeros(500, bool), 0.01, 0.1)
    assert rt.threshold == np.inf and rt.coverage == 0.0 and rt.n_accepted == 0


def test_risk_coverage_and_aurc():
    conf = np.linspace(1.0, 0.0, 100)
    correct = np.ones(100, bool)
    correct[-10:] = False  # errors at the lowest confidence: ideal ranking
    cov, risk = risk_coverage_curve(conf, correct)
    assert cov[-1] == 1.0 and risk[89] == 0.0 and risk[-1] == pytest.approx(0.1)
    assert aurc(conf, correct) < aurc(conf, correct[::-1])


# ---- anomaly ----

def test_zeta_higher_for_clear_winner_than_three_way_tie():
    clear = np.array([[1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    tie = np.array([[1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    assert zeta(clear)[0] == pytest.approx(4.0)
    assert zeta(clear)[0] > zeta(tie)[0]
    scores = anomaly_scores(np.vstack([clear, tie]), np.zeros(2))
    assert scores["neg_zeta"][1] > scores["neg_zeta"][0]  # the tie is more anomalous


def test_zeta_uses_at_most_ten_runners_up():
    e = np.concatenate([[0.0], np.ones(10), np.full(5, 100.0)])[None, :]
    assert zeta(e)[0] == pytest.approx(1.0)  # the five far classes are beyond the 10 runners-up


def test_auroc_matches_brute_force_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        normal = rng.integers(0, 6, rng.integers(1, 40)).astype(float)
        abnormal = rng.integers(2, 9, rng.integers(1, 40)).astype(float)
        diff = abnormal[:, None] - normal[None, :]
        brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
        assert auroc(normal, abnormal) == pytest.approx(brute)


def test_conformal_threshold_controls_false_alarms_over_seeds():
    f, rates = 0.02, []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        t = conformal_threshold(rng.normal(size=500), f)
        rates.append((rng.normal(size=2000) >= t).mean())
    assert np.mean(rates) <= f + 0.002  # marginal guarantee: E[false alarm] <= f


def test_conformal_threshold_with_ties_and_refusal():
    assert conformal_threshold(np.zeros(100), 0.02) > 0.0  # a tied normal score is not flagged
    assert min_normal_cells(0.02) == 49
    conformal_threshold(np.arange(49.0), 0.02)
    with pytest.raises(CalibrationError, match="need at least 49"):
        conformal_threshold(np.arange(48.0), 0.02)


def profile_cells(n: int, rng: np.random.Generator, odd: bool = False) -> np.ndarray:
    """Class errors [n, 4] of a 4-class model: the best class at ~2, the runners-up in a fixed pattern per class
    (class c is confused with class c+1: its error there is lower). ``odd`` cells fit their best class just as
    well (same best-error level) but the runner-up pattern is another class's."""
    c = rng.integers(0, 4, n)
    e = 10.0 + rng.normal(0, 0.3, (n, 4))
    e[np.arange(n), (c + (2 if odd else 1)) % 4] = 6.0 + rng.normal(0, 0.3, n)
    e[np.arange(n), c] = 2.0 + rng.normal(0, 0.2, n)
    return e


def test_error_profile_sees_what_the_best_error_cannot():
    rng = np.random.default_rng(0)
    cal, normal, odd = profile_cells(1000, rng), profile_cells(500, rng), profile_cells(500, rng, odd=True)
    prof, stats = fit_profile_stats(cal), fit_best_error_stats(cal)
    s_norm, s_odd = anomaly_scores(normal, np.zeros(500), stats, prof), anomaly_scores(odd, np.zeros(500), stats, prof)
    assert abs(auroc(s_norm["best_error"], s_odd["best_error"]) - 0.5) < 0.1
    assert auroc(s_norm["error_profile"], s_odd["error_profile"]) > 0.95
    assert np.shape(prof["mean"]) == (4, 4) and np.shape(prof["precision"]) == (4, 4, 4)
    # a class predicted too rarely uses the pooled statistics
    rare = cal[cal.argmin(1) != 3]
    rare = np.concatenate([rare, cal[cal.argmin(1) == 3][:5]])
    pooled = fit_profile_stats(rare)
    assert pooled["mean"][3] == pytest.approx(np.log(rare).mean(0).tolist())
    with pytest.raises(CalibrationError, match="at least 30 normal cells"):
        fit_profile_stats(cal[:10])
    with pytest.raises(CalibrationError, match="4 classes x 4 features, the cells have 3 classes x 3"):
        profile_distance(cal[:, :3], prof)


def test_a_profile_per_timestep_sees_what_the_time_average_cannot():
    """Odd cells have the normal errors on average over two timesteps but the other split between them."""
    rng = np.random.default_rng(0)

    def per_t(n: int, odd: bool = False) -> np.ndarray:
        e = profile_cells(n, rng)
        share = 0.7 + rng.normal(0, 0.03, (n, 4))  # the t = 0 part of twice the mean, per class
        share = 1.0 - share if odd else share
        return np.stack([e * 2 * share, e * 2 * (1 - share)], axis=2)  # [n, K, T]; mean over T = e

    cal, normal, odd = per_t(1000), per_t(500), per_t(500, odd=True)
    flat = lambda e: e.reshape(len(e), -1)  # noqa: E731
    averaged = fit_profile_stats(cal.mean(2))
    timed = fit_profile_stats(cal.mean(2), flat(cal))
    assert np.shape(timed["mean"]) == (4, 8) and np.shape(timed["precision"]) == (4, 8, 8)
    assert abs(auroc(profile_distance(normal.mean(2), averaged), profile_distance(odd.mean(2), averaged)) - 0.5) < 0.1
    assert auroc(profile_distance(normal.mean(2), timed, flat(normal)),
                 profile_distance(odd.mean(2), timed, flat(odd))) > 0.95
    out_of_fold = crossfit_profile_distance(cal.mean(2), profile=flat(cal))
    assert out_of_fold.shape == (1000,) and np.median(out_of_fold) > np.median(profile_distance(cal.mean(2), timed, flat(cal)))
    with pytest.raises(CalibrationError, match="profile has 10 rows for 1000 cells"):
        fit_profile_stats(cal.mean(2), flat(cal)[:10])


def test_crossfitted_profile_threshold_keeps_the_false_alarm_rate():
    """The threshold from out-of-fold distances holds on new normal cells; from in-sample distances it does not."""
    cross, insample = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        cal, fresh = profile_cells(300, rng), profile_cells(4000, rng)
        d_new = profile_distance(fresh, fit_profile_stats(cal))
        cross.append((d_new >= conformal_threshold(crossfit_profile_distance(cal, seed=seed), 0.02)).mean())
        insample.append((d_new >= conformal_threshold(profile_distance(cal, fit_profile_stats(cal)), 0.02)).mean())
    assert np.mean(cross) <= 0.03 and np.mean(insample) > np.mean(cross)


def test_best_error_level_standardises_per_predicted_class():
    rng = np.random.default_rng(0)
    errors = rng.normal(10.0, 1.0, (400, 3))
    errors[np.arange(400), rng.integers(0, 3, 400)] = rng.normal(2.0, 0.5, 400)
    stats = fit_best_error_stats(errors)
    assert np.allclose(stats["mean"], 2.0, atol=0.15) and np.allclose(stats["std"], 0.5, atol=0.1)
    level = best_error_level(np.array([[2.0, 10, 10], [6.0, 10, 10]]), stats)
    assert abs(level[0]) < 0.5 and level[1] > 5


# ---- calibration sets ----

def test_stratified_sample_is_proportional_seeded_and_covers_classes():
    labels = np.repeat(np.arange(4), [600, 300, 95, 5])
    idx = stratified_sample(labels, 100, seed=3)
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    assert np.array_equal(idx, stratified_sample(labels, 100, seed=3))
    assert not np.array_equal(idx, stratified_sample(labels, 100, seed=4))
    counts = np.bincount(labels[idx], minlength=4)
    assert counts[3] >= 1 and abs(counts[0] - 60) <= 1 and abs(counts[1] - 30) <= 1
    assert np.array_equal(stratified_sample(labels, 5000), np.arange(len(labels)))


def test_crops_sha256_identifies_the_crops():
    crops = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    h = crops_sha256(crops)
    assert h == crops_sha256(crops.copy()) and len(h) == 64
    changed = crops.copy()
    changed[2, 3, 3, 1] ^= 1
    assert crops_sha256(changed) != h
    with pytest.raises(CalibrationError):
        crops_sha256(crops.astype(np.float32))


# ---- fit ----

def synthetic_engine(n: int, seed: int = 0):
    """Over-confident 8-class logits and errors consistent with them (errors = -logits / 4 + noise)."""
    logits, labels = overconfident(n, scale=3.0, seed=seed)
    logits = logits + 6.0 * np.eye(8)[labels]  # a good classifier: the true class mostly wins
    rng = np.random.default_rng(seed + 1)
    errors = 5.0 - logits / 4 + rng.normal(0, 0.1, logits.shape)
    return logits.astype(np.float32), errors.astype(np.float32), (-zeta(errors)).astype(np.float32), labels


def test_fit_calibration_writes_a_complete_json_ready_dict():
    logits, errors, anomaly, labels = synthetic_engine(3000)
    logits[5, 2] = np.nan  # a broken cell is left out and counted
    cal = fit_calibration(logits, errors, anomaly, labels, CLASSES, calibset_sha256="ab" * 32)
    json.dumps(cal, allow_nan=False)
    check_calibration(cal, CLASSES)
    for key in ("format", "temperature", "review_threshold", "alpha", "delta", "anomaly_threshold", "anomaly_score",
                "false_alarm", "n_cells", "calibset_sha256"):
        assert key in cal
    m = cal["metrics"]
    assert cal["n_cells"] == 3000 and m["n_nonfinite"] == 1
    assert m["ece_after"] < m["ece_before"] and m["risk_accepted"] <= 0.01 and 0 < m["coverage"] <= 1
    assert 0 < cal["review_threshold"] < 1 and cal["temperature"] > 1
    # the apply functions reproduce the fit
    probs = calibrated_probs(logits[:5], cal)
    t, b = cal["temperature"], np.array(cal["class_bias"])
    assert len(b) == 8 and np.allclose(probs, softmax(logits[:5] / t + b))
    old = {k: v for k, v in cal.items() if k != "class_bias"}  # calibrations written before class_bias existed
    assert np.allclose(calibrated_probs(logits[:5], old), softmax(logits[:5], t))
    plain = fit_calibration(logits, errors, anomaly, labels, CLASSES, class_bias=False)
    assert plain["class_bias"] == [0.0] * 8 and plain["metrics"]["accuracy"] == plain["metrics"]["accuracy_before"]
    assert np.allclose(apply_anomaly_score(errors, anomaly, cal), anomaly)


@pytest.mark.parametrize("name", ["neg_zeta", "best_error", "error_profile"])
def test_fit_calibration_with_computed_anomaly_scores(name):
    logits, errors, anomaly, labels = synthetic_engine(1000)
    cal = fit_calibration(logits, errors, anomaly, labels, CLASSES, alpha=0.05, anomaly_score=name)
    score = apply_anomaly_score(errors, anomaly, cal)
    assert (score >= cal["anomaly_threshold"]).mean() <= 0.02 + 1e-9
    json.dumps(cal, allow_nan=False)
    check_calibration(cal, CLASSES)
    if name == "error_profile":
        with pytest.raises(CalibrationError, match="error_profile_stats are not for 8 classes"):
            check_calibration({k: v for k, v in cal.items() if k != "error_profile_stats"}, CLASSES)


def test_fit_calibration_refusals():
    logits, errors, anomaly, labels = synthetic_engine(3000)
    with pytest.raises(CalibrationError, match="need at least 230"):
        fit_calibration(logits[:100], errors[:100], anomaly[:100], labels[:100], CLASSES)
    with pytest.raises(CalibrationError, match="need at least 49"):
        fit_calibration(logits[:40], errors[:40], anomaly[:40], labels[:40], CLASSES, alpha=0.2)
    with pytest.raises(CalibrationError, match="unknown anomaly score"):
        fit_calibration(logits, errors, anomaly, labels, CLASSES, anomaly_score="magic")
    with pytest.raises(CalibrationError, match="labels"):
        fit_calibration(logits, errors, anomaly, labels + 1, CLASSES)
    with pytest.raises(CalibrationError, match="no confidence threshold"):
        fit_calibration(logits, errors, anomaly, (labels + 1) % 8, CLASSES)


def test_check_calibration_refuses_other_classes_and_formats():
    logits, errors, anomaly, labels = synthetic_engine(1000)
    cal = fit_calibration(logits, errors, anomaly, labels, CLASSES, alpha=0.05)
    for bad in ([0.0] * 7, [0.0] * 7 + [float("nan")]):
        with pytest.raises(CalibrationError, match="class_bias must hold 8 finite numbers"):
            check_calibration({**cal, "class_bias": bad}, CLASSES)
    logits, errors, anomaly, labels = synthetic_engine(1000)
    cal = fit_calibration(logits, errors, anomaly, labels, CLASSES, alpha=0.05)
    with pytest.raises(CalibrationError, match="differ"):
        check_calibration(cal, CLASSES[::-1])
    with pytest.raises(CalibrationError, match="format"):
        check_calibration({**cal, "format": 2}, CLASSES)


# ---- plots and imports ----

def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    logits, labels = overconfident(500)
    conf, correct = synthetic_selective(500, np.random.default_rng(0))
    paths = [
        reliability_diagram({"before": softmax(logits), "after": softmax(logits, 3.0)}, labels, tmp_path / "rel.png"),
        plot_risk_coverage(conf, correct, tmp_path / "rc.png", marks={"alpha 2%": (0.4, 0.015)}),
        score_histograms(np.random.default_rng(0).normal(size=300), {"held-out": np.ones(50)}, tmp_path / "h.png", 1.5),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_and_postprocess_import_neither_torch_nor_matplotlib():
    code = ("import sys, calibration.fit, calibration.calibset, edge.postprocess; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
