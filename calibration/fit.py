"""Fit a bundle's calibration.json from engine outputs on labelled calibration cells, and apply it.

Fit (numpy only): temperature, optionally with per-class offsets (BCTS, calibration.temperature), review
threshold with a risk guarantee (calibration.risk), anomaly threshold at a false-alarm rate (calibration.anomaly). Apply: the functions
at the bottom turn one batch of engine outputs into calibrated probabilities and the chosen anomaly
score; edge/postprocess.py uses them so the runtime and the fit can never disagree.
"""
from __future__ import annotations

import numpy as np

from calibration.anomaly import (ANOMALY_SCORES, anomaly_scores, best_error_level, conformal_threshold,
                                 crossfit_profile_distance, fit_best_error_stats, fit_profile_stats, min_normal_cells,
                                 profile_distance, zeta)
from calibration.risk import aurc, ltt_threshold, min_cells
from calibration.temperature import expected_calibration_error, fit_bias_temperature, fit_temperature, nll, softmax
from edge.errors import CalibrationError

FORMAT = 1
REQUIRED_KEYS = ("format", "classes", "temperature", "review_threshold", "anomaly_threshold", "anomaly_score")


def fit_calibration(logits: np.ndarray, errors: np.ndarray, anomaly: np.ndarray, labels: np.ndarray,
                    classes: list[str], alpha: float = 0.01, delta: float = 0.1, false_alarm: float = 0.02,
                    anomaly_score: str = "engine", calibset_sha256: str | None = None, class_bias: bool = False) -> dict:
    """Engine outputs on labelled normal cells -> the calibration.json dict (JSON-ready, format 1).

    logits, errors: float [N, K]; anomaly: float [N] (the engine's score, higher = more anomalous);
    labels: int [N] indices into ``classes`` (K names). Cells with a non-finite output are left out of the
    fit (the runtime never accepts them) and counted in metrics["n_nonfinite"]. The temperature (and, with
    ``class_bias``, one offset per class: BCTS) and both thresholds are fitted on the same cells. class_bias is
    off by default: on the session-2 engine it raised validation accuracy by 0.8 points, on the session-3 engine
    it lowered balanced accuracy by 0.7 points (benchmarks/uncertainty.py --class-bias measures it). Raises
    CalibrationError when there are too few cells (the message names the minimum), when labels or shapes do not
    match, or when no threshold can be certified.
    """
    logits, errors = np.asarray(logits, np.float64), np.asarray(errors, np.float64)
    anomaly, labels = np.asarray(anomaly, np.float64), np.asarray(labels, np.int64)
    n, k = len(labels), len(classes)
    if logits.shape != (n, k) or errors.shape != (n, k) or anomaly.shape != (n,):
        raise CalibrationError(f"expected logits and errors [{n}, {k}] and anomaly [{n}], got "
                               f"{logits.shape}, {errors.shape}, {anomaly.shape}")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise CalibrationError(f"labels must be indices into the {k} classes, got range {labels.min()}..{labels.max()}")
    if anomaly_score not in ANOMALY_SCORES:
        raise CalibrationError(f"unknown anomaly score {anomaly_score!r} (known: {', '.join(ANOMALY_SCORES)})")
    finite = np.isfinite(logits).all(1) & np.isfinite(errors).all(1) & np.isfinite(anomaly)
    need = max(min_cells(alpha, delta), min_normal_cells(false_alarm))
    if finite.sum() < need:
        raise CalibrationError(f"too few calibration cells for alpha={alpha:g}, delta={delta:g}, false alarm "
                               f"{false_alarm:g}: got {int(finite.sum())} usable, need at least {need}")
    lg, er, an, y = logits[finite], errors[finite], anomaly[finite], labels[finite]

    if class_bias:
        temperature, bias = fit_bias_temperature(lg, y)
    else:
        temperature, bias = fit_temperature(lg, y), np.zeros(k)
    p0, p1 = softmax(lg), softmax(lg + bias * temperature, temperature)
    conf, correct = p1.max(1), p1.argmax(1) == y
    rt = ltt_threshold(conf, correct, alpha, delta)
    if not np.isfinite(rt.threshold):
        raise CalibrationError(f"no confidence threshold keeps the error among accepted cells <= {alpha:g} with "
                               f"probability {1 - delta:g} on these {rt.n_cells} cells (even the most confident "
                               f"ones hold too many errors); use more cells or a larger alpha")

    stats = fit_best_error_stats(er)
    profile = fit_profile_stats(er) if anomaly_score == "error_profile" else None
    # error_profile: the threshold comes from out-of-fold distances (in-sample ones are too small)
    score = crossfit_profile_distance(er) if profile else anomaly_scores(er, an, stats)[anomaly_score]
    a_thr = conformal_threshold(score, false_alarm)
    return {
        "format": FORMAT,
        "classes": list(classes),
        "temperature": temperature,
        "class_bias": [float(v) for v in bias],
        "review_threshold": rt.threshold,
        "alpha": alpha,
        "delta": delta,
        "anomaly_threshold": a_thr,
        "anomaly_score": anomaly_score,
        "best_error_stats": stats,
        **({"error_profile_stats": profile} if profile else {}),
        "false_alarm": false_alarm,
        "n_cells": int(n),
        "calibset_sha256": calibset_sha256,
        "metrics": {
            "accuracy": float(correct.mean()),
            "accuracy_before": float((lg.argmax(1) == y).mean()),
            "ece_before": expected_calibration_error(p0, y),
            "ece_after": expected_calibration_error(p1, y),
            "nll_before": nll(lg, y),
            "nll_after": nll(lg + bias * temperature, y, temperature),
            "coverage": rt.n_accepted / n,
            "risk_accepted": rt.risk,
            "n_accepted": rt.n_accepted,
            "n_errors_accepted": rt.n_errors,
            "aurc": aurc(conf, correct),
            "min_cells": rt.min_cells,
            "anomaly_false_alarm": float((score >= a_thr).mean()),
            "n_nonfinite": int(n - finite.sum()),
        },
    }


def check_calibration(calibration: dict, classes: list[str]) -> None:
    """Raise CalibrationError unless ``calibration`` is a format-1 calibration for exactly ``classes``."""
    missing = [key for key in REQUIRED_KEYS if key not in calibration]
    if missing:
        raise CalibrationError(f"calibration is missing {', '.join(missing)}")
    if calibration["format"] != FORMAT:
        raise CalibrationError(f"calibration format {calibration['format']!r} is not supported (this runtime reads {FORMAT})")
    if list(calibration["classes"]) != list(classes):
        raise CalibrationError(f"calibration classes {calibration['classes']} differ from the model's {list(classes)}")
    if calibration["anomaly_score"] not in ANOMALY_SCORES:
        raise CalibrationError(f"calibration names unknown anomaly score {calibration['anomaly_score']!r}")
    if calibration["anomaly_score"] == "best_error" and "best_error_stats" not in calibration:
        raise CalibrationError("calibration uses best_error but has no best_error_stats")
    if calibration["anomaly_score"] == "error_profile":
        prof = calibration.get("error_profile_stats") or {}
        k = len(classes)
        if np.shape(prof.get("mean")) != (k, k) or np.shape(prof.get("precision")) != (k, k, k):
            raise CalibrationError(f"calibration uses error_profile but its error_profile_stats are not for {k} classes")
    if not float(calibration["temperature"]) > 0:
        raise CalibrationError(f"calibration temperature must be > 0, got {calibration['temperature']}")
    bias = calibration.get("class_bias")
    if bias is not None and (len(bias) != len(classes) or not np.isfinite(np.asarray(bias, np.float64)).all()):
        raise CalibrationError(f"calibration class_bias must hold {len(classes)} finite numbers, got {bias}")


def calibrated_probs(logits: np.ndarray, calibration: dict | None) -> np.ndarray:
    """float [N, K] logits -> float64 [N, K] softmax(logits / T + b), T = 1 and b = 0 without calibration (b: the
    calibration's class_bias, 0 in calibrations made before it existed). Finite rows only."""
    if calibration is None:
        return softmax(logits)
    t = float(calibration["temperature"])
    bias = np.asarray(calibration.get("class_bias") or np.zeros(np.shape(logits)[1]), np.float64)
    return softmax(np.asarray(logits, np.float64) + bias * t, t)


def apply_anomaly_score(errors: np.ndarray, anomaly: np.ndarray, calibration: dict | None) -> np.ndarray:
    """The calibration's chosen anomaly score, float64 [N] (the engine's own without calibration)."""
    name = "engine" if calibration is None else calibration["anomaly_score"]
    if name == "engine":
        return np.asarray(anomaly, np.float64)
    if name == "neg_zeta":
        return -zeta(errors)
    if name == "error_profile":
        return profile_distance(errors, calibration["error_profile_stats"])
    return best_error_level(errors, calibration["best_error_stats"])
