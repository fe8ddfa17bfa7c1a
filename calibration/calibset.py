"""Calibration sets: a seeded, stratified sample of cells and the hash that identifies it.

The same sample feeds INT8 quantization (export) and can feed the calibration fit; its sha256 goes into
the bundle so that a calibration can be traced to the exact crops it saw.
"""
from __future__ import annotations

import hashlib

import numpy as np

from edge.errors import CalibrationError


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0, min_per_class: int = 1) -> np.ndarray:
    """Pick ``n`` of the cells with int labels [N], each class in proportion to its count (largest remainder),
    but at least ``min_per_class`` of every class that has that many. Returns sorted int64 indices; the same
    seed gives the same sample. n >= N returns every index."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise CalibrationError(f"stratified_sample needs labels [N] with N > 0, got shape {labels.shape}")
    if n < 1:
        raise CalibrationError(f"stratified_sample: n must be >= 1, got {n}")
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    floor = np.minimum(counts, min_per_class)
    if floor.sum() > n:
        raise CalibrationError(f"stratified_sample: n={n} cannot hold {min_per_class} cell(s) of each of {len(classes)} classes")
    quota = n * counts / counts.sum()
    take = np.clip(np.floor(quota).astype(np.int64), floor, counts)
    while take.sum() > n:  # the minimums pushed us over: trim the classes furthest above their quota
        i = int(np.argmax(np.where(take > floor, take - quota, -np.inf)))
        take[i] -= 1
    while take.sum() < n:  # hand out the rest by largest remainder, where cells remain
        i = int(np.argmax(np.where(take < counts, quota - take, -np.inf)))
        take[i] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=int(t), replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked).astype(np.int64))


def crops_sha256(crops: np.ndarray) -> str:
    """sha256 (hex) over uint8 crops [N, S, S, 3] (or [N, 3, S, S]), their shape included, in the given order."""
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4:
        raise CalibrationError(f"crops_sha256 expects uint8 [N, S, S, 3], got {crops.dtype} {crops.shape}")
    h = hashlib.sha256(("uint8" + str(tuple(crops.shape))).encode())
    h.update(np.ascontiguousarray(crops).tobytes())
    return h.hexdigest()
