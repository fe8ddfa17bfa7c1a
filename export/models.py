"""The teacher's networks: a small convolutional autoencoder and a class-conditional latent denoiser.

Shapes: cells are float in [-1, 1], [N, 3, S, S] (S = 64); latents [N, C, S/4, S/4] (C = 8), scaled to
unit standard deviation by ``latent_scale`` (measured on training cells after the autoencoder is trained).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the teacher (and of a student, which may be narrower). Stored with every checkpoint."""

    classes: tuple[str, ...] = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
    crop_size: int = 64
    latent_channels: int = 8
    ae_patch: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    disc_radius: float = 0.375  # error disc radius as a fraction of the latent side

    @property
    def latent_size(self) -> int:
        return self.crop_size // self.ae_patch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        for k in ("classes", "unet_channels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class AutoEncoder(nn.Module):
    """Linear patch autoencoder: [N, 3, S, S] in [-1, 1] <-> latent [N, C, S/p, S/p] (p = ae_patch).

    Each p x p RGB patch is projected on its top C principal components (fitted on training cells by
    ``fit_pca``), the optimal linear autoencoder. On this CPU a learned conv autoencoder costs ~1 s per training
    step at 64x64; the PCA one is fitted in seconds, reconstructs PBC cells to ~5 grey levels RMS with C = 8,
    and costs ~0.01 GFLOP per cell in the engine.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p, c = cfg.ae_patch, cfg.latent_channels
        self.encoder = nn.Conv2d(3, c, p, stride=p)
        self.decoder = nn.ConvTranspose2d(c, 3, p, stride=p)

    @torch.no_grad()
    def fit_pca(self, cells: torch.Tensor) -> None:
        """cells: float [N, 3, S, S] in [-1, 1] (training crops) -> sets encoder/decoder weights."""
        c, _, p, _ = self.encoder.weight.shape
        patches = F.unfold(cells, p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p).double()  # (c, ky, kx) order
        mu = patches.mean(0)
        cov = torch.cov((patches - mu).T)
        _, vecs = torch.linalg.eigh(cov)
        v = vecs[:, -c:].flip(1).float()  # [3pp, C], largest variance first
        self.encoder.weight.copy_(v.T.reshape(c, 3, p, p))
        self.encoder.bias.copy_(-(v.T @ mu.float()))
        self.decoder.weight.copy_(v.T.reshape(c, 3, p, p))
        self.decoder.bias.copy_(mu.float().reshape(3, p * p).mean(1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def build_unet(cfg: ModelConfig, multi_head: bool = False):
    """diffusers UNet2DModel: latent [N, C, s, s], timestep [N], class_labels [N] -> epsilon [N, C, s, s].
    multi_head: no class embedding and K * C output channels instead (the trunk of MultiHeadDenoiser)."""
    from diffusers import UNet2DModel

    n, k = len(cfg.unet_channels), len(cfg.classes)
    return UNet2DModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels * (k if multi_head else 1),
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        num_class_embeds=None if multi_head else k, norm_num_groups=8,
    )


def build_scheduler(cfg: ModelConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type="epsilon")


def disc_mask(cfg: ModelConfig) -> torch.Tensor:
    """float32 [1, 1, s, s]: 1 inside the central disc where errors are measured, normalised to mean 1 over it."""
    s = cfg.latent_size
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5 - s / 2, torch.arange(s) + 0.5 - s / 2, indexing="ij")
    m = ((xx ** 2 + yy ** 2) <= (cfg.disc_radius * s) ** 2).float()
    return (m / m.mean())[None, None]


def set_threads(n: int) -> None:
    """torch CPU threads for this process (1 when other work shares the CPU: spinning OpenMP threads stall)."""
    torch.set_num_threads(n)


def to_unit(cells_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> float32 [N, 3, S, S] in [-1, 1]."""
    return cells_u8.float() / 127.5 - 1.0


class MultiHeadDenoiser(nn.Module):
    """A denoiser that predicts epsilon for every class in one pass: one unconditional UNet2DModel trunk whose
    output has K * C channels, read as K class-conditional predictions.

    all_classes: latent [B, C, s, s], timestep [B] -> epsilon [B, K, C, s, s]; forward(z, t, class_labels=y)
    keeps the UNet2DModel call (``.sample`` is [B, C, s, s], the head of class y[b]), so training code that
    denoises one class per sample is unchanged. The engine calls ``all_classes`` once per (cell, timestep), so
    a cell costs T trunk passes instead of K * T class-conditional ones.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_classes, self.channels = len(cfg.classes), cfg.latent_channels
        self.trunk = build_unet(cfg, multi_head=True)

    @classmethod
    @torch.no_grad()
    def from_conditional(cls, cfg: ModelConfig, unet: nn.Module) -> "MultiHeadDenoiser":
        """Start from a class-conditional denoiser of the same width: its weights, the mean class embedding folded
        into the time embedding's last bias, and its output convolution copied to every head (so every head
        starts as the denoiser conditioned on the average class)."""
        m = cls(cfg)
        sd = {k: v for k, v in unet.state_dict().items() if not k.startswith(("class_embedding.", "conv_out."))}
        sd["time_embedding.linear_2.bias"] = sd["time_embedding.linear_2.bias"] + unet.class_embedding.weight.mean(0)
        sd["conv_out.weight"] = unet.conv_out.weight.repeat(m.n_classes, 1, 1, 1)
        sd["conv_out.bias"] = unet.conv_out.bias.repeat(m.n_classes)
        m.trunk.load_state_dict(sd, strict=True)
        return m

    def all_classes(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.trunk(z, t).sample
        return out.view(-1, self.n_classes, self.channels, *out.shape[2:])

    def forward(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor):
        from types import SimpleNamespace

        eps = self.all_classes(z, t)
        return SimpleNamespace(sample=eps[torch.arange(len(z)), class_labels])


def all_class_eps(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Every class's epsilon from either kind of denoiser in one batched call: latent [B, C, s, s], timestep [B]
    -> [B, K, C, s, s] (a MultiHeadDenoiser in one pass; a class-conditional one on B * K inputs)."""
    if hasattr(unet, "all_classes"):
        return unet.all_classes(z, t)
    y = torch.arange(n_classes, device=z.device).repeat(len(z))
    out = unet(z.repeat_interleave(n_classes, 0), t.repeat_interleave(n_classes), class_labels=y).sample
    return out.view(len(z), n_classes, *out.shape[1:])
