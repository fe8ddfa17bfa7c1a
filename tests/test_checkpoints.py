"""The teacher checkpoint kept in git (export/checkpoints/teacherD): its manifest's hashes hold, it is teacher A
trained on (same autoencoder, more steps), and its cached teacher stages cover every training and validation cell,
so that distillation from it skips the teacher's 20 core-minutes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.bundle import default_bundle_dir  # noqa: E402
from export.distill import cached_teacher  # noqa: E402
from export.teacher import load_teacher  # noqa: E402

CKPT = Path(__file__).resolve().parents[1] / "export" / "checkpoints" / "teacherD"


def test_manifest_lists_every_file_with_its_hash():
    man = json.loads((CKPT / "manifest.json").read_text())
    on_disk = {p.name for p in CKPT.iterdir()} - {"manifest.json"}
    assert set(man["files"]) == on_disk
    for name, meta in man["files"].items():
        data = (CKPT / name).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name


def test_it_is_the_shipped_teacher_trained_on():
    d, a = load_teacher(CKPT), load_teacher(default_bundle_dir())
    assert d.meta["steps"] == 54000 > a.meta["steps"] and d.cfg == a.cfg
    for k, v in a.ae.state_dict().items():  # the autoencoder is frozen after stage 1
        assert torch.equal(d.ae.state_dict()[k], v), k
    assert torch.equal(d.latent_scale, a.latent_scale)
    diff = max((d.unet.state_dict()[k] - v).abs().max().item() for k, v in a.unet.state_dict().items())
    assert diff > 1e-3  # 20,000 more steps moved the denoiser


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
