"""``cytoedge evaluate``: accuracy report of a predictions JSONL against a labelled folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy report of classify's JSONL against a labelled folder",
                       description="Compare `cytoedge classify` predictions (JSONL) with the true classes given by the "
                       "class folder each image sits in (<DATA>/<class>/.../<image>). Prints accuracy, balanced accuracy, "
                       "per-class recall and the confusion matrix; with --out also writes report.json and confusion.png.")
    p.add_argument("predictions", help="JSONL written by `cytoedge classify` (one object per image)")
    p.add_argument("--data", required=True, help="labelled folder: one sub-folder per class (PBC layout)")
    p.add_argument("--out", help="folder for report.json and confusion.png")
    p.set_defaults(func=run)


def load_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{i}: not a JSON line ({exc.msg})") from exc
    if not rows:
        raise InputError(f"{path}: no predictions")
    return rows


def run(args) -> int:
    from calibration.accuracy import accuracy_report, format_report, plot_confusion

    data = Path(args.data).resolve()
    if not data.is_dir():
        raise InputError(f"{data}: not a folder")
    rows = load_predictions(Path(args.predictions))
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    truths, labels = [], []
    for r in rows:
        try:
            rel = Path(r["path"]).resolve().relative_to(data)
        except (KeyError, ValueError):
            raise InputError(f"prediction for {r.get('path')!r} is not inside {data}") from None
        truths.append(rel.parts[0])
        labels.append(r["label"])
    classes = sorted(set(truths) | set(labels))
    rep = accuracy_report(np.array([classes.index(t) for t in truths]), np.array([classes.index(p) for p in labels]), classes)
    rep["unreadable"] = len(errors)
    print(format_report(rep, classes))
    if errors:
        print(f"\n{len(errors)} image(s) could not be classified (error lines in the JSONL)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"classes": classes, **rep}, indent=2))
        plot_confusion(rep, classes, out / "confusion.png")
        print(f"\nwrote {out / 'report.json'} and {out / 'confusion.png'}")
    return 0
