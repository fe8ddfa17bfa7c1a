"""How much does the engine's fixed view matter? The student engine under each of the 8 dihedral views.

The engine draws its noise once (fixed seed), so how that noise meets a cell depends on the cell's orientation.
``cytoedge distill`` picks one view on the calibration split (stage 6, view.json); this script shows the whole
picture on both held-out splits, so the choice can be checked on cells it did not see: per view, accuracy and
balanced accuracy on the ``cal`` and ``val`` splits and agreement with the teacher's full labels on ``val``; then
the average of the class errors over the first 2, 4 and 8 views (test-time augmentation: 2x, 4x, 8x the
evaluations per cell) for comparison. Prints a table; writes JSON and a PNG.

    python benchmarks/views.py --teacher runs/teacher --student runs/student --out benchmarks/out/views
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/teacher", help="teacher folder (teacher.safetensors, splits.npz)")
    ap.add_argument("--student", default="runs/student", help="student folder (student.safetensors, distill.json, "
                    "teacher_val.npz)")
    ap.add_argument("--cache", default="runs/cache/pbc64.npz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/views", help="folder for views.json and views.png")
    args = ap.parse_args()

    import torch

    from calibration.accuracy import accuracy_report
    from export.distill import engine_errors
    from export.engine import VIEWS, build_engine, load_student
    from export.teacher import load_teacher
    from export.train import load_cache

    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    unet, info = load_student(teacher, args.student)
    engine = build_engine(teacher, unet, info["timesteps"], info["noise_seed"])
    data = load_cache(args.cache)
    with np.load(Path(args.teacher) / "splits.npz") as z:
        splits = {k: z[k] for k in ("cal", "val")}
    with np.load(Path(args.student) / "teacher_val.npz") as z:
        teacher_val = z["label"]
    errors: dict[str, list[np.ndarray]] = {}
    for split, idx in splits.items():
        errors[split] = []
        for view in range(len(VIEWS)):
            engine.view = view
            errors[split].append(engine_errors(engine, data["crops"][idx]))
            print(f"{split} {VIEWS[view]} done", file=sys.stderr, flush=True)

    def scores(split: str, e: np.ndarray) -> dict:
        y, pred = data["labels"][splits[split]], e.argmin(1)
        rep = accuracy_report(y, pred, list(teacher.cfg.classes))
        r = {"accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"]}
        if split == "val":
            r["teacher_agreement"] = float(np.mean(pred == teacher_val))
        return r

    rows = [{"view": VIEWS[v], "evals_per_cell": engine.evals_per_cell,
             **{f"{s}_{k}": x for s in splits for k, x in scores(s, errors[s][v]).items()}} for v in range(len(VIEWS))]
    for n in (2, 4, 8):
        rows.append({"view": f"mean of views 0-{n - 1}", "evals_per_cell": n * engine.evals_per_cell,
                     **{f"{s}_{k}": x for s in splits for k, x in scores(s, np.mean(errors[s][:n], 0)).items()}})
    chosen = VIEWS[int(info.get("view", 0))]
    print(f"student {args.student}: chosen view {chosen} (distill.json); {len(splits['cal'])} cal / "
          f"{len(splits['val'])} val cells")
    print(f"{'view':>18} {'evals':>5} {'cal acc':>8} {'cal bal':>8} {'val acc':>8} {'val bal':>8} {'val agree':>9}")
    for r in rows:
        mark = " <- chosen" if r["view"] == chosen else ""
        print(f"{r['view']:>18} {r['evals_per_cell']:>5} {100 * r['cal_accuracy']:>7.2f}% {100 * r['cal_balanced_accuracy']:>7.2f}% "
              f"{100 * r['val_accuracy']:>7.2f}% {100 * r['val_balanced_accuracy']:>7.2f}% {100 * r['val_teacher_agreement']:>8.2f}%{mark}")
    single = rows[:len(VIEWS)]
    summary = {k: {"min": min(r[k] for r in single), "mean": float(np.mean([r[k] for r in single])),
                   "max": max(r[k] for r in single)} for k in ("cal_accuracy", "val_accuracy", "val_teacher_agreement")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "views.json").write_text(json.dumps({"student": args.student, "chosen_view": chosen, "rows": rows,
                                                "single_view_summary": summary}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for r in single:
        ax.scatter(100 * r["cal_accuracy"], 100 * r["val_accuracy"], color="C3" if r["view"] == chosen else "C0")
        ax.annotate(r["view"], (100 * r["cal_accuracy"], 100 * r["val_accuracy"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("accuracy on the calibration split (%): what picks the view")
    ax.set_ylabel("accuracy on the validation split (%)")
    ax.set_title(f"engine accuracy per fixed view ({engine.evals_per_cell} evaluations per cell)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "views.png", dpi=120)
    print(f"wrote {out / 'views.json'} and views.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
