"""The fused engine: encoder, every (class, timestep) denoiser evaluation with fixed noise, masked error,
weighted reduction, logits and anomaly score in one ``nn.Module`` that exports to a single ONNX graph.

cells uint8 [N, 3, S, S] RGB -> logits float32 [N, K], errors float32 [N, K], anomaly float32 [N].

Per cell the denoiser runs K * T times (K classes, T fixed timesteps), all in one batched call of size
N * K * T. The noise is fixed (drawn once from ``noise_seed`` by ``fixed_noise``) and shared by every class
and every cell, as in the teacher's classifier, so that class errors differ only through the class condition.
The cells may first be turned by one fixed dihedral ``view`` (a rotation by a multiple of 90 degrees and an
optional flip, chosen after distillation on the calibration split: with one fixed noise draw the engine's
accuracy depends on how the noise meets the cell, and one view suits it best). There is no Python control flow
on data, so tracing gives the same graph for every batch size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

N_RUNNERS = 10  # runners-up in zeta, as in CytoDiffusion and calibration.anomaly
VIEWS = ("identity", "rot90", "rot180", "rot270", "flip_w", "rot90+flip_w", "flip_h", "rot270+flip_w")


def dihedral_view(cells: torch.Tensor, view: int) -> torch.Tensor:
    """[N, C, S, S] -> [N, C, S, S]: rotate by ``view % 4`` quarter turns over (H, W), then flip W if view >= 4
    (the 8 views of the square, named in VIEWS; view 6 is an up-down flip)."""
    if not 0 <= view < len(VIEWS):
        raise ValueError(f"view must be in [0, {len(VIEWS)}), got {view}")
    # torch.rot90(cells, view % 4, (2, 3)), spelt with flip and transpose, which ONNX exports
    x = {0: lambda c: c, 1: lambda c: c.flip(3).transpose(2, 3), 2: lambda c: c.flip((2, 3)),
         3: lambda c: c.transpose(2, 3).flip(3)}[view % 4](cells)
    return x.flip(3) if view >= 4 else x


def fixed_noise(seed: int, timesteps: int, channels: int, size: int) -> torch.Tensor:
    """The engine's fixed noise: float32 [T, C, s, s] from a CPU generator seeded with ``seed``.

    Distillation must use this same function so that the student is trained on the noise it is exported with.
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(timesteps, channels, size, size, generator=g, dtype=torch.float32)


class Engine(nn.Module):
    """The distilled classifier as one module.

    ae: AutoEncoder (only ``encode`` is used); unet: the student denoiser (diffusers UNet2DModel with class
    embeddings, epsilon prediction, or an export.models.MultiHeadDenoiser); latent_scale: float or float [1, C, 1, 1] (per-channel whitening),
    z0 = encode(x) * latent_scale; abar: float32 [T_train]
    cumulative alpha products of the DDPM schedule; mask: float32 [1, 1, s, s] error disc (mean 1 inside);
    timesteps: the T fixed timesteps; noise: float32 [T, C, s, s]; weights: float [T] per-timestep weights
    (normalised to sum 1 here); n_classes: K; logit_scale: logits = -errors * logit_scale.
    """

    def __init__(self, ae: nn.Module, unet: nn.Module, latent_scale: float | torch.Tensor, abar: torch.Tensor, mask: torch.Tensor,
                 timesteps: Sequence[int], noise: torch.Tensor, weights: Sequence[float] | torch.Tensor,
                 n_classes: int, logit_scale: float = 1.0, view: int = 0):
        super().__init__()
        dihedral_view(torch.zeros(1, 1, 2, 2), view)  # validates the view
        t = torch.as_tensor(list(timesteps), dtype=torch.int64)
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        n_t = len(t)
        if n_t < 1 or noise.shape[0] != n_t or len(w) != n_t:
            raise ValueError(f"need T >= 1 timesteps with noise [T, C, s, s] and weights [T]; got {n_t} timesteps, "
                             f"noise {tuple(noise.shape)}, weights {tuple(w.shape)}")
        if int(t.min()) < 0 or int(t.max()) >= len(abar):
            raise ValueError(f"timesteps must lie in [0, {len(abar)}), got {t.tolist()}")
        if not (w >= 0).all() or float(w.sum()) <= 0:
            raise ValueError(f"timestep weights must be >= 0 with a positive sum, got {w.tolist()}")
        if n_classes < 2:
            raise ValueError(f"the engine needs at least 2 classes, got {n_classes}")
        self.encoder = ae.encoder
        self.unet = unet
        self.n_classes, self.n_timesteps = int(n_classes), n_t
        self.timesteps = [int(v) for v in t]
        self.register_buffer("latent_scale", torch.as_tensor(latent_scale, dtype=torch.float32).clone().reshape(1, -1, 1, 1))
        self.logit_scale = float(logit_scale)
        self.view = int(view)
        a = abar.float()[t]
        self.register_buffer("sqrt_a", a.sqrt().view(1, n_t, 1, 1, 1))
        self.register_buffer("sqrt_1ma", (1 - a).sqrt().view(1, n_t, 1, 1, 1))
        self.register_buffer("noise", noise.float().contiguous())
        # error = sum over (C, s, s) of (pred - noise)^2 * mask / (C s s): fold the mean into the mask
        c, s = noise.shape[1], noise.shape[2]
        self.register_buffer("mask", (mask.float() / (c * s * s)).expand(1, c, s, s).contiguous())
        self.register_buffer("weights", (w / w.sum()).view(1, 1, n_t))
        # (class, timestep) pairs in the order of the batched call: class-major, timestep-minor
        self.register_buffer("pair_t", t.repeat(n_classes))
        self.register_buffer("pair_y", torch.arange(n_classes).repeat_interleave(n_t))

    @property
    def heads(self) -> bool:
        """True for a multi-head denoiser (export.models.MultiHeadDenoiser): T passes per cell, not K * T."""
        return hasattr(self.unet, "all_classes")

    @property
    def evals_per_cell(self) -> int:
        """(class, timestep) denoiser evaluations per cell: K * T (one per class and timestep, also when a
        multi-head denoiser makes the K of one timestep in one pass; see passes_per_cell)."""
        return self.n_classes * self.n_timesteps

    @property
    def passes_per_cell(self) -> int:
        """Denoiser network passes per cell: T for a multi-head denoiser, K * T otherwise."""
        return self.n_timesteps if self.heads else self.evals_per_cell

    def class_errors(self, cells: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> float32 [N, K]: weighted mean over t of the masked squared denoiser error."""
        return (self.timestep_errors(cells) * self.weights).sum(dim=2)

    def timestep_errors(self, cells: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> float32 [N, K, T]: the masked squared denoiser error per class and timestep."""
        k, n_t = self.n_classes, self.n_timesteps
        x = dihedral_view(cells.float() * (1.0 / 127.5) - 1.0, self.view)  # flips on float: every backend has them
        z0 = self.encoder(x) * self.latent_scale  # [N, C, s, s]
        c, s = z0.shape[1], z0.shape[2]
        zt = self.sqrt_a * z0.unsqueeze(1) + self.sqrt_1ma * self.noise.unsqueeze(0)  # [N, T, C, s, s]
        n = z0.shape[0]
        if self.heads:  # one trunk pass per (cell, timestep) predicts every class
            t = self.pair_t[:n_t].unsqueeze(0).expand(n, -1).reshape(-1)
            pred = self.unet.all_classes(zt.reshape(-1, c, s, s), t).view(n, n_t, k, c, s, s).transpose(1, 2)
        else:
            zt = zt.unsqueeze(1).expand(-1, k, -1, -1, -1, -1).reshape(-1, c, s, s)  # [N*K*T, C, s, s]
            t = self.pair_t.unsqueeze(0).expand(n, -1).reshape(-1)
            y = self.pair_y.unsqueeze(0).expand(n, -1).reshape(-1)
            pred = self.unet(zt, t, class_labels=y).sample.view(-1, k, n_t, c, s, s)
        return ((pred - self.noise.view(1, 1, n_t, c, s, s)) ** 2 * self.mask.unsqueeze(0)).sum(dim=(3, 4, 5))

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cells uint8 [N, 3, S, S] RGB -> (logits [N, K], errors [N, K], anomaly [N]), float32.

        anomaly = -zeta, zeta = mean gap of the top m = min(K-1, 10) runners-up over the best error minus the
        (population) std of the runners-up' errors: higher anomaly = no class explains the cell clearly.
        """
        errors = self.class_errors(cells)
        m = min(self.n_classes - 1, N_RUNNERS)
        e = torch.topk(errors, m + 1, dim=1, largest=False, sorted=True).values  # [N, m+1] ascending
        runners = e[:, 1:]
        gap = (runners - e[:, :1]).mean(dim=1)
        spread = ((runners - runners.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).sqrt()
        anomaly = spread - gap
        return -errors * self.logit_scale, errors, anomaly


@torch.no_grad()
def measure_logit_scale(engine: Engine, cells_u8: torch.Tensor, batch: int = 16) -> float:
    """1 / median over cells of the std of the class errors, so that logits spread by about 1 per cell.

    cells_u8: uint8 [N, 3, S, S] sample cells (a few dozen suffice). calibration.json's temperature refines it.
    """
    errs = torch.cat([engine.class_errors(cells_u8[i:i + batch]) for i in range(0, len(cells_u8), batch)])
    spread = float(errs.std(dim=1).median())
    if not spread > 0:
        raise ValueError("class errors do not vary across classes on these cells; cannot set a logit scale")
    return 1.0 / spread


def build_engine(model, unet: nn.Module | None, timesteps: Sequence[int], noise_seed: int,
                 weights: Sequence[float] | None = None, logit_scale: float = 1.0, view: int = 0) -> Engine:
    """An Engine from a loaded Teacher-like ``model`` (export.teacher.Teacher: cfg, ae, unet, latent_scale,
    abar, mask) with ``unet`` as the denoiser (None = the model's own), eval mode, no gradients."""
    cfg = model.cfg
    noise = fixed_noise(noise_seed, len(timesteps), cfg.latent_channels, cfg.latent_size)
    w = [1.0] * len(timesteps) if weights is None else list(weights)
    eng = Engine(model.ae, model.unet if unet is None else unet, model.latent_scale, model.abar, model.mask,
                 timesteps, noise, w, len(cfg.classes), logit_scale, view)
    return eng.eval().requires_grad_(False)


def student_unet(model, channels) -> nn.Module:
    """A fresh denoiser like ``model``'s (a loaded Teacher) but with ``channels`` per level (float32, train mode)."""
    import dataclasses

    from export.models import build_unet

    return build_unet(dataclasses.replace(model.cfg, unet_channels=tuple(int(c) for c in channels)))


def load_student(model, folder) -> tuple[nn.Module, dict]:
    """The distilled student of ``model`` (a loaded Teacher) from ``folder``: student.safetensors (the denoiser's
    state dict; the teacher's architecture, narrower as distill.json's ``student_channels`` says, or an
    export.models.MultiHeadDenoiser when its ``student_heads`` is true) and
    distill.json (timesteps, noise_seed, logit_scale, ...).
    Returns (unet in eval mode, the parsed distill.json). Raises BundleError naming a missing or mismatched file."""
    import copy
    import json
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from edge.errors import BundleError

    folder = Path(folder)
    wpath, jpath = folder / "student.safetensors", folder / "distill.json"
    for p in (wpath, jpath):
        if not p.exists():
            raise BundleError(f"{p}: student file missing (run `cytoedge distill` to the end)")
    try:
        info = json.loads(jpath.read_text())
        info["timesteps"], info["noise_seed"] = [int(t) for t in info["timesteps"]], int(info["noise_seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{jpath}: not a valid distillation record ({exc})") from exc
    chans = info.get("student_channels")
    if info.get("student_heads"):
        from export.models import MultiHeadDenoiser

        unet = MultiHeadDenoiser(model.cfg)
    elif chans and list(chans) != list(model.cfg.unet_channels):
        unet = student_unet(model, chans)
    else:
        unet = copy.deepcopy(model.unet)
    try:
        unet.load_state_dict({k: v.float() for k, v in load_file(str(wpath)).items()}, strict=True)
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{wpath}: unreadable or truncated weights ({exc})") from exc
    except RuntimeError as exc:
        raise BundleError(f"{wpath}: weights do not match the teacher's denoiser ({str(exc).splitlines()[0]})") from exc
    return unet.eval().requires_grad_(False), info
