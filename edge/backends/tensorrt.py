"""TensorRT backend: runs a bundle's TensorRT plan with pycuda (page-locked host buffers, one CUDA stream,
async copies), chunking batches larger than the plan's optimisation profile.

A plan only runs on the GPU and the TensorRT version it was built for. Plans in a bundle are named
``engine_<precision>.sm<major><minor>.trt<TensorRT major>.plan`` (e.g. ``engine_fp16.sm87.trt10.plan``)
and each has a JSON sidecar ``<plan>.json``: {"gpu", "compute_capability", "tensorrt", "precision",
"onnx_file", "onnx_sha256", "profile", "built"}. The backend refuses a plan whose sidecar names another GPU,
compute capability, TensorRT version or precision than the one asked for, or whose ONNX is not the one in
the bundle: a clear BackendError, never a fallback. ``export/tensorrt_build.py`` writes plans and sidecars.

tensorrt and pycuda are imported only inside ``gpu_runtime``, so the helpers above it are pure and run
(and are tested) on machines without a GPU.
"""
from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge.backends import OUTPUTS, check_cells
from edge.bundle import PRECISIONS
from edge.errors import BackendError

DEFAULT_PRECISION = "fp16"  # what a GPU runs when no precision is named
INPUT = "cells"
IDENTITY_KEYS = ("gpu", "compute_capability", "tensorrt")
SIDECAR_KEYS = IDENTITY_KEYS + ("precision", "onnx_file", "onnx_sha256", "profile", "built")


# ---- pure helpers (no tensorrt, no pycuda) -----------------------------------------------------------------

def parse_version(text: str) -> tuple:
    """A version as a tuple to compare: "10.3.0.26" -> (10, 3, 0, 26); "8.7" -> (8, 7);
    "10.7.0.post1" -> (10, 7, 0, ".post1").

    Raises BackendError when ``text`` does not start with a number."""
    m = re.fullmatch(r"(\d+(?:\.\d+)*)(.*)", str(text).strip())
    if not m:
        raise BackendError(f"not a version number: {text!r}")
    return tuple(int(p) for p in m.group(1).split(".")) + ((m.group(2),) if m.group(2) else ())


def plan_name(precision: str, compute_capability: str, tensorrt_version: str) -> str:
    """File name of a plan: ("fp16", "8.7", "10.3.0") -> "engine_fp16.sm87.trt10.plan"."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown TensorRT precision {precision!r} (known: {', '.join(PRECISIONS)})")
    cc = parse_version(compute_capability)
    if len(cc) != 2:
        raise BackendError(f"compute capability must be MAJOR.MINOR, got {compute_capability!r}")
    return f"engine_{precision}.sm{cc[0]}{cc[1]}.trt{parse_version(tensorrt_version)[0]}.plan"


def sidecar_name(plan: str) -> str:
    """The JSON sidecar next to a plan: "engine_fp16.sm87.trt10.plan" -> "engine_fp16.sm87.trt10.plan.json"."""
    return f"{plan}.json"


def plan_mismatches(sidecar: dict, running: dict) -> list[str]:
    """What differs between the machine a plan was built on (``sidecar``) and this one (``running``).

    Both dicts hold "gpu" (device name), "compute_capability" ("8.7") and "tensorrt" (version). Versions are
    compared as number tuples, and must be equal: TensorRT plans are not portable across versions or GPUs.
    Returns one human-readable line per difference; [] means the plan fits this machine.
    """
    out = []
    if sidecar.get("gpu") != running["gpu"]:
        out.append(f"GPU: built on {sidecar.get('gpu')!r}, this machine has {running['gpu']!r}")
    for key, what in (("compute_capability", "compute capability"), ("tensorrt", "TensorRT")):
        try:
            same = parse_version(str(sidecar.get(key))) == parse_version(running[key])
        except BackendError:
            same = False
        if not same:
            out.append(f"{what}: built with {sidecar.get(key)!r}, this machine has {running[key]!r}")
    return out


def check_sidecar(sidecar: dict, running: dict, precision: str, onnx_sha256: str | None, where: str) -> None:
    """Refuse (BackendError naming ``where``) a plan that does not fit this machine, precision or bundle ONNX."""
    missing = [k for k in SIDECAR_KEYS if k not in sidecar]
    if missing:
        raise BackendError(f"{where}: sidecar lacks {', '.join(missing)}; rebuild the plan")
    problems = plan_mismatches(sidecar, running)
    if sidecar["precision"] != precision:
        problems.append(f"precision: plan is {sidecar['precision']!r}, {precision!r} was asked for")
    if onnx_sha256 is not None and sidecar["onnx_sha256"] != onnx_sha256:
        problems.append(f"model: plan was built from another {sidecar['onnx_file']} than the one in this bundle")
    if problems:
        raise BackendError(f"{where} cannot run here: " + "; ".join(problems) +
                           ". Build a plan on this machine with: cytoedge export tensorrt --bundle DIR "
                           f"--precision {precision}")


def bundle_files(bundle) -> dict[str, str]:
    """{file name: sha256} of every file the bundle's manifest names (all verified by load_bundle)."""
    return {name: entry["sha256"] for name, entry in bundle.manifest["files"].items()}


def find_plan(bundle, precision: str, running: dict) -> tuple[Path, dict]:
    """The plan in ``bundle`` for ``precision`` on the machine ``running`` describes, and its checked sidecar.

    Refuses (BackendError) when the bundle has no plan for this precision, only plans for other GPUs or
    TensorRT versions, a plan without sidecar, or a sidecar that does not match (see ``check_sidecar``).
    """
    files = bundle_files(bundle)
    want = plan_name(precision, running["compute_capability"], running["tensorrt"])
    build = f"build one on this machine with: cytoedge export tensorrt --bundle {bundle.root} --precision {precision}"
    if want not in files:
        others = sorted(f for f in files if f.startswith(f"engine_{precision}.") and f.endswith(".plan"))
        have = f"only {', '.join(others)}" if others else "none"
        raise BackendError(f"bundle {bundle.root} has no TensorRT {precision} plan for this machine "
                           f"({running['gpu']}, compute capability {running['compute_capability']}, TensorRT "
                           f"{running['tensorrt']}: {want}; it has {have}); {build}")
    side = sidecar_name(want)
    if side not in files:
        raise BackendError(f"{bundle.root / want} has no sidecar {side} in the bundle; {build}")
    try:
        sidecar = json.loads((bundle.root / side).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendError(f"{bundle.root / side}: unreadable sidecar: {exc}") from exc
    # the plan must come from this bundle's ONNX of that precision (a stale plan after a model update is refused)
    check_sidecar(sidecar, running, precision, files.get(bundle.tensorrt_onnx(precision, missing_ok=True)),
                  str(bundle.root / want))
    return bundle.root / want, sidecar


# ---- GPU side (tensorrt and pycuda imported here only) ------------------------------------------------------

def gpu_runtime(device: int = 0):
    """Import tensorrt and pycuda and initialise CUDA -> (trt, cuda, running identity dict).

    Any failure (package missing, no driver, no GPU) is a BackendError with the original error chained.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendError(f"the TensorRT backend needs the 'tensorrt' package and NVIDIA's libraries "
                           f"(pip install 'cytoedge[tensorrt]'): {exc}") from exc
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as exc:
        raise BackendError(f"the TensorRT backend needs 'pycuda' and a CUDA driver "
                           f"(pip install 'cytoedge[tensorrt]'): {exc}") from exc
    try:
        cuda.init()
        count = cuda.Device.count()
        if count <= device:
            raise BackendError(f"no CUDA GPU number {device} on this machine ({count} found)")
        dev = cuda.Device(device)
        major, minor = dev.compute_capability()
        running = {"gpu": dev.name(), "compute_capability": f"{major}.{minor}", "tensorrt": trt.__version__}
    except cuda.Error as exc:
        raise BackendError(f"CUDA is not usable here: {exc}") from exc
    return trt, cuda, running


class TensorRTBackend:
    """Runs the bundle's TensorRT plan for ``precision`` on GPU ``device``.

    ``infer(cells uint8 [N, 3, S, S]) -> {"logits": float32 [N, K], "errors": float32 [N, K],
    "anomaly": float32 [N]}``; N >= 1; batches beyond the plan's profile maximum run
    in chunks. Thread-safe (one call at a time). ``close()`` frees the GPU buffers.
    ``precision`` None = "fp16" (what a GPU should run; the bundle's default precision is the CPU's).
    """

    name = "tensorrt"

    def __init__(self, bundle, precision: str | None = None, device: int = 0):
        self.precision = precision or DEFAULT_PRECISION
        if self.precision not in PRECISIONS:
            raise BackendError(f"unknown TensorRT precision {self.precision!r} (known: {', '.join(PRECISIONS)})")
        self.evals_per_cell = bundle.evals_per_cell
        self.crop_size = bundle.crop_size
        self.n_classes = len(bundle.classes)
        trt, cuda, self.running = gpu_runtime(device)
        self.plan_path, self.sidecar = find_plan(bundle, self.precision, self.running)
        self._cuda = cuda
        self._lock = threading.Lock()
        self._ctx = cuda.Device(device).retain_primary_context()  # the context TensorRT's runtime API uses
        self._dev: dict = {}
        try:
            with self._current():
                self._load(trt)
        except BaseException:
            self._release()
            raise

    @contextmanager
    def _current(self):
        self._ctx.push()
        try:
            yield
        finally:
            self._ctx.pop()

    def _load(self, trt) -> None:
        cuda = self._cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"{self.plan_path}: TensorRT could not deserialize the plan (see its log above)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT] or sorted(set(names) - {INPUT}) != sorted(OUTPUTS):
            raise BackendError(f"{self.plan_path}: expected input {INPUT!r} and outputs {', '.join(OUTPUTS)}, "
                               f"the plan has inputs {inputs} and tensors {names}")
        s = self.crop_size
        in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(INPUT)))
        in_shape = tuple(self._engine.get_tensor_shape(INPUT))
        if in_dtype != np.uint8 or in_shape[1:] != (3, s, s):
            raise BackendError(f"{self.plan_path}: input {INPUT!r} is {in_dtype} {in_shape}, the bundle needs "
                               f"uint8 [N, 3, {s}, {s}]")
        self.max_batch = int(self._engine.get_tensor_profile_shape(INPUT, 0)[2][0])
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._host = {INPUT: cuda.pagelocked_empty((self.max_batch, 3, s, s), np.uint8)}
        k = self.n_classes
        for n, tail in (("logits", (k,)), ("errors", (k,)), ("anomaly", ())):
            shape = tuple(self._engine.get_tensor_shape(n))
            if shape[1:] != tail:
                raise BackendError(f"{self.plan_path}: output {n!r} has shape {shape}, the bundle's {k} classes "
                                   f"need [N{''.join(f', {d}' for d in tail)}]")
            self._host[n] = cuda.pagelocked_empty((self.max_batch, *tail), trt.nptype(self._engine.get_tensor_dtype(n)))
        for n, host in self._host.items():
            self._dev[n] = cuda.mem_alloc(host.nbytes)
            if not self._context.set_tensor_address(n, int(self._dev[n])):
                raise BackendError(f"{self.plan_path}: TensorRT refused the device buffer for {n!r}")
        self._bound = 0  # batch size the context's input shape is set to

    def infer(self, cells: np.ndarray) -> dict[str, np.ndarray]:
        """cells uint8 [N, 3, S, S] RGB, N >= 1 -> {"logits" [N, K], "errors" [N, K], "anomaly" [N]} float32."""
        cells = check_cells(cells, self.crop_size)
        with self._lock:
            if self._ctx is None:
                raise BackendError("TensorRT backend is closed")
            with self._current():
                parts = [self._run(cells[i:i + self.max_batch]) for i in range(0, len(cells), self.max_batch)]
        return {n: np.concatenate([p[n] for p in parts]) for n in OUTPUTS}

    def _run(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        """One chunk of at most max_batch cells: copy in, execute, copy out, all queued on one stream."""
        cuda, n = self._cuda, len(chunk)
        self._host[INPUT][:n] = chunk
        if n != self._bound:
            if not self._context.set_input_shape(INPUT, (n, 3, self.crop_size, self.crop_size)):
                raise BackendError(f"{self.plan_path}: TensorRT refused batch size {n}")
            self._bound = n
        cuda.memcpy_htod_async(self._dev[INPUT], self._host[INPUT][:n], self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise BackendError(f"{self.plan_path}: TensorRT execution failed (see its log above)")
        for name in OUTPUTS:
            cuda.memcpy_dtoh_async(self._host[name][:n], self._dev[name], self._stream)
        self._stream.synchronize()
        # astype copies out of the page-locked buffers, which the next chunk reuses
        return {name: self._host[name][:n].astype(np.float32) for name in OUTPUTS}

    def close(self) -> None:
        """Free the GPU buffers and release the CUDA context (idempotent)."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._ctx is None:
            return
        with self._current():
            for mem in self._dev.values():
                mem.free()
            self._dev = {}
            self._context = self._engine = self._runtime = self._stream = None
        self._ctx.detach()
        self._ctx = None


def load(bundle, precision: str | None = None, device: int = 0) -> TensorRTBackend:
    """Entry point for ``edge.backends.load_backend("tensorrt", bundle, precision)``."""
    return TensorRTBackend(bundle, precision, device)
