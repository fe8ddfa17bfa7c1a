"""Distillation pieces on a tiny random teacher: a narrow student imitates the teacher, and loads back."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_TIMESTEPS, random_cells, tiny_model  # noqa: E402


def test_narrow_student_imitation_lowers_its_loss_and_loads_back_narrow(tmp_path):
    from safetensors.torch import save_file

    from export.distill import DistillConfig, fit_scale, imitate
    from export.engine import build_engine, load_student, student_unet

    teacher = tiny_model(0)
    torch.manual_seed(1)
    student = student_unet(teacher, (8, 8))
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.unet.parameters())
    crops = random_cells(24, seed=3).transpose(0, 2, 3, 1).copy()
    labels = np.arange(24) % 8
    cfg = DistillConfig(init_steps=60, init_batch=4, init_lr=3e-3, threads=1)
    z0 = teacher.latents(torch.from_numpy(random_cells(6, seed=9)))
    t = torch.tensor(TINY_TIMESTEPS * 3)
    zt, y = teacher.noisy(z0, t, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))), torch.arange(6)

    def gap() -> float:
        with torch.no_grad():
            return float(((student(zt, t, class_labels=y).sample - teacher.eps(zt, t, y)) ** 2).mean())

    before = gap()
    losses = imitate(teacher, student, crops, labels, np.arange(24), TINY_TIMESTEPS, 7, cfg,
                     tmp_path / "student_init.safetensors", progress=False)
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert gap() < 0.5 * before  # held-out inputs: the student's noise prediction moved toward the teacher's
    # resumes from its checkpoint: nothing left to do
    assert imitate(teacher, student, crops, labels, np.arange(24), TINY_TIMESTEPS, 7, cfg,
                   tmp_path / "student_init.safetensors", progress=False) == []

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "student.safetensors"))
    (tmp_path / "distill.json").write_text(json.dumps({"timesteps": TINY_TIMESTEPS, "noise_seed": 7, "student_channels": [8, 8]}))
    unet, info = load_student(teacher, tmp_path)
    assert list(unet.config.block_out_channels) == [8, 8]
    cells = torch.from_numpy(random_cells(3, seed=5))
    e = build_engine(teacher, unet, TINY_TIMESTEPS, 7).class_errors(cells)
    assert e.shape == (3, 8) and torch.isfinite(e).all()


def test_fit_scale_recovers_a_known_temperature():
    from export.distill import fit_scale

    rng = np.random.default_rng(0)
    n, k, b = 4000, 8, 40.0
    errors = rng.uniform(0, 0.1, (n, k))
    p = np.exp(-b * (errors - errors.min(1, keepdims=True)))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in p])
    assert fit_scale(errors, labels) == pytest.approx(b, rel=0.15)
