"""Distillation pieces on a tiny random teacher: a narrow student imitates the teacher, and loads back."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibration.calibset import stratified_sample  # noqa: E402
from conftest import TINY_TIMESTEPS, random_cells, tiny_model  # noqa: E402
from edge.errors import InputError  # noqa: E402


def test_narrow_student_imitation_lowers_its_loss_and_loads_back_narrow(tmp_path):
    from safetensors.torch import save_file

    from export.distill import DistillConfig, imitate
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


def test_cached_teacher_stages_split_into_parts_are_reused_and_kept_in_cell_order(tmp_path):
    """--part I/N slices compute disjoint halves; the whole stage then computes nothing new; a legacy file without
    an index counts as the cells it was made for; a larger sample only computes the cells it lacks."""
    from export.distill import DistillConfig, _target_index, cached_teacher

    teacher = tiny_model(0)
    crops = random_cells(20, seed=4).transpose(0, 2, 3, 1).copy()
    labels = np.arange(20) % 4
    train = np.arange(2, 18)  # 16 training cells
    run = tmp_path / "run"
    run.mkdir()
    idx8 = _target_index(labels, train, DistillConfig(target_cells=8))
    assert len(idx8) == 8 and set(idx8) <= set(train)
    legacy = lambda n: train[stratified_sample(labels[train], n, seed=0)]  # noqa: E731
    r8 = cached_teacher(teacher, crops, idx8, run, "teacher_targets", legacy)
    assert r8["errors"].shape == (8, 8) and len(list(run.glob("teacher_targets*.npz"))) == 2  # its file + the whole
    # legacy layout: only teacher_targets.npz, without an index, standing for the stratified sample of its size
    for f in run.glob("teacher_targets*.npz"):
        with np.load(f) as z:
            rows = {k: z[k] for k in z.files if k != "index"}
        f.unlink()
    np.savez(run / "teacher_targets.npz", **rows)
    idx = _target_index(labels, train, DistillConfig(target_cells=0))
    assert list(idx) == list(train)
    for i in range(2):
        assert cached_teacher(teacher, crops, idx, run, "teacher_targets", legacy, part=(i, 2)) is None
    files = sorted(run.glob("teacher_targets_c*.npz"))
    parts = [np.load(f)["index"] for f in files]
    assert len(files) == 2 and sorted(np.concatenate(parts).tolist()) == sorted(set(train) - set(idx8))
    r = cached_teacher(teacher, crops, idx, run, "teacher_targets", legacy)
    assert len(list(run.glob("teacher_targets_c*.npz"))) == 2  # nothing new computed
    assert r["errors"].shape == (16, 8)
    pos = {int(c): j for j, c in enumerate(idx)}
    np.testing.assert_array_equal(r["errors"][[pos[int(c)] for c in idx8]], r8["errors"])
    for f, p in zip(files, parts):
        np.testing.assert_array_equal(r["label"][[pos[int(c)] for c in p]], np.load(f)["label"])
    with np.load(run / "teacher_targets.npz") as z:  # rewritten whole, with its index
        assert list(z["index"]) == list(idx) and np.array_equal(z["label"], r["label"])
    # a legacy file whose size does not match the cells it stands for is refused, naming it
    np.savez(run / "teacher_val.npz", **{k: v[:3] for k, v in rows.items()})
    with pytest.raises(InputError, match="teacher_val.npz"):
        cached_teacher(teacher, crops, np.arange(18, 20), run, "teacher_val", lambda n: np.arange(18, 20))


def test_teacher_runs_with_other_noise_seeds_are_stages_of_their_own(tmp_path):
    """target_seeds: a second teacher run (noise seed 1) is cached under its own prefix; its files never leak into
    the seed-0 stage that shares the prefix's start, and its errors differ (other noise), around the same cells."""
    from export.diffusion_classifier import ClassifierConfig
    from export.distill import cached_teacher

    teacher = tiny_model(0)
    crops = random_cells(6, seed=5).transpose(0, 2, 3, 1).copy()
    idx = np.arange(6)
    legacy = lambda n: idx[:n]  # noqa: E731
    run = tmp_path
    fast = dict(max_trials=4, min_trials=2, test_every=2)
    r1 = cached_teacher(teacher, crops, idx, run, "teacher_targets_seed1", legacy, ccfg=ClassifierConfig(seed=1, **fast))
    r0 = cached_teacher(teacher, crops, idx, run, "teacher_targets", legacy, ccfg=ClassifierConfig(**fast))
    assert {f.name for f in run.glob("*.npz")} == {"teacher_targets_seed1.npz", "teacher_targets_seed1_c0n6.npz",
                                                   "teacher_targets.npz", "teacher_targets_c0n6.npz"}
    assert not np.allclose(r0["errors"], r1["errors"])
    again = cached_teacher(teacher, crops, idx, run, "teacher_targets", legacy)  # nothing computed: seed 0's rows
    np.testing.assert_array_equal(again["errors"], r0["errors"])
    assert len(list(run.glob("*.npz"))) == 4


def test_dihedral_gives_one_of_the_eight_symmetries_per_cell():
    from export.distill import dihedral

    cells = torch.from_numpy(random_cells(32, seed=2))
    out = dihedral(cells, torch.Generator().manual_seed(0))
    seen = set()
    for c, o in zip(cells, out):
        views = [torch.rot90(c, k, dims=(1, 2)) for k in range(4)]
        views += [v.flip(2) for v in views]
        hit = [j for j, v in enumerate(views) if torch.equal(v, o)]
        assert hit, "not a rotation or flip of its input"
        seen.add(hit[0])
    assert len(seen) >= 5  # random per cell, not one transform for the batch


def test_distill_part_and_target_seeds_options_are_checked_by_the_cli():
    import subprocess
    import sys

    for opt, bad in (("--part", "2/2"), ("--part", "x/2"), ("--part", "1"), ("--target-seeds", "0,0"),
                     ("--target-seeds", "0,x"), ("--target-seeds", "-1")):
        res = subprocess.run([sys.executable, "-m", "edge.cli", "distill", opt, bad], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 2 and opt in res.stderr and "Traceback" not in res.stderr


def test_distill_end_to_end_on_a_tiny_teacher_with_parts_anneal_and_resume(tmp_path):
    """The whole `distill` on a tiny teacher and cache: two --part processes' worth of teacher stages, then the
    run picks them up (computing nothing new), searches, fine-tunes with augmentation and an lr anneal, writes
    student.safetensors + distill.json; run again, it resumes with nothing left to do."""
    import torch as _torch

    from conftest import save_tiny_teacher
    from export.distill import DistillConfig, distill
    from export.engine import load_student

    teacher = tiny_model(0)
    tdir = tmp_path / "teacher"
    tdir.mkdir()
    save_tiny_teacher(teacher, tdir)
    n = 30
    crops = random_cells(n, seed=8).transpose(0, 2, 3, 1).copy()
    labels = np.arange(n) % 8
    np.savez(tmp_path / "cache.npz", crops=crops, labels=labels, classes=np.array(teacher.cfg.classes))
    np.savez(tdir / "splits.npz", train=np.arange(0, 16), val=np.arange(16, 24), cal=np.arange(24, 30))
    cfg = DistillConfig(teacher_dir=str(tdir), run_dir=str(tmp_path / "run"), cache=str(tmp_path / "cache.npz"),
                        grid=(200, 600), search_seeds=2, search_cells=8, target_cells=0, steps=6, batch=4,
                        lr=1e-4, lr_decay_steps=4, ckpt_every=3, threads=1, augment=True)
    for i in range(2):
        distill(cfg, progress=False, part=(i, 2))
    run = tmp_path / "run"
    before = {f.name for f in run.glob("*.npz")}
    assert len([f for f in before if f.startswith("teacher_val_c")]) == 2
    assert len([f for f in before if f.startswith("teacher_targets_c")]) == 2
    distill(cfg, progress=False)
    assert {f.name for f in run.glob("*_c*.npz")} == {f for f in before if "_c" in f}  # nothing recomputed
    info = json.loads((run / "distill.json").read_text())
    assert info["steps"] == 6 and info["timesteps"] == [200, 600] and 0.0 <= info["val_agreement_with_teacher"] <= 1.0
    view = json.loads((run / "view.json").read_text())
    assert info["view"] == view["view"] and view["n_cells"] == 6 and len(view["table"]) == 8  # the cal split
    ck = _torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
    assert len({row[3] for row in ck["state"]["log"]}) == 6  # the logit scale is learnt (logit_scale = 0)
    assert ck["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * 3 / 4))))
    assert view["steps"] == 6
    # a run stopped by its time budget writes its checkpoint but neither a view nor a report; finished later,
    # it chooses the view again, for the student it now has
    (run / "distill.json").unlink()
    distill(dataclasses.replace(cfg, steps=7, max_minutes=1e-9), progress=False)
    assert not (run / "distill.json").exists() and json.loads((run / "view.json").read_text())["steps"] == 6
    distill(dataclasses.replace(cfg, steps=7), progress=False)
    assert json.loads((run / "view.json").read_text())["steps"] == 7 and json.loads((run / "distill.json").read_text())["steps"] == 7
    cfg = dataclasses.replace(cfg, steps=7)
    unet, _ = load_student(teacher, run)
    w = {k: v.clone() for k, v in unet.state_dict().items()}
    distill(cfg, progress=False)  # resumes at step 7 of 7: the student does not change
    unet2, _ = load_student(teacher, run)
    assert all(_torch.equal(w[k], v) for k, v in unet2.state_dict().items())
    with pytest.raises(InputError, match="augment"):
        distill(dataclasses.replace(cfg, train_view=6), progress=False)
    distill(dataclasses.replace(cfg, augment=False, train_view=6, steps=8), progress=False)  # 1 more step, upside down
    info = json.loads((run / "distill.json").read_text())
    assert info["steps"] == 8 and info["view"] == 6 and json.loads((run / "view.json").read_text())["chosen_by"] == "train_view"
    with pytest.raises(InputError, match="target_seeds"):
        distill(dataclasses.replace(cfg, target_seeds=(1, 1)), progress=False)
    seed0 = sorted(f.name for f in run.glob("teacher_targets*.npz"))
    distill(dataclasses.replace(cfg, augment=False, train_view=6, steps=9, target_seeds=(0, 1)), progress=False)
    assert {f.name for f in run.glob("teacher_targets*.npz")} - set(seed0) == {
        "teacher_targets_seed1.npz", "teacher_targets_seed1_c0n16.npz"}  # the second run: all 16 cells, once
    assert json.loads((run / "distill.json").read_text())["config"]["target_seeds"] == [0, 1]
    with pytest.raises(InputError, match="jitter_copies"):
        distill(dataclasses.replace(cfg, jitter_copies=-1), progress=False)
    seeds = {f.name for f in run.glob("teacher_targets*.npz")}
    distill(dataclasses.replace(cfg, augment=False, train_view=6, steps=10, target_seeds=(0, 1), jitter_copies=1),
            progress=False)
    assert {f.name for f in run.glob("teacher_targets*.npz")} - seeds == {
        "teacher_targets_jitter1.npz", "teacher_targets_jitter1_c0n16.npz"}  # one more teacher run, on the copies
    with np.load(run / "teacher_targets_jitter1.npz") as j, np.load(run / "teacher_targets.npz") as t:
        assert list(j["index"]) == list(t["index"]) and not np.allclose(j["errors"], t["errors"])
    assert json.loads((run / "distill.json").read_text())["config"]["jitter_copies"] == 1
    with pytest.raises(InputError, match="jitter_targets"):
        distill(dataclasses.replace(cfg, jitter_copies=1, jitter_targets="median"), progress=False)
    files = sorted(run.glob("*.npz"))
    distill(dataclasses.replace(cfg, augment=False, train_view=6, steps=11, target_seeds=(0, 1), jitter_copies=1,
                                jitter_targets="mean"), progress=False)
    assert sorted(run.glob("*.npz")) == files  # the same teacher stages, only matched differently
    assert json.loads((run / "distill.json").read_text())["config"]["jitter_targets"] == "mean"
    with pytest.raises(InputError, match="target_sharpen"):
        distill(dataclasses.replace(cfg, target_sharpen=0.0), progress=False)
    distill(dataclasses.replace(cfg, augment=False, train_view=6, steps=12, target_sharpen=4.0), progress=False)
    assert json.loads((run / "distill.json").read_text())["config"]["target_sharpen"] == 4.0


def test_sharpened_targets_keep_the_teachers_label_and_move_mass_to_it():
    from export.distill import teacher_distribution

    rng = np.random.default_rng(0)
    errors = 0.3 + 0.002 * rng.standard_normal((200, 8))  # class errors a few 1/1000 apart, as the teacher's are
    p1, p4 = teacher_distribution(errors, 1856.0).numpy(), teacher_distribution(errors, 4 * 1856.0).numpy()
    assert np.allclose(p1.sum(1), 1) and np.allclose(p4.sum(1), 1)
    assert (p1.argmax(1) == errors.argmin(1)).all() and (p4.argmax(1) == errors.argmin(1)).all()
    assert (p4.max(1) >= p1.max(1) - 1e-6).all() and p4.max(1).mean() > p1.max(1).mean() + 0.1


def test_jittered_copies_are_seeded_mild_perturbations_of_the_cells():
    from export.distill import jittered

    cells = random_cells(12, seed=4).transpose(0, 2, 3, 1).copy()
    a = jittered(cells, 1001)
    assert a.dtype == np.uint8 and a.shape == cells.shape
    np.testing.assert_array_equal(a, jittered(cells, 1001))  # every process gets the same copies
    assert not np.array_equal(a, jittered(cells, 1002))
    shift = np.abs(a.reshape(12, -1, 3).mean(1) - cells.reshape(12, -1, 3).mean(1))  # mean colour, grey levels
    assert 0.5 < shift.mean() and shift.max() < 30  # recoloured, mildly (turns and flips keep the mean)


class _RowEngine:
    """A stand-in engine whose class k error is minus the mean of the left half of row k of the cell turned by its
    view: which class wins depends on the view, as with a real student's fixed noise."""

    view = 0

    def class_errors(self, cells):
        from export.engine import dihedral_view

        return -dihedral_view(cells, self.view).float()[:, 0, :8, :32].mean(2)


def test_search_view_picks_the_most_accurate_view_and_leaves_the_engine_as_it_was():
    from export.distill import engine_errors, search_view
    from export.engine import VIEWS

    engine = _RowEngine()
    cells = random_cells(40, seed=9).transpose(0, 2, 3, 1).copy()
    engine.view = 5
    labels = engine_errors(engine, cells).argmin(1)  # view 5 is right on every cell
    engine.view = 2
    found = search_view(engine, cells, labels)
    acc = [r["accuracy"] for r in found["table"]]
    assert len(acc) == 8 and acc[5] == 1.0 and max(acc[:5] + acc[6:]) < 0.5
    assert found["view"] == 5 and found["name"] == VIEWS[5] and engine.view == 2
