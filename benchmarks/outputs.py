"""Collect engine outputs for benchmarks/uncertainty.py: one .npz with the calibration split, the validation
split, and the anomaly protocols.

- the shipped bundle's engine (ONNX Runtime, its default precision) on the cache's 'cal' and 'val' splits;
- ``bccd``: BCCD white cells (another microscope; domain shift alone) through the same engine;
- ``loco_<class>``: leave-one-class-out. A teacher trained WITHOUT that class (``--loco-teacher``, made by
  ``cytoedge train`` on a cache with the class removed) is turned into a fixed-timestep engine with the
  bundle's timesteps, noise seed and view; its normal validation and calibration cells, and the held-out class's
  cells, are scored by it;
- ``loco_<class>_full`` (with ``--loco-full``): the same cells scored by that teacher's full diffusion classification
  (export.diffusion_classifier, pruned; anomaly = -zeta), to tell what the 16 fixed evaluations cost against it.

    python benchmarks/outputs.py --bundle edge/models/default --bccd ../shared/data/bccd \
        --loco-teacher runs/teacher_no_erythroblast --loco-class erythroblast --out benchmarks/out/outputs.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def engine_outputs(backend, cells: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """uint8 [N, 3, S, S] -> dict(logits, errors, anomaly) from a runtime Backend."""
    outs = [backend.infer(cells[i:i + batch]) for i in range(0, len(cells), batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in ("logits", "errors", "anomaly")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the shipped one)")
    ap.add_argument("--cache", default="runs/cache/pbc64.npz")
    ap.add_argument("--splits", default="runs/teacher/splits.npz")
    ap.add_argument("--bccd", help="BCCD root (adds the 'bccd' protocol)")
    ap.add_argument("--loco-teacher", help="teacher folder trained without --loco-class")
    ap.add_argument("--loco-class", default="erythroblast")
    ap.add_argument("--loco-cells", type=int, default=400, help="cells per LOCO set (stratified)")
    ap.add_argument("--loco-full", action="store_true", help="also score the LOCO cells with the LOCO teacher's full "
                    "diffusion classification (about 130 evaluations per cell: minutes)")
    ap.add_argument("--out", default="benchmarks/out/outputs.npz")
    args = ap.parse_args()

    from calibration.calibset import stratified_sample
    from edge.backends import load_backend
    from edge.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    backend = load_backend("onnxruntime", bundle)
    with np.load(args.cache) as z:
        crops, labels, classes = z["crops"], z["labels"], [str(c) for c in z["classes"]]
    sp = np.load(args.splits)
    res: dict[str, np.ndarray] = {"classes": np.array(bundle.classes)}
    for name, split in (("cal", "cal"), ("test", "val")):
        idx = sp[split]
        o = engine_outputs(backend, crops[idx].transpose(0, 3, 1, 2))
        res.update({f"{name}_{k}": v for k, v in o.items()})
        res[f"{name}_labels"] = labels[idx]
        print(f"{name}: {len(idx)} cells, engine accuracy {np.mean(o['logits'].argmax(1) == labels[idx]):.3f}")
    if args.bccd:
        from teacher import bccd_cells

        bc, bl = bccd_cells(args.bccd, bundle.classes, bundle.crop_size)
        o = engine_outputs(backend, bc)
        res.update({f"ood_bccd_{k}": v for k, v in o.items()})
        res["ood_bccd_labels"] = bl
        print(f"bccd: {len(bl)} cells, engine accuracy {np.mean(o['logits'].argmax(1) == bl):.3f} (domain shift)")
    if args.loco_teacher:
        import torch

        from export.diffusion_classifier import classify_cells
        from export.engine import VIEWS, build_engine
        from export.teacher import load_teacher

        torch.set_num_threads(2)
        t = load_teacher(args.loco_teacher)
        eng = build_engine(t, None, bundle.timesteps, bundle.noise_seed, view=VIEWS.index(bundle.view))
        held = classes.index(args.loco_class)
        keep = [classes.index(c) for c in t.cfg.classes]
        remap = {c: i for i, c in enumerate(keep)}
        loco_sp = np.load(Path(args.loco_teacher) / "splits.npz")
        normal_idx = np.flatnonzero(labels != held)  # the LOCO cache's indices map to these

        @torch.no_grad()
        def score(cells: np.ndarray) -> dict[str, np.ndarray]:
            x = torch.from_numpy(cells)
            outs = [(*eng(x[i:i + 64]), eng.timestep_errors(x[i:i + 64])) for i in range(0, len(x), 64)]
            return {k: torch.cat([o[j] for o in outs]).numpy()
                    for j, k in enumerate(("logits", "errors", "anomaly", "errors_t"))}

        p = f"ood_loco_{args.loco_class}"
        ho = np.flatnonzero(labels == held)
        ho = ho[stratified_sample(np.zeros(len(ho), int), args.loco_cells, seed=0)]
        for suffix, idx in (("", ho), ("_normal", normal_idx[loco_sp["val"]]), ("_cal", normal_idx[loco_sp["cal"]])):
            if suffix:
                idx = idx[stratified_sample(np.array([remap[l] for l in labels[idx]]), args.loco_cells, seed=0)]
            cells = crops[idx].transpose(0, 3, 1, 2).copy()  # uint8 [n, 3, S, S]
            o = score(cells)
            res[f"{p}{suffix}_anomaly"], res[f"{p}{suffix}_errors"] = o["anomaly"], o["errors"]
            res[f"{p}{suffix}_errors_t"] = o["errors_t"]  # [n, K, T]: for the per-timestep error profile
            if args.loco_full:
                full = classify_cells(t, cells, progress=True)
                res[f"{p}_full{suffix}_errors"] = np.stack([r.errors for r in full])
                res[f"{p}_full{suffix}_anomaly"] = -np.array([r.zeta for r in full])
            if not suffix:
                res[f"{p}_logits"] = o["logits"]
            else:
                acc = np.mean(o["logits"].argmax(1) == np.array([remap[l] for l in labels[idx]]))
                print(f"loco {suffix[1:]}: {len(idx)} normal cells, accuracy of the LOCO engine {acc:.3f}")
        print(f"loco: {len(ho)} held-out {args.loco_class} cells")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
