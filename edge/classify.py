"""Classify cell images: files -> preprocessed crops -> engine (or teacher) -> calibrated decisions.

Used by ``cytoedge classify``; the engine path needs no torch, the teacher path imports export lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edge.errors import CytoEdgeError
from edge.imageio import read_image
from edge.postprocess import decide
from edge.preprocess import normalise_cell


@dataclass(frozen=True)
class ImageResult:
    """One line of classify's JSONL: ``record`` is the contract-1 object (with "error" when it failed)."""

    record: dict
    ok: bool


def _load_batch(paths: list[Path], size: int) -> tuple[list[tuple[Path, str]], list[tuple[Path, np.ndarray, bool]]]:
    bad, good = [], []
    for p in paths:
        try:
            c = normalise_cell(read_image(p), size=size)
            good.append((p, c.crop.transpose(2, 0, 1), c.found))
        except CytoEdgeError as exc:
            bad.append((p, str(exc)))
    return bad, good


def teacher_outputs(teacher, cells: np.ndarray, cfg=None) -> tuple[dict, np.ndarray]:
    """Full diffusion classification of uint8 [N, 3, S, S] -> (outputs dict like Backend.infer, evals int [N])."""
    from export.diffusion_classifier import ClassifierConfig, classify_cells

    res = classify_cells(teacher, cells, cfg or ClassifierConfig())
    errors = np.stack([r.errors for r in res]).astype(np.float32)
    scale = float(teacher.meta.get("logit_scale", 100.0))
    out = {"logits": -errors * scale, "errors": errors, "anomaly": np.array([-r.zeta for r in res], np.float32) * scale}
    return out, np.array([r.evals for r in res])


def classify_paths(paths: list[Path], bundle, backend=None, teacher=None, batch: int = 32) -> Iterator[ImageResult]:
    """Yield one ImageResult per path, in order of batches; unreadable images give an "error" record.

    Exactly one of ``backend`` (engine) or ``teacher`` (export.teacher.Teacher) is used.
    """
    calibration = bundle.calibration
    if teacher is not None:
        calibration = (bundle.calibration or {}).get("teacher")
    for start in range(0, len(paths), batch):
        bad, good = _load_batch(paths[start:start + batch], bundle.crop_size)
        for p, msg in bad:
            yield ImageResult({"path": str(p), "error": msg}, ok=False)
        if not good:
            continue
        cells = np.stack([g[1] for g in good])
        if teacher is not None:
            outputs, evals = teacher_outputs(teacher, cells)
        else:
            outputs = backend.infer(cells)
            evals = np.full(len(good), backend.evals_per_cell)
        for (p, _, found), d, ev in zip(good, decide(outputs, bundle.classes, calibration), evals):
            rec = {"path": str(p), "label": d.label, "probs": {k: round(v, 5) for k, v in d.probs.items()},
                   "state": d.state, "anomaly": round(d.anomaly, 5), "evals": int(ev), "cell_found": bool(found)}
            if d.reason:
                rec["reason"] = d.reason
            yield ImageResult(rec, ok=True)
