"""``cytoedge export onnx|int8|bundle|tensorrt|checkpoint``: build the engine's ONNX graphs, quantize them, write a
model bundle, build TensorRT plans into a bundle (``tensorrt`` runs on the GPU box and needs no torch), keep a
teacher with its cached classifications as a checkpoint folder (``checkpoint``, export.checkpoint).

Needs the 'export' extra (torch is imported inside ``run``). One process config, ExportConfig (TOML via
--config, CLI options override it). Progress goes to stderr; the result (a path) to stdout.
Actions are registered in ACTIONS; a new one (e.g. ``tensorrt``) adds a ``_add_<action>`` function there.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ConfigError, InputError


@dataclass(frozen=True)
class ExportConfig:
    teacher: str = "runs/teacher"  # teacher.safetensors + teacher.json (+ splits.npz)
    student: str = ""  # student.safetensors + distill.json; "" = use the teacher's own denoiser
    timesteps: tuple[int, ...] = ()  # () = the student's (distill.json); required without a student
    noise_seed: int = -1  # -1 = the student's
    weights: tuple[float, ...] = ()  # per-timestep weights; () = uniform
    cache: str = "runs/cache/pbc64.npz"  # crop cache: crops uint8 [N, S, S, 3], labels, classes, digest
    splits: str = ""  # "" = <teacher>/splits.npz (train / val / cal indices into the cache)
    calib_cells: int = 256  # INT8 calibration set: stratified sample of the training split
    calib_seed: int = 0
    int8_preset: str = "tail"  # which nodes stay float (export.quantize.EXCLUDE_PRESETS)
    precisions: tuple[str, ...] = ("fp32", "int8", "fp16")
    default_precision: str = "auto"  # what the runtime runs by default; auto = int8 if it keeps agreement and is faster
    min_int8_agreement: float = 0.99  # auto: INT8 vs FP32 label agreement required on validation cells
    choice_cells: int = 0  # validation cells INT8 is measured against FP32 on (stratified sample); 0 = every one
    calibrate: bool = True  # fit calibration.json on held-out splits of the cache with the shipped engine
    calibration_splits: tuple[str, ...] = ("cal",)  # which held-out splits: cal and/or val
    alpha: float = 0.01  # calibration: error bound among accepted cells
    delta: float = 0.1
    false_alarm: float = 0.02
    anomaly_score: str = "error_profile"  # measured best (benchmarks/uncertainty.py): BCCD and held-out-class AUROC
    class_bias: bool = False  # calibration: one offset per class besides the temperature (BCTS); see calibration.fit
    ship_teacher: bool = True  # put teacher.safetensors + teacher.json in the bundle (for --teacher)
    name: str = "cytoedge-pbc"
    threads: int = 2


def _say(msg: str) -> None:
    print(f"cytoedge export: {msg}", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with ExportConfig keys (CLI options override it)")
    p.add_argument("--teacher", help="teacher folder (default runs/teacher)")
    p.add_argument("--student", help="distilled student folder (student.safetensors + distill.json); "
                   "without it the engine uses the teacher's denoiser and needs --timesteps and --noise-seed")
    p.add_argument("--timesteps", type=lambda s: tuple(int(v) for v in s.split(",")), metavar="T1,T2,...",
                   help="fixed timesteps (default: the student's)")
    p.add_argument("--noise-seed", type=int, help="seed of the fixed noise (default: the student's)")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime CPU threads (default 2)")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="crop cache .npz (default runs/cache/pbc64.npz)")
    p.add_argument("--splits", help="splits .npz with train/val/cal indices (default <teacher>/splits.npz)")
    p.add_argument("--calib-cells", type=int, help="INT8 calibration cells from the training split (default 256)")
    p.add_argument("--int8-preset", help="nodes kept in float: tail, tail+out or tail+ends (default tail)")


def _add_onnx(sub) -> None:
    p = sub.add_parser("onnx", help="export the fused engine to one ONNX graph (fp32 or fp16)",
                       description="Build the engine (encoder, every (class, timestep) denoiser evaluation with fixed "
                       "noise, masked error, reduction, logits and anomaly score) and export it to ONNX: input 'cells' "
                       "uint8 [N, 3, S, S], outputs logits, errors, anomaly; dynamic batch.")
    _common(p)
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="graph precision (default fp32)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .onnx file")


def _add_int8(sub) -> None:
    p = sub.add_parser("int8", help="quantize an FP32 engine ONNX to INT8 (QDQ) on real training cells, or "
                       "re-quantize a bundle's INT8 engine in place",
                       description="Static INT8 quantization with QDQ nodes (per-channel 7-bit weights, uint8 "
                       "activations), calibrated on a stratified sample of the training split; the error tail stays "
                       "float. With --bundle DIR: the bundle's FP32 engine is quantized again and replaces its "
                       "engine_int8.onnx (manifest: hash, quantization, INT8 vs FP32 measured on this CPU); the "
                       "default precision is kept. This makes a bundle quantized with 8-bit weights, which ONNX "
                       "Runtime refuses on x86 CPUs without VNNI, run there.")
    p.add_argument("--config", help="TOML file with ExportConfig keys")
    p.add_argument("--teacher", help="teacher folder holding splits.npz (default runs/teacher)")
    _data(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", metavar="FILE", help="FP32 engine .onnx to quantize (with --out)")
    src.add_argument("--bundle", metavar="DIR", help="bundle whose INT8 engine is re-quantized in place")
    p.add_argument("--out", metavar="FILE", help="output INT8 .onnx file (with --onnx)")


def _add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="build the engine, export fp32/int8/fp16 ONNX, calibrate, write a model bundle",
                       description="Build the engine from the teacher and the distilled student, export it to ONNX "
                       "(fp32, fp16), quantize it to INT8 on training cells, fit calibration.json on the held-out "
                       "splits named by --calibration-splits with the shipped precision, and write a bundle folder "
                       "with a hashed manifest. "
                       "The folder is assembled beside --out and moved there only when complete.")
    _common(p)
    _data(p)
    p.add_argument("--precisions", type=lambda s: tuple(s.split(",")), metavar="P1,P2",
                   help="engines to ship among fp32,int8,fp16 (default all three)")
    p.add_argument("--default-precision", choices=("auto", "fp32", "int8", "fp16"),
                   help="precision the runtime uses by default; auto (default) measures INT8 against FP32 on "
                   "validation cells and ships INT8 only if labels agree on >= 99%% of them and it is faster")
    p.add_argument("--calibration-splits", type=lambda s: tuple(v for v in s.split(",") if v), metavar="S1,S2",
                   help="held-out splits to fit calibration.json on: cal, val or cal,val (default cal)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_const", const=False,
                   help="ship the bundle uncalibrated (every cell goes to review until `cytoedge calibrate`)")
    p.add_argument("--no-teacher", dest="ship_teacher", action="store_const", const=False,
                   help="leave the teacher's weights out of the bundle")
    p.add_argument("--name", help="bundle name in the manifest")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder to create (must not exist)")


def _add_tensorrt(sub) -> None:
    p = sub.add_parser("tensorrt", help="build a TensorRT plan for this GPU into a bundle (needs the 'tensorrt' extra)",
                       description="Build the bundle's ONNX engine of one precision into a TensorRT plan for the GPU "
                       "and TensorRT version of this machine (strongly typed: fp16 from the FP16 ONNX, int8 from a "
                       "QDQ ONNX with symmetric int8 quantization), with one optimisation profile over batch sizes "
                       "and a timing cache. The plan (engine_<precision>.sm<XY>.trt<N>.plan) and its JSON sidecar "
                       "(GPU, compute capability, TensorRT version, ONNX hash, profile) are added to the bundle's "
                       "manifest; the tensorrt backend refuses plans built for another GPU or TensorRT version. "
                       "Needs tensorrt and pycuda, not torch.")
    p.add_argument("--bundle", metavar="DIR", help="bundle folder to add the plan to (default: the shipped bundle)")
    p.add_argument("--precision", choices=("fp16", "int8", "fp32"), default="fp16",
                   help="plan precision (default fp16)")
    p.add_argument("--min-batch", type=int, default=1, metavar="N", help="profile: smallest batch (default 1)")
    p.add_argument("--opt-batch", type=int, default=16, metavar="N", help="profile: batch tuned for (default 16)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N", help="profile: largest batch; the backend splits "
                   "larger ones (default 64)")
    p.add_argument("--workspace-mib", type=int, default=4096, metavar="MIB",
                   help="TensorRT workspace limit (default 4096)")
    p.add_argument("--timing-cache", metavar="FILE", help="timing cache file (default: one per GPU and TensorRT "
                   "version under ~/.cache/cytoedge/tensorrt)")


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="keep a teacher and its cached full classifications as a checkpoint folder",
                       description="Copy a trained teacher (teacher.safetensors, teacher.json, splits.npz) and the "
                       "teacher stages a distill run folder has cached (teacher_val: required, every validation cell; "
                       "teacher_targets: kept when every training cell is there) into a new folder with a manifest "
                       "(sha256 and size of each file, the commands that made it, validation accuracy, balanced "
                       "accuracy and evaluations per cell measured from the stages). Distilling from that folder "
                       "skips the teacher stages once its npz files are copied into the run folder.")
    p.add_argument("--teacher", required=True, metavar="DIR", help="teacher folder (cytoedge train's --run-dir)")
    p.add_argument("--run-dir", required=True, metavar="DIR", help="distill run folder holding the cached teacher stages")
    p.add_argument("--cache", default="runs/cache/pbc64.npz", help="crop cache the splits index (default runs/cache/pbc64.npz)")
    p.add_argument("--what", required=True, help="one sentence for the manifest: what this teacher is")
    p.add_argument("--made-by", action="append", default=[], metavar="COMMAND",
                   help="a command that made it, for the manifest (repeat, in order)")
    p.add_argument("--use", default="", help="how to use it, for the manifest")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to create (must not exist)")


def run_checkpoint(args: argparse.Namespace) -> int:
    from export.checkpoint import write_checkpoint

    man = write_checkpoint(args.teacher, args.run_dir, args.out, what=args.what, made_by=args.made_by,
                           cache=args.cache, use=args.use)
    _say(", ".join(f"{k} {v}" for k, v in man["metrics"].items()))
    print(args.out)
    return 0


def run_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt_build import BuildConfig, export_tensorrt

    try:
        cfg = BuildConfig(precision=args.precision, min_batch=args.min_batch, opt_batch=args.opt_batch,
                          max_batch=args.max_batch, workspace_mib=args.workspace_mib, timing_cache=args.timing_cache)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _say(f"building a TensorRT plan ({cfg.precision}, batch {cfg.min_batch}/{cfg.opt_batch}/{cfg.max_batch}); "
         "minutes the first time, the timing cache speeds up rebuilds")
    path, side = export_tensorrt(args.bundle, cfg)
    _say(f"built for {side['gpu']} (compute capability {side['compute_capability']}, TensorRT {side['tensorrt']}) "
         f"in {side['build_seconds']} s")
    print(path)
    return 0


ACTIONS = {"onnx": _add_onnx, "int8": _add_int8, "bundle": _add_bundle, "tensorrt": _add_tensorrt,
           "checkpoint": _add_checkpoint}


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export the engine: ONNX graphs, INT8 quantization, model bundles",
                              description="Turn the teacher and the distilled student into deployable artefacts. "
                              "Needs the 'export' extra (torch, diffusers, onnx).")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    for add in ACTIONS.values():
        add(sub)
    p.set_defaults(func=run)


def make_export_config(args: argparse.Namespace) -> ExportConfig:
    from edge.config import config_from_args

    return config_from_args(ExportConfig, args)


def _engine_parts(cfg: ExportConfig):
    """(teacher, student unet or None, timesteps, noise_seed, view, logit_scale or None, distill info)."""
    from export.engine import load_student
    from export.teacher import load_teacher

    teacher = load_teacher(cfg.teacher)
    unet, info, scale = None, {}, None
    ts, seed = list(cfg.timesteps), cfg.noise_seed
    if cfg.student:
        unet, info = load_student(teacher, cfg.student)
        if ts and ts != info["timesteps"]:
            raise ConfigError(f"--timesteps {ts} differ from the student's {info['timesteps']} (it was distilled for those)")
        if seed >= 0 and seed != info["noise_seed"]:
            raise ConfigError(f"--noise-seed {seed} differs from the student's {info['noise_seed']}")
        ts, seed, scale = info["timesteps"], info["noise_seed"], info.get("logit_scale")
    elif not ts or seed < 0:
        raise ConfigError("without --student, give the engine's --timesteps and --noise-seed")
    return teacher, unet, ts, seed, int(info.get("view", 0)), scale, info


def _load_data(cfg: ExportConfig) -> dict:
    """Crop cache + splits -> dict(crops [N, S, S, 3], labels [N], classes, digest, train, val, cal)."""
    import numpy as np

    from export.train import load_cache

    data = load_cache(cfg.cache)
    path = Path(cfg.splits) if cfg.splits else Path(cfg.teacher) / "splits.npz"
    if not path.exists():
        raise InputError(f"{path}: splits file not found (train/val/cal indices into {cfg.cache})")
    with np.load(path) as z:
        data.update({k: z[k] for k in ("train", "val", "cal") if k in z.files})
    if "train" not in data:
        raise InputError(f"{path}: no 'train' split")
    return data


def _calib_cells(cfg: ExportConfig, data: dict):
    import numpy as np

    from calibration.calibset import stratified_sample

    train = data["train"]
    pick = train[stratified_sample(data["labels"][train], cfg.calib_cells, seed=cfg.calib_seed)]
    return np.ascontiguousarray(data["crops"][pick].transpose(0, 3, 1, 2))


def _calibration_index(cfg: ExportConfig, data: dict):
    """Cache indices int64 [M] of the cfg.calibration_splits cells (InputError for a split not held out or absent)."""
    from export.datasets import held_out_index

    return held_out_index({k: data[k] for k in ("train", "val", "cal") if k in data}, cfg.calibration_splits)


def _fit_calibration(cfg: ExportConfig, bundle_dir: Path, data: dict, idx) -> dict:
    """Run the bundle's default engine (ONNX Runtime) on the cache cells ``idx`` (the cfg.calibration_splits
    cells, from _calibration_index) and fit calibration.json."""
    import numpy as np

    from calibration.calibset import crops_sha256
    from calibration.fit import fit_calibration
    from edge.backends import load_backend
    from edge.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    backend = load_backend("onnxruntime", bundle, intra_op_num_threads=cfg.threads)
    crops = np.ascontiguousarray(data["crops"][idx].transpose(0, 3, 1, 2))
    outs, what = [], "+".join(cfg.calibration_splits)
    for i in range(0, len(crops), 64):
        outs.append(backend.infer(crops[i:i + 64]))
        print(f"\rcytoedge export: calibrating on the {what} split {min(i + 64, len(crops))}/{len(crops)}", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    merged = {k: np.concatenate([o[k] for o in outs]) for k in ("logits", "errors", "anomaly")}
    cal = fit_calibration(merged["logits"], merged["errors"], merged["anomaly"], data["labels"][idx],
                          bundle.classes, alpha=cfg.alpha, delta=cfg.delta, false_alarm=cfg.false_alarm,
                          anomaly_score=cfg.anomaly_score, calibset_sha256=crops_sha256(crops), class_bias=cfg.class_bias)
    cal["backend"], cal["precision"], cal["splits"] = backend.name, backend.precision, list(cfg.calibration_splits)
    return cal


def _choose_precision(cfg: ExportConfig, bundle_dir: Path, data: dict) -> tuple[str, dict]:
    """Measure INT8 against FP32 (ONNX Runtime, this CPU) on the validation cells (every one, or a stratified
    sample of cfg.choice_cells): label agreement and cells/s at batch 32 (alternating runs, medians). INT8 is
    chosen when agreement >= cfg.min_int8_agreement and it is faster. Both depend on the CPU (VNNI or not,
    export.quantize), so the result records whether this one has VNNI."""
    import time

    import numpy as np

    from calibration.calibset import stratified_sample
    from edge.backends import load_backend
    from edge.backends.onnxruntime import cpu_has_vnni
    from edge.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if "int8" not in bundle.engines or "fp32" not in bundle.engines:
        return "fp32" if "fp32" in bundle.engines else next(iter(bundle.engines)), {}
    split = data.get("val", data["train"])
    idx = split if cfg.choice_cells <= 0 else split[stratified_sample(data["labels"][split], cfg.choice_cells, seed=1)]
    cells = np.ascontiguousarray(data["crops"][idx].transpose(0, 3, 1, 2))
    be = {p: load_backend("onnxruntime", bundle, p, intra_op_num_threads=cfg.threads) for p in ("fp32", "int8")}
    _say(f"measuring INT8 against FP32 on {len(cells)} validation cells")
    labels = {p: b.infer(cells)["logits"].argmax(1) for p, b in be.items()}
    agreement = float(np.mean(labels["fp32"] == labels["int8"]))
    times: dict[str, list[float]] = {p: [] for p in be}
    batch = cells[:32]
    for _ in range(5):
        for p, b in be.items():
            t = time.perf_counter()
            b.infer(batch)
            times[p].append(time.perf_counter() - t)
    cps = {p: len(batch) / float(np.median(v)) for p, v in times.items()}
    keep = agreement >= cfg.min_int8_agreement
    chosen = "int8" if keep and cps["int8"] > cps["fp32"] else "fp32"
    reason = (f"INT8 agrees with FP32 on {100 * agreement:.1f}% of {len(cells)} validation cells "
              f"({'>=' if keep else '<'} {100 * cfg.min_int8_agreement:g}%); {cps['int8']:.1f} vs {cps['fp32']:.1f} cells/s")
    _say(f"INT8 vs FP32: {reason}")
    return chosen, {"agreement": agreement, "n_cells": int(len(cells)), "cells_per_s": cps, "chosen": chosen,
                    "reason": reason, "min_agreement": cfg.min_int8_agreement, "cpu_vnni": cpu_has_vnni()}


def run_int8(args: argparse.Namespace, cfg: ExportConfig) -> int:
    """``export int8``: --onnx FILE --out FILE, or --bundle DIR (re-quantize its INT8 engine in place)."""
    import tempfile

    from calibration.calibset import crops_sha256
    from edge.bundle import load_bundle, update_bundle_file
    from export.quantize import quantize_int8

    if args.onnx and not args.out:
        raise InputError("export int8 --onnx needs --out FILE")
    if args.bundle and args.out:
        raise InputError("export int8 --bundle rewrites the bundle's engine_int8.onnx; drop --out")
    data = _load_data(cfg)
    cells = _calib_cells(cfg, data)
    if args.onnx:
        _say(f"quantizing {args.onnx} on {len(cells)} training cells (preset {cfg.int8_preset})")
        summary = quantize_int8(args.onnx, args.out, cells, cfg.int8_preset)
        _say(f"{summary['qdq_nodes']} Q/DQ nodes, {summary['float_nodes']} nodes kept float")
        print(args.out)
        return 0
    bundle = load_bundle(args.bundle)  # verifies every hash before anything is rewritten
    if bundle.engines.get("int8") != "engine_int8.onnx" or "fp32" not in bundle.engines:
        raise InputError(f"{args.bundle}: needs an fp32 engine and an int8 engine named engine_int8.onnx")
    m = bundle.manifest
    _say(f"re-quantizing {bundle.engine_path('fp32')} on {len(cells)} training cells (preset {cfg.int8_preset})")
    with tempfile.TemporaryDirectory() as tmp:
        summary = quantize_int8(bundle.engine_path("fp32"), Path(tmp) / "int8.onnx", cells, cfg.int8_preset)
        summary["calibset_sha256"] = crops_sha256(cells)
        if "tensorrt" in m.get("quantization", {}):
            summary["tensorrt"] = m["quantization"]["tensorrt"]
        update_bundle_file(bundle.root, "engine_int8.onnx", (Path(tmp) / "int8.onnx").read_bytes(), {"quantization": summary})
    _, choice = _choose_precision(cfg, bundle.root, data)  # needs the new engine in the bundle
    choice["reason"] += f"; default precision kept: {bundle.precision}"
    # the same bytes again: one atomic manifest write that adds the measurement
    bundle_id = update_bundle_file(bundle.root, "engine_int8.onnx", bundle.engine_path("int8").read_bytes(),
                                   {"metrics": {**m.get("metrics", {}), "int8_vs_fp32": choice}})
    _say(f"{args.bundle}: engine_int8.onnx re-quantized ({summary['weight_type']}), bundle {bundle_id}")
    print(args.bundle)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "tensorrt":  # runs on the GPU box: no torch
        return run_tensorrt(args)
    if args.action == "checkpoint":
        return run_checkpoint(args)
    from export.models import set_threads  # the torch side lives in export/, never in edge/

    cfg = make_export_config(args)
    set_threads(cfg.threads)
    if args.action == "int8":
        return run_int8(args, cfg)
    out = Path(args.out)

    teacher, unet, ts, seed, view, scale, info = _engine_parts(cfg)
    if args.action == "onnx":
        from export.engine import build_engine
        from export.onnx_export import export_onnx

        eng = build_engine(teacher, unet, ts, seed, list(cfg.weights) or None, logit_scale=scale or 1.0, view=view)
        if scale is None:
            _say("no student logit scale: logits = -errors (the bundle action measures a scale)")
        export_onnx(eng, out, teacher.cfg.crop_size, args.precision)
        _say(f"{eng.evals_per_cell} (class, timestep) denoiser evaluations in {eng.passes_per_cell} passes per cell, "
             f"timesteps {eng.timesteps}, noise seed {seed}")
        print(out)
        return 0

    from edge.bundle import staged_folder, update_bundle_file
    from export.bundle import build_bundle, set_manifest_fields

    if out.exists():
        raise InputError(f"{out}: already exists; give a new bundle folder")
    data = _load_data(cfg)
    cal_idx = _calibration_index(cfg, data) if cfg.calibrate else None  # a bad split is refused before the build
    cells = _calib_cells(cfg, data)
    train_labels = data["labels"][data["train"]]
    classes = [str(c) for c in data["classes"]]
    if classes != list(teacher.cfg.classes):
        raise InputError(f"{cfg.cache}: classes {classes} differ from the teacher's {list(teacher.cfg.classes)}")
    training_data = {
        "cache": Path(cfg.cache).name, "cache_digest": str(data.get("digest", "")),
        "n_train": int(len(data["train"])), "n_val": int(len(data.get("val", []))), "n_cal": int(len(data.get("cal", []))),
        "train_per_class": {c: int((train_labels == k).sum()) for k, c in enumerate(classes)},
        "teacher_steps": teacher.meta.get("steps"), "int8_calibration_split": "train",
        **({"calibration_splits": list(cfg.calibration_splits)} if cfg.calibrate else {}),
    }
    metrics = {"distill": {k: v for k, v in info.items() if k not in ("config", "search")}} if info else {}
    teacher_files = None
    if cfg.ship_teacher:
        teacher_files = {n: Path(cfg.teacher) / n for n in ("teacher.safetensors", "teacher.json")}
    with staged_folder(out) as partial:
        build_bundle(partial, teacher, unet, timesteps=ts, noise_seed=seed, view=view, weights=list(cfg.weights) or None,
                     calib_cells=cells, logit_scale=scale, precisions=cfg.precisions,
                     default_precision="fp32" if cfg.default_precision == "auto" else cfg.default_precision,
                     int8_preset=cfg.int8_preset, teacher_files=teacher_files,
                     name=cfg.name, training_data=training_data, metrics=metrics, progress=_say)
        # INT8 vs FP32 is measured and recorded whenever both engines exist; it sets the precision only under auto
        chosen, choice = _choose_precision(cfg, partial, data)
        if cfg.default_precision != "auto":
            chosen = cfg.default_precision
            if choice:
                choice["reason"] += f"; default precision set by the config: {chosen}"
        _say(f"default precision {chosen}" + ("" if cfg.default_precision == "auto" else " (set by the config)"))
        if choice:
            metrics["int8_vs_fp32"] = {**choice, "chosen": chosen}
        set_manifest_fields(partial, precision=chosen, metrics=metrics)
        if cfg.calibrate:
            cal = _fit_calibration(cfg, partial, data, cal_idx)
            update_bundle_file(partial, "calibration.json", (json.dumps(cal, indent=2, allow_nan=False) + "\n").encode())
            m = cal["metrics"]
            _say(f"calibrated on {cal['n_cells']} {'+'.join(cfg.calibration_splits)} cells: accuracy "
                 f"{100 * m['accuracy']:.1f}%, temperature {cal['temperature']:.3f}, coverage {100 * m['coverage']:.1f}%")
    print(out)
    return 0
