"""Export the fused Engine to ONNX: FP32 (the reference graph) and FP16 (for GPUs).

Graph contract (checked again by the runtime when it loads a bundle):
input ``cells`` uint8 [N, 3, S, S] RGB with a dynamic batch N; outputs ``logits`` float32 [N, K],
``errors`` float32 [N, K], ``anomaly`` float32 [N].
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn as nn

OPSET = 17
INPUT = "cells"
OUTPUTS = ("logits", "errors", "anomaly")


class _HalfInput(nn.Module):
    """Wraps the encoder conv of a float16 engine: casts its float32 input (from the uint8 scaling) to float16."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.half())


class _HalfEngine(nn.Module):
    """Runs an Engine in float16 between a uint8 input and float32 outputs (the I/O contract is unchanged)."""

    def __init__(self, engine: nn.Module):
        super().__init__()
        self.engine = copy.deepcopy(engine).half()
        self.engine.encoder = _HalfInput(self.engine.encoder)

    def forward(self, cells: torch.Tensor):
        logits, errors, anomaly = self.engine(cells)
        return logits.float(), errors.float(), anomaly.float()


def export_onnx(engine: nn.Module, path: str | Path, crop_size: int, precision: str = "fp32",
                example_batch: int = 2, opset: int = OPSET) -> Path:
    """Trace ``engine`` (export.engine.Engine, eval mode) into an ONNX file at ``path`` and check it.

    precision: "fp32" or "fp16" (weights and arithmetic in float16, input uint8 and outputs float32).
    Constant folding is on, so the fixed noise, schedule terms and pair labels become initialisers.
    """
    import onnx

    if precision not in ("fp32", "fp16"):
        raise ValueError(f"export_onnx: precision must be fp32 or fp16, got {precision!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = engine if precision == "fp32" else _HalfEngine(engine)
    module.eval()
    example = torch.randint(0, 256, (example_batch, 3, crop_size, crop_size), dtype=torch.uint8)
    dyn = {INPUT: {0: "N"}, **{name: {0: "N"} for name in OUTPUTS}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT],
                          output_names=list(OUTPUTS), dynamic_axes=dyn, opset_version=opset,
                          do_constant_folding=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return path


def onnx_io(path: str | Path) -> dict:
    """{name: (elem_type name, [dims as int or symbolic str])} for the inputs and outputs of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def desc(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return onnx.TensorProto.DataType.Name(t.elem_type), dims

    return {v.name: desc(v) for v in list(model.graph.input) + list(model.graph.output)}
