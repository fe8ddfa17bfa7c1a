"""benchmarks/timesteps.py: accuracies over timestep subsets, on error tensors whose answer is known,
and the error tensor itself on a tiny random teacher."""
from __future__ import annotations


import numpy as np
import pytest

from conftest import load_benchmark



def test_report_finds_the_informative_timestep_and_range():
    m = load_benchmark("timesteps")
    rng = np.random.default_rng(0)
    n, grid, reps, k = 400, (50, 150, 300, 600, 900), 3, 8
    labels = rng.integers(0, k, n)
    err = rng.normal(1.0, 0.05, (n, len(grid), reps, k))
    err[np.arange(n), 2, :, labels] -= 0.2  # only t = 300 tells the class, every replicate
    err[np.arange(n), 1, 0, labels] -= 0.05  # t = 150 a little, first replicate only
    rep = m.report(err, labels, grid)
    single = rep["single_all_reps"]
    assert single[300] == 1.0 and max(single[t] for t in (50, 600, 900)) < 0.3
    assert single[300] > single[150] > single[600]
    ranges = rep["best_ranges"]  # sorted best first: every range that holds t = 300 beats every one that does not
    holds = [int(r.split("-")[0]) <= 300 <= int(r.split("-")[1]) for r in ranges]
    assert holds == sorted(holds, reverse=True) and holds[0]
    assert next(iter(rep["best_pairs_one_rep"])).split(",").count("300") == 1
    assert rep["all"] > 0.9


def test_error_tensor_shares_noise_across_classes():
    torch = pytest.importorskip("torch")
    from conftest import random_cells, tiny_model

    m = load_benchmark("timesteps")
    teacher = tiny_model(0)
    # identical class embeddings -> identical errors for every class of a (t, replicate): shared noise and view
    with torch.no_grad():
        teacher.unet.class_embedding.weight[:] = teacher.unet.class_embedding.weight[0]
    err = m.error_tensor(teacher, random_cells(2, seed=1), (100, 400), reps=2)
    assert err.shape == (2, 2, 2, 8)
    assert np.allclose(err, err[..., :1], rtol=1e-5, atol=1e-7)
    assert not np.allclose(err[:, 0], err[:, 1])  # but timesteps differ
