"""Inference backends behind one small interface, chosen explicitly by name; never a silent fallback.

``load_backend(name, bundle, precision=None, **options) -> Backend``. A backend module ``edge.backends.<name>``
defines ``load(bundle, precision, **options) -> Backend``; it is imported only when asked for, so that the
GPU stack (tensorrt, pycuda) is never imported on a CPU box. A backend that cannot be loaded raises
BackendError with the original error chained (``raise ... from exc``), never another backend or precision.

A Backend has ``name`` (str), ``precision`` (str), ``evals_per_cell`` (int) and
``infer(cells uint8 [N, 3, S, S] RGB) -> {"logits": float32 [N, K], "errors": float32 [N, K],
"anomaly": float32 [N]}`` for any N >= 1.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from edge.errors import BackendError, InputError

BACKENDS = ("onnxruntime", "tensorrt")
OUTPUTS = ("logits", "errors", "anomaly")


class Backend(Protocol):
    name: str
    precision: str
    evals_per_cell: int

    def infer(self, cells: np.ndarray) -> dict[str, np.ndarray]: ...


def check_cells(cells: np.ndarray, crop_size: int) -> np.ndarray:
    """Validate a batch for infer: uint8 [N, 3, S, S] with N >= 1 and S = crop_size -> C-contiguous array."""
    if not isinstance(cells, np.ndarray):
        raise InputError(f"cells must be a numpy array, got {type(cells).__name__}")
    if cells.dtype != np.uint8:
        raise InputError(f"cells must be uint8 RGB, got dtype {cells.dtype}")
    if cells.ndim != 4 or cells.shape[1] != 3 or cells.shape[2:] != (crop_size, crop_size):
        raise InputError(f"cells must be [N, 3, {crop_size}, {crop_size}] (NCHW RGB), got shape {cells.shape}")
    if cells.shape[0] < 1:
        raise InputError("cells batch is empty (N = 0)")
    return np.ascontiguousarray(cells)


def load_backend(name: str, bundle, precision: str | None = None, **options) -> Backend:
    """The backend ``name`` ("onnxruntime" | "tensorrt") running ``bundle``'s engine at ``precision``
    (None = the bundle's default). options go to the backend (e.g. intra_op_num_threads, max_batch)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    try:
        module = importlib.import_module(f"edge.backends.{name}")
    except ImportError as exc:
        raise BackendError(f"backend {name!r} is not available here: {exc}") from exc
    try:
        return module.load(bundle, precision, **options)
    except ImportError as exc:  # a lazily imported dependency (tensorrt, pycuda) is missing
        raise BackendError(f"backend {name!r} is not available here: {exc}") from exc
