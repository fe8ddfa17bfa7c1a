"""Anomaly scores from class errors, a false-alarm-controlled threshold, and AUROC (numpy only).

Every score here follows one convention: higher = more anomalous. Candidate scores (``anomaly_scores``):
- "engine": the ``anomaly`` output of the engine's graph, as is.
- "neg_zeta": minus CytoDiffusion's zeta. zeta = mean gap between the best class error and the errors of
  the top min(K-1, 10) runners-up, minus the spread (std) of those runners-up' errors. A clear winner has a
  large zeta, so -zeta is high when no class explains the cell much better than the others.
- "best_error": the best (lowest) class error standardised against its distribution on normal cells
  predicted as the same class: a cell that no class denoises well is unlike the training data.
- "error_profile": the Mahalanobis distance of the cell's log class errors (all K of them, the error
  profile) from those of normal cells predicted as the same class (Lee et al. 2018's OOD score, on the
  diffusion classifier's error vector; covariance with Ledoit-Wolf shrinkage). A cell can fit its best class
  as well as normal cells do and still be abnormal in how the other classes fit it.
Which separates abnormal cells better is measured (benchmarks/uncertainty.py), not assumed.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edge.errors import CalibrationError

ANOMALY_SCORES = ("engine", "neg_zeta", "best_error", "error_profile")
N_RUNNERS = 10  # runners-up used by zeta, as in CytoDiffusion
MIN_CLASS_CELLS = 10  # fewer normal cells predicted as a class -> use the pooled best-error statistics
MIN_PROFILE_CELLS = 30  # the same for error profiles (a K x K covariance needs more cells)


def zeta(errors: np.ndarray, n_runners: int = N_RUNNERS) -> np.ndarray:
    """Class errors float [N, K] (lower = better fit) -> zeta float64 [N]; higher = clearer winner = more normal."""
    errors = np.asarray(errors, np.float64)
    if errors.ndim != 2 or errors.shape[1] < 2:
        raise CalibrationError(f"zeta needs errors [N, K] with K >= 2, got {errors.shape}")
    e = np.sort(errors, axis=1)
    runners = e[:, 1:1 + min(errors.shape[1] - 1, n_runners)]
    return (runners - e[:, :1]).mean(axis=1) - runners.std(axis=1)


def fit_best_error_stats(errors: np.ndarray) -> dict:
    """Errors float [N, K] of normal cells -> {"mean": [K], "std": [K]} of the best class error, per predicted
    class (argmin), with the pooled mean/std for classes predicted fewer than MIN_CLASS_CELLS times."""
    errors = np.asarray(errors, np.float64)
    best, pred = errors.min(axis=1), errors.argmin(axis=1)
    if len(best) < 2:
        raise CalibrationError("best-error statistics need at least 2 normal cells")
    floor = 1e-6 * max(abs(float(best.mean())), 1e-6)
    pooled = (float(best.mean()), max(float(best.std()), floor))
    mean, std = [], []
    for c in range(errors.shape[1]):
        b = best[pred == c]
        m, s = (float(b.mean()), max(float(b.std()), floor)) if len(b) >= MIN_CLASS_CELLS else pooled
        mean.append(m)
        std.append(s)
    return {"mean": mean, "std": std}


def best_error_level(errors: np.ndarray, stats: dict) -> np.ndarray:
    """Errors float [N, K] -> float64 [N]: (best error - mean[c]) / std[c], c = the best class; higher = worse fit."""
    errors = np.asarray(errors, np.float64)
    mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
    if len(mean) != errors.shape[1]:
        raise CalibrationError(f"best-error statistics are for {len(mean)} classes, errors have {errors.shape[1]}")
    c = errors.argmin(axis=1)
    return (errors[np.arange(len(c)), c] - mean[c]) / std[c]


def _log_errors(errors: np.ndarray) -> np.ndarray:
    errors = np.asarray(errors, np.float64)
    if errors.ndim != 2 or errors.shape[1] < 2:
        raise CalibrationError(f"error profiles need errors [N, K] with K >= 2, got {errors.shape}")
    return np.log(np.maximum(errors, 1e-12))


def _shrunk_precision(x: np.ndarray) -> np.ndarray:
    """Rows [n, K] -> inverse of the Ledoit-Wolf shrunk covariance [K, K] (shrinkage estimated from the data)."""
    xc = x - x.mean(axis=0)
    n, k = xc.shape
    cov = xc.T @ xc / n
    mu = np.trace(cov) / k
    target = mu * np.eye(k)
    d2 = float(((cov - target) ** 2).sum())
    # sum_i ||x_i x_i^T - cov||_F^2 = sum_i ||x_i||^4 - n ||cov||_F^2
    b2 = float((np.sum(xc ** 2, axis=1) ** 2).sum() - n * (cov ** 2).sum()) / n ** 2
    shrink = 1.0 if d2 <= 0 else min(b2, d2) / d2
    return np.linalg.inv(shrink * target + (1 - shrink) * cov + 1e-12 * max(mu, 1e-12) * np.eye(k))


def fit_profile_stats(errors: np.ndarray, profile: np.ndarray | None = None) -> dict:
    """Errors float [N, K] of normal cells -> {"mean": [K][D], "precision": [K][D][D]}: per predicted class
    (argmin of errors), the mean log-error profile and its shrunk inverse covariance; pooled for classes predicted
    fewer than MIN_PROFILE_CELLS times. The profile is the class errors (D = K) unless ``profile`` float [N, D]
    gives other positive errors of the same cells (e.g. per class and timestep, D = K * T)."""
    k = np.shape(errors)[1]
    pred = _log_errors(errors).argmin(axis=1)
    le = _log_errors(errors if profile is None else profile)
    n = len(le)
    if len(pred) != n:
        raise CalibrationError(f"profile has {n} rows for {len(pred)} cells")
    if n < MIN_PROFILE_CELLS:
        raise CalibrationError(f"error-profile statistics need at least {MIN_PROFILE_CELLS} normal cells, got {n}")
    pooled = (le.mean(axis=0), _shrunk_precision(le))
    mean, prec = [], []
    for c in range(k):
        rows = le[pred == c]
        m, p = (rows.mean(axis=0), _shrunk_precision(rows)) if len(rows) >= MIN_PROFILE_CELLS else pooled
        mean.append(m.tolist())
        prec.append(p.tolist())
    return {"mean": mean, "precision": prec}


def profile_distance(errors: np.ndarray, stats: dict, profile: np.ndarray | None = None) -> np.ndarray:
    """Errors float [N, K] -> float64 [N] squared Mahalanobis distance of the log-error profile (``profile`` [N, D]
    if the statistics were fitted on one, as fit_profile_stats) from the normal profile of its predicted class;
    higher = more unusual."""
    c = _log_errors(errors).argmin(axis=1)
    le = _log_errors(errors if profile is None else profile)
    mean, prec = np.asarray(stats["mean"], np.float64), np.asarray(stats["precision"], np.float64)
    k, dim = np.shape(errors)[1], le.shape[1]
    if mean.shape != (k, dim) or prec.shape != (k, dim, dim):
        raise CalibrationError(f"error-profile statistics are {mean.shape[0]} classes x {mean.shape[-1]} features, "
                               f"the cells have {k} classes x {dim}")
    d = le - mean[c]
    return np.einsum("ni,nij,nj->n", d, prec[c], d)


def crossfit_profile_distance(errors: np.ndarray, folds: int = 5, seed: int = 0,
                              profile: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold profile distances float64 [N] of the cells ``fit_profile_stats`` is fitted on: each fold is
    scored by statistics fitted on the others, so a threshold set on them holds for new cells (in-sample
    distances are too small: the statistics have ~K^2 parameters per class). ``profile``: as fit_profile_stats."""
    errors = np.asarray(errors, np.float64)
    profile = errors if profile is None else np.asarray(profile, np.float64)
    order = np.random.default_rng(seed).permutation(len(errors))
    out = np.empty(len(errors))
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        out[part] = profile_distance(errors[part], fit_profile_stats(errors[rest], profile[rest]), profile[part])
    return out


def anomaly_scores(errors: np.ndarray, engine_anomaly: np.ndarray, stats: dict | None = None,
                   profile_stats: dict | None = None) -> dict[str, np.ndarray]:
    """Every candidate score (higher = more anomalous), float64 [N] each; "best_error" only when stats are
    given, "error_profile" only when profile_stats are."""
    out = {"engine": np.asarray(engine_anomaly, np.float64), "neg_zeta": -zeta(errors)}
    if stats is not None:
        out["best_error"] = best_error_level(errors, stats)
    if profile_stats is not None:
        out["error_profile"] = profile_distance(errors, profile_stats)
    return out


def min_normal_cells(false_alarm: float) -> int:
    """Fewest normal cells for which the conformal threshold at ``false_alarm`` exists: n >= (1 - f) / f."""
    return max(1, math.ceil((1.0 - false_alarm) / false_alarm - 1e-9))


def conformal_threshold(normal_scores: np.ndarray, false_alarm: float = 0.02) -> float:
    """Threshold t on scores of normal calibration cells float [n] such that a new exchangeable normal cell
    has P(score >= t) <= false_alarm (finite-sample, ties included).

    t is just above the k-th smallest score, k = ceil((n + 1)(1 - false_alarm)): a new cell exceeds the k-th
    smallest of n others with probability at most (n + 1 - k) / (n + 1) <= false_alarm.
    """
    if not 0.0 < false_alarm < 1.0:
        raise CalibrationError(f"false_alarm must lie in (0, 1), got {false_alarm}")
    s = np.sort(np.asarray(normal_scores, np.float64))
    if not np.isfinite(s).all():
        raise CalibrationError("anomaly scores of normal cells contain NaN or inf")
    n = len(s)
    k = math.ceil((n + 1) * (1.0 - false_alarm) - 1e-9)
    if k > n:
        raise CalibrationError(f"too few normal cells for a {100 * false_alarm:g}% false-alarm threshold: "
                               f"got {n}, need at least {min_normal_cells(false_alarm)}")
    return float(np.nextafter(s[k - 1], np.inf))


def auroc(normal: np.ndarray, abnormal: np.ndarray) -> float:
    """P(score of an abnormal cell > score of a normal cell) + 0.5 P(tie), from average ranks (Mann-Whitney U)."""
    normal, abnormal = np.asarray(normal, np.float64).ravel(), np.asarray(abnormal, np.float64).ravel()
    if len(normal) == 0 or len(abnormal) == 0:
        raise CalibrationError("auroc needs at least one normal and one abnormal score")
    allv = np.concatenate([normal, abnormal])
    if not np.isfinite(allv).all():
        raise CalibrationError("auroc: scores contain NaN or inf")
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    avg_rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]  # 1-based average rank of each value
    u = avg_rank[len(normal):].sum() - len(abnormal) * (len(abnormal) + 1) / 2.0
    return float(u / (len(normal) * len(abnormal)))


def score_histograms(normal: np.ndarray, others: dict[str, np.ndarray], path: str | Path,
                     threshold: float | None = None, title: str = "Anomaly score") -> Path:
    """Write a PNG: density histograms of normal scores and of each named group in ``others``, and the threshold."""
    from matplotlib.figure import Figure

    groups = {"normal": np.asarray(normal, np.float64), **{k: np.asarray(v, np.float64) for k, v in others.items()}}
    allv = np.concatenate(list(groups.values()))
    lo, hi = np.percentile(allv, [0.5, 99.5])
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, v in groups.items():
        ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, alpha=0.5, label=f"{name} (n={len(v)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set(xlabel="score (higher = more anomalous)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
