"""``cytoedge detect``: nucleated cells in whole smear frames -> JSONL boxes (contract 2 of the design)."""
from __future__ import annotations

import argparse
import json
import sys

from edge.detect import DetectConfig, detect_cells
from edge.errors import CytoEdgeError, InputError
from edge.imageio import iter_image_paths, read_image


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "detect", help="find the nucleated cells (white cells, erythroblasts) in whole smear frames",
        description="Find the nucleated cells in whole smear frames (any size and magnification). Writes one JSON "
        'object per frame per line: {"path": ..., "cells": [{"box": [x0, y0, x1, y1], "score": s, "edge": bool}]} '
        "in pixels of the original frame, highest score first; edge = cut by the frame edge (the daemon does not "
        'classify those). An unreadable frame gives {"path": ..., "error": ...}, the run goes on, and the exit '
        "status is 1 at the end.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument("--out", metavar="FILE", help="write JSONL here instead of stdout")
    p.add_argument("--um-per-px", type=float, default=None, metavar="X",
                   help="microns per pixel of the frames, when known (default: measured from the red cells in view)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.um_per_px is not None and not args.um_per_px > 0:
        raise InputError(f"--um-per-px must be > 0, got {args.um_per_px}")
    paths = iter_image_paths(args.inputs)
    if not paths:
        raise InputError(f"no images found in {', '.join(args.inputs)}")
    config = DetectConfig()
    errors = 0
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for path in paths:
            try:
                rgb = read_image(path)
                cells = [d.to_json() for d in detect_cells(rgb, um_per_px=args.um_per_px, config=config)]
                line = {"path": str(path), "cells": cells}
            except CytoEdgeError as exc:
                errors += 1
                line = {"path": str(path), "error": str(exc)}
            out.write(json.dumps(line) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if errors:
        print(f"cytoedge detect: {errors} of {len(paths)} frame(s) could not be read", file=sys.stderr)
    return 1 if errors else 0
