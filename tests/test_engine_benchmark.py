"""benchmarks/engine.py's FLOP counts: the bundle's ONNX graph is counted as its own network."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

torch = pytest.importorskip("torch")


def test_onnx_flops_match_the_pytorch_count_of_the_same_engine(tiny_bundle):
    from conftest import TINY_NOISE_SEED, TINY_TIMESTEPS, tiny_model
    from engine import count_flops, onnx_flops

    from export.engine import build_engine, student_unet

    model = tiny_model()
    engine = build_engine(model, None, TINY_TIMESTEPS, TINY_NOISE_SEED)
    size = model.cfg.crop_size
    cell = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    expected = count_flops(engine, cell)
    got = onnx_flops(tiny_bundle / "engine_fp32.onnx")
    # the ONNX count also has the attention's two matrix products, which the module hooks miss (3% on this tiny
    # engine, 0.07% on the shipped one)
    assert expected <= got <= 1.05 * expected
    # a narrower student costs less: the bundle rows must not borrow the PyTorch student's count
    narrow = build_engine(model, student_unet(model, [8, 8]).eval(), TINY_TIMESTEPS, TINY_NOISE_SEED)
    assert count_flops(narrow, cell) < 0.8 * got
