"""Full diffusion classification, as CytoDiffusion does it: the accuracy reference and the distillation target.

Per cell, trials are run in chunks. A trial is one (timestep, noise, dihedral transform) triple; every class
still in the race is evaluated with the SAME noise and timestep, so class differences are paired. Timesteps
follow a low-discrepancy order over [t_min, t_max] so any prefix of trials covers the schedule. After
``min_trials`` and then every ``test_every`` trials, classes whose error is significantly larger than the
current best (one-sided paired t-test, p < ``p_prune``) are pruned, until one class remains or the trial
budget is spent.

Errors per class are reported on a common footing: the winner's mean over all its trials plus the mean
paired difference (class - winner) over the trials they shared, so pruned classes are not biased by the
timesteps they happened to see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from export.teacher import Teacher


@dataclass(frozen=True)
class ClassifierConfig:
    max_trials: int = 48  # trials per cell (evaluations <= K * max_trials)
    min_trials: int = 8  # no pruning before this many trials
    test_every: int = 8  # trials per chunk between t-tests
    p_prune: float = 2e-3  # one-sided paired t-test level
    prune: bool = True
    # Single timesteps above ~500 carry little class signal (benchmarks/timesteps.py, 240 cal-split cells: at
    # 22.7k teacher steps single-t accuracy is 86.7% at t=300 and 26.7% at t=950). Averaged, 100-500 vs 50-950
    # was 92.5% vs 91.2% at 15.5k steps and 92.9% vs 93.3% at 22.7k (1 cell): the same accuracy, but the t-test
    # prunes sooner on informative timesteps (validation: 117 evaluations per cell; 191 at 10k steps over 50-950).
    t_min: int = 100
    t_max: int = 500
    dihedral: bool = True  # random rotation/flip per trial
    weighting: str = "uniform"  # per-timestep weight: "uniform" or "snr" (sqrt(abar/(1-abar)) normalised)
    seed: int = 0


@dataclass(frozen=True)
class TeacherResult:
    """label: class index; errors: float64 [K] (lower = better); evals: denoiser evaluations used;
    trials: int [K] trials each class took part in; zeta: anomaly margin (higher = clearer winner)."""

    label: int
    errors: np.ndarray
    evals: int
    trials: np.ndarray
    zeta: float


def spread_timesteps(n: int, t_min: int, t_max: int) -> np.ndarray:
    """n timesteps over [t_min, t_max] in van der Corput (base 2) order: int64 [n]."""
    def vdc(i: int) -> float:
        x, denom = 0.0, 1.0
        while i:
            denom *= 2
            x += (i & 1) / denom
            i >>= 1
        return x
    u = np.array([vdc(i) for i in range(1, n + 1)])
    return np.round(t_min + u * (t_max - t_min)).astype(np.int64)


def zeta_score(errors: np.ndarray, n_runners: int = 10) -> float:
    """CytoDiffusion's anomaly margin from class errors [K]: mean gap of the top m = min(K-1, n_runners)
    runners-up from the best class, minus the spread (std) among those runners-up. Higher = clearer winner."""
    e = np.sort(np.asarray(errors, np.float64))
    m = min(len(e) - 1, n_runners)
    runners = e[1:1 + m]
    return float(np.mean(runners - e[0]) - np.std(runners))


def _paired_p(diff: np.ndarray) -> float:
    """One-sided p-value that mean(diff) > 0 (diff = other - best), paired t-test."""
    n = len(diff)
    sd = diff.std(ddof=1)
    if sd == 0:
        return 0.0 if diff.mean() > 0 else 1.0
    tstat = diff.mean() / (sd / math.sqrt(n))
    from scipy.stats import t as student_t

    return float(student_t.sf(tstat, df=n - 1))


def _timestep_weights(teacher: Teacher, ts: np.ndarray, mode: str) -> np.ndarray:
    if mode == "uniform":
        return np.ones(len(ts))
    if mode == "snr":
        a = teacher.abar[torch.from_numpy(ts)].double().numpy()
        w = np.sqrt(a / (1 - a))
        return w / w.mean()
    raise ValueError(f"unknown weighting {mode!r}")


@torch.no_grad()
def classify_cell(teacher: Teacher, cell_u8: np.ndarray, cfg: ClassifierConfig, rng: np.random.Generator) -> TeacherResult:
    """cell_u8: uint8 [3, S, S] RGB (preprocessed crop) -> TeacherResult."""
    k = len(teacher.cfg.classes)
    ts_all = spread_timesteps(cfg.max_trials, cfg.t_min, cfg.t_max)
    w_all = _timestep_weights(teacher, ts_all, cfg.weighting)
    alive = np.ones(k, bool)
    err = np.full((cfg.max_trials, k), np.nan)
    x = torch.from_numpy(np.ascontiguousarray(cell_u8))[None]
    evals, done = 0, 0
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    while done < cfg.max_trials and alive.sum() > 1:
        n = min(cfg.test_every if done >= cfg.min_trials else cfg.min_trials, cfg.max_trials - done)
        cls = np.flatnonzero(alive)
        views = []
        for _ in range(n):
            v = torch.rot90(x, int(rng.integers(4)), dims=(2, 3)) if cfg.dihedral else x
            views.append(v.flip(3) if cfg.dihedral and rng.random() < 0.5 else v)
        z0 = teacher.latents(torch.cat(views))  # [n, C, s, s]
        noise = torch.randn(z0.shape, generator=gen)
        ts = torch.from_numpy(ts_all[done:done + n])
        # every (trial, class) pair in one batch; the same noise and timestep for all classes of a trial
        rep = len(cls)
        e = teacher.errors(z0.repeat_interleave(rep, 0), ts.repeat_interleave(rep), noise.repeat_interleave(rep, 0),
                           torch.from_numpy(cls).repeat(n)).double().numpy().reshape(n, rep)
        err[done:done + n][:, cls] = e * w_all[done:done + n, None]
        evals += n * rep
        done += n
        if cfg.prune and done >= cfg.min_trials:
            means = np.nanmean(err[:done], axis=0)
            best = int(np.flatnonzero(alive)[np.argmin(means[alive])])
            for c in np.flatnonzero(alive):
                if c != best:
                    shared = ~np.isnan(err[:done, c])
                    if _paired_p(err[:done, c][shared] - err[:done, best][shared]) < cfg.p_prune:
                        alive[c] = False
    trials = (~np.isnan(err[:done])).sum(0)
    means = np.nanmean(err[:done], axis=0)
    best = int(np.flatnonzero(alive)[np.argmin(means[alive])])
    errors = np.empty(k)
    for c in range(k):
        shared = ~np.isnan(err[:done, c])
        errors[c] = means[best] + np.mean(err[:done, c][shared] - err[:done, best][shared])
    return TeacherResult(label=best, errors=errors, evals=evals, trials=trials, zeta=zeta_score(errors))


def classify_cells(teacher: Teacher, cells_u8: np.ndarray, cfg: ClassifierConfig = ClassifierConfig(),
                   progress: bool = False) -> list[TeacherResult]:
    """cells_u8: uint8 [N, 3, S, S] -> one TeacherResult per cell (seeded by cfg.seed, reproducible)."""
    rng = np.random.default_rng(cfg.seed)
    it = range(len(cells_u8))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="teacher", unit="cell")
    return [classify_cell(teacher, cells_u8[i], cfg, rng) for i in it]
