"""INT8 static quantization of the engine's ONNX graph with QDQ nodes (onnxruntime.quantization).

Activations uint8, weights int8 per output channel (U8S8, the fast path on x86 with VNNI), ranges from a real
calibration set of cells (a stratified sample chosen and hashed by calibration.calibset). The graph is first
pre-processed (symbolic shape inference and ORT graph optimisation, ``quant_pre_process``), as the ONNX Runtime
documentation recommends for static quantization.

What is quantized: only the convolutions (``DEFAULT_OP_TYPES``), which hold nearly all the engine's FLOPs.
Measured on the teacher (1,000 steps, timesteps 300/600, 128 validation cells, 64 calibration cells): letting
the quantizer take every op type it supports (time embedding, Add/Mul of the group norms...) drove INT8 vs FP32
label agreement to 9%; convolutions only gave 88%, and 100% on the half of the cells whose FP32 margin between
the best two classes is above the median (0.6% of the error). INT8 changes errors by ~1% (p99), so it can only
swap near-tied classes. The flip rate is about (density of FP32 top-2 margins near 0) x (INT8 error): with the
teacher's margins (median 0.6-0.9% of the error) 99% agreement needs errors near 1e-4 relative, which FP16 gives
(99.2% agreement, max 5.5e-4) and 8-bit activations do not. INT8 therefore ships as the default only where a
model's margins allow it (``cytoedge export bundle --default-precision auto`` measures this).

What stays in float (``EXCLUDE_PRESETS``): the tail that turns the predicted noise into errors, logits and the
anomaly score (everything after the denoiser's last convolution) is always float: quantizing a difference of
near-equal numbers loses it. Keeping the end convolutions float too ("tail+ends": encoder, conv_in, conv_out)
moved agreement only from 87.5% to 88.3% at a cost in speed; keeping all 21 up-path convolutions float reached
94% but leaves little to gain. Calibration method (MinMax, Entropy, Percentile 99.99) made no difference, so
MinMax (fastest) is the default. The multi-head engine (2 denoiser passes per cell, H4b; session 15, all 1,367
validation cells, 7-bit weights, AVX2 CPU) is different: "tail" 98.02% (27 flips), "tail+out" 99.12%,
"tail+ends" **99.41%** (8 flips; 99.49% of the calibration split), and still 12-30% faster than FP32, so its
bundle is exported with ``int8_preset = "tail+ends"`` (configs/export_heads.toml); on the 16-pass conditional
engine "tail+ends" gave 97.44% against 97.51% for "tail". Percentile calibration (98.46%) and 1,024 calibration
cells (98.54%) did less. ``benchmarks/engine.py`` measures agreement and speed of the shipped engine;
``cytoedge export bundle`` always measures INT8 against FP32, and with ``default_precision = "auto"`` ships INT8
as the default only when it keeps agreement and is faster (the shipped config sets FP32).

Weights are 7-bit (``reduce_range``) by default. On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI: older
Intel, many AMD EPYC) ONNX Runtime's uint8 x int8 kernels sum pairs of products in int16 (vpmaddubsw), which
saturates when both are large; 7-bit weights ([-64, 64]) keep 2 x 255 x 64 = 32,640 under 32,767. Measured on
a 2-core AMD EPYC with AVX2 only, on the multi-head engine H2 (512 validation cells): 8-bit weights agreed with
FP32 on 72.3% of the labels (99.49% on the VNNI machine they were chosen on), 7-bit weights on 99.8%, at the
same speed. The runtime refuses an 8-bit-weight INT8 engine on such a CPU (edge.backends.onnxruntime). The
symmetric model for TensorRT keeps 8-bit weights: GPUs accumulate in int32.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

EXCLUDE_PRESETS = ("tail", "tail+out", "tail+ends")
DEFAULT_OP_TYPES = ("Conv",)


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def float_nodes(model, preset: str = "tail") -> list[str]:
    """Names of the nodes of ``model`` (onnx.ModelProto, after pre-processing) to keep in float for ``preset``.

    "tail": every node downstream of the last Conv (error, reduction, logits, top-k, anomaly);
    "tail+out": the tail and the last Conv (the denoiser's conv_out, whose output is the predicted noise);
    "tail+ends": the tail, the first two Convs (encoder, conv_in) and the last Conv.
    """
    if preset not in EXCLUDE_PRESETS:
        raise ValueError(f"unknown float-node preset {preset!r} (known: {', '.join(EXCLUDE_PRESETS)})")
    graph = model.graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if len(convs) < 3:
        raise ValueError(f"expected an engine graph with at least 3 Conv nodes, found {len(convs)}")
    for i, n in enumerate(graph.node):  # give unnamed nodes stable names so they can be excluded
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    consumers = _consumers(graph)
    tail, stack = set(), list(convs[-1].output)
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in tail:
                tail.add(node.name)
                stack.extend(node.output)
    names = sorted(tail)
    if preset in ("tail+out", "tail+ends"):
        names.append(convs[-1].name)
    if preset == "tail+ends":
        names += [convs[0].name, convs[1].name]
    return names


class CellReader:
    """onnxruntime.quantization.CalibrationDataReader over uint8 cells [N, 3, S, S], ``batch`` cells per feed."""

    def __init__(self, cells: np.ndarray, batch: int = 8, input_name: str = "cells"):
        if cells.dtype != np.uint8 or cells.ndim != 4 or cells.shape[1] != 3:
            raise ValueError(f"calibration cells must be uint8 [N, 3, S, S], got {cells.dtype} {cells.shape}")
        self.cells, self.batch, self.input_name = cells, batch, input_name
        self._it: Iterator[dict] = self._feeds()

    def _feeds(self) -> Iterator[dict]:
        for i in range(0, len(self.cells), self.batch):
            yield {self.input_name: np.ascontiguousarray(self.cells[i:i + self.batch])}

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._feeds()


def quantize_int8(fp32_path: str | Path, out_path: str | Path, cells: np.ndarray, preset: str = "tail",
                  batch: int = 4, calibrate_method: str = "MinMax",
                  op_types: tuple[str, ...] | None = DEFAULT_OP_TYPES, symmetric: bool = False,
                  reduce_range: bool = True) -> dict:
    """FP32 engine ONNX -> INT8 QDQ ONNX at ``out_path``, calibrated on ``cells`` uint8 [N, 3, S, S].

    Returns a summary dict for the bundle manifest: preset, the float node names, calibration cell count,
    method, and the count of QuantizeLinear/DequantizeLinear nodes inserted. op_types: quantize only these op
    types (default: convolutions only); None = every op type the quantizer supports. symmetric: int8
    activations with zero point 0 and float biases (what TensorRT's explicit quantization accepts) instead of
    uint8 asymmetric activations and int32 biases (ONNX Runtime's fast path on x86). reduce_range: 7-bit weights,
    which no x86 CPU saturates (module docstring); False only for a GPU's model.
    """
    from onnxruntime.quantization import CalibrationMethod

    method = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy,
              "Percentile": CalibrationMethod.Percentile}[calibrate_method]
    out_path = Path(out_path)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a warning per per-channel weight it cannot split
    try:
        summary = _quantize(fp32_path, out_path, cells, preset, batch, method, op_types, symmetric, reduce_range)
    finally:
        root.setLevel(level)
    summary["calibrate_method"] = calibrate_method
    summary["op_types"] = list(op_types) if op_types else "all"
    return summary


def _quantize(fp32_path, out_path: Path, cells: np.ndarray, preset: str, batch: int, method, op_types,
              symmetric: bool, reduce_range: bool) -> dict:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        exclude = float_nodes(model, preset)
        onnx.save(model, str(pre))  # with the stable names given by float_nodes
        quantize_static(
            str(pre), str(out_path), CellReader(cells, batch), quant_format=QuantFormat.QDQ, per_channel=True,
            op_types_to_quantize=list(op_types) if op_types else None, nodes_to_exclude=exclude, calibrate_method=method,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": not symmetric})
    q = onnx.load(str(out_path))
    onnx.checker.check_model(q)
    ops = [n.op_type for n in q.graph.node]
    return {"preset": preset, "float_nodes": len(exclude), "calibration_cells": int(len(cells)),
            "activation_type": "int8 symmetric" if symmetric else "uint8",
            "weight_type": "int7 per-channel (reduce_range)" if reduce_range else "int8 per-channel",
            "bias": "float" if symmetric else "int32",
            "qdq_nodes": ops.count("QuantizeLinear") + ops.count("DequantizeLinear")}
