"""``cytoedge generate``: class-conditional sampling from the teacher (needs the export extra)."""
from __future__ import annotations

from pathlib import Path

from edge.bundle import BUNDLE_HELP


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample synthetic cells of one class (or all) from the diffusion teacher",
                       description="Class-conditional DDIM sampling from the bundle's teacher: writes N PNG crops "
                       "(<label>_0000.png ...) and a contact sheet (<label>_sheet.png) into --out. With --label all, "
                       "every class, and all_sheet.png with one row per class (column j of every row starts from the "
                       "same noise, so the rows show what the class condition changes). Needs the 'export' extra.")
    p.add_argument("--label", required=True, help="class name, e.g. neutrophil, or 'all'")
    p.add_argument("-n", type=int, default=16, help="number of cells (default 16)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bundle", help=BUNDLE_HELP)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--guidance", type=float, default=2.0,
                   help="class-contrast guidance: eps_c + g * (eps_c - mean over classes); 0 = plain (default 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from edge.bundle import load_bundle
    from export.generate import sample_cells, write_samples
    from export.teacher import load_teacher

    bundle = load_bundle(args.bundle)
    teacher = load_teacher(bundle.root)
    labels = list(teacher.cfg.classes) if args.label == "all" else [args.label]
    rows = []
    for label in labels:
        cells = sample_cells(teacher, label, args.n, seed=args.seed, steps=args.steps, guidance=args.guidance)
        paths = write_samples(cells, args.out, label)
        rows.append(cells)
        print(f"wrote {len(paths) - 1} cells and {paths[-1]}")
    if args.label == "all":
        import cv2
        import numpy as np

        from export.generate import contact_sheet

        sheet = Path(args.out) / "all_sheet.png"
        cv2.imwrite(str(sheet), cv2.cvtColor(contact_sheet(np.concatenate(rows), cols=args.n), cv2.COLOR_RGB2BGR))
        print(f"wrote {sheet} (rows: {', '.join(labels)})")
    return 0
