"""Accuracy report: accuracy, balanced accuracy, per-class recall and the confusion matrix; a proportion's Wilson
interval and the exact McNemar test for two classifiers on the same cells (numpy only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.risk import binom_cdf


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """int [N] true and predicted class indices -> int64 [K, K] counts, rows = true, columns = predicted."""
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def accuracy_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """-> {"n", "accuracy", "balanced_accuracy" (mean recall over classes present), "recall": {class: r|None},
    "confusion": [[...]]}."""
    cm = confusion(y_true, y_pred, len(classes))
    support = cm.sum(1)
    recall = {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    present = [r for r in recall.values() if r is not None]
    return {"n": int(cm.sum()), "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
            "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
            "recall": recall, "confusion": cm.tolist()}


def format_report(rep: dict, classes: list[str]) -> str:
    lines = [f"cells: {rep['n']}   accuracy: {100 * rep['accuracy']:.2f}%   balanced accuracy: {100 * rep['balanced_accuracy']:.2f}%",
             "", "per-class recall:"]
    for c in classes:
        r = rep["recall"][c]
        lines.append(f"  {c:<13} {'n/a' if r is None else f'{100 * r:6.2f}%'}")
    w = max(len(c) for c in classes)
    lines += ["", "confusion (rows = true, columns = predicted):", " " * (w + 1) + " ".join(f"{c[:5]:>5}" for c in classes)]
    for c, row in zip(classes, rep["confusion"]):
        lines.append(f"{c:<{w}} " + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


def plot_confusion(rep: dict, classes: list[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix with counts -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(rep["confusion"], float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {100 * rep['accuracy']:.1f}%, balanced {100 * rep['balanced_accuracy']:.1f}%")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (default 95%) of a proportion: ``successes`` of ``n`` -> (low, high) in [0, 1]."""
    if n <= 0:
        raise ValueError(f"need n >= 1, got {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value for two classifiers scored on the same cells: ``only_a`` cells right for A
    only, ``only_b`` right for B only (the cells both get right or both get wrong say nothing about which is better)."""
    n = only_a + only_b
    return 1.0 if n == 0 else min(1.0, 2 * binom_cdf(min(only_a, only_b), n, 0.5))

