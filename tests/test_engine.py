"""The fused engine (PyTorch) and the ONNX Runtime backend: shapes, shared noise, zeta, batching, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.anomaly import zeta
from conftest import TINY_NOISE_SEED, TINY_TIMESTEPS, random_cells, tiny_model
from edge.backends import load_backend
from edge.bundle import load_bundle
from edge.errors import InputError
from export.engine import VIEWS, Engine, build_engine, dihedral_view, fixed_noise, measure_logit_scale


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def engine(model):
    return build_engine(model, None, TINY_TIMESTEPS, TINY_NOISE_SEED, None, logit_scale=3.0)


def test_fixed_noise_is_reproducible_and_seed_dependent():
    a, b, c = fixed_noise(5, 2, 8, 16), fixed_noise(5, 2, 8, 16), fixed_noise(6, 2, 8, 16)
    assert a.shape == (2, 8, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_outputs_shapes_logits_and_anomaly_definition(engine):
    cells = torch.from_numpy(random_cells(5, seed=1))
    with torch.no_grad():
        logits, errors, anomaly = engine(cells)
    assert logits.shape == errors.shape == (5, 8) and anomaly.shape == (5,)
    assert engine.evals_per_cell == 8 * len(TINY_TIMESTEPS)
    assert torch.allclose(logits, -3.0 * errors)
    # the graph's anomaly is exactly -zeta of calibration.anomaly (top-10 runners-up, population std)
    np.testing.assert_allclose(anomaly.numpy(), -zeta(errors.numpy()), rtol=1e-5, atol=1e-6)


def test_errors_match_the_teachers_masked_error_with_shared_noise(model, engine):
    """The engine's error for (cell, class) = mean over its timesteps of Teacher.errors with the fixed noise:
    the same noise for every class, so only the class condition differs."""
    cells = torch.from_numpy(random_cells(2, seed=2))
    noise = fixed_noise(TINY_NOISE_SEED, len(TINY_TIMESTEPS), 8, 16)
    z0 = model.latents(cells)
    with torch.no_grad():
        errors = engine.class_errors(cells)
    for i in range(2):
        for k in (0, 5):
            ref = np.mean([float(model.errors(z0[i:i + 1], torch.tensor([t]), noise[j:j + 1], torch.tensor([k])))
                           for j, t in enumerate(TINY_TIMESTEPS)])
            assert float(errors[i, k]) == pytest.approx(ref, rel=1e-5)


def test_timestep_weights_weight_the_mean(model):
    cells = torch.from_numpy(random_cells(2, seed=3))
    noise = fixed_noise(0, 2, 8, 16)

    def make(ts, nz, w):
        return Engine(model.ae, model.unet, model.latent_scale, model.abar, model.mask, ts, nz, w, 8).eval()

    with torch.no_grad():
        e0 = make([100], noise[:1], [1.0]).class_errors(cells)
        e1 = make([700], noise[1:], [1.0]).class_errors(cells)
        both = make([100, 700], noise, [3.0, 1.0]).class_errors(cells)
        per_t = make([100, 700], noise, [3.0, 1.0]).timestep_errors(cells)
    torch.testing.assert_close(both, 0.75 * e0 + 0.25 * e1, rtol=1e-5, atol=1e-7)
    assert per_t.shape == (2, 8, 2)  # [N, K, T], before the weighting
    torch.testing.assert_close(per_t[:, :, 0], e0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(per_t[:, :, 1], e1, rtol=1e-5, atol=1e-7)


def test_each_cell_is_independent_of_its_batch(engine):
    cells = torch.from_numpy(random_cells(4, seed=4))
    with torch.no_grad():
        together = engine.class_errors(cells)
        alone = torch.cat([engine.class_errors(cells[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_logit_scale_is_the_inverse_median_spread(engine):
    cells = torch.from_numpy(random_cells(6, seed=5))
    with torch.no_grad():
        spread = engine.class_errors(cells).std(dim=1).median()
    assert measure_logit_scale(engine, cells) == pytest.approx(1 / float(spread), rel=1e-5)


def test_bad_engine_arguments_are_refused(model):
    noise = fixed_noise(0, 2, 8, 16)
    with pytest.raises(ValueError, match="timesteps must lie"):
        Engine(model.ae, model.unet, 1.0, model.abar, model.mask, [10, 5000], noise, [1, 1], 8)
    with pytest.raises(ValueError, match="noise"):
        Engine(model.ae, model.unet, 1.0, model.abar, model.mask, [10], noise, [1], 8)


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    cells = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    outs = [dihedral_view(cells, v) for v in range(len(VIEWS))]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    assert torch.equal(outs[0], cells)
    assert torch.equal(outs[VIEWS.index("flip_h")], cells.flip(2))  # upside down
    assert torch.equal(outs[VIEWS.index("flip_w")], cells.flip(3))
    for k in range(4):
        assert torch.equal(outs[k], torch.rot90(cells, k, (2, 3)))
        assert torch.equal(outs[k + 4], torch.rot90(cells, k, (2, 3)).flip(3))
    with pytest.raises(ValueError, match="view"):
        dihedral_view(cells, 8)


def test_engine_view_turns_each_cell_before_everything_else(model, engine):
    """An engine with view v gives on a cell what the view-0 engine gives on that cell turned by v."""
    cells = torch.from_numpy(random_cells(3, seed=6))
    turned = build_engine(model, None, TINY_TIMESTEPS, TINY_NOISE_SEED, None, logit_scale=3.0, view=6)
    with torch.no_grad():
        got = turned.class_errors(cells)
        torch.testing.assert_close(got, engine.class_errors(dihedral_view(cells, 6)), rtol=1e-6, atol=1e-8)
        assert not torch.allclose(got, engine.class_errors(cells), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="view"):
        build_engine(model, None, TINY_TIMESTEPS, TINY_NOISE_SEED, view=-1)


@pytest.mark.parametrize("n, max_batch", [(1, 4), (3, 4), (5, 2), (7, 3)])
def test_backend_handles_any_batch_size_including_a_partial_last_batch(tiny_bundle, n, max_batch):
    bundle = load_bundle(tiny_bundle)
    cells = random_cells(n, seed=10 + n)
    out = load_backend("onnxruntime", bundle, max_batch=max_batch).infer(cells)
    assert out["logits"].shape == out["errors"].shape == (n, 8) and out["anomaly"].shape == (n,)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    one = load_backend("onnxruntime", bundle, max_batch=1)
    singles = np.concatenate([one.infer(cells[i:i + 1])["errors"] for i in range(n)])
    np.testing.assert_allclose(out["errors"], singles, rtol=1e-5, atol=1e-6)


def test_backend_rejects_bad_input_with_input_errors(tiny_bundle):
    backend = load_backend("onnxruntime", load_bundle(tiny_bundle))
    assert backend.name == "onnxruntime" and backend.evals_per_cell == 16
    good = random_cells(2)
    for bad, msg in [(good.astype(np.float32), "uint8"), (good[:, :, :32, :32], r"\[N, 3, 64, 64\]"),
                     (good.transpose(0, 2, 3, 1), r"\[N, 3, 64, 64\]"), (good[:0], "empty"),
                     (good.tolist(), "numpy array")]:
        with pytest.raises(InputError, match=msg):
            backend.infer(bad)
