"""ONNX Runtime backend (CPUExecutionProvider): runs a bundle's engine ONNX at one precision.

The graph's input and outputs are checked against the bundle's manifest when the session opens (a mismatch is
a BundleError naming the file); batches of any size are split into chunks of at most ``max_batch`` cells.

An INT8 engine with 8-bit weights is refused on an x86 CPU without VNNI: there ONNX Runtime's uint8 x int8
kernels sum pairs of products in int16, which saturates, and the labels change silently (72% agreement with
FP32 measured on an AVX2-only AMD EPYC, export.quantize). Bundles built since then carry 7-bit weights, which
run everywhere.
"""
from __future__ import annotations

import numpy as np

from edge.backends import OUTPUTS, check_cells
from edge.errors import BackendError, BundleError

_X86 = ("x86_64", "amd64", "i386", "i686")
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
FULL_RANGE_INT8_WEIGHTS = "int8 per-channel"  # the manifest's quantization.weight_type of an 8-bit-weight model


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI, AMX-INT8): True/False;
    None when it is not x86 or the flags cannot be read (not Linux)."""
    import platform

    if platform.machine().lower() not in _X86:
        return None
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool(_VNNI_FLAGS & set(flags))


def check_int8_weights(bundle, vnni: bool | None) -> None:
    """Refuse (BackendError) the bundle's INT8 engine when it has 8-bit weights and the CPU lacks VNNI."""
    weights = bundle.manifest.get("quantization", {}).get("weight_type")
    if weights == FULL_RANGE_INT8_WEIGHTS and vnni is False:
        raise BackendError(
            f"{bundle.root}: its INT8 engine has 8-bit weights, which saturate in ONNX Runtime on this CPU (x86 "
            "without VNNI) and change labels; run --precision fp32, or re-quantize it with 7-bit weights: "
            "`cytoedge export int8 --bundle DIR --teacher TEACHER`")

_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


def _check_io(session, bundle, path) -> None:
    """Refuse a graph whose I/O does not match the manifest: cells uint8 [N, 3, S, S] -> logits, errors
    float32 [N, K], anomaly float32 [N]. Symbolic dims are accepted where the batch goes."""
    spec = bundle.manifest["input"]
    k, s = len(bundle.classes), bundle.crop_size
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != spec.get("name", "cells"):
        raise BundleError(f"{path}: engine inputs {[i.name for i in inputs]} do not match the manifest's "
                          f"single input {spec.get('name', 'cells')!r}")
    inp = inputs[0]
    if _ORT_TYPES.get(inp.type) != spec.get("dtype", "uint8"):
        raise BundleError(f"{path}: engine input {inp.name!r} is {inp.type}, the manifest says {spec.get('dtype')}")
    if len(inp.shape) != 4 or list(inp.shape[1:]) != [3, s, s]:
        raise BundleError(f"{path}: engine input {inp.name!r} has shape {inp.shape}, the manifest says [N, 3, {s}, {s}]")
    outs = {o.name: o for o in session.get_outputs()}
    if sorted(outs) != sorted(OUTPUTS):
        raise BundleError(f"{path}: engine outputs {sorted(outs)} are not {list(OUTPUTS)}")
    for name, rank in (("logits", 2), ("errors", 2), ("anomaly", 1)):
        o = outs[name]
        if o.type != "tensor(float)" or len(o.shape) != rank or (rank == 2 and isinstance(o.shape[1], int) and o.shape[1] != k):
            raise BundleError(f"{path}: engine output {name!r} is {o.type} {o.shape}, expected float32 "
                              f"{'[N, %d]' % k if rank == 2 else '[N]'}")


class OrtBackend:
    """name "onnxruntime"; precision: the engine run; evals_per_cell from the manifest.

    intra_op_num_threads: 0 = ONNX Runtime's default (one per core); max_batch: cells per session.run call;
    onnx_file: run this ONNX file of the bundle instead of the precision's engine (e.g. the one a TensorRT plan
    was built from, ``bundle.tensorrt_onnx(precision)``, for parity checks); it must be hashed in the bundle.
    """

    name = "onnxruntime"

    def __init__(self, bundle, precision: str | None = None, intra_op_num_threads: int = 0, max_batch: int = 32,
                 onnx_file: str | None = None):
        import onnxruntime as ort

        self.bundle = bundle
        self.precision = precision or bundle.precision
        self.evals_per_cell = bundle.evals_per_cell
        if max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch)
        if onnx_file is not None and onnx_file not in bundle.manifest["files"]:
            raise BundleError(f"{bundle.root}: {onnx_file} is not a file of this bundle")
        path = bundle.root / onnx_file if onnx_file is not None else bundle.engine_path(self.precision)
        if self.precision == "int8" and onnx_file is None:
            check_int8_weights(bundle, cpu_has_vnni())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_num_threads)
        opts.inter_op_num_threads = 1  # one graph, run sequentially: parallelism is inside the ops
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"{path}: ONNX Runtime cannot open the {self.precision} engine: {exc}") from exc
        _check_io(self.session, bundle, path)
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, cells: np.ndarray) -> dict[str, np.ndarray]:
        """cells uint8 [N, 3, S, S] RGB, N >= 1 -> {"logits" [N, K], "errors" [N, K], "anomaly" [N]} float32."""
        cells = check_cells(cells, self.bundle.crop_size)
        parts = []
        for i in range(0, len(cells), self.max_batch):
            chunk = cells[i:i + self.max_batch]
            try:
                out = self.session.run(list(OUTPUTS), {self.input_name: chunk})
            except Exception as exc:  # onnxruntime's own runtime errors
                raise BackendError(f"onnxruntime {self.precision} inference failed: {exc}") from exc
            parts.append(out)
        res = {name: np.ascontiguousarray(np.concatenate([p[j] for p in parts]), dtype=np.float32)
               for j, name in enumerate(OUTPUTS)}
        n, k = len(cells), len(self.bundle.classes)
        if res["logits"].shape != (n, k) or res["errors"].shape != (n, k) or res["anomaly"].shape != (n,):
            raise BackendError(f"engine returned logits {res['logits'].shape}, errors {res['errors'].shape}, "
                               f"anomaly {res['anomaly'].shape} for {n} cells of {k} classes")
        return res


def load(bundle, precision: str | None = None, **options) -> OrtBackend:
    return OrtBackend(bundle, precision, **options)
