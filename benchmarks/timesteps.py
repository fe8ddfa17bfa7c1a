"""Which timesteps carry the class signal? Per-timestep and per-range accuracy of the teacher's class errors.

For a stratified sample of held-out cells (the ``cal`` split by default, so the validation split stays clean
for the reported figures) the teacher's masked error is computed for every class at a grid of timesteps,
with R independent (noise, dihedral view) replicates each, shared across classes. That tensor
errors[N, T, R, K] is saved, and accuracies of the argmin over subsets of it are printed:
single timesteps, contiguous ranges (all replicates), and the best pairs/triples with one replicate (what a
fixed-noise engine sees). It guides ``ClassifierConfig.t_min/t_max`` and the distillation grid.

    python benchmarks/timesteps.py --teacher runs/teacher --cells 240 --replicates 4
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = (25, 50, 100, 150, 200, 300, 400, 500, 600, 700, 800, 950)


def error_tensor(teacher, cells_u8: np.ndarray, grid: tuple[int, ...], reps: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, 3, S, S] -> float64 errors [N, T, R, K] (same noise and view for all classes of a (t, r))."""
    import torch
    from tqdm import tqdm

    k = len(teacher.cfg.classes)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((len(cells_u8), len(grid), reps, k))
    cls = torch.arange(k)
    for i in tqdm(range(len(cells_u8)), desc="cells", unit="cell"):
        x = torch.from_numpy(np.ascontiguousarray(cells_u8[i]))[None]
        views = []
        for _ in range(reps):
            v = torch.rot90(x, int(rng.integers(4)), dims=(2, 3))
            views.append(v.flip(3) if rng.random() < 0.5 else v)
        z0 = teacher.latents(torch.cat(views))  # [R, C, s, s]
        for j, t in enumerate(grid):
            noise = torch.randn(z0.shape, generator=gen)
            e = teacher.errors(z0.repeat_interleave(k, 0), torch.full((reps * k,), t), noise.repeat_interleave(k, 0), cls.repeat(reps))
            out[i, j] = e.double().numpy().reshape(reps, k)
    return out


def report(err: np.ndarray, labels: np.ndarray, grid: tuple[int, ...]) -> dict:
    """Accuracies of argmin over subsets of errors [N, T, R, K] against labels [N]."""
    def acc(e: np.ndarray) -> float:
        return float(np.mean(e.argmin(-1) == labels))

    single = {t: acc(err[:, j].mean(1)) for j, t in enumerate(grid)}
    ranges = {}
    for a, b in itertools.combinations(range(len(grid)), 2):
        ranges[f"{grid[a]}-{grid[b]}"] = acc(err[:, a:b + 1].mean((1, 2)))
    # a fixed-noise engine sees one replicate: average the accuracy over replicates
    def one_rep(idx: tuple[int, ...]) -> float:
        return float(np.mean([acc(err[:, list(idx), r].mean(1)) for r in range(err.shape[2])]))
    pairs = {f"{grid[a]},{grid[b]}": one_rep((a, b)) for a, b in itertools.combinations(range(len(grid)), 2)}
    triples = {",".join(str(grid[i]) for i in c): one_rep(c) for c in itertools.combinations(range(len(grid)), 3)}
    quads = {",".join(str(grid[i]) for i in c): one_rep(c) for c in itertools.combinations(range(len(grid)), 4)}
    top = lambda d, n=8: dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])  # noqa: E731
    return {"all": acc(err.mean((1, 2))), "single_all_reps": single, "best_ranges": top(ranges, 10),
            "best_pairs_one_rep": top(pairs), "best_triples_one_rep": top(triples), "best_quads_one_rep": top(quads)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/teacher")
    ap.add_argument("--cache", default="runs/cache/pbc64.npz")
    ap.add_argument("--split", default="cal", choices=["cal", "val"])
    ap.add_argument("--cells", type=int, default=240)
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/out/timesteps")
    args = ap.parse_args(argv)

    import torch

    from calibration.calibset import stratified_sample
    from export.teacher import load_teacher
    from export.train import load_cache

    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    data = load_cache(args.cache)
    with np.load(Path(args.teacher) / "splits.npz") as z:
        idx = z[args.split]
    idx = idx[stratified_sample(data["labels"][idx], args.cells, seed=0)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    err = error_tensor(teacher, data["crops"][idx].transpose(0, 3, 1, 2), GRID, args.replicates)
    labels = data["labels"][idx]
    np.savez(out / "errors.npz", errors=err, labels=labels, grid=np.array(GRID), index=idx)
    rep = {"teacher": args.teacher, "teacher_steps": teacher.meta.get("steps"), "split": args.split,
           "cells": int(len(idx)), "replicates": args.replicates, "seconds": round(time.time() - t0, 1), **report(err, labels, GRID)}
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
