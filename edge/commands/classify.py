"""``cytoedge classify``: classify cell images (contract 1 of the design)."""
from __future__ import annotations

import json
import sys

from edge.backends import BACKENDS
from edge.bundle import BUNDLE_HELP


def register(sub) -> None:
    p = sub.add_parser("classify", help="classify cell images (JSONL out)",
                       description="Classify images of single cells (files or folders searched recursively; JPEG, PNG, "
                       "BMP, TIFF; any size and magnification). Each image's main nucleated cell is located by its stain, "
                       "centred and scale-normalised, then classified by the bundle's distilled engine (default) or the full "
                       "diffusion teacher (--teacher). Writes one JSON object per image per line: path, label, probs "
                       "(calibrated), state (accepted | review | abnormal), anomaly (higher = more anomalous), evals "
                       "(denoiser evaluations used), cell_found (false = no nucleus found, the image centre was used). "
                       "An unreadable image gives a line with \"error\" and the run goes on; the exit status is 1 if any failed.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--bundle", help=BUNDLE_HELP)
    p.add_argument("--teacher", action="store_true", help="run the full diffusion teacher instead of the engine (needs the export extra; slow)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="engine backend (default onnxruntime)")
    p.add_argument("--precision", choices=("fp32", "int8", "fp16"), help="engine precision (default: the bundle's)")
    p.add_argument("--batch", type=int, default=32, help="images per inference batch (default 32)")
    p.add_argument("--out", help="write JSONL here instead of stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from edge.backends import load_backend
    from edge.bundle import load_bundle
    from edge.classify import classify_paths
    from edge.errors import InputError
    from edge.imageio import iter_image_paths

    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    paths = iter_image_paths(args.inputs)
    if not paths:
        raise InputError(f"no images found in: {' '.join(args.inputs)}")
    bundle = load_bundle(args.bundle)
    backend = teacher = None
    if args.teacher:
        from export.teacher import load_teacher

        teacher = load_teacher(bundle.root)
    else:
        backend = load_backend(args.backend, bundle, args.precision)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    failed = 0
    try:
        progress = None
        if args.out and sys.stderr.isatty():
            from edge.progress import Progress
            progress = Progress(len(paths), "classify")
        for res in classify_paths(paths, bundle, backend=backend, teacher=teacher, batch=args.batch):
            out.write(json.dumps(res.record) + "\n")
            out.flush()
            failed += not res.ok
            if progress:
                progress.update(1)
    finally:
        if args.out:
            out.close()
    if failed:
        print(f"cytoedge classify: {failed} of {len(paths)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0
