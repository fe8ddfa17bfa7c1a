"""Teacher accuracy and cost: full diffusion classification with and without t-test pruning, on the same cells.

Reads the crop cache and the training run's split (validation cells, never trained on); optionally also the
BCCD white cells (another microscope; the WBC box of frames with exactly one label, cropped with a margin and
passed through the same preprocessing) as a domain-shift figure. Prints a table and writes JSON.

    python benchmarks/teacher.py --run runs/teacher --cells 300 --bccd ../shared/data/bccd --out benchmarks/out/teacher
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def bccd_cells(root: str, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 3, S, S] crops of single-labelled BCCD white cells and their class indices."""
    from edge.imageio import read_image
    from edge.preprocess import normalise_cell
    from export.datasets import load_bccd

    cells, labels = [], []
    for fr in load_bccd(root):
        wbc = fr.boxes.get("WBC")
        if fr.label is None or wbc is None or len(wbc) != 1:
            continue
        img = read_image(fr.path)
        x0, y0, x1, y1 = wbc[0]
        m = int(0.35 * max(x1 - x0, y1 - y0))
        crop = img[max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m]
        cells.append(normalise_cell(crop, size=size).crop.transpose(2, 0, 1))
        labels.append(classes.index(fr.label))
    return np.stack(cells), np.array(labels)


def run_teacher(teacher, cells, labels, classes, prune: bool, max_trials: int) -> dict:
    from calibration.accuracy import accuracy_report
    from export.diffusion_classifier import ClassifierConfig, classify_cells

    t0 = time.perf_counter()
    res = classify_cells(teacher, cells, ClassifierConfig(prune=prune, max_trials=max_trials), progress=True)
    dt = time.perf_counter() - t0
    pred = np.array([r.label for r in res])
    evals = np.array([r.evals for r in res])
    rep = accuracy_report(labels, pred, classes)
    return {"prune": prune, "max_trials": max_trials, "n": len(labels), "accuracy": rep["accuracy"],
            "balanced_accuracy": rep["balanced_accuracy"], "recall": rep["recall"], "evals_mean": float(evals.mean()),
            "evals_p90": float(np.percentile(evals, 90)), "s_per_cell": dt / len(labels), "pred": pred.tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/teacher", help="teacher folder (teacher.safetensors/json, splits.npz)")
    ap.add_argument("--cache", default="runs/cache/pbc64.npz")
    ap.add_argument("--cells", type=int, default=300, help="stratified validation cells for the prune/no-prune comparison")
    ap.add_argument("--max-trials", type=int, default=48)
    ap.add_argument("--pruned-only", action="store_true",
                    help="skip the unpruned run (3.5x the time): only the teacher's accuracy as it classifies")
    ap.add_argument("--bccd", help="BCCD root for the domain-shift figure")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/teacher")
    args = ap.parse_args()

    import torch

    from calibration.calibset import stratified_sample
    from export.teacher import load_teacher

    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.run)
    classes = list(teacher.cfg.classes)
    with np.load(args.cache) as z:
        crops, labels = z["crops"], z["labels"]
    val = np.load(Path(args.run) / "splits.npz")["val"]
    sub = val[stratified_sample(labels[val], args.cells, seed=0)]
    cells = crops[sub].transpose(0, 3, 1, 2)
    settings = (True,) if args.pruned_only else (True, False)  # t-test pruning on / off
    rows = [run_teacher(teacher, cells, labels[sub], classes, p, args.max_trials) for p in settings]
    out = {"teacher_steps": teacher.meta.get("steps"), "validation": rows}
    if args.bccd:
        bc, bl = bccd_cells(args.bccd, classes, teacher.cfg.crop_size)
        out["bccd"] = run_teacher(teacher, bc, bl, classes, True, args.max_trials)
    print(f"\nteacher after {out['teacher_steps']} steps")
    print(f"{'set':<22}{'n':>6}{'acc %':>8}{'bal %':>8}{'evals':>8}{'p90':>7}{'s/cell':>8}")
    for r in rows + ([out["bccd"]] if "bccd" in out else []):
        name = ("bccd (other scope)" if r is out.get("bccd") else "val, " + ("pruned" if r["prune"] else "no pruning"))
        print(f"{name:<22}{r['n']:>6}{100 * r['accuracy']:>8.1f}{100 * r['balanced_accuracy']:>8.1f}"
              f"{r['evals_mean']:>8.0f}{r['evals_p90']:>7.0f}{r['s_per_cell']:>8.3f}")
    if len(rows) == 2:
        agree = np.mean(np.array(rows[0]["pred"]) == np.array(rows[1]["pred"]))
        print(f"pruned vs unpruned label agreement: {100 * agree:.1f}%; evaluations cut by "
              f"{100 * (1 - rows[0]['evals_mean'] / rows[1]['evals_mean']):.0f}%")
        out["prune_agreement"] = float(agree)
    o = Path(args.out)
    o.mkdir(parents=True, exist_ok=True)
    (o / "teacher.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {o / 'teacher.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
