"""Teacher checkpoints kept in git (``export/checkpoints/<name>``): a trained teacher with its cached full
classifications, so that distilling from it needs no teacher run, and a manifest that says how it was made.

A checkpoint folder holds ``teacher.safetensors`` + ``teacher.json`` (fp16 EMA weights, as ``cytoedge train``
writes them), ``splits.npz`` (train / val / cal indices into the crop cache), ``teacher_val.npz`` (the teacher's
full classification of every validation cell) and, when the distill run has it, ``teacher_targets.npz`` (the same
for every training cell: the distillation targets), both keyed by crop-cache ``index``. ``manifest.json`` lists
each file with its sha256 and size, the commands that made it, the teacher's steps, the cache digest and the
figures measured from the cached stages. ``cytoedge export checkpoint`` writes one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from calibration.accuracy import accuracy_report
from edge.bundle import MANIFEST, file_sha256, staged_folder
from edge.errors import InputError
from export.distill import STAGE_KEYS, cached_rows

TEACHER_FILES = ("teacher.safetensors", "teacher.json", "splits.npz")


def _no_legacy(n: int):
    raise InputError(f"a cached stage file of {n} rows has no 'index' array (an older format); recompute it")


def merged_stage(run: Path, prefix: str, idx: np.ndarray) -> dict[str, np.ndarray] | None:
    """The cached stage ``prefix`` of distill run folder ``run`` for the cells idx (rows in idx order, keys
    STAGE_KEYS + index), or None when ``run`` holds none of them; InputError when it holds only some."""
    have, _ = cached_rows(run, prefix, _no_legacy)
    missing = [int(c) for c in idx if int(c) not in have]
    if len(missing) == len(idx):
        return None
    if missing:
        raise InputError(f"{run}: stage {prefix} has {len(idx) - len(missing)} of {len(idx)} cells; finish it "
                         f"(cytoedge distill --run-dir {run} --part I/N) before keeping it")
    out = {k: np.stack([have[int(c)][k] for c in idx]) for k in STAGE_KEYS}
    out["index"] = np.asarray(idx, np.int64)
    return out


def _stage_metrics(stage: dict, labels: np.ndarray, classes: list[str], name: str) -> dict:
    rep = accuracy_report(labels[stage["index"]], stage["label"], classes)
    m = {f"{name}_accuracy": round(rep["accuracy"], 4), f"{name}_balanced_accuracy": round(rep["balanced_accuracy"], 4),
         f"{name}_cells": int(len(stage["index"]))}
    if name == "val":
        m.update(val_evals_mean=round(float(stage["evals"].mean()), 1),
                 val_evals_p90=int(np.percentile(stage["evals"], 90)))
    return m


def write_checkpoint(teacher_dir: str | Path, run_dir: str | Path, out_dir: str | Path, *, what: str,
                     made_by: list[str], cache: str | Path, use: str = "") -> dict:
    """Copy the teacher of ``teacher_dir`` and the cached stages of distill run ``run_dir`` into a new folder
    ``out_dir`` with manifest.json; returns the manifest. The validation stage must be complete; the training
    targets are kept when complete and left out when absent. ``cache``: the crop cache the splits index."""
    from export.teacher import load_teacher
    from export.train import load_cache

    src, run, out = Path(teacher_dir), Path(run_dir), Path(out_dir)
    if out.exists():
        raise InputError(f"{out}: already exists; give a new checkpoint folder")
    for name in TEACHER_FILES:
        if not (src / name).is_file():
            raise InputError(f"{src / name}: not found (a teacher folder holds {', '.join(TEACHER_FILES)})")
    teacher = load_teacher(src)
    data = load_cache(cache)
    classes = [str(c) for c in data["classes"]]
    if classes != list(teacher.cfg.classes):
        raise InputError(f"{cache}: classes {classes} differ from the teacher's {list(teacher.cfg.classes)}")
    with np.load(src / "splits.npz") as z:
        splits = {k: z[k] for k in ("train", "val")}
    stages = {"teacher_val.npz": ("val", merged_stage(run, "teacher_val", splits["val"])),
              "teacher_targets.npz": ("train", merged_stage(run, "teacher_targets", np.sort(splits["train"])))}
    if stages["teacher_val.npz"][1] is None:
        raise InputError(f"{run}: no teacher_val stage (cytoedge distill --teacher-dir {src} --run-dir {run})")
    with staged_folder(out) as partial:
        partial.mkdir(parents=True)
        for name in TEACHER_FILES:
            shutil.copy2(src / name, partial / name)
        metrics = {}
        for name, (split, stage) in stages.items():
            if stage is not None:
                np.savez(partial / name, **stage)
                metrics.update(_stage_metrics(stage, data["labels"], classes, split))
        files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(partial.iterdir())}
        manifest = {"what": what, "made_by": list(made_by), "steps": teacher.meta.get("steps"),
                    "cache_digest": str(data.get("digest", "")), "metrics": metrics, "use": use, "files": files}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
