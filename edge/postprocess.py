"""Engine outputs -> one decision per cell: calibrated probabilities, accepted / review / abnormal.

Rules, per cell and independent of the other cells in the batch:
1. A NaN or inf in the cell's logits, errors or anomaly -> "review" ("non-finite model output"); never accepted.
2. No calibration in the bundle -> "review" ("uncalibrated bundle"): nothing is accepted blindly.
3. anomaly score >= the calibrated anomaly threshold -> "abnormal" (abnormal wins over review).
4. calibrated max probability < the review threshold -> "review".
5. Otherwise "accepted".
The probabilities are softmax(logits / T) with the bundle's temperature (T = 1 without calibration).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.fit import apply_anomaly_score, calibrated_probs, check_calibration
from edge.errors import BackendError

STATES = ("accepted", "review", "abnormal")


@dataclass(frozen=True)
class CellDecision:
    """label: predicted class; p: its calibrated probability; probs: class -> calibrated probability;
    state: "accepted" | "review" | "abnormal"; anomaly: the calibration's anomaly score, higher = more
    anomalous (0.0 when the model output was not finite); reason: why not accepted ("" when accepted)."""

    label: str
    p: float
    probs: dict[str, float]
    state: str
    anomaly: float
    reason: str


def _fallback_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities for rows with non-finite logits: softmax over the finite entries, uniform if none."""
    z = np.where(np.isfinite(logits), logits / temperature, -np.inf)
    out = np.full(z.shape, 1.0 / z.shape[1])
    ok = np.isfinite(z).any(axis=1)
    if ok.any():
        e = np.exp(z[ok] - z[ok].max(axis=1, keepdims=True))
        out[ok] = e / e.sum(axis=1, keepdims=True)
    return out


def decide(outputs: dict, classes: list[str], calibration: dict | None) -> list[CellDecision]:
    """outputs: {"logits": float [N, K], "errors": float [N, K], "anomaly": float [N]} from Backend.infer;
    classes: the K class names; calibration: the bundle's parsed calibration.json or None -> N decisions."""
    try:
        logits = np.asarray(outputs["logits"], np.float64)
        errors = np.asarray(outputs["errors"], np.float64)
        anomaly = np.asarray(outputs["anomaly"], np.float64)
    except KeyError as exc:
        raise BackendError(f"engine outputs lack {exc.args[0]!r} (have: {', '.join(outputs)})") from exc
    n, k = len(logits), len(classes)
    if logits.shape != (n, k) or errors.shape != (n, k) or anomaly.shape != (n,):
        raise BackendError(f"engine outputs for {k} classes must be logits and errors [N, {k}] and anomaly [N], "
                           f"got {logits.shape}, {errors.shape}, {anomaly.shape}")
    if calibration is not None:
        check_calibration(calibration, classes)
    temperature = 1.0 if calibration is None else float(calibration["temperature"])

    finite = np.isfinite(logits).all(1) & np.isfinite(errors).all(1) & np.isfinite(anomaly)
    probs = np.empty((n, k))
    probs[finite] = calibrated_probs(logits[finite], calibration)
    probs[~finite] = _fallback_probs(logits[~finite], temperature)
    score = np.zeros(n)
    score[finite] = apply_anomaly_score(errors[finite], anomaly[finite], calibration)
    pred = probs.argmax(axis=1)

    decisions = []
    for i in range(n):
        p = float(probs[i, pred[i]])
        if not finite[i]:
            state, reason = "review", "non-finite model output"
        elif calibration is None:
            state, reason = "review", "uncalibrated bundle"
        elif score[i] >= calibration["anomaly_threshold"]:
            state, reason = "abnormal", f"anomaly {score[i]:.3g} >= threshold {calibration['anomaly_threshold']:.3g}"
        elif p < calibration["review_threshold"]:
            state, reason = "review", f"confidence {p:.3f} < review threshold {calibration['review_threshold']:.4g}"
        else:
            state, reason = "accepted", ""
        decisions.append(CellDecision(label=classes[pred[i]], p=p, probs=dict(zip(classes, map(float, probs[i]))),
                                      state=state, anomaly=float(score[i]), reason=reason))
    return decisions
