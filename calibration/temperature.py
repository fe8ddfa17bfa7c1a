"""Temperature scaling, expected calibration error and the reliability diagram (numpy only).

Temperature scaling (Guo et al. 2017) divides every logit by one scalar T fitted to minimise the negative
log-likelihood on a calibration split; it changes confidence, never the predicted class. Bias-corrected
temperature scaling (BCTS, Alexandari et al. 2020) adds one offset per class, fitted jointly with T: a diffusion
classifier's per-class errors have class-dependent levels (complex cells denoise worse), which an offset
corrects; it can change the predicted class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import CalibrationError

T_BOUNDS = (0.05, 20.0)  # search range of the temperature; beyond it the logits are degenerate


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float [N, K] logits -> float64 [N, K] probabilities of softmax(logits / temperature), rows sum to 1."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats per cell) of int labels [N] under softmax(logits [N, K] / T)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    zmax = z.max(axis=1, keepdims=True)
    logz = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(logz - z[np.arange(len(z)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = T_BOUNDS,
                    tol: float = 1e-4) -> float:
    """Temperature T > 0 minimising nll(logits [N, K], labels int [N], T), by golden-section search.

    The NLL is convex in 1/T (log-sum-exp of a linear function minus a linear term), so a 1-D search on
    log T over ``bounds`` finds the global minimum within ``tol`` (relative).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise CalibrationError(f"fit_temperature needs logits [N, K] and labels [N], got {logits.shape} and {labels.shape}")
    if not np.isfinite(logits).all():
        raise CalibrationError("fit_temperature: logits contain NaN or inf")
    f = lambda u: nll(logits, labels, float(np.exp(u)))  # noqa: E731
    a, b = np.log(bounds[0]), np.log(bounds[1])
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(np.exp((a + b) / 2.0))


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index in [0, n_bins) of each confidence; bins are (i/n, (i+1)/n], the first also holds 0."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE (a fraction, 0..1) of probs float [N, K] against labels int [N]: sum over equal-width confidence
    bins of (cells in bin / N) * |accuracy in bin - mean confidence in bin|; confidence = max prob."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    if len(labels) == 0:
        raise CalibrationError("expected_calibration_error: no cells")
    idx = _bins(conf, n_bins)
    gap = np.abs(np.bincount(idx, correct, n_bins) - np.bincount(idx, conf, n_bins))
    return float(gap.sum() / len(labels))


def reliability_diagram(curves: dict[str, np.ndarray], labels: np.ndarray, path: str | Path,
                        n_bins: int = 15, title: str = "Reliability diagram") -> Path:
    """Write a PNG: accuracy against mean confidence per bin, one line per probs float [N, K] in ``curves``
    (e.g. {"before": p0, "after": p1}), the ECE of each in the legend, and the diagonal."""
    from matplotlib.figure import Figure

    labels = np.asarray(labels, np.int64)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for name, probs in curves.items():
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(np.float64)
        idx = _bins(conf, n_bins)
        n = np.bincount(idx, minlength=n_bins)
        keep = n > 0
        acc = np.bincount(idx, correct, n_bins)[keep] / n[keep]
        mean_conf = np.bincount(idx, conf, n_bins)[keep] / n[keep]
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.plot(mean_conf, acc, marker="o", label=f"{name} (ECE {100 * ece:.2f}%)")
    ax.set(xlabel="confidence (max probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


MIN_CELLS_PER_CLASS_FOR_BIAS = 10  # a class offset from fewer cells (or none: -> -inf) would be noise


def fit_bias_temperature(logits: np.ndarray, labels: np.ndarray, iters: int = 100) -> tuple[float, np.ndarray]:
    """BCTS: T > 0 and offsets b float64 [K] (mean 0) minimising the mean NLL of softmax(logits / T + b).

    logits float [N, K], labels int [N]. The NLL is convex in (1/T, b); damped Newton steps from the plain
    temperature fit. When a class has fewer than MIN_CELLS_PER_CLASS_FOR_BIAS cells, b = 0 (plain temperature).
    """
    L = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.int64)
    t0 = fit_temperature(L, y)
    n, k = L.shape
    if np.bincount(y, minlength=k).min() < MIN_CELLS_PER_CLASS_FOR_BIAS:
        return t0, np.zeros(k)
    onehot = np.eye(k)[y]
    ridge = 1e-6  # the offsets' common shift is free (softmax ignores it)

    def loss(th: np.ndarray) -> float:
        z = th[0] * L + th[1:]
        zmax = z.max(1, keepdims=True)
        return float(np.mean(zmax[:, 0] + np.log(np.exp(z - zmax).sum(1)) - z[np.arange(n), y]) + 0.5 * ridge * th[1:] @ th[1:])

    th = np.r_[1.0 / t0, np.zeros(k)]
    f = loss(th)
    for _ in range(iters):
        p = softmax(th[0] * L + th[1:])
        r = p - onehot
        grad = np.r_[np.mean((r * L).sum(1)), r.mean(0) + ridge * th[1:]]
        pl = p * L
        h = np.empty((k + 1, k + 1))
        h[0, 0] = np.mean((pl * L).sum(1) - pl.sum(1) ** 2)
        h[0, 1:] = h[1:, 0] = np.mean(pl - p * pl.sum(1, keepdims=True), 0)
        h[1:, 1:] = np.diag(p.mean(0)) - p.T @ p / n + ridge * np.eye(k)
        step = np.linalg.solve(h + 1e-12 * np.eye(k + 1), grad)
        lr = 1.0
        while lr > 1e-4:
            cand = th - lr * step
            fc = loss(cand) if cand[0] > 0 else np.inf
            if fc <= f:
                break
            lr /= 2
        else:
            break
        done = f - fc < 1e-12
        th, f = cand, fc
        if done:
            break
    b = th[1:] - th[1:].mean()
    return float(1.0 / th[0]), b
