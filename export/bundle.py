"""Write a model bundle (contract 4): copy the files in, hash them, and write manifest.json.

The loader (edge/bundle.py) is the other half: it re-hashes every file and refuses any mismatch. The manifest
format is ``edge.bundle.FORMAT``; change both sides together and bump the number when the format changes.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from edge import __version__
from edge.bundle import FORMAT, MANIFEST, PRECISIONS, compute_bundle_id, file_sha256
from edge.errors import BundleError
from edge.preprocess import CROP_SIZE, NUCLEUS_FILL

PREPROCESSING_VERSION = 1  # bump when edge.preprocess changes what a crop looks like


def input_spec(crop_size: int = CROP_SIZE) -> dict:
    """The manifest's input spec: what the engine's ``cells`` input holds and how it was produced."""
    return {"name": "cells", "dtype": "uint8", "layout": "NCHW", "channels": "RGB", "size": int(crop_size),
            "preprocessing": {"module": "edge.preprocess", "version": PREPROCESSING_VERSION,
                              "crop_size": int(crop_size), "nucleus_fill": NUCLEUS_FILL}}


def runtime_versions(opset: int) -> dict:
    """Versions of the tools that produced the bundle."""
    import onnxruntime
    import torch

    return {"cytoedge": __version__, "onnx_opset": int(opset), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__}


def write_bundle(out_dir: str | Path, files: dict[str, str | Path], *, name: str, classes: list[str],
                 timesteps: list[int], noise_seed: int, evals_per_cell: int, precision: str,
                 engines: dict[str, str], crop_size: int = CROP_SIZE, teacher: dict | None = None,
                 calibration: str | None = None, training_data: dict | None = None, metrics: dict | None = None,
                 versions: dict | None = None, extra: dict | None = None) -> dict:
    """Copy ``files`` (bundle file name -> source path) into ``out_dir`` and write manifest.json; returns it.

    engines: precision ("fp32" | "fp16" | "int8") -> file name; precision: the default the runtime uses;
    teacher: {"weights": name, "config": name} or None; calibration: file name of calibration.json or None;
    extra: more manifest fields (e.g. the engine's logit_scale, quantization summary). Every named file must be
    in ``files``. ``out_dir`` may exist but must not already hold a manifest.
    """
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise BundleError(f"{out}: already holds a bundle; write to a new folder")
    if precision not in engines:
        raise BundleError(f"default precision {precision!r} has no engine (engines: {', '.join(engines)})")
    named = list(engines.values()) + ([calibration] if calibration else []) + list((teacher or {}).values())
    for prec in engines:
        if prec not in PRECISIONS:
            raise BundleError(f"unknown engine precision {prec!r} (known: {', '.join(PRECISIONS)})")
    missing = [n for n in named if n not in files]
    if missing:
        raise BundleError(f"write_bundle: {', '.join(missing)} named in the manifest but not given in files")
    out.mkdir(parents=True, exist_ok=True)
    hashed = {}
    for fname, src in sorted(files.items()):
        src = Path(src)
        if not src.is_file():
            raise BundleError(f"{src}: bundle source file missing")
        dst = out / fname
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        hashed[fname] = {"sha256": file_sha256(dst), "bytes": dst.stat().st_size}
    manifest = {
        "format": FORMAT,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(classes),
        "input": input_spec(crop_size),
        "timesteps": [int(t) for t in timesteps],
        "noise_seed": int(noise_seed),
        "evals_per_cell": int(evals_per_cell),
        "precision": precision,
        "engines": dict(engines),
        **({"teacher": dict(teacher)} if teacher else {}),
        **({"calibration": calibration} if calibration else {}),
        "files": hashed,
        "bundle_id": compute_bundle_id(hashed),
        "training_data": training_data or {},
        "metrics": metrics or {},
        "versions": versions or {},
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_bundle(out_dir: str | Path, model, unet, *, timesteps: list[int], noise_seed: int, view: int = 0,
                 weights: list[float] | None, calib_cells, scale_cells=None, logit_scale: float | None = None, precisions=("fp32", "int8"),
                 default_precision: str = "fp32", int8_preset: str = "tail", calibration: dict | None = None,
                 teacher_files: dict[str, str | Path] | None = None, name: str = "cytoedge-engine",
                 training_data: dict | None = None, metrics: dict | None = None, progress=None) -> dict:
    """Build the engine from ``model`` (a loaded Teacher-like object) with ``unet`` as the denoiser (None =
    the model's own), export it at each of ``precisions``, and write a bundle to ``out_dir``; returns the manifest.

    view: the dihedral view the engine turns cells by (export.engine.VIEWS; the student's distill.json says which);

    calib_cells: uint8 [N, 3, S, S], the INT8 calibration set (a stratified sample of training cells);
    logit_scale: logits = -errors * logit_scale (e.g. the one distillation fitted); None = measured on
    scale_cells: uint8 [M, 3, S, S] (default: the first 64 calibration cells) by measure_logit_scale;
    calibration: a calibration.json dict to ship (None = an uncalibrated bundle, every cell goes to review);
    teacher_files: {"teacher.safetensors": path, "teacher.json": path} to ship the teacher alongside.
    progress: callable(str) for stage messages (e.g. print to stderr).
    """
    import tempfile

    import numpy as np
    import torch

    from calibration.calibset import crops_sha256
    from export.engine import VIEWS, build_engine, measure_logit_scale
    from export.onnx_export import OPSET, export_onnx
    from export.quantize import quantize_int8

    say = progress or (lambda msg: None)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or default_precision not in precisions:
        raise BundleError(f"precisions {list(precisions)} must be among {PRECISIONS} and include the default "
                          f"{default_precision!r}")
    engine = build_engine(model, unet, timesteps, noise_seed, weights, view=view)
    if logit_scale is None:
        scale_cells = calib_cells[:64] if scale_cells is None else scale_cells
        logit_scale = measure_logit_scale(engine, torch.from_numpy(np.ascontiguousarray(scale_cells)))
    engine.logit_scale = float(logit_scale)
    say(f"engine: {engine.evals_per_cell} (class, timestep) denoiser evaluations in {engine.passes_per_cell} "
        f"passes per cell, timesteps {engine.timesteps}, "
        f"logit scale {engine.logit_scale:.4g}")
    crop = int(model.cfg.crop_size)
    files: dict[str, Path] = {}
    engines: dict[str, str] = {}
    quant = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_onnx(engine, tmp / "engine_fp32.onnx", crop, "fp32")
        if "fp32" in precisions:
            files["engine_fp32.onnx"], engines["fp32"] = fp32, "engine_fp32.onnx"
        say("exported engine_fp32.onnx")
        if "fp16" in precisions:
            files["engine_fp16.onnx"] = export_onnx(engine, tmp / "engine_fp16.onnx", crop, "fp16")
            engines["fp16"] = "engine_fp16.onnx"
            say("exported engine_fp16.onnx")
        if "int8" in precisions:
            say(f"quantizing to INT8 on {len(calib_cells)} calibration cells (preset {int8_preset})")
            quant = quantize_int8(fp32, tmp / "engine_int8.onnx", np.ascontiguousarray(calib_cells), int8_preset)
            quant["calibset_sha256"] = crops_sha256(np.ascontiguousarray(calib_cells))
            files["engine_int8.onnx"], engines["int8"] = tmp / "engine_int8.onnx", "engine_int8.onnx"
            say(f"wrote engine_int8.onnx ({quant['qdq_nodes']} Q/DQ nodes, {quant['float_nodes']} nodes kept float)")
            # TensorRT builds only symmetric int8 Q/DQ with float biases; on this CPU that flavour is slower and
            # agrees less with FP32 than uint8 activations, so it ships beside the ONNX Runtime one, for GPUs.
            quant["tensorrt"] = quantize_int8(fp32, tmp / "engine_int8_symmetric.onnx", np.ascontiguousarray(calib_cells),
                                              int8_preset, symmetric=True, reduce_range=False)
            files["engine_int8_symmetric.onnx"] = tmp / "engine_int8_symmetric.onnx"
            say("wrote engine_int8_symmetric.onnx (the INT8 source for TensorRT plans)")
        cal_name = None
        if calibration is not None:
            import json

            (tmp / "calibration.json").write_text(json.dumps(calibration, indent=2, allow_nan=False) + "\n")
            files["calibration.json"], cal_name = tmp / "calibration.json", "calibration.json"
        teacher = None
        if teacher_files:
            files.update({k: Path(v) for k, v in teacher_files.items()})
            teacher = {"weights": next(k for k in teacher_files if k.endswith(".safetensors")),
                       "config": next(k for k in teacher_files if k.endswith(".json"))}
        extra = {"logit_scale": engine.logit_scale, "timestep_weights": engine.weights.flatten().tolist(),
                 "view": VIEWS[engine.view], "passes_per_cell": engine.passes_per_cell,
                 "denoiser": "multi_head" if engine.heads else "class_conditional"}
        if quant:
            extra["quantization"] = quant
            extra["tensorrt_sources"] = {"int8": "engine_int8_symmetric.onnx"}
        manifest = write_bundle(out_dir, files, name=name, classes=list(model.cfg.classes), timesteps=engine.timesteps,
                                noise_seed=noise_seed, evals_per_cell=engine.evals_per_cell,
                                precision=default_precision, engines=engines, crop_size=crop, teacher=teacher,
                                calibration=cal_name, training_data=training_data, metrics=metrics,
                                versions=runtime_versions(OPSET), extra=extra)
    say(f"wrote bundle {out_dir} (bundle_id {manifest['bundle_id']})")
    return manifest


def set_manifest_fields(bundle_dir: str | Path, **fields) -> dict:
    """Rewrite manifest.json of a bundle being built with ``fields`` replaced (e.g. precision, metrics);
    file hashes are untouched. Returns the new manifest. BundleError if ``precision`` names no engine."""
    from edge.bundle import _atomic_write, _read_manifest

    root = Path(bundle_dir)
    m = _read_manifest(root)
    m.update(fields)
    if m["precision"] not in m["engines"]:
        raise BundleError(f"{root}: precision {m['precision']!r} has no engine (engines: {', '.join(m['engines'])})")
    _atomic_write(root / MANIFEST, (json.dumps(m, indent=2) + "\n").encode())
    return m
