"""Cell detection on the BCCD frames: recall and precision against the annotated white cells.

A detection is a hit when its box centre lies inside an annotated WBC box. Recall = annotated WBCs with at
least one hit / all annotated WBCs; precision = detections inside some WBC box / all detections. Edge-cut
detections are included (BCCD annotates cut cells too) and also reported apart.

    python benchmarks/detection.py [--bccd ../shared/data/bccd] [--json out.json] [--limit N] [--um-per-px X]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from edge.detect import DetectConfig, detect_cells
from edge.imageio import read_image
from export.datasets import load_bccd


def evaluate(frames, config: DetectConfig, um_per_px: float | None = None, scale: float = 1.0,
             gains: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict:
    """Run the detector on every frame; ``scale`` resizes frames (and boxes) to mimic another
    magnification, ``gains`` multiply R, G, B to mimic another lamp, camera white balance or stain."""
    n_wbc = found = n_det = hits = n_edge = edge_hits = split = 0
    times, misses, false = [], [], []
    for fr in frames:
        rgb = read_image(fr.path)
        if scale != 1.0:
            rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        if gains != (1.0, 1.0, 1.0):
            rgb = np.clip(rgb * np.asarray(gains, np.float32), 0, 255).astype(np.uint8)
        t0 = time.perf_counter()
        dets = detect_cells(rgb, um_per_px=um_per_px, config=config)
        times.append((time.perf_counter() - t0) * 1e3)
        wbc = fr.boxes.get("WBC", np.zeros((0, 4), np.int64)) * scale
        centres = [((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2) for d in dets]
        inside = np.array([[b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in wbc] for cx, cy in centres], bool)
        inside = inside.reshape(len(dets), len(wbc))
        n_wbc += len(wbc)
        found += int(inside.any(0).sum())
        split += int((inside.sum(0) > 1).sum())
        n_det += len(dets)
        hits += int(inside.any(1).sum())
        for d, ok in zip(dets, inside.any(1) if len(dets) else []):
            n_edge += d.edge
            edge_hits += bool(d.edge and ok)
            if not ok:
                false.append(fr.path.name)
        if len(wbc) and not inside.any(0).all():
            misses.append(fr.path.name)
    return {
        "frames": len(frames), "wbc": n_wbc, "found": found, "detections": n_det, "hits": hits,
        "recall": found / max(n_wbc, 1), "precision": hits / max(n_det, 1),
        "wbc_with_several_detections": split, "edge_detections": n_edge, "edge_hits": edge_hits,
        "ms_per_frame_p50": float(np.percentile(times, 50)), "ms_per_frame_p99": float(np.percentile(times, 99)),
        "missed_frames": sorted(set(misses)), "false_positive_frames": sorted(set(false)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bccd", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bccd"))
    ap.add_argument("--json", default="benchmarks/out/detection.json", help="where to write the figures")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N frames (0 = all)")
    ap.add_argument("--um-per-px", type=float, default=None, help="give the detector the scale (default: it measures it)")
    ap.add_argument("--scale", type=float, nargs="*", default=[1.0],
                    help="also run on frames resized by these factors (another magnification), e.g. 1 0.5 1.5")
    ap.add_argument("--gains", default="1,1,1", help="R,G,B multipliers (another lamp or white balance), e.g. 1.1,0.95,0.9")
    args = ap.parse_args()
    frames = load_bccd(args.bccd)
    if args.limit:
        frames = frames[:args.limit]
    gains = tuple(float(g) for g in args.gains.split(","))
    results = []
    print(f"{'scale':>6} {'frames':>7} {'WBC':>5} {'found':>6} {'dets':>5} {'recall':>7} {'precision':>9} {'several':>7} "
          f"{'edge':>5} {'ms p50':>7} {'ms p99':>7}")
    for sc in args.scale:
        res = evaluate(frames, DetectConfig(), args.um_per_px and args.um_per_px / sc, sc, gains)
        results.append({"scale": sc, "gains": gains, **res})
        print(f"{sc:>6.2f} {res['frames']:>7} {res['wbc']:>5} {res['found']:>6} {res['detections']:>5} {res['recall']:>7.1%} "
              f"{res['precision']:>9.1%} {res['wbc_with_several_detections']:>7} {res['edge_detections']:>5} "
              f"{res['ms_per_frame_p50']:>7.1f} {res['ms_per_frame_p99']:>7.1f}")
    print("several: annotated WBCs holding more than one detection; edge: detections marked as cut by the frame edge")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": DetectConfig().__dict__, "um_per_px": args.um_per_px, "runs": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
