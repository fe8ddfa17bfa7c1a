"""Review threshold with a finite-sample risk guarantee (Learn then Test), and risk-coverage curves.

A cell is accepted when its confidence (calibrated max probability) is >= a threshold lambda. We want
the error rate among accepted cells, R(lambda) = P(wrong | confidence >= lambda), to be <= alpha with
probability >= 1 - delta over the draw of the calibration cells.

Learn then Test (Angelopoulos et al. 2021): for each lambda on a grid fixed in advance, test the null
H(lambda): R(lambda) > alpha with an exact binomial p-value. Given the n(lambda) accepted calibration
cells, their error count is Binomial(n, R(lambda)), so p = P(Binomial(n, alpha) <= errors) is a valid
p-value. Fixed-sequence testing walks the grid downwards and stops at the first null it cannot reject;
it controls the family-wise error at delta with no multiplicity correction, so every rejected lambda (in
particular the lowest, which we return) has R <= alpha with probability >= 1 - delta.

Where the walk starts decides its power: starting at the very top, one error among the first few hundred
cells (a mislabelled cell, say) ends the walk at once. So the walk starts at the threshold whose p-value
is predicted to be smallest if the confidences are calibrated probabilities (predicted errors = sum of
1 - confidence over accepted cells), among thresholds accepting at least ``min_cells(alpha, delta)``
cells (below that no error count can be certified). The start uses the confidences only, never the
errors; tests/test_calibration.py checks over 200 seeds that the guarantee holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import CalibrationError

# Thresholds on the max probability, fixed before seeing data; dense near 1 where the accepted set is chosen.
DEFAULT_GRID = np.unique(np.concatenate([np.linspace(0.0, 1.0, 1001), 1.0 - np.logspace(-8, -1, 141)]))[::-1]


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), exact (summed in log space), for 0 < p < 1."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    i = np.arange(1, k + 1, dtype=np.float64)
    log_pmf = n * math.log1p(-p) + np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i) + math.log(p) - math.log1p(-p))])
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def min_cells(alpha: float, delta: float) -> int:
    """Fewest accepted cells for which zero errors certify risk <= alpha at level delta:
    the smallest n with (1 - alpha)^n <= delta, i.e. n >= log(delta) / log(1 - alpha)."""
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while n * math.log1p(-alpha) > math.log(delta):
        n += 1
    while n > 1 and (n - 1) * math.log1p(-alpha) <= math.log(delta):
        n -= 1
    return n


@dataclass(frozen=True)
class RiskThreshold:
    """threshold: accept a cell iff confidence >= threshold (inf = nothing can be accepted);
    coverage: fraction of calibration cells accepted; risk: error rate among them (0 when none);
    n_accepted, n_errors: counts among accepted; n_cells; alpha, delta; min_cells: see ``min_cells``."""

    threshold: float
    coverage: float
    risk: float
    n_accepted: int
    n_errors: int
    n_cells: int
    alpha: float
    delta: float
    min_cells: int


def _check(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    if confidence.ndim != 1 or confidence.shape != correct.shape:
        raise CalibrationError(f"confidence and correct must both be [N], got {confidence.shape} and {correct.shape}")
    if not np.isfinite(confidence).all():
        raise CalibrationError("confidence contains NaN or inf")
    return confidence, correct


def ltt_threshold(confidence: np.ndarray, correct: np.ndarray, alpha: float = 0.01, delta: float = 0.1,
                  grid: np.ndarray | None = None) -> RiskThreshold:
    """Lowest threshold on confidence float [N] (calibrated max probability, 0..1) such that
    P(error rate among accepted <= alpha) >= 1 - delta.

    correct: bool [N], the prediction was right. grid: candidate thresholds (default DEFAULT_GRID), tested in
    descending order. Raises CalibrationError when N < min_cells(alpha, delta) (the message names the minimum).
    If no threshold can be certified, returns threshold=inf with coverage 0 (accept nothing).
    """
    if not (0.0 < alpha < 1.0 and 0.0 < delta < 1.0):
        raise CalibrationError(f"alpha and delta must lie in (0, 1), got alpha={alpha}, delta={delta}")
    confidence, correct = _check(confidence, correct)
    n_cells, need = len(confidence), min_cells(alpha, delta)
    if n_cells < need:
        raise CalibrationError(f"too few cells for error <= {alpha:g} among accepted with probability {1 - delta:g}: "
                               f"got {n_cells}, need at least {need} (and more if any of them are misclassified)")
    grid = np.sort(np.asarray(DEFAULT_GRID if grid is None else grid, np.float64))[::-1]
    order = np.argsort(-confidence, kind="stable")
    cum_err = np.concatenate([[0], np.cumsum(~correct[order])])
    cum_pred = np.concatenate([[0.0], np.cumsum(1.0 - confidence[order])])
    n_acc = n_cells - np.searchsorted(np.sort(confidence), grid, side="left")  # cells with confidence >= lambda
    testable = np.flatnonzero(n_acc >= need)
    if len(testable) == 0:  # a custom grid with no threshold low enough to accept `need` cells
        return RiskThreshold(math.inf, 0.0, 0.0, 0, 0, n_cells, alpha, delta, need)
    sizes, first = np.unique(n_acc[testable], return_index=True)  # many grid points accept the same cells
    predicted = [binom_cdf(int(round(cum_pred[n])), int(n), alpha) for n in sizes]
    best = None
    for j in range(int(testable[first[int(np.argmin(predicted))]]), len(grid)):
        if binom_cdf(int(cum_err[n_acc[j]]), int(n_acc[j]), alpha) > delta:
            break
        best = j
    if best is None:
        return RiskThreshold(math.inf, 0.0, 0.0, 0, 0, n_cells, alpha, delta, need)
    n, k = int(n_acc[best]), int(cum_err[n_acc[best]])
    return RiskThreshold(float(grid[best]), n / n_cells, k / n, n, k, n_cells, alpha, delta, need)


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accept the m most confident cells for m = 1..N -> (coverage m/N, error rate among them), both float [N]."""
    confidence, correct = _check(confidence, correct)
    err = ~correct[np.argsort(-confidence, kind="stable")]
    m = np.arange(1, len(err) + 1)
    return m / len(err), np.cumsum(err) / m


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean selective risk over all coverages; lower is better)."""
    return float(risk_coverage_curve(confidence, correct)[1].mean())


def plot_risk_coverage(confidence: np.ndarray, correct: np.ndarray, path: str | Path,
                       marks: dict[str, tuple[float, float]] | None = None, title: str = "Risk-coverage") -> Path:
    """Write a PNG of the risk-coverage curve; ``marks`` maps a label to a (coverage, risk) point to mark."""
    from matplotlib.figure import Figure

    cov, risk = risk_coverage_curve(confidence, correct)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(cov, 100 * risk, label=f"AURC {100 * risk.mean():.2f}%")
    for name, (c, r) in (marks or {}).items():
        ax.scatter([c], [100 * r], zorder=3, label=f"{name}: coverage {100 * c:.1f}%, error {100 * r:.2f}%")
    ax.set(xlabel="coverage (fraction accepted)", ylabel="error among accepted (%)", xlim=(0, 1), title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
