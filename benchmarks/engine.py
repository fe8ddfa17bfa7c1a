"""Teacher vs engine in one run on the same cells: speed, cost, agreement and accuracy.

Variants: the full diffusion teacher (export.diffusion_classifier), the student engine in PyTorch, the bundle's
engines in ONNX Runtime (every precision it ships), and TensorRT when a GPU and a plan are present. For each:
cells/s at batch 1 and at the best batch, ms per cell p50/p99 (batch 1), (class, timestep) denoiser evaluations
per cell and the network passes they take (fewer for a multi-head denoiser, which makes every class at once), FLOPs
per cell (convolutions and linear layers, counted on the PyTorch modules: 2 x multiply-accumulates), achieved
GFLOP/s against the matmul peak measured in the same run (2048 x 2048 float32 numpy), label agreement with the
teacher, and balanced accuracy against the true labels. Warm-up first; machines are noisy, so the ratios
between variants in one run are what to read. The timings are taken in ``--rounds`` rounds, every variant once
per round in turn, so that a slow spell of a shared machine hits all of them: each figure is the median over the
rounds, and the speed-up over the teacher is also given per round.

    python benchmarks/engine.py [--bundle DIR] [--teacher runs/teacher] [--student runs/student]
        [--cache runs/cache/pbc64.npz --splits runs/teacher/splits.npz | --data FOLDER]
        [--cells 128] [--teacher-cells 32] [--rounds 3] [--out runs/bench/engine]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 8, 32, 64)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n float32 numpy matmul (best of ``reps`` after a warm-up)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def onnx_flops(path) -> float:
    """FLOPs of one cell through an engine's ONNX graph: 2 x MACs of every Conv with an initializer weight, Gemm
    and MatMul, with shapes from ONNX Runtime's symbolic shape inference at batch 1. Counts the bundle's own
    network, whatever --student is."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # the dynamic batch, fixed at one cell
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if not out or 0 in out:
            continue
        if node.op_type == "Conv" and node.input[1] in shapes:
            macs += int(np.prod(out)) * int(np.prod(shapes[node.input[1]][1:]))
        elif node.op_type in ("Gemm", "MatMul") and shapes.get(node.input[0]):
            macs += int(np.prod(out)) * shapes[node.input[0]][-1]
    return 2.0 * macs


def count_flops(module, *inputs, **kwargs) -> float:
    """FLOPs of one forward of a PyTorch module on ``inputs``: 2 x MACs of every Conv2d and Linear inside it."""
    import torch

    macs = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            macs[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs[0] += out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        module(*inputs, **kwargs)
    for h in hooks:
        h.remove()
    return 2.0 * macs[0]


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[truth == c] == c) for c in np.unique(truth)]))


def time_batches(infer, cells: np.ndarray, min_seconds: float = 1.5) -> dict:
    """infer(uint8 [B, 3, S, S]) timed at each batch size: cells/s (median), and ms per cell p50/p99 at batch 1."""
    out, lat = {}, []
    for b in BATCHES:
        if b > len(cells):
            break
        x = np.ascontiguousarray(cells[:b])
        infer(x)  # warm-up
        times, t0, i = [], time.perf_counter(), 0
        while (time.perf_counter() - t0 < min_seconds or len(times) < 3) and len(times) < 200:
            xb = np.ascontiguousarray(cells[i % len(cells)][None]) if b == 1 else x
            times.append(_timed(lambda: infer(xb)))
            i += 1
        if b == 1:
            lat = np.array(times) * 1e3
        out[b] = b / float(np.median(times))
    best = max(out, key=out.get)
    return {"cells_per_s_b1": out.get(1), "best_batch": best, "cells_per_s_best": out[best],
            "ms_per_cell_p50": float(np.percentile(lat, 50)), "ms_per_cell_p99": float(np.percentile(lat, 99)),
            "cells_per_s_by_batch": {str(k): v for k, v in out.items()}}


def median_timing(timed: list[dict]) -> dict:
    """One variant's time_batches results over the rounds -> the same keys, each the median over the rounds (the
    best batch: the batch size whose median cells/s is highest)."""
    by_batch = {b: float(np.median([t["cells_per_s_by_batch"][b] for t in timed])) for b in timed[0]["cells_per_s_by_batch"]}
    best = max(by_batch, key=by_batch.get)
    med = lambda key: float(np.median([t[key] for t in timed]))  # noqa: E731
    return {"cells_per_s_b1": by_batch.get("1"), "best_batch": int(best), "cells_per_s_best": by_batch[best],
            "ms_per_cell_p50": med("ms_per_cell_p50"), "ms_per_cell_p99": med("ms_per_cell_p99"),
            "cells_per_s_by_batch": by_batch}


def load_cells(args) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 [N, 3, S, S] cells, int labels [N], class names) from the cache's validation split or --data."""
    from calibration.calibset import stratified_sample

    if args.data:
        from edge.imageio import read_image
        from edge.preprocess import normalise_cell
        from export.datasets import load_labelled_folder

        folder = load_labelled_folder(args.data)
        pick = stratified_sample(folder.labels, args.cells, seed=0)
        cells = np.stack([normalise_cell(read_image(folder.paths[i])).crop.transpose(2, 0, 1) for i in pick])
        return cells, folder.labels[pick], list(folder.classes)
    with np.load(args.cache) as z:
        crops, labels, classes = z["crops"], z["labels"], [str(c) for c in z["classes"]]
    with np.load(args.splits) as z:
        val = z["val"]
    pick = val[stratified_sample(labels[val], args.cells, seed=0)]
    return np.ascontiguousarray(crops[pick].transpose(0, 3, 1, 2)), labels[pick], classes


def run(args) -> dict:
    import torch

    from calibration.fit import calibrated_probs
    from edge.backends import load_backend
    from edge.bundle import load_bundle
    from edge.errors import BackendError
    from export.diffusion_classifier import ClassifierConfig, classify_cells
    from export.engine import VIEWS, build_engine, load_student
    from export.teacher import load_teacher

    torch.set_num_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    bundle = load_bundle(args.bundle)
    cells, truth, classes = load_cells(args)
    if classes != bundle.classes:
        raise SystemExit(f"class names {classes} differ from the bundle's {bundle.classes}")
    say(f"{len(cells)} cells; bundle {bundle.root} ({bundle.bundle_id}), timesteps {bundle.timesteps}")
    peak = matmul_peak()
    say(f"matmul peak {peak:.1f} GFLOP/s")

    teacher = load_teacher(args.teacher)
    unet = load_student(teacher, args.student)[0] if args.student else None
    engine = build_engine(teacher, unet, bundle.timesteps, bundle.noise_seed,
                          bundle.manifest.get("timestep_weights"), bundle.manifest.get("logit_scale", 1.0),
                          VIEWS.index(bundle.view))
    # a multi-head denoiser makes the K (class, timestep) evaluations of a timestep in one pass
    passes = int(bundle.manifest.get("passes_per_cell", bundle.evals_per_cell))
    if engine.passes_per_cell != passes:
        who = f"--student {args.student}" if args.student else "the teacher's denoiser (no --student)"
        raise SystemExit(f"{who} makes {engine.passes_per_cell} denoiser passes per cell, the bundle "
                         f"{passes} ({bundle.manifest.get('denoiser', 'conditional')} denoiser): give --student, "
                         "the student folder the bundle was exported from")
    c, s = teacher.cfg.latent_channels, teacher.cfg.latent_size
    flops_per_eval = count_flops(teacher.unet, torch.zeros(1, c, s, s), torch.tensor([500]),
                                 class_labels=torch.tensor([0]))
    engine_flops = count_flops(engine, torch.zeros(1, 3, bundle.crop_size, bundle.crop_size, dtype=torch.uint8))
    bundle_flops = onnx_flops(bundle.root / bundle.engines["fp32"]) if "fp32" in bundle.engines else engine_flops
    rows = []

    # teacher: the reference labels, on a subset (it is slow)
    nt = min(args.teacher_cells, len(cells))
    tcfg = ClassifierConfig()
    say(f"teacher on {nt} cells ...")
    classify_cells(teacher, cells[:1], tcfg)  # warm-up
    # one call per cell, as timed below (each call seeds its own noise: the same work every round)
    results = [classify_cells(teacher, cells[i:i + 1], tcfg)[0] for i in range(nt)]
    t_label = np.array([r.label for r in results])
    t_evals = float(np.mean([r.evals for r in results]))

    def time_teacher() -> dict:
        per_cell = np.array([_timed(lambda: classify_cells(teacher, cells[i:i + 1], tcfg)) for i in range(nt)])
        cps = 1.0 / float(np.mean(per_cell))
        return {"cells_per_s_b1": cps, "best_batch": 1, "cells_per_s_best": cps,
                "ms_per_cell_p50": 1e3 * float(np.percentile(per_cell, 50)),
                "ms_per_cell_p99": 1e3 * float(np.percentile(per_cell, 99)), "cells_per_s_by_batch": {"1": cps}}

    rows.append({"variant": "teacher (PyTorch)", "evals_per_cell": t_evals, "passes_per_cell": t_evals,
                 "flops_per_cell": t_evals * flops_per_eval, "agreement": 1.0,
                 "balanced_accuracy": balanced_accuracy(t_label, truth[:nt]), "n_cells": nt})
    timers = [time_teacher]

    def engine_row(name: str, infer, evals: int, flops: float) -> None:
        say(f"{name} ...")
        # the runtime's label: argmax of the calibrated probabilities (temperature and class offsets)
        pred = np.concatenate([calibrated_probs(infer(cells[i:i + 32])["logits"], bundle.calibration).argmax(1)
                               for i in range(0, len(cells), 32)])
        rows.append({"variant": name, "evals_per_cell": evals, "passes_per_cell": passes, "flops_per_cell": flops,
                     "agreement": float(np.mean(pred[:nt] == t_label)),
                     "balanced_accuracy": balanced_accuracy(pred, truth), "n_cells": len(cells), "labels": pred})
        timers.append(lambda: time_batches(infer, cells))

    def torch_infer(x):
        with torch.no_grad():
            logits, errors, anomaly = engine(torch.from_numpy(x))
        return {"logits": logits.numpy()}

    engine_row("student (PyTorch)", torch_infer, engine.evals_per_cell, engine_flops)
    for prec in sorted(bundle.engines):
        if prec == "fp16":
            continue  # ONNX Runtime CPU has no fast float16 kernels; fp16 is for GPUs
        be = load_backend("onnxruntime", bundle, prec, intra_op_num_threads=args.threads, max_batch=64)
        engine_row(f"ONNX Runtime {prec}", be.infer, bundle.evals_per_cell, bundle_flops)
    try:
        be = load_backend("tensorrt", bundle)
        engine_row(f"TensorRT {be.precision}", be.infer, bundle.evals_per_cell, bundle_flops)
    except BackendError as exc:
        say(f"TensorRT skipped: {exc}")

    rounds = [[] for _ in rows]  # rounds[variant][round]: time_batches-like dicts
    for k in range(args.rounds):
        say(f"timing, round {k + 1} of {args.rounds}: {', '.join(r['variant'] for r in rows)}")
        for timer, out in zip(timers, rounds):
            out.append(timer())
    for r, timed in zip(rows, rounds):
        r.update(median_timing(timed))
        r["speedup_by_round"] = [t["cells_per_s_best"] / t0["cells_per_s_best"] for t, t0 in zip(timed, rounds[0])]
    f32 = next((r for r in rows if r["variant"] == "ONNX Runtime fp32"), None)
    for r in rows:
        r["gflops_per_s"] = r["flops_per_cell"] * r["cells_per_s_best"] / 1e9
        r["fraction_of_peak"] = r["gflops_per_s"] / peak
        r["speedup_vs_teacher"] = float(np.median(r["speedup_by_round"]))
        if f32 is not None and "labels" in r:
            r["agreement_with_fp32"] = float(np.mean(r["labels"] == f32["labels"]))
    for r in rows:
        r.pop("labels", None)
    return {"matmul_peak_gflops": peak, "bundle": str(bundle.root), "bundle_id": bundle.bundle_id,
            "precision_default": bundle.precision, "timesteps": bundle.timesteps, "n_cells": int(len(cells)),
            "teacher_cells": nt, "flops_per_eval": flops_per_eval, "threads": args.threads, "rounds": args.rounds,
            "teacher_config": dataclasses.asdict(tcfg), "rows": rows}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_table(res: dict) -> None:
    print(f"matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s (float32; INT8 rows can exceed it); {res['n_cells']} "
          f"cells (teacher and agreement with it on the first {res['teacher_cells']})")
    head = (f"{'variant':22s} {'cells/s b1':>10s} {'best (b)':>14s} {'ms p50':>8s} {'ms p99':>8s} {'evals':>6s} {'passes':>6s} "
            f"{'GFLOP/cell':>10s} {'GFLOP/s':>8s} {'%peak':>6s} {'x teach':>8s} {'agree':>6s} {'vs fp32':>7s} {'bal acc':>7s}")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        print(f"{r['variant']:22s} {r['cells_per_s_b1']:10.2f} {r['cells_per_s_best']:9.2f} ({r['best_batch']:2d}) "
              f"{r['ms_per_cell_p50']:8.1f} {r['ms_per_cell_p99']:8.1f} {r['evals_per_cell']:6.1f} {r['passes_per_cell']:6.1f} "
              f"{r['flops_per_cell'] / 1e9:10.3f} {r['gflops_per_s']:8.1f} {100 * r['fraction_of_peak']:5.1f}% "
              f"{r['speedup_vs_teacher']:8.1f} {100 * r['agreement']:5.1f}% {_pct(r.get('agreement_with_fp32')):>7s} "
              f"{100 * r['balanced_accuracy']:6.1f}%")
    print(f"speed-up over the teacher in each of {res['rounds']} timing rounds (the table: medians):")
    for r in res["rows"][1:]:
        print(f"  {r['variant']:22s} " + ", ".join(f"{x:.1f}x" for x in r["speedup_by_round"]))


def plot(res: dict, path: Path) -> None:
    """Two panels: speed over the teacher (log; issue 3's 50x and 100x lines) and the label figures, zoomed to
    where they differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    names = [r["variant"] for r in rows]
    y = np.arange(len(rows))
    teacher = rows[0]["cells_per_s_best"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.9 * len(rows) + 2.8))
    spread = np.array([[r["speedup_vs_teacher"] - min(r["speedup_by_round"]), max(r["speedup_by_round"]) - r["speedup_vs_teacher"]]
                       for r in rows]).T
    a.barh(y, [r["speedup_vs_teacher"] for r in rows], xerr=spread, capsize=3, color="tab:blue",
           label=f"best batch (median, range of {res['rounds']} rounds)")
    a.barh(y, [r["cells_per_s_b1"] / teacher for r in rows], color="tab:orange", alpha=0.7, label="batch 1")
    for i, r in enumerate(rows):
        a.text(max(r["speedup_by_round"]) * 1.12, i, f"{r['speedup_vs_teacher']:.1f}x  ({r['cells_per_s_best']:.0f} cells/s, "
               f"batch {r['best_batch']})", va="center", fontsize=8)
    for line, style in ((50, "--"), (100, ":")):
        a.axvline(line, color="C3", ls=style, lw=1, label=f"issue 3: {line}x")
    a.set_xscale("log")
    a.set_xlim(0.5, 20 * max(r["speedup_vs_teacher"] for r in rows))
    a.set_yticks(y, names)
    a.set_xlabel(f"cells/s over the teacher's {teacher:.2f} (log)")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8)
    a.invert_yaxis()
    series = [("agreement", f"agreement with the teacher ({res['teacher_cells']} cells)", "tab:green"),
              ("balanced_accuracy", f"balanced accuracy ({res['n_cells']} cells)", "tab:gray"),
              ("agreement_with_fp32", "labels as ONNX Runtime fp32", "tab:purple")]
    h = 0.8 / len(series)
    lo = 100.0
    for k, (key, label, color) in enumerate(series):
        vals = [100 * r[key] if r.get(key) is not None else np.nan for r in rows]
        lo = min(lo, np.nanmin(vals))
        b.barh(y + (k - 1) * h, vals, height=h, color=color, label=label)
        for i, v in enumerate(vals):
            if np.isfinite(v):
                b.text(v + 0.1, i + (k - 1) * h, f"{v:.1f}", va="center", fontsize=7)
    b.set_xlim(max(0.0, np.floor(lo) - 3), 101.5)
    b.set_yticks(y, names)
    b.set_xlabel("% (the runtime's labels)")
    b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    b.invert_yaxis()
    fig.suptitle(f"engine benchmark: {res['n_cells']} cells, {res['threads']} threads, "
                 f"matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle folder (default: the one shipped in the package)")
    p.add_argument("--teacher", default="runs/teacher", help="teacher folder")
    p.add_argument("--student", default=None, help="student folder (default: the teacher's denoiser, as in a "
                   "bundle exported without a student)")
    p.add_argument("--cache", default="runs/cache/pbc64.npz")
    p.add_argument("--splits", default="runs/teacher/splits.npz")
    p.add_argument("--data", default=None, help="labelled folder instead of the cache's validation split")
    p.add_argument("--cells", type=int, default=128, help="cells for engine accuracy and speed")
    p.add_argument("--teacher-cells", type=int, default=32, help="cells the (slow) teacher classifies")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, every variant once per round in turn; "
                   "figures are medians over the rounds (default 3)")
    p.add_argument("--out", default="runs/bench/engine", help="folder for engine.json and engine.png")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.cells < 1 or args.teacher_cells < 1:
        p.error("--rounds, --cells and --teacher-cells must be >= 1")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(res, indent=2, default=float))
    plot(res, out / "engine.png")
    print_table(res)
    print(f"wrote {out / 'engine.json'} and {out / 'engine.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
