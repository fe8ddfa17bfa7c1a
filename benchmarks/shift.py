"""How do the flags move under mild acquisition changes? Held-out PBC cells, altered the way another camera,
lamp, focus or compression alters them, through each bundle's engine and calibrated decision.

A box next to a microscope sees images that differ a little from the ones it was calibrated on: white balance,
brightness, focus, JPEG settings, sensor noise, resolution. A normal cell should stay normal under such
changes: the share of cells flagged abnormal (the false-alarm rate, about 2% on unaltered cells) and the share
sent to review should move little, and the label should stay. The perturbations act on the original image,
before the shared preprocessing (``edge.preprocess.normalise_cell``), as they would on the box. Bundles are
compared in one run on the same cells.

    python benchmarks/shift.py --bundle edge/models/default --bundle runs/bundleH2 \
        --splits export/checkpoints/teacherE/splits.npz --cells 400 --out runs/shift

Prints a table per bundle (perturbation: accuracy, label kept, accepted / review / abnormal %); writes
``<out>.json`` and ``<out>.png`` (abnormal and review rates per perturbation, one bar per bundle).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.backends import load_backend  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.imageio import read_image  # noqa: E402
from edge.postprocess import STATES, decide  # noqa: E402
from edge.preprocess import normalise_cell  # noqa: E402
from edge.progress import Progress  # noqa: E402


def _gain(rgb: np.ndarray, g: tuple[float, float, float]) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) * np.float32(g), 0, 255).astype(np.uint8)


def _gamma(rgb: np.ndarray, gamma: float) -> np.ndarray:
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    return lut[rgb]


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def _noise(rgb: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    n = np.random.default_rng(seed).normal(0.0, sigma, rgb.shape)
    return np.clip(rgb + n, 0, 255).astype(np.uint8)


def _resolution(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


# name -> f(uint8 RGB [H, W, 3], seed) -> uint8 RGB [H, W, 3]; mild: each within what two set-ups of the same
# microscope differ by (channel gains of 6-8%, brightness 10%, focus blur of ~1 px at 360 px, JPEG 60)
PERTURBATIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "none": lambda x, s: x,
    "brighter 10%": lambda x, s: _gain(x, (1.1, 1.1, 1.1)),
    "darker 10%": lambda x, s: _gain(x, (0.9, 0.9, 0.9)),
    "warmer (R +6%, B -6%)": lambda x, s: _gain(x, (1.06, 1.0, 0.94)),
    "cooler (R -6%, B +6%)": lambda x, s: _gain(x, (0.94, 1.0, 1.06)),
    "greener (G +8%)": lambda x, s: _gain(x, (1.0, 1.08, 1.0)),
    "gamma 0.85": lambda x, s: _gamma(x, 0.85),
    "gamma 1.15": lambda x, s: _gamma(x, 1.15),
    "defocus (blur sigma 0.6 px)": lambda x, s: cv2.GaussianBlur(x, (0, 0), 0.6),
    "JPEG quality 60": lambda x, s: _jpeg(x, 60),
    "sensor noise (sigma 3)": lambda x, s: _noise(x, 3.0, s),
    "resolution x0.7": lambda x, s: _resolution(x, 0.7),
}


def perturbed_cells(paths: list[Path], crop_size: int, names: list[str]) -> dict[str, np.ndarray]:
    """Image files -> {perturbation: uint8 [N, 3, S, S] normalised cells}."""
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    bar = Progress(len(paths), "perturb")
    for i, p in enumerate(paths):
        rgb = read_image(p)
        for n in names:
            out[n].append(normalise_cell(PERTURBATIONS[n](rgb, i), crop_size).crop.transpose(2, 0, 1))
        bar.update()
    return {n: np.stack(v) for n, v in out.items()}


def flag_rates(bundle_dir: str, cells: dict[str, np.ndarray], truth: np.ndarray, batch: int = 64) -> dict[str, dict]:
    """Per perturbation: accuracy, share of labels kept from the unaltered cells, and state shares (fractions)."""
    bundle = load_bundle(bundle_dir)
    backend = load_backend("onnxruntime", bundle)
    rows, base = {}, None
    for name, x in cells.items():
        dec = [d for i in range(0, len(x), batch) for d in decide(backend.infer(x[i:i + batch]), bundle.classes, bundle.calibration)]
        label = np.array([bundle.classes.index(d.label) for d in dec])
        base = label if base is None else base
        state = np.array([d.state for d in dec])
        rows[name] = {"accuracy": float(np.mean(label == truth)), "label_kept": float(np.mean(label == base)),
                      **{s: float(np.mean(state == s)) for s in STATES},
                      "median_anomaly": float(np.median([d.anomaly for d in dec]))}
    return rows


def summarise(rows: dict[str, dict]) -> dict:
    """Over the perturbations (not "none"): mean and worst abnormal rate, and the mean share of labels kept."""
    alt = {n: r for n, r in rows.items() if n != "none"}
    if not alt:
        return {"perturbations": 0}
    worst = max(alt, key=lambda n: alt[n]["abnormal"])
    return {"perturbations": len(alt), "mean_abnormal": float(np.mean([r["abnormal"] for r in alt.values()])),
            "worst_abnormal": alt[worst]["abnormal"], "worst": worst,
            "mean_label_kept": float(np.mean([r["label_kept"] for r in alt.values()]))}


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(next(iter(results.values())))
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / len(results)
    y = np.arange(len(names))
    for ax, state in zip(axes, ("abnormal", "review")):
        for j, (bundle, rows) in enumerate(results.items()):
            ax.barh(y + j * width, [100 * rows[n][state] for n in names], height=width, label=bundle)
        ax.set(xlabel=f"% of normal cells flagged {state}", title=state)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y + width * (len(results) - 1) / 2, names)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, help="bundle folder; repeat to compare bundles")
    ap.add_argument("--data", default="../shared/data/pbc", help="labelled folder the splits were made for")
    ap.add_argument("--splits", required=True, help="splits.npz of the bundle's teacher (its 'val' cells are used)")
    ap.add_argument("--split", default="val", help="held-out split to draw from (default val)")
    ap.add_argument("--cells", type=int, default=400, help="cells, a class-stratified sample of the split (0 = all)")
    ap.add_argument("--only", help="comma-separated perturbation names (default: all)")
    ap.add_argument("--out", default="benchmarks/out/shift", help="output prefix for .json and .png")
    args = ap.parse_args()

    from calibration.calibset import stratified_sample
    from export.datasets import load_labelled_folder, select_splits

    names = list(PERTURBATIONS) if not args.only else ["none"] + [n.strip() for n in args.only.split(",") if n.strip() != "none"]
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        ap.error(f"unknown perturbation(s) {unknown}; known: {list(PERTURBATIONS)}")
    folder = select_splits(load_labelled_folder(args.data), args.splits, [args.split])
    pick = np.arange(len(folder.paths)) if args.cells <= 0 else stratified_sample(folder.labels, args.cells, seed=0)
    paths, truth = [folder.paths[i] for i in pick], folder.labels[pick]
    sizes = {load_bundle(b).crop_size for b in args.bundle}
    if len(sizes) != 1:
        ap.error(f"bundles take different crop sizes {sorted(sizes)}; compare bundles of one input spec")
    cells = perturbed_cells(paths, sizes.pop(), names)
    results = {b: flag_rates(b, cells, truth) for b in args.bundle}
    summary = {b: summarise(rows) for b, rows in results.items()}
    for b, rows in results.items():
        print(f"\n{b} ({len(truth)} {args.split} cells)")
        print(f"{'perturbation':30s} {'acc':>6s} {'kept':>6s} {'accept':>7s} {'review':>7s} {'abnorm':>7s} {'med.anom':>9s}")
        for n, r in rows.items():
            print(f"{n:30s} {100 * r['accuracy']:6.1f} {100 * r['label_kept']:6.1f} {100 * r['accepted']:7.1f} "
                  f"{100 * r['review']:7.1f} {100 * r['abnormal']:7.1f} {r['median_anomaly']:9.2f}")
        sm = summary[b]
        print(f"over the {sm['perturbations']} perturbations: abnormal {100 * sm['mean_abnormal']:.1f}% on average, "
              f"{100 * sm['worst_abnormal']:.1f}% at worst ({sm['worst']}); label kept {100 * sm['mean_label_kept']:.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"cells": len(truth), "split": args.split, "summary": summary,
                                                     "results": results}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
