"""Train the teacher: stage 1 the (PCA patch) autoencoder, stage 2 the class-conditional latent denoiser (epsilon, EMA).

Reads the preprocessed crop cache (export.datasets.build_crop_cache), splits it (train / val / cal,
stratified, seeded; the split is saved with the run), and checkpoints often so that a run stopped by the
wall-clock budget or killed resumes where it left off. Output: ``<run>/teacher.safetensors`` (fp16, EMA
weights) and ``<run>/teacher.json`` (ModelConfig, per-channel latent scale, split and training summary).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge.errors import InputError
from export.datasets import stratified_split
from export.models import AutoEncoder, ModelConfig, build_scheduler, build_unet, to_unit


@dataclass(frozen=True)
class TrainConfig:
    cache: str = "runs/cache/pbc64.npz"
    run_dir: str = "runs/teacher"
    val_frac: float = 0.1  # held out for accuracy and distillation search
    cal_frac: float = 0.1  # held out for calibration (never trained or distilled on)
    seed: int = 0
    steps: int = 40000  # denoiser steps
    batch: int = 64
    lr: float = 2e-4
    ema_decay: float = 0.999
    ckpt_every: int = 500
    max_minutes: float = 0.0  # stop (after a checkpoint) when this wall-clock budget is spent; 0 = no limit
    bf16: bool = True
    threads: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 128)  # denoiser width per level (tests use a tiny one)


def load_cache(path: str | Path) -> dict[str, np.ndarray]:
    """The crop cache -> dict(crops uint8 [N, S, S, 3], labels int64 [N], classes str [K], names, digest)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: crop cache not found (build it with `cytoedge train --data FOLDER`)")
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def make_splits(labels: np.ndarray, cfg: TrainConfig) -> dict[str, np.ndarray]:
    train, val, cal = stratified_split(labels, (cfg.val_frac, cfg.cal_frac), seed=cfg.seed)
    return {"train": train, "val": val, "cal": cal}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """float [N, 3, S, S] in [-1, 1]: random dihedral transform per batch quarter and per-cell colour jitter."""
    out = []
    for chunk in x.chunk(4):
        k = int(torch.randint(0, 4, (1,), generator=gen))
        chunk = torch.rot90(chunk, k, dims=(2, 3))
        if torch.rand(1, generator=gen) < 0.5:
            chunk = chunk.flip(3)
        out.append(chunk)
    x = torch.cat(out)
    n = x.shape[0]
    bright = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.16
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    chan = 1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.08  # mild stain / white-balance shift
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright) * chan


class _Batches:
    """Random training batches of crops: uint8 [N, S, S, 3] -> float [B, 3, S, S] in [-1, 1], augmented."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray, idx: np.ndarray, batch: int, seed: int):
        self.crops = torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels[idx])
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(self.labels), (self.batch,), generator=self.gen)
        return augment(to_unit(self.crops[i]), self.gen).clamp(-1.2, 1.2), self.labels[i]


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def save_teacher(run: Path, mcfg: ModelConfig, ae, unet, latent_scale: list[float], meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"ae.{k}": v.detach().half().contiguous() for k, v in ae.state_dict().items()}
    tensors.update({f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()})
    tmp = run / "teacher.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(run / "teacher.safetensors")
    (run / "teacher.json").write_text(json.dumps({"model": mcfg.to_dict(), "latent_scale": latent_scale, **meta}, indent=2))


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) both stages; returns the run folder."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    data = load_cache(cfg.cache)
    classes = tuple(str(c) for c in data["classes"])
    splits = make_splits(data["labels"], cfg)
    np.savez(run / "splits.npz", **splits, digest=data["digest"])
    mcfg = ModelConfig(classes=classes, crop_size=int(data["crops"].shape[1]), unet_channels=tuple(cfg.unet_channels))
    ae, unet = AutoEncoder(mcfg), build_unet(mcfg)
    ema = build_unet(mcfg)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    state = {"ae_step": 0, "step": 0, "latent_scale": None, "losses": []}
    ckpt = run / "ckpt.pt"
    if ckpt.exists():
        c = torch.load(ckpt, map_location="cpu", weights_only=False)
        if c["train_config"]["cache"] != cfg.cache or c["model"] != mcfg.to_dict():
            raise InputError(f"{ckpt}: checkpoint is from another config or dataset; use another --run-dir")
        ae.load_state_dict(c["ae"]); unet.load_state_dict(c["unet"]); ema.load_state_dict(c["ema"])
        opt.load_state_dict(c["opt"])
        state = c["state"]
    batches = _Batches(data["crops"], data["labels"], splits["train"], cfg.batch, cfg.seed + state["ae_step"] + state["step"])
    t_start = time.time()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)

    def out_of_time() -> bool:
        return cfg.max_minutes > 0 and time.time() - t_start > cfg.max_minutes * 60

    def checkpoint() -> None:
        tmp = run / "ckpt.pt.tmp"
        torch.save({"ae": ae.state_dict(), "unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "state": state, "model": mcfg.to_dict(), "train_config": asdict(cfg)}, tmp)
        tmp.replace(ckpt)

    from tqdm import tqdm

    # Stage 1: the autoencoder (PCA of 4x4 patches of un-augmented training cells).
    if state["ae_step"] == 0:
        sub = torch.from_numpy(data["crops"][splits["train"][:: max(1, len(splits["train"]) // 3000)]]).permute(0, 3, 1, 2)
        ae.fit_pca(to_unit(sub))
        state["ae_step"] = 1
        checkpoint()
    ae.eval().requires_grad_(False)
    if state["latent_scale"] is None:
        with torch.no_grad():
            z = torch.cat([ae.encode(batches.next()[0]) for _ in range(16)])
        # Per-channel whitening: PCA channels range over 15x in std; unit variance per channel is what DDPM assumes.
        state["latent_scale"] = (1.0 / z.std(dim=(0, 2, 3))).tolist()
        checkpoint()
    scale = torch.tensor(state["latent_scale"]).view(1, -1, 1, 1)
    sched = build_scheduler(mcfg)
    abar = sched.alphas_cumprod.float()

    # Stage 2: class-conditional denoiser on latents, epsilon prediction.
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="denoiser", disable=not progress)
    run_loss = None
    while state["step"] < cfg.steps and not out_of_time():
        x, y = batches.next()
        with torch.no_grad():
            z0 = ae.encode(x) * scale
        t = torch.randint(0, mcfg.num_train_timesteps, (z0.shape[0],))
        eps = torch.randn_like(z0)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with amp:
            pred = unet(zt, t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        _ema_update(ema, unet, min(cfg.ema_decay, (1 + state["step"]) / (10 + state["step"])))
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        bar.update(1); bar.set_postfix(loss=f"{run_loss:.4f}")
        if state["step"] % 10 == 0:
            state["losses"].append((state["step"], run_loss))
        if state["step"] % cfg.ckpt_every == 0:
            checkpoint()
            save_teacher(run, mcfg, ae, ema, state["latent_scale"], {"steps": state["step"], "ae": "pca"})
    bar.close()
    checkpoint()
    save_teacher(run, mcfg, ae, ema, state["latent_scale"], {"steps": state["step"], "ae": "pca",
                                             "train_config": asdict(cfg), "dataset_digest": str(data["digest"]),
                                             "n_train": int(len(splits["train"]))})
    return run
