"""INT8 QDQ quantization: which nodes stay float, per-channel weights, and INT8 vs FP32 agreement on real cells.

The tiny bundle's denoiser has random weights, so its class errors differ by little and INT8 noise can swap
near-tied classes; the agreement asserted here (>= 85% of real cells, and errors within 5%) is a regression
floor for the quantization pipeline, not the shipped figure. The trained engine's agreement (>= 99% target) is
measured on validation cells by benchmarks/engine.py.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import random_cells
from edge.backends import load_backend
from edge.bundle import load_bundle
from export.quantize import CellReader, float_nodes


@pytest.fixture(scope="module")
def int8_model(tiny_bundle):
    return onnx.load(str(tiny_bundle / "engine_int8.onnx"))


def test_int8_graph_has_qdq_nodes_with_per_channel_conv_weights(int8_model):
    ops = [n.op_type for n in int8_model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    inits = {t.name: t for t in int8_model.graph.initializer}
    per_channel = 0
    for node in int8_model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type == onnx.TensorProto.INT8:
            scale = inits[node.input[1]]
            per_channel += int(len(scale.dims) == 1 and scale.dims[0] > 1)
    assert per_channel >= 4  # conv weights quantized per output channel


def test_the_error_tail_stays_float_and_every_conv_is_quantized(int8_model):
    tail = set(float_nodes(int8_model, "tail"))  # node names survive quantization
    tail_nodes = [n for n in int8_model.graph.node if n.name in tail]
    assert {"TopK", "ReduceSum"} <= {n.op_type for n in tail_nodes}
    qdq = [n for n in tail_nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) <= 2  # at most the output Q/DQ pair of the last (quantized) conv; nothing after it
    produced_by = {o: n for n in int8_model.graph.node for o in n.output}
    convs = [n for n in int8_model.graph.node if n.op_type == "Conv"]
    assert convs and all(produced_by[c.input[1]].op_type == "DequantizeLinear" for c in convs)


def test_presets_nest(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "engine_fp32.onnx"))
    tail, out, ends = (set(float_nodes(model, p)) for p in ("tail", "tail+out", "tail+ends"))
    assert tail < out < ends and len(out - tail) == 1 and len(ends - out) == 2
    with pytest.raises(ValueError, match="unknown float-node preset"):
        float_nodes(model, "everything")


def test_int8_agrees_with_fp32_on_real_cells(tiny_bundle, pbc_cells):
    cells, _ = pbc_cells
    bundle = load_bundle(tiny_bundle)
    f32 = load_backend("onnxruntime", bundle, "fp32").infer(cells)
    i8 = load_backend("onnxruntime", bundle, "int8").infer(cells)
    agreement = float(np.mean(f32["logits"].argmax(1) == i8["logits"].argmax(1)))
    assert agreement >= 0.85, f"INT8 vs FP32 label agreement {agreement:.1%} on {len(cells)} real cells"
    np.testing.assert_allclose(i8["errors"], f32["errors"], rtol=0.05)


def test_cell_reader_feeds_batches_and_rewinds():
    reader = CellReader(random_cells(5), batch=2)
    sizes = []
    while (feed := reader.get_next()) is not None:
        sizes.append(len(feed["cells"]))
    assert sizes == [2, 2, 1]
    reader.rewind()
    assert len(reader.get_next()["cells"]) == 2
    with pytest.raises(ValueError, match="uint8"):
        CellReader(random_cells(2).astype(np.float32))


def test_onnx_runtime_int8_weights_are_7_bit_and_the_tensorrt_ones_8_bit(tiny_bundle, int8_model):
    """No weight of the ONNX Runtime model leaves [-64, 64] (7 bits: x86 without VNNI cannot saturate); the
    symmetric model for TensorRT keeps the full int8 range; the manifest says which is which."""
    def weight_range(model):
        return max(int(np.abs(onnx.numpy_helper.to_array(t)).max()) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4)
    assert weight_range(int8_model) <= 64
    assert weight_range(onnx.load(str(tiny_bundle / "engine_int8_symmetric.onnx"))) == 127
    q = load_bundle(tiny_bundle).manifest["quantization"]
    assert q["weight_type"] == "int7 per-channel (reduce_range)" and q["tensorrt"]["weight_type"] == "int8 per-channel"


def test_cpu_vnni_is_read_from_the_cpu_flags(tmp_path):
    import platform

    from edge.backends.onnxruntime import cpu_has_vnni

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"VNNI is an x86 flag; this machine is {platform.machine()}")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n")
    assert cpu_has_vnni(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_vnni(str(info)) is False
    assert cpu_has_vnni(str(tmp_path / "absent")) is None


def test_an_8_bit_weight_int8_engine_is_refused_on_a_cpu_without_vnni(tiny_bundle):
    """The refusal names the way out; 7-bit weights, a VNNI CPU or an unknown CPU are let through."""
    from types import SimpleNamespace

    from edge.backends.onnxruntime import check_int8_weights
    from edge.errors import BackendError

    old = SimpleNamespace(root=tiny_bundle, manifest={"quantization": {"weight_type": "int8 per-channel"}})
    with pytest.raises(BackendError, match="8-bit weights, which saturate.*--precision fp32.*7-bit.*export int8 --bundle"):
        check_int8_weights(old, vnni=False)
    check_int8_weights(old, vnni=True)
    check_int8_weights(old, vnni=None)
    check_int8_weights(load_bundle(tiny_bundle), vnni=False)  # 7-bit weights run everywhere
