"""ONNX export parity: the ONNX Runtime engine against the PyTorch engine on real PBC cells, at stated tolerances.

Tolerances (float32 graph, ONNX Runtime CPU vs PyTorch CPU): class errors |d| <= 1e-6 + 1e-4 |e|, anomaly
|d| <= 1e-5, identical labels. FP16 graph: errors |d| <= 2e-3 + 2e-2 |e|, and the same label wherever the
PyTorch winner leads the runner-up by more than that tolerance.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_NOISE_SEED, TINY_TIMESTEPS, TINY_VIEW, tiny_model
from edge.backends import load_backend
from edge.bundle import load_bundle
from export.engine import VIEWS, build_engine
from export.onnx_export import export_onnx, onnx_io


@pytest.fixture(scope="module")
def torch_engine(tiny_bundle):
    """The PyTorch engine the tiny bundle was exported from (same seed, view, weights and logit scale)."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["view"] == VIEWS[TINY_VIEW] == load_bundle(tiny_bundle).view
    return build_engine(tiny_model(), None, TINY_TIMESTEPS, TINY_NOISE_SEED, None, logit_scale=manifest["logit_scale"],
                        view=TINY_VIEW)


def torch_outputs(engine, cells: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = engine(torch.from_numpy(cells))
    return {k: v.numpy() for k, v in zip(("logits", "errors", "anomaly"), out)}


def test_graph_io_contract(tiny_bundle):
    io = onnx_io(tiny_bundle / "engine_fp32.onnx")
    assert io["cells"][0] == "UINT8" and io["cells"][1][1:] == [3, 64, 64] and isinstance(io["cells"][1][0], str)
    for name in ("logits", "errors"):
        assert io[name][0] == "FLOAT" and len(io[name][1]) == 2
    assert io["anomaly"][0] == "FLOAT" and len(io["anomaly"][1]) == 1


def test_fp32_onnx_matches_pytorch_on_real_cells(tiny_bundle, torch_engine, pbc_cells):
    cells, _ = pbc_cells
    ref = torch_outputs(torch_engine, cells)
    got = load_backend("onnxruntime", load_bundle(tiny_bundle), "fp32", max_batch=7).infer(cells)
    np.testing.assert_allclose(got["errors"], ref["errors"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["anomaly"], ref["anomaly"], rtol=0, atol=1e-5)
    scale = torch_engine.logit_scale
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-4, atol=1e-6 * scale)
    assert (got["logits"].argmax(1) == ref["logits"].argmax(1)).all()


def test_fp16_onnx_tracks_pytorch_on_real_cells(tiny_bundle, torch_engine, pbc_cells, tmp_path):
    import onnxruntime as ort

    cells, _ = pbc_cells
    path = export_onnx(torch_engine, tmp_path / "engine_fp16.onnx", 64, "fp16")
    io = onnx_io(path)
    assert io["cells"][0] == "UINT8" and io["errors"][0] == "FLOAT"  # the I/O contract does not change
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(("logits", "errors", "anomaly"), sess.run(None, {"cells": cells})))
    ref = torch_outputs(torch_engine, cells)
    np.testing.assert_allclose(got["errors"], ref["errors"], rtol=2e-2, atol=2e-3)
    e = np.sort(ref["errors"], axis=1)
    clear = (e[:, 1] - e[:, 0]) > 2e-3 + 2e-2 * e[:, 0]
    assert (got["errors"].argmin(1)[clear] == ref["errors"].argmin(1)[clear]).all()
