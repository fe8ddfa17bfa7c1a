"""Build TensorRT plans from a bundle's ONNX models, on the GPU that will run them.

Networks are strongly typed: the precision is the ONNX model's own (the FP16 ONNX gives an FP16 plan, the
QDQ ONNX an INT8 plan by explicit quantization, no calibrator), so no precision builder flag is set. That is
what TensorRT 10 recommends for Q/DQ models, and the only mode TensorRT 11 has (it removed BuilderFlag.FP16,
BuilderFlag.INT8 and the implicit INT8 calibrators). One optimisation profile covers batch sizes
min..opt..max of input ``cells``; a timing cache file per GPU and TensorRT version makes rebuilds fast.

Each plan goes into the bundle with a JSON sidecar (GPU, compute capability, TensorRT version, precision, ONNX
hash, profile, build time) through ``edge.bundle.update_bundle_file``, so the manifest's hashes stay valid and
``edge/backends/tensorrt.py`` can refuse a plan built elsewhere. Needs the ``tensorrt`` extra (tensorrt,
pycuda, onnx), not torch, so it runs on the edge box itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge.backends import OUTPUTS
from edge.backends.tensorrt import IDENTITY_KEYS, INPUT, PRECISIONS, gpu_runtime, plan_name, sidecar_name
from edge.errors import BackendError


@dataclass(frozen=True)
class BuildConfig:
    """precision: "fp16", "int8" or "fp32" (the bundle ONNX of that precision is built); min/opt/max_batch:
    the optimisation profile over N of ``cells`` [N, 3, S, S]; workspace_mib: TensorRT workspace pool limit
    in MiB; timing_cache: file (None = one per GPU and TensorRT version under the user cache folder)."""

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    workspace_mib: int = 4096
    timing_cache: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mib < 16:
            raise ValueError(f"workspace_mib must be >= 16, got {self.workspace_mib}")


def default_timing_cache(running: dict) -> Path:
    """~/.cache/cytoedge/tensorrt/timing.sm87.trt10.3.0.cache (XDG_CACHE_HOME respected)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    sm = running["compute_capability"].replace(".", "")
    return root / "cytoedge" / "tensorrt" / f"timing.sm{sm}.trt{running['tensorrt']}.cache"


def onnx_precision_problems(onnx_path: str | Path, precision: str) -> list[str]:
    """Why the ONNX model at ``onnx_path`` would not build into a ``precision`` plan ([] if it would).

    A strongly typed build keeps the model's own types, so: "fp16" needs float16 weights; "int8" needs
    QuantizeLinear nodes, all Q/DQ zero points int8 and equal to 0 (TensorRT quantizes symmetrically and has no
    int32 DequantizeLinear for quantized biases; the uint8 asymmetric activations that suit ONNX Runtime on x86
    CPUs do not build); "fp32" needs neither.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    problems = []
    if precision == "fp16" and not half:
        problems.append("it has no float16 weights: a strongly typed build of it would run in fp32")
    if precision == "fp32" and (half or qdq):
        problems.append("it holds float16 weights or Q/DQ nodes, not an fp32 model")
    if precision == "int8":
        if not any(n.op_type == "QuantizeLinear" for n in qdq):
            problems.append("it has no QuantizeLinear nodes: not an explicitly quantized (QDQ) model")
        bad = set()
        for node in qdq:
            zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zp is None:
                continue
            if zp.data_type != onnx.TensorProto.INT8:
                bad.add(f"{onnx.TensorProto.DataType.Name(zp.data_type).lower()} zero point")
            elif numpy_helper.to_array(zp).any():
                bad.add("non-zero int8 zero point")
        if bad:
            problems.append(f"its Q/DQ nodes use {' and '.join(sorted(bad))}s; TensorRT needs symmetric int8 "
                            "quantization (int8 zero points equal to 0, float biases: onnxruntime quantize_static "
                            "with activation_type=QInt8 and extra_options ActivationSymmetric=True, "
                            "QuantizeBias=False)")
    return problems


def _parse(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = sorted(network.get_output(i).name for i in range(network.num_outputs))
    if [t.name for t in inputs] != [INPUT] or outputs != sorted(OUTPUTS):
        raise BackendError(f"{onnx_path}: expected input {INPUT!r} and outputs {', '.join(OUTPUTS)}, got "
                           f"{[t.name for t in inputs]} and {outputs}")
    if inputs[0].dtype != trt.DataType.UINT8:
        raise BackendError(f"{onnx_path}: input {INPUT!r} must be uint8, TensorRT reads {inputs[0].dtype}")


def build_plan(onnx_path: str | Path, plan_path: str | Path, config: BuildConfig, crop_size: int,
               trt=None, running: dict | None = None) -> dict:
    """Build ``onnx_path`` into a serialized plan at ``plan_path``; returns its sidecar dict (not written).

    ``trt`` and ``running`` come from ``edge.backends.tensorrt.gpu_runtime()`` (called when omitted).
    Raises BackendError when the model does not fit ``config.precision`` or TensorRT cannot build it.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if trt is None or running is None:
        trt, _, running = gpu_runtime()
    problems = onnx_precision_problems(onnx_path, config.precision)
    if problems:
        raise BackendError(f"{onnx_path} cannot be built into a TensorRT {config.precision} plan: "
                           + "; ".join(problems))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: the ONNX types decide the precision (required for Q/DQ in TensorRT 10, always on in 11).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(trt, network, logger, onnx_path)

    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    shapes = {k: (getattr(config, f"{k}_batch"), 3, crop_size, crop_size) for k in ("min", "opt", "max")}
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, shapes["min"], shapes["opt"], shapes["max"])
    build.add_optimization_profile(profile)

    cache_path = Path(config.timing_cache) if config.timing_cache else default_timing_cache(running)
    cache = build.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not build.set_timing_cache(cache, ignore_mismatch=False):
        # unreadable, or timed on another device of the same compute capability: start a fresh one
        cache = build.create_timing_cache(b"")
        build.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, build)
    if serialized is None:
        raise BackendError(f"{onnx_path}: TensorRT could not build the {config.precision} plan (see its log above; "
                           f"if it mentions memory, raise the workspace above {config.workspace_mib} MiB)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(build.get_timing_cache().serialize()))
    return {
        **{k: running[k] for k in IDENTITY_KEYS},
        "precision": config.precision,
        "onnx_file": onnx_path.name,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "profile": {"input": INPUT, **{k: list(v) for k, v in shapes.items()}},
        "workspace_mib": config.workspace_mib,
        "build_seconds": round(time.perf_counter() - started, 1),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_tensorrt(bundle_dir: str | Path | None, config: BuildConfig) -> tuple[Path, dict]:
    """Build the bundle's ``config.precision`` ONNX into a plan for this GPU and add plan + sidecar to the
    bundle (manifest hashes updated). Returns (plan path, sidecar dict). Replaces an older plan of the same
    name (same precision, compute capability and TensorRT major version)."""
    from edge.bundle import load_bundle, update_bundle_file

    bundle = load_bundle(bundle_dir)
    source = bundle.tensorrt_onnx(config.precision)
    onnx_path = bundle.root / source
    trt, _, running = gpu_runtime()
    name = plan_name(config.precision, running["compute_capability"], running["tensorrt"])
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = build_plan(onnx_path, Path(tmp) / name, config, bundle.crop_size, trt, running)
        sidecar["onnx_file"] = source
        update_bundle_file(bundle.root, name, (Path(tmp) / name).read_bytes())
    update_bundle_file(bundle.root, sidecar_name(name), (json.dumps(sidecar, indent=2) + "\n").encode())
    return bundle.root / name, sidecar

