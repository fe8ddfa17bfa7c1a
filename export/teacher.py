"""The trained teacher in memory: load from safetensors + JSON, encode cells, denoise with shared noise.

A ``Teacher`` is what the full diffusion classifier, the generator and distillation all use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edge.errors import BundleError
from export.models import AutoEncoder, ModelConfig, build_scheduler, build_unet, disc_mask, to_unit


@dataclass
class Teacher:
    """cfg: architecture; ae, unet: eval-mode modules (float32); latent_scale: float32 [1, C, 1, 1],
    z = encode(x) * latent_scale (per-channel whitening);
    abar: float32 [T] cumulative alpha products of the DDPM schedule; mask: float32 [1, 1, s, s] error disc."""

    cfg: ModelConfig
    ae: AutoEncoder
    unet: torch.nn.Module
    latent_scale: torch.Tensor
    abar: torch.Tensor
    mask: torch.Tensor
    meta: dict

    @torch.no_grad()
    def latents(self, cells_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] RGB -> float32 [N, C, s, s] scaled latents."""
        return self.ae.encode(to_unit(cells_u8)) * self.latent_scale

    @torch.no_grad()
    def eps(self, zt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noisy latents [B, C, s, s], timesteps int64 [B], class indices int64 [B] -> predicted noise [B, C, s, s]."""
        return self.unet(zt, t, class_labels=y).sample

    def noisy(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    @torch.no_grad()
    def errors(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Masked squared error of the denoiser: z0, noise [B, C, s, s], t, y int64 [B] -> float32 [B]."""
        return self.masked_error(self.eps(self.noisy(z0, t, noise), t, y), noise)

    def masked_error(self, pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean squared error inside the disc: pred, noise float [B, C, s, s] -> float [B] (differentiable)."""
        return ((pred - noise) ** 2 * self.mask).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def latents_of_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Augmented cells float [N, 3, S, S] in [-1, 1] (export.train batches) -> scaled latents, through the same
        uint8 rounding the runtime's cells have."""
        return self.latents(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


def load_teacher(folder: str | Path, name: str = "teacher") -> Teacher:
    """``folder/<name>.safetensors`` + ``folder/<name>.json`` -> Teacher (float32, eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    wpath, jpath = folder / f"{name}.safetensors", folder / f"{name}.json"
    for p in (wpath, jpath):
        if not p.exists():
            raise BundleError(f"{p}: teacher file missing")
    try:
        meta = json.loads(jpath.read_text())
        cfg = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{jpath}: not a valid teacher config ({exc})") from exc
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{wpath}: unreadable or truncated weights ({exc})") from exc
    ae, unet = AutoEncoder(cfg), build_unet(cfg)
    for prefix, mod in (("ae.", ae), ("unet.", unet)):
        sd = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        try:
            mod.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{wpath}: weights do not match the config in {jpath.name} ({str(exc).splitlines()[0]})") from exc
    ae.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    abar = build_scheduler(cfg).alphas_cumprod.float()
    return Teacher(cfg=cfg, ae=ae, unet=unet, latent_scale=torch.tensor(meta["latent_scale"], dtype=torch.float32).view(1, -1, 1, 1), abar=abar,
                   mask=disc_mask(cfg), meta=meta)
