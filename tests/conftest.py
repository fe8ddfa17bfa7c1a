"""Shared fixtures: a tiny but complete model bundle built on the fly, and the PBC data folder.

``tiny_bundle``: a valid bundle (manifest, FP32 and INT8 engine ONNX, tiny teacher weights, calibration.json)
from a randomly initialised tiny model: the 8 PBC classes, crop 64, denoiser channels (8, 16), 2 timesteps
(16 evaluations per cell). Built once per test session in a temporary folder (a few seconds). Tests that
modify a bundle must copy it first (shutil.copytree).

Its calibration.json is fitted by calibration.fit.fit_calibration on synthetic engine-like outputs (class errors
with a clear winner for most cells), not on the random engine's own outputs: a random engine is right about 1
time in 8, and no review threshold with a risk guarantee exists for it, so the fit would (rightly) refuse.
The result is a real, format-valid calibration that exercises every code path of the runtime.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PBC = ROOT.parent / "shared" / "data" / "pbc"
TINY_CHANNELS = (8, 16)
TINY_TIMESTEPS = [200, 600]
TINY_NOISE_SEED = 7
TINY_VIEW = 6  # the tiny bundle turns cells upside down in its graph, so every parity test covers a view


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_calibration(classes: list[str], n: int = 600, seed: int = 0) -> dict:
    """calibration.json for ``classes`` fitted on synthetic outputs: errors ~ 1 + noise, the true class lower by
    a margin that varies per cell (so confidence varies and a review threshold can be certified)."""
    from calibration.anomaly import zeta
    from calibration.fit import fit_calibration

    rng = np.random.default_rng(seed)
    k = len(classes)
    labels = rng.integers(0, k, n)
    errors = 1.0 + 0.05 * rng.standard_normal((n, k))
    errors[np.arange(n), labels] -= rng.uniform(0.0, 0.4, n)
    logits = -errors / 0.05
    return fit_calibration(logits, errors, -zeta(errors), labels, classes, alpha=0.05, delta=0.1,
                           false_alarm=0.05, anomaly_score="engine")


def tiny_model(seed: int = 0):
    """A randomly initialised Teacher-like object (export.teacher.Teacher) with a tiny denoiser."""
    import torch

    from export.models import AutoEncoder, ModelConfig, build_scheduler, build_unet, disc_mask
    from export.teacher import Teacher

    torch.manual_seed(seed)
    cfg = ModelConfig(unet_channels=TINY_CHANNELS)
    ae, unet = AutoEncoder(cfg).eval(), build_unet(cfg).eval()
    scale = torch.full((1, cfg.latent_channels, 1, 1), 2.0)
    return Teacher(cfg=cfg, ae=ae, unet=unet, latent_scale=scale, abar=build_scheduler(cfg).alphas_cumprod.float(),
                   mask=disc_mask(cfg), meta={"latent_scale": scale.flatten().tolist(), "steps": 0})


def save_tiny_teacher(model, folder: Path) -> dict[str, Path]:
    """The tiny model in the teacher's on-disk format (export.train.save_teacher): safetensors + JSON."""
    from safetensors.torch import save_file

    tensors = {f"ae.{k}": v.detach().half().contiguous() for k, v in model.ae.state_dict().items()}
    tensors.update({f"unet.{k}": v.detach().half().contiguous() for k, v in model.unet.state_dict().items()})
    save_file(tensors, str(folder / "teacher.safetensors"))
    (folder / "teacher.json").write_text(json.dumps({"model": model.cfg.to_dict(), **model.meta}, indent=2))
    return {"teacher.safetensors": folder / "teacher.safetensors", "teacher.json": folder / "teacher.json"}


def random_cells(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [n, 3, size, size]: a dark disc on a lighter field with noise (cell-like, not real)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2 + 0.5
    cells = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        r = rng.uniform(0.15, 0.35) * size
        bg = rng.uniform(170, 230, 3)[:, None, None]
        fg = rng.uniform(60, 140, 3)[:, None, None]
        disc = (xx ** 2 + yy ** 2 <= r * r)[None]
        img = np.where(disc, fg, bg) + rng.normal(0, 8, (3, size, size))
        cells[i] = np.clip(img, 0, 255).astype(np.uint8)
    return cells


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """Path to a tiny, valid bundle folder (see the module docstring). Read-only: copy it before changing it."""
    import torch

    from export.bundle import build_bundle

    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("tiny_src")
    model = tiny_model()
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    build_bundle(out, model, None, timesteps=TINY_TIMESTEPS, noise_seed=TINY_NOISE_SEED, view=TINY_VIEW, weights=None,
                 calib_cells=random_cells(16), precisions=("fp32", "int8"), default_precision="fp32",
                 int8_preset="tail", calibration=synthetic_calibration(list(model.cfg.classes)),
                 teacher_files=save_tiny_teacher(model, work), name="tiny-random",
                 training_data={"note": "random weights, no training (test fixture)"})
    return out


@pytest.fixture(scope="session")
def pbc_dir() -> Path:
    """../shared/data/pbc (PBC class folders of real cell images); skips when absent."""
    if not PBC.is_dir():
        pytest.skip(f"needs the PBC images in {PBC} (not present on this machine)")
    return PBC


@pytest.fixture(scope="session")
def pbc_cells(pbc_dir) -> tuple[np.ndarray, np.ndarray]:
    """Real PBC cells through the shared preprocessing: (uint8 [N, 3, 64, 64] RGB, int labels [N]), the first
    4 images of each of the 8 classes (sorted names). Skips when ../shared/data/pbc is absent."""
    from edge.imageio import read_image
    from edge.preprocess import normalise_cell
    from export.models import ModelConfig

    cells, labels = [], []
    for k, cls in enumerate(ModelConfig().classes):
        for path in sorted((pbc_dir / cls).glob("*.jpg"))[:4]:
            cells.append(normalise_cell(read_image(path)).crop.transpose(2, 0, 1))
            labels.append(k)
    if len(cells) < 8:
        pytest.skip(f"too few PBC images found under {pbc_dir}")
    return np.ascontiguousarray(np.stack(cells)), np.array(labels)
