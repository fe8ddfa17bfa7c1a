"""``cytoedge calibrate``: re-fit a bundle's calibration.json on a labelled folder of the clinic's own cells.

Runs the bundle's engine over every image (read_image -> normalise_cell -> backend.infer, in batches),
fits temperature, review threshold and anomaly threshold (calibration.fit) and rewrites calibration.json
in the bundle with its manifest hash. With ``--splits FILE --split cal,val`` only the folder's cells in those
held-out splits of a teacher's splits.npz are used (how the shipped bundle is calibrated on PBC). Needs only the
base install (no torch).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from calibration.anomaly import ANOMALY_SCORES, min_normal_cells
from calibration.calibset import crops_sha256
from calibration.fit import fit_calibration
from calibration.risk import min_cells
from edge.errors import CalibrationError, InputError
from edge.imageio import read_image
from edge.preprocess import normalise_cell

CALIBRATION_FILE = "calibration.json"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="re-fit a bundle's calibration (temperature, review and abnormal thresholds) on labelled cells",
        description="Run the bundle's engine over a labelled folder (<folder>/<class>/<image>, class folders named "
        "like the bundle's classes, normal cells only, never seen in training) and rewrite the bundle's "
        "calibration.json: the temperature of the probabilities, the review threshold that keeps the error rate "
        "among accepted cells <= ALPHA with probability 1 - DELTA, and the anomaly threshold that flags at most "
        "a fraction F of normal cells as abnormal. Refuses when the folder has too few cells for the requested "
        "guarantee (the minimum is named) or class folders the bundle does not know.")
    p.add_argument("folder", metavar="LABELLED_FOLDER", help="folder of class folders of labelled cell images")
    p.add_argument("--bundle", required=True, metavar="DIR", help="model bundle folder to re-calibrate (rewritten in place)")
    p.add_argument("--splits", metavar="NPZ",
                   help="calibrate only on the --split cells of the folder named by this splits file (a teacher's "
                   "splits.npz: indices into the folder's image list; refused for another folder)")
    p.add_argument("--split", metavar="NAMES",
                   help="comma-separated held-out splits of --splits to calibrate on: cal, val or cal,val (default cal)")
    p.add_argument("--alpha", type=float, default=0.01, metavar="A",
                   help="largest error rate allowed among accepted cells (default 0.01)")
    p.add_argument("--delta", type=float, default=0.1, metavar="D",
                   help="allowed probability that the error bound fails (default 0.1: the bound holds with 90%%)")
    p.add_argument("--false-alarm", type=float, default=0.02, metavar="F",
                   help="fraction of normal cells allowed to be flagged abnormal (default 0.02)")
    p.add_argument("--anomaly-score", choices=ANOMALY_SCORES, default=None,
                   help="anomaly score to threshold (default: the one the bundle's calibration uses, else 'engine')")
    p.add_argument("--class-bias", action="store_true",
                   help="fit one offset per class besides the temperature (bias-corrected temperature scaling); it can "
                   "change labels, e.g. when this microscope's class mix differs (default: temperature only)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="inference backend (default onnxruntime)")
    p.add_argument("--precision", default=None, help="engine precision to run (default: the bundle's default)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="cells per inference batch (default 32)")
    p.set_defaults(func=run)


def _progress(done: int, total: int) -> None:
    width = 30
    fill = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\rcalibrate [{'#' * fill}{'.' * (width - fill)}] {done}/{total} cells", end=end, file=sys.stderr, flush=True)


def run_engine(backend, paths: list, crop_size: int, batch_size: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Images -> (outputs {"logits" [M, K], "errors" [M, K], "anomaly" [M]}, crops uint8 [M, S, S, 3],
    kept bool [N]: False for an unreadable image, which is skipped with a warning)."""
    crops, kept, outs = [], np.zeros(len(paths), bool), []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            outs.append(backend.infer(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2))))
            crops.extend(batch)
            batch.clear()

    for i, path in enumerate(paths):
        try:
            batch.append(normalise_cell(read_image(path), size=crop_size).crop)
            kept[i] = True
        except InputError as exc:
            print(f"\ncytoedge calibrate: skipping {exc}", file=sys.stderr)
        if len(batch) == batch_size or i == len(paths) - 1:
            flush()
            _progress(i + 1, len(paths))
    if not outs:
        raise InputError("no readable images in the calibration folder")
    merged = {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in ("logits", "errors", "anomaly")}
    return merged, np.stack(crops), kept


def run(args: argparse.Namespace) -> int:
    from edge.backends import load_backend
    from edge.bundle import load_bundle, update_bundle_file
    from export.datasets import load_labelled_folder, select_splits

    for name in ("alpha", "delta", "false_alarm"):
        if not 0.0 < getattr(args, name) < 1.0:
            raise CalibrationError(f"--{name.replace('_', '-')} must lie in (0, 1), got {getattr(args, name)}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    bundle = load_bundle(args.bundle)
    folder = load_labelled_folder(args.folder, classes=bundle.classes, min_classes=1)
    if args.split and not args.splits:
        raise InputError("--split names splits of a --splits file: give --splits too")
    splits = [n for n in (args.split or "cal").split(",") if n] if args.splits else None
    if splits is not None:
        folder = select_splits(folder, args.splits, splits)
    need = max(min_cells(args.alpha, args.delta), min_normal_cells(args.false_alarm))
    if len(folder.paths) < need:
        raise CalibrationError(f"{args.folder}: {len(folder.paths)} cells is too few for error <= {args.alpha:g} among "
                               f"accepted with probability {1 - args.delta:g} and a {args.false_alarm:g} false-alarm "
                               f"rate: need at least {need}")
    score = args.anomaly_score or (bundle.calibration or {}).get("anomaly_score", "engine")
    backend = load_backend(args.backend, bundle, args.precision)
    outputs, crops, kept = run_engine(backend, folder.paths, bundle.crop_size, args.batch_size)
    cal = fit_calibration(outputs["logits"], outputs["errors"], outputs["anomaly"], folder.labels[kept],
                          bundle.classes, alpha=args.alpha, delta=args.delta, false_alarm=args.false_alarm,
                          anomaly_score=score, calibset_sha256=crops_sha256(crops), class_bias=args.class_bias)
    cal["backend"], cal["precision"] = backend.name, backend.precision
    if splits is not None:
        cal["splits"] = splits
    update_bundle_file(bundle.root, CALIBRATION_FILE, (json.dumps(cal, indent=2, allow_nan=False) + "\n").encode())
    m = cal["metrics"]
    print(f"calibrated {bundle.root} on {cal['n_cells']} cells ({backend.name} {backend.precision}): "
          f"temperature {cal['temperature']:.3f}, ECE {100 * m['ece_before']:.2f}% -> {100 * m['ece_after']:.2f}%; "
          f"review below p={cal['review_threshold']:.4g}: coverage {100 * m['coverage']:.1f}%, error among accepted "
          f"{100 * m['risk_accepted']:.2f}% (bound {100 * args.alpha:g}% at {100 * (1 - args.delta):g}%); "
          f"abnormal at {score} >= {cal['anomaly_threshold']:.4g} ({100 * args.false_alarm:g}% false alarms)")
    return 0
