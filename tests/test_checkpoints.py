"""The teacher checkpoints kept in git (export/checkpoints/teacherD, teacherE): their manifests' hashes hold, D is
teacher A trained on and E is D trained on (same autoencoder, more steps), and D's cached teacher stages cover every
training and validation cell, so that distillation from it skips the teacher's 20 core-minutes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.bundle import default_bundle_dir, file_sha256  # noqa: E402
from export.distill import cached_teacher  # noqa: E402
from export.teacher import load_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "export" / "checkpoints"
CKPT = ROOT / "teacherD"


@pytest.mark.parametrize("name", ["teacherD", "teacherE"])
def test_manifest_lists_every_file_with_its_hash(name):
    folder = ROOT / name
    man = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(man["files"]) == on_disk
    for fname, meta in man["files"].items():
        path = folder / fname
        assert path.stat().st_size == meta["bytes"] and file_sha256(path) == meta["sha256"], fname


@pytest.mark.parametrize("child, parent, steps", [("teacherD", None, 54000), ("teacherE", "teacherD", 64000)])
def test_it_is_its_parent_trained_on(child, parent, steps):
    d, a = load_teacher(ROOT / child), load_teacher(ROOT / parent if parent else default_bundle_dir())
    assert d.meta["steps"] == steps > a.meta["steps"] and d.cfg == a.cfg
    for k, v in a.ae.state_dict().items():  # the autoencoder is frozen after stage 1
        assert torch.equal(d.ae.state_dict()[k], v), k
    assert torch.equal(d.latent_scale, a.latent_scale)
    diff = max((d.unet.state_dict()[k] - v).abs().max().item() for k, v in a.unet.state_dict().items())
    assert diff > 1e-3  # 10,000 or more further steps moved the denoiser


def test_cached_stages_cover_the_split_without_running_the_teacher(tmp_path):
    for name in ("teacher_targets.npz", "teacher_val.npz"):  # a run folder of its own: the cache may write there
        (tmp_path / name).write_bytes((CKPT / name).read_bytes())
    with np.load(CKPT / "splits.npz") as z:
        train, val = np.sort(z["train"]), z["val"]
    never = lambda n: pytest.fail("a cached stage fell back to the legacy index")  # noqa: E731
    # teacher=None, crops=None: computing any missing cell would fail, so this passes only from the cache
    tgt = cached_teacher(None, None, train, tmp_path, "teacher_targets", never)
    v = cached_teacher(None, None, val, tmp_path, "teacher_val", never)
    assert tgt["errors"].shape == (len(train), 8) and v["errors"].shape == (len(val), 8)
    assert np.isfinite(tgt["errors"]).all() and (tgt["label"] == tgt["errors"].argmin(1)).mean() > 0.99
    assert 100 < v["evals"].mean() < 130  # the pruned teacher's cost per cell (110.5 measured)
