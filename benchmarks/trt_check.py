"""TensorRT check for a GPU machine: build plans for this GPU, compare them with ONNX Runtime, time them.

    python benchmarks/trt_check.py --bundle edge/models/default --out gpu_check_out [--cells DIR]

Works on a copy of the bundle (OUT/bundle), so the bundle given is never changed. For each precision
(default fp16 and int8): build the plan (export.tensorrt_build.export_tensorrt, the code behind
``cytoedge export tensorrt``), run it and ONNX Runtime (CPU) on the same cells, and report the largest
absolute difference of each output (also relative to the largest reference value), label agreement with
ONNX Runtime on the same ONNX and with the FP32 ONNX, and the plan's latency at batch 1 and 64 (warm-up,
then timed calls of ``infer``, which include the host-device copies: ms per batch p50/p99, cells/s).

Cells: real cell images from --cells (searched recursively), else ../shared/data/pbc when present, else the
package's demo frames (edge/demo), each normalised by edge.preprocess as ``cytoedge classify`` does; the
source is named in the output. Writes OUT/trt_check.json and prints a table. Exit status 1 when any build or
parity check failed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edge.backends import load_backend
from edge.bundle import default_bundle_dir, load_bundle
from edge.errors import CytoEdgeError, InputError
from edge.imageio import iter_image_paths, read_image
from edge.preprocess import normalise_cell

ROOT = Path(__file__).resolve().parents[1]

PARITY = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}  # max abs diff / max |reference| (tests/test_tensorrt.py)


def load_cells(folder: Path | None, n: int, size: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` cells uint8 [n, 3, size, size] from evenly spaced images of the first source that exists."""
    candidates = [folder] if folder else [ROOT.parent / "shared" / "data" / "pbc", ROOT / "edge" / "demo"]
    for source in candidates:
        if source is None or not source.is_dir():
            continue
        paths = iter_image_paths([source])
        if not paths:
            continue
        pick = [paths[i] for i in np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)]
        crops = []
        for path in pick:
            try:
                crops.append(normalise_cell(read_image(path), size=size).crop)
            except InputError as exc:
                print(f"skipping {exc}", file=sys.stderr)
        if crops:
            return np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2)), f"{source} ({len(crops)} images)"
    raise InputError(f"no cell images found in {', '.join(str(c) for c in candidates if c)}; pass --cells DIR")


def parity(got: dict, want: dict, ref32: dict | None, precision: str) -> dict:
    """Differences between a TensorRT run (got) and ONNX Runtime on the same ONNX (want), plus label
    agreement with ONNX Runtime FP32 (ref32, None when the bundle has no FP32 engine).

    Logits are compared after removing each cell's mean (softmax ignores it; the shared offset is large),
    each output's largest difference relative to its largest reference value (at least 1)."""
    out = {}
    for name in ("logits", "errors", "anomaly"):
        g, w = got[name], want[name]
        if name == "logits":
            g, w = g - g.mean(1, keepdims=True), w - w.mean(1, keepdims=True)
        diff = float(np.abs(g - w).max())
        out[f"{name}_max_abs_diff"] = diff
        out[f"{name}_rel_diff"] = diff / max(1.0, float(np.abs(w).max()))
    labels = got["logits"].argmax(1)
    out["label_agreement_same_onnx"] = float((labels == want["logits"].argmax(1)).mean())
    if ref32 is not None:
        out["label_agreement_fp32_onnx"] = float((labels == ref32["logits"].argmax(1)).mean())
    out["tolerance"] = PARITY[precision]
    out["ok"] = all(out[f"{n}_rel_diff"] <= PARITY[precision] for n in ("logits", "errors", "anomaly"))
    return out


def timing(backend, cells: np.ndarray, batch: int, warmup: int, iters: int, budget_s: float) -> dict:
    """Latency of ``backend.infer`` on ``batch`` cells: ms per call p50/p99 and cells/s (from the mean)."""
    x = np.ascontiguousarray(np.resize(cells, (batch, *cells.shape[1:])))
    for _ in range(warmup):
        backend.infer(x)
    ms, start = [], time.perf_counter()
    while len(ms) < iters and time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        backend.infer(x)
        ms.append(1000 * (time.perf_counter() - t))
    ms = np.array(ms)
    return {"batch": batch, "calls": len(ms), "ms_p50": float(np.percentile(ms, 50)),
            "ms_p99": float(np.percentile(ms, 99)), "ms_per_cell_p50": float(np.percentile(ms, 50) / batch),
            "cells_per_s": float(batch * 1000 / ms.mean())}


def check_precision(root: Path, precision: str, cells: np.ndarray, ref32: dict | None, args) -> dict:
    from export.tensorrt_build import BuildConfig, export_tensorrt

    result: dict = {}
    try:
        if not args.no_build:
            _, result["sidecar"] = export_tensorrt(root, BuildConfig(precision=precision, max_batch=args.max_batch,
                                                                     workspace_mib=args.workspace_mib))
        bundle = load_bundle(root)
        want = load_backend("onnxruntime", bundle, precision, onnx_file=bundle.tensorrt_onnx(precision)).infer(cells)
        trt = load_backend("tensorrt", bundle, precision)
        try:
            result["parity"] = parity(trt.infer(cells), want, ref32, precision)
            result["timing"] = [timing(trt, cells, b, args.warmup, args.iters, args.budget_s) for b in (1, 64)]
        finally:
            trt.close()
    except CytoEdgeError as exc:
        result["error"] = str(exc)
    return result


def print_table(report: dict) -> None:
    print(f"\nTensorRT on {report['gpu']['gpu']} (sm {report['gpu']['compute_capability']}, TensorRT "
          f"{report['gpu']['tensorrt']}); cells: {report['cells']}")
    print(f"{'plan':6} {'build s':>8} {'logits diff':>12} {'labels=ORT':>11} {'labels=FP32':>12} "
          f"{'b1 ms p50/p99':>15} {'b64 ms p50/p99':>16} {'b64 cells/s':>12}")
    for p, r in report["plans"].items():
        if "error" in r:
            print(f"{p:6} FAILED: {r['error']}")
            continue
        par, (t1, t64) = r["parity"], r["timing"]
        build = r.get("sidecar", {}).get("build_seconds", float("nan"))
        print(f"{p:6} {build:8.1f} {par['logits_max_abs_diff']:12.3g} {100 * par['label_agreement_same_onnx']:10.1f}% "
              f"{100 * par.get('label_agreement_fp32_onnx', float('nan')):11.1f}% "
              f"{t1['ms_p50']:7.2f}/{t1['ms_p99']:<7.2f} {t64['ms_p50']:8.2f}/{t64['ms_p99']:<7.2f} "
              f"{t64['cells_per_s']:12.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=default_bundle_dir(),
                    help="bundle folder (default: the shipped one)")
    ap.add_argument("--out", type=Path, required=True, help="folder for trt_check.json and the bundle copy")
    ap.add_argument("--cells", type=Path, default=None, help="folder of cell images (default ../shared/data/pbc)")
    ap.add_argument("--n-cells", type=int, default=256, help="cells for the parity check (default 256)")
    ap.add_argument("--precisions", default="fp16,int8", help="comma-separated plan precisions (default fp16,int8)")
    ap.add_argument("--max-batch", type=int, default=64, help="profile maximum batch (default 64)")
    ap.add_argument("--workspace-mib", type=int, default=4096, help="TensorRT workspace limit (default 4096 MiB)")
    ap.add_argument("--no-build", action="store_true", help="use the plans already in the bundle")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    ap.add_argument("--iters", type=int, default=200, help="timed calls per batch size at most (default 200)")
    ap.add_argument("--budget-s", type=float, default=10.0, help="seconds of timed calls per batch size at most")
    args = ap.parse_args(argv)

    from edge.backends.tensorrt import gpu_runtime

    _, _, running = gpu_runtime()
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "bundle"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(load_bundle(args.bundle).root, root)
    bundle = load_bundle(root)
    cells, source = load_cells(args.cells, args.n_cells, bundle.crop_size)
    ref32 = load_backend("onnxruntime", bundle, "fp32").infer(cells) if "fp32" in bundle.engines else None
    report = {"gpu": running, "bundle": {"path": str(args.bundle), "bundle_id": bundle.bundle_id,
                                         "evals_per_cell": bundle.evals_per_cell},
              "cells": source, "plans": {}}
    for precision in args.precisions.split(","):
        report["plans"][precision] = check_precision(root, precision, cells, ref32, args)
    (args.out / "trt_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.out / 'trt_check.json'}")
    failed = [p for p, r in report["plans"].items() if "error" in r or not r["parity"]["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CytoEdgeError as exc:
        print(f"trt_check: error: {exc}", file=sys.stderr)
        sys.exit(2)
