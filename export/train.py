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
    bf16: bool = True  # bf16 autocast where the CPU runs it natively (cpu_autocast); fp32 elsewhere
    threads: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 128)  # denoiser width per level (tests use a tiny one)
    lr_decay_steps: int = 0  # the last N steps anneal lr (cosine) down to lr_final_frac * lr; 0 = constant lr
    lr_final_frac: float = 0.05
    t_focus: tuple[int, int] = (0, 0)  # timestep range the classifier uses ([lo, hi), e.g. (100, 500)) ...
    t_focus_frac: float = 0.0  # ... and the fraction of each batch whose t is drawn from it (rest: uniform)
    stain_jitter: float = 0.0  # per-cell stain (colour-deconvolution) jitter strength, e.g. 0.05; 0 = off
    blur_prob: float = 0.0  # fraction of cells blurred (Gaussian, sigma 0.3-1.2 px): other microscopes' focus
    exclude_classes: tuple[str, ...] = ()  # leave these classes out (leave-one-class-out anomaly protocol)
    init_from: str = ""  # a folder with teacher.safetensors + teacher.json (a bundle or a run) to start a new run from


def load_cache(path: str | Path) -> dict[str, np.ndarray]:
    """The crop cache -> dict(crops uint8 [N, S, S, 3], labels int64 [N], classes str [K], names, digest)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: crop cache not found (build it with `cytoedge train --data FOLDER`)")
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def drop_classes(data: dict[str, np.ndarray], exclude: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The crop cache without the cells of ``exclude``; labels renumbered over the remaining classes (in order)."""
    classes = [str(c) for c in data["classes"]]
    unknown = sorted(set(exclude) - set(classes))
    if unknown:
        raise InputError(f"exclude_classes: {', '.join(unknown)} not in the cache's classes ({', '.join(classes)})")
    if len(classes) - len(set(exclude)) < 2:
        raise InputError("exclude_classes would leave fewer than 2 classes")
    keep_cls = [i for i, c in enumerate(classes) if c not in exclude]
    remap = np.full(len(classes), -1, np.int64)
    remap[keep_cls] = np.arange(len(keep_cls))
    keep = remap[data["labels"]] >= 0
    out = {k: (v[keep] if k in ("crops", "labels", "found", "names") else v) for k, v in data.items()}
    out["labels"] = remap[data["labels"][keep]]
    out["classes"] = np.asarray([classes[i] for i in keep_cls])
    return out


def make_splits(labels: np.ndarray, cfg: TrainConfig) -> dict[str, np.ndarray]:
    train, val, cal = stratified_split(labels, (cfg.val_frac, cfg.cal_frac), seed=cfg.seed)
    return {"train": train, "val": val, "cal": cal}


# Optical densities of the three stain components, rows normalised (Ruifrok & Johnston's H-E-DAB basis).
# Romanowsky stains are not H&E, but jittering amounts along these axes gives the stain-strength and
# hue shifts seen between labs and scanners (Tellez et al. 2018).
_RGB_FROM_STAIN = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_STAIN = _RGB_FROM_STAIN / _RGB_FROM_STAIN.norm(dim=1, keepdim=True)


def stain_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """float [N, 3, S, S] in [-1, 1] -> same: per cell, scale (1 +- s) and shift (+- s) each stain's density,
    then jitter saturation and white balance."""
    n = x.shape[0]
    od = -torch.log(((x + 1) / 2).clamp(1 / 255, 1))  # optical density [N, 3, S, S]
    stains = torch.einsum("nchw,cd->ndhw", od, torch.linalg.inv(_RGB_FROM_STAIN))
    alpha = 1 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * strength
    beta = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * strength
    od = torch.einsum("ndhw,dc->nchw", stains * alpha + beta, _RGB_FROM_STAIN).clamp(min=0)
    rgb = torch.exp(-od)
    # Saturation (1 - 4s .. 1 + 2s) and white balance (+- 2s per channel): washed-out or bluish illumination.
    sat = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 6 - 4) * strength
    grey = rgb.mean(dim=1, keepdim=True)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 2 * strength
    return ((grey + (rgb - grey) * sat) * gain).clamp(0, 1) * 2 - 1


def random_blur(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Blur a random `prob` of the cells [N, 3, S, S] with a Gaussian of sigma 0.3-1.2 px (one sigma per call)."""
    pick = torch.rand(x.shape[0], generator=gen) < prob
    if not pick.any():
        return x
    sigma = 0.3 + 0.9 * float(torch.rand(1, generator=gen))
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-r**2 / (2 * sigma**2)); k = k / k.sum()
    y = F.pad(x[pick], (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
    y = F.conv2d(y, k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
    x = x.clone(); x[pick] = y
    return x


def augment(x: torch.Tensor, gen: torch.Generator, stain: float = 0.0, blur: float = 0.0) -> torch.Tensor:
    """float [N, 3, S, S] in [-1, 1]: random dihedral transform per batch quarter, per-cell colour jitter and,
    when asked, stain jitter (strength `stain`) and blur (fraction `blur` of the cells)."""
    if stain > 0:
        x = stain_jitter(x, stain, gen)
    if blur > 0:
        x = random_blur(x, blur, gen)
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

    def __init__(self, crops: np.ndarray, labels: np.ndarray, idx: np.ndarray, batch: int, seed: int,
                 stain: float = 0.0, blur: float = 0.0):
        self.crops = torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels[idx])
        self.batch, self.stain, self.blur = batch, stain, blur
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(self.labels), (self.batch,), generator=self.gen)
        x = augment(to_unit(self.crops[i]), self.gen, self.stain, self.blur)
        return x.clamp(-1.2, 1.2), self.labels[i]


def cpu_autocast(bf16: bool = True) -> torch.autocast:
    """bf16 autocast on the CPU when asked for and the CPU has native bf16 (AVX-512 BF16); otherwise disabled,
    because emulated bf16 is far slower than fp32: on a 2-core AMD EPYC with AVX2 only, a forward and backward
    pass of the multi-head student (16 latents) took 1.90 s in bf16 against 0.15 s in fp32, and 128 teacher
    evaluations 8.0 s against 0.34 s."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and torch.cpu._is_avx512_bf16_supported())


def lr_at(step: int, cfg: "TrainConfig | DistillConfig") -> float:
    """Constant cfg.lr, then a cosine anneal to lr_final_frac * lr over the last lr_decay_steps steps (any config
    with steps, lr, lr_decay_steps and lr_final_frac)."""
    start = cfg.steps - cfg.lr_decay_steps
    if cfg.lr_decay_steps <= 0 or step < start:
        return cfg.lr
    f = min(1.0, (step - start) / cfg.lr_decay_steps)
    lo = cfg.lr * cfg.lr_final_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * f))


def sample_t(n: int, cfg: TrainConfig, num_train_timesteps: int) -> torch.Tensor:
    """Training timesteps int64 [n]: uniform, except a t_focus_frac share drawn from the classifier's t_focus range."""
    t = torch.randint(0, num_train_timesteps, (n,))
    lo, hi = cfg.t_focus
    if cfg.t_focus_frac > 0 and hi > lo:
        k = int(round(n * cfg.t_focus_frac))
        t[:k] = torch.randint(lo, hi, (k,))
    return t


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


def _init_from(folder: str, mcfg: ModelConfig, ae, unet, ema) -> dict:
    """Start a new run from a saved teacher (fp16 EMA weights, e.g. a bundle's): its autoencoder, latent scale and
    step count carry over, and its EMA weights seed both the trained and the EMA denoiser. The optimizer starts
    fresh, so use it for a warm restart (a new lr cycle), where Adam's moments matter least."""
    from export.teacher import load_teacher

    t = load_teacher(folder)
    if t.cfg != mcfg:
        raise InputError(f"{folder}: its teacher has another architecture or class list than this run's config")
    ae.load_state_dict(t.ae.state_dict()); unet.load_state_dict(t.unet.state_dict()); ema.load_state_dict(t.unet.state_dict())
    return {"ae_step": 1, "step": int(t.meta["steps"]), "latent_scale": t.latent_scale.flatten().tolist(), "losses": [],
            "init_from": str(folder)}


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) both stages; returns the run folder."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    data = load_cache(cfg.cache)
    if cfg.exclude_classes:
        data = drop_classes(data, tuple(cfg.exclude_classes))
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
    elif cfg.init_from:
        state = _init_from(cfg.init_from, mcfg, ae, unet, ema)
    batches = _Batches(data["crops"], data["labels"], splits["train"], cfg.batch, cfg.seed + state["ae_step"] + state["step"],
                       cfg.stain_jitter, cfg.blur_prob)
    t_start = time.time()
    amp = cpu_autocast(cfg.bf16)

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
        t = sample_t(z0.shape[0], cfg, mcfg.num_train_timesteps)
        eps = torch.randn_like(z0)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with amp:
            pred = unet(zt, t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], cfg)
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
