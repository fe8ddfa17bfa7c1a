"""edge/postprocess.decide: calibrated probabilities and accepted / review / abnormal, cell by cell."""
from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.fit import fit_calibration
from calibration.temperature import softmax
from edge.errors import BackendError, CalibrationError
from edge.postprocess import decide

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
CAL = {"format": 1, "classes": CLASSES, "temperature": 2.0, "review_threshold": 0.9, "alpha": 0.01, "delta": 0.1,
       "anomaly_threshold": 1.5, "anomaly_score": "engine", "false_alarm": 0.02, "n_cells": 1000,
       "calibset_sha256": None, "metrics": {}}


def outputs(logits, anomaly, errors=None):
    logits = np.asarray(logits, np.float32)
    errors = -logits if errors is None else np.asarray(errors, np.float32)
    return {"logits": logits, "errors": errors, "anomaly": np.asarray(anomaly, np.float32)}


def row(winner: int, margin: float) -> list[float]:
    r = [0.0] * 8
    r[winner] = margin
    return r


def test_states_and_calibrated_probs():
    out = outputs([row(6, 20.0), row(2, 4.0), row(1, 20.0), row(3, 1.0)], [0.0, 0.0, 3.0, 2.0])
    d = decide(out, CLASSES, CAL)
    assert [c.state for c in d] == ["accepted", "review", "abnormal", "abnormal"]  # abnormal wins over review
    assert d[0].label == "neutrophil" and d[0].reason == "" and d[1].reason.startswith("confidence")
    assert "anomaly" in d[2].reason and d[3].anomaly == pytest.approx(2.0)
    expected = softmax(out["logits"], 2.0)
    for c, p in zip(d, expected):
        assert np.allclose([c.probs[k] for k in CLASSES], p) and c.p == pytest.approx(p.max())
        assert c.p == c.probs[c.label] and sum(c.probs.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("field,value", [("logits", np.nan), ("logits", np.inf), ("logits", -np.inf),
                                         ("errors", np.nan), ("errors", np.inf), ("anomaly", np.nan)])
def test_non_finite_output_goes_to_review_and_leaves_other_cells_alone(field, value):
    good = outputs([row(6, 20.0), row(0, 20.0), row(4, 20.0)], [0.0, 0.0, 0.0])
    bad = {k: v.copy() for k, v in good.items()}
    if field == "anomaly":
        bad["anomaly"][1] = value
    else:
        bad[field][1, 3] = value
    d_good, d_bad = decide(good, CLASSES, CAL), decide(bad, CLASSES, CAL)
    assert d_bad[1].state == "review" and d_bad[1].reason == "non-finite model output"
    assert np.isfinite(d_bad[1].p) and np.isfinite(d_bad[1].anomaly)
    assert sum(d_bad[1].probs.values()) == pytest.approx(1.0)
    json.dumps([c.probs for c in d_bad], allow_nan=False)
    assert d_bad[0] == d_good[0] and d_bad[2] == d_good[2] and d_good[1].state == "accepted"


def test_all_nan_cell_even_with_huge_anomaly_is_never_accepted_nor_abnormal():
    d = decide(outputs([[np.nan] * 8], [100.0]), CLASSES, CAL)[0]
    assert d.state == "review" and d.p == pytest.approx(1 / 8)


def test_uncalibrated_bundle_sends_everything_to_review_at_temperature_one():
    out = outputs([row(6, 20.0), row(1, 1.0)], [0.0, 9.0])
    d = decide(out, CLASSES, None)
    assert all(c.state == "review" and c.reason == "uncalibrated bundle" for c in d)
    assert d[1].p == pytest.approx(softmax(out["logits"])[1].max())


def test_bad_shapes_and_mismatched_calibration_raise():
    with pytest.raises(BackendError):
        decide(outputs([[0.0] * 7], [0.0]), CLASSES, CAL)
    with pytest.raises(BackendError):
        decide({"logits": np.zeros((1, 8))}, CLASSES, CAL)
    with pytest.raises(CalibrationError):
        decide(outputs([row(0, 1.0)], [0.0]), CLASSES[::-1], {**CAL, "classes": CLASSES})


def test_empty_batch():
    assert decide(outputs(np.zeros((0, 8)), np.zeros(0)), CLASSES, CAL) == []


def test_decide_applies_a_fitted_calibration_with_a_computed_anomaly_score():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 2000)
    logits = rng.normal(0, 1, (2000, 8)) + 8.0 * np.eye(8)[labels]
    errors = 5.0 - logits / 4
    cal = fit_calibration(logits, errors, np.zeros(2000), labels, CLASSES, alpha=0.02, anomaly_score="neg_zeta")
    tie = np.full(8, 5.0)
    tie[:3] = 1.0  # three classes fit equally well: a high -zeta
    d = decide({"logits": logits[:5], "errors": errors[:5], "anomaly": np.zeros(5)}, CLASSES, cal)
    assert [c.label for c in d] == [CLASSES[i] for i in labels[:5]]
    assert all(c.state == "accepted" for c in d)
    odd = decide({"logits": np.zeros((1, 8)), "errors": tie[None], "anomaly": np.zeros(1)}, CLASSES, cal)[0]
    assert odd.state == "abnormal" and odd.anomaly >= cal["anomaly_threshold"]


def test_tiny_bundle_outputs_through_decide(request):
    """The engine's real outputs on a random-weight bundle go through decide without error."""
    try:
        bundle_dir = request.getfixturevalue("tiny_bundle")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py does not provide the tiny_bundle fixture yet")
    from edge.backends import load_backend
    from edge.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    backend = load_backend("onnxruntime", bundle)
    cells = np.random.default_rng(0).integers(0, 256, (3, 3, bundle.crop_size, bundle.crop_size), dtype=np.uint8)
    d = decide(backend.infer(cells), bundle.classes, bundle.calibration)
    assert len(d) == 3 and all(c.state in ("accepted", "review", "abnormal") for c in d)
    if bundle.calibration is None:
        assert all(c.state == "review" for c in d)
