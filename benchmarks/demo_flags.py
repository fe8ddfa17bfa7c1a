"""Are the demo's flags plausible? What the runtime makes of every cell placed in the bundled demo frames.

Runs the daemon's own per-frame path (detect -> crop window like ``edge.daemon`` -> ``normalise_cell`` ->
engine -> calibrated decision) on ``edge/demo/frames`` and matches each detection to the nearest truth
cell of ``truth.json`` (detection centre inside the truth box). Prints, per true label, how often the runtime
gives that label and the states it assigns (accepted / review / abnormal), and writes a PNG montage of the
runtime's normalised crops with their truth and verdict, so a person can look.

    python benchmarks/demo_flags.py [--bundle DIR] [--out benchmarks/out/demo_flags]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.backends import load_backend  # noqa: E402
from edge.bundle import load_bundle  # noqa: E402
from edge.daemon import DaemonConfig, cell_crop  # noqa: E402
from edge.detect import detect_cells  # noqa: E402
from edge.imageio import read_image  # noqa: E402
from edge.postprocess import decide  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "edge" / "demo"


def runtime_crops(rgb: np.ndarray, um_per_px: float, crop_size: int, window: float = DaemonConfig.window):
    """Frame -> list of (Detection, uint8 crop [S, S, 3]) for every whole detected cell, as the daemon makes them."""
    return [(det, cell_crop(rgb, det, window, crop_size)) for det in detect_cells(rgb, um_per_px=um_per_px) if not det.edge]


def evaluate(demo: Path, bundle_dir: str | None, every: int = 1) -> tuple[list[dict], list[np.ndarray]]:
    """One row per (frame, matched detection): truth label, runtime label, p, state, anomaly; and the crops."""
    bundle = load_bundle(bundle_dir)
    backend = load_backend("onnxruntime", bundle)
    truth = json.loads((demo / "truth.json").read_text())
    rows, crops = [], []
    for t in truth["frames"][::every]:
        rgb = read_image(demo / "frames" / t["file"])
        found = runtime_crops(rgb, truth["um_per_px"], bundle.crop_size)
        if not found:
            continue
        dec = decide(backend.infer(np.stack([c for _, c in found]).transpose(0, 3, 1, 2)), bundle.classes, bundle.calibration)
        for (det, crop), d in zip(found, dec):
            cx, cy = (det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2
            hit = [c for c in t["cells"] if c["box"][0] <= cx <= c["box"][2] and c["box"][1] <= cy <= c["box"][3]]
            rows.append({"frame": t["file"], "cell": hit[0]["cell"] if hit else None, "truth": hit[0]["label"] if hit else "none",
                         "label": d.label, "p": round(d.p, 3), "state": d.state, "anomaly": round(d.anomaly, 3)})
            crops.append(crop)
    return rows, crops


def summarise(rows: list[dict]) -> dict:
    by = defaultdict(list)
    for r in rows:
        by[r["truth"]].append(r)
    out = {}
    for lab, rs in sorted(by.items()):
        out[lab] = {"views": len(rs), "same_label": round(np.mean([r["label"] == lab for r in rs]), 3),
                    "states": dict(Counter(r["state"] for r in rs)), "labels": dict(Counter(r["label"] for r in rs).most_common(3))}
    normal = [r for r in rows if r["truth"] not in ("none", "blast", "smudge")]
    out["_all_teacher_cells"] = {"views": len(normal), "same_label": round(float(np.mean([r["label"] == r["truth"] for r in normal])), 3) if normal else None,
                                 "states": dict(Counter(r["state"] for r in normal))}
    return out


def montage(rows: list[dict], crops: list[np.ndarray], path: Path, per_cell: int = 1) -> None:
    """First view of every physical cell, labelled truth -> verdict, as a PNG grid."""
    import cv2

    seen, tiles = set(), []
    for r, c in zip(rows, crops):
        key = r["cell"] or r["frame"]
        if key in seen:
            continue
        seen.add(key)
        tile = cv2.resize(c, (128, 128), interpolation=cv2.INTER_NEAREST)
        tile = np.vstack([tile, np.full((30, 128, 3), 255, np.uint8)])
        col = {"accepted": (0, 140, 0), "review": (200, 140, 0), "abnormal": (200, 0, 0)}[r["state"]]
        cv2.putText(tile, r["truth"][:10], (2, 140), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
        cv2.putText(tile, f"{r['label'][:10]} {r['p']:.2f}", (2, 154), cv2.FONT_HERSHEY_SIMPLEX, 0.38, col, 1)
        tiles.append(tile)
    cols = 8
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="model bundle (default: the shipped one)")
    ap.add_argument("--demo", default=str(DEMO), help="demo folder with frames/ and truth.json")
    ap.add_argument("--every", type=int, default=1, help="use every n-th frame")
    ap.add_argument("--out", default="benchmarks/out/demo_flags")
    args = ap.parse_args(argv)
    rows, crops = evaluate(Path(args.demo), args.bundle, args.every)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if crops:
        montage(rows, crops, out / "crops.png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
