"""Class-conditional sampling from the teacher (DDIM): CytoDiffusion's synthetic cells, and the demo's cells."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge.errors import InputError
from export.teacher import Teacher


@torch.no_grad()
def sample_cells(teacher: Teacher, label: str, n: int, seed: int = 0, steps: int = 50, batch: int = 64,
                 guidance: float = 2.0) -> np.ndarray:
    """Sample ``n`` cells of class ``label`` with deterministic DDIM (eta = 0) -> uint8 RGB [n, S, S, 3].

    The teacher has no unconditional mode, so guidance contrasts the class with the mean of all classes:
    eps = eps_c + guidance * (eps_c - mean_k eps_k). guidance = 0 is plain conditional sampling; the class
    condition alone changes a sample little (it is what the classifier reads, not what shapes the cell).
    """
    from diffusers import DDIMScheduler

    classes = list(teacher.cfg.classes)
    if label not in classes:
        raise InputError(f"unknown class {label!r} (known: {', '.join(classes)})")
    if n < 1:
        raise InputError(f"-n must be >= 1, got {n}")
    sched = DDIMScheduler(num_train_timesteps=teacher.cfg.num_train_timesteps, beta_schedule=teacher.cfg.beta_schedule,
                          prediction_type="epsilon", clip_sample=False)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    s, c = teacher.cfg.latent_size, teacher.cfg.latent_channels
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = torch.randn((m, c, s, s), generator=gen)
        y = torch.full((m,), classes.index(label), dtype=torch.long)
        k = len(classes)
        for t in sched.timesteps:
            eps = teacher.eps(z, t.repeat(m), y)
            if guidance:
                every = teacher.eps(z.repeat(k, 1, 1, 1), t.repeat(m * k), torch.arange(k).repeat_interleave(m))
                eps = eps + guidance * (eps - every.view(k, m, *z.shape[1:]).mean(0))
            z = sched.step(eps, t, z).prev_sample
        x = teacher.ae.decode(z / teacher.latent_scale)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def contact_sheet(cells: np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 [n, S, S, 3] -> uint8 [rows*(S+pad)+pad, cols*(S+pad)+pad, 3] grid on white."""
    n, s = cells.shape[0], cells.shape[1]
    cols = min(cols, n)
    rows = -(-n // cols)
    sheet = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad, 3), 255, np.uint8)
    for i, cell in enumerate(cells):
        r, q = divmod(i, cols)
        sheet[pad + r * (s + pad):pad + r * (s + pad) + s, pad + q * (s + pad):pad + q * (s + pad) + s] = cell
    return sheet


def write_samples(cells: np.ndarray, out: str | Path, label: str) -> list[Path]:
    """Write ``<out>/<label>_<i>.png`` crops and ``<out>/<label>_sheet.png``; returns the paths."""
    import cv2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, cell in enumerate(cells):
        p = out / f"{label}_{i:04d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(cell, cv2.COLOR_RGB2BGR))
        paths.append(p)
    sheet = out / f"{label}_sheet.png"
    cv2.imwrite(str(sheet), cv2.cvtColor(contact_sheet(cells), cv2.COLOR_RGB2BGR))
    return paths + [sheet]
