"""The checkpoints kept in git (export/checkpoints/teacherD, teacherE, teacher_loco, and E's multi-head students
student_heads, student_heads_scale314, student_heads_h6, student_heads_h7b): their manifests' hashes hold, the
multi-head students classify real cells in 2 passes per cell, the leave-one-class-out teacher knows every class but
erythroblast, E is D trained on (same autoencoder, more steps) and is the shipped bundle's teacher, the cached
teacher stages of each cover every training and validation cell, so that distillation from it skips the teacher's 20
core-minutes, and `cytoedge export checkpoint` rebuilds D's folder, files and figures, from its teacher and a run
folder of parts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.bundle import default_bundle_dir, file_sha256  # noqa: E402
from edge.cli import main  # noqa: E402
from export.datasets import file_digest, load_labelled_folder  # noqa: E402
from export.distill import cached_teacher  # noqa: E402
from export.teacher import load_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "export" / "checkpoints"
CKPT = ROOT / "teacherD"


@pytest.mark.parametrize("name", ["teacherD", "teacherE", "teacher_loco", "student_heads", "student_heads_scale314",
                                  "student_heads_h6", "student_heads_h7b"])
def test_manifest_lists_every_file_with_its_hash(name):
    folder = ROOT / name
    man = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(man["files"]) == on_disk
    for fname, meta in man["files"].items():
        path = folder / fname
        assert path.stat().st_size == meta["bytes"] and file_sha256(path) == meta["sha256"], fname


def test_the_loco_teacher_was_trained_without_erythroblasts():
    loco, e = load_teacher(ROOT / "teacher_loco"), load_teacher(ROOT / "teacherE")
    assert list(loco.cfg.classes) == [c for c in e.cfg.classes if c != "erythroblast"]
    assert loco.meta["steps"] == 9000
    with np.load(ROOT / "teacher_loco" / "splits.npz") as z:  # indices into the cache without erythroblasts
        n_normal = sum(len(z[k]) for k in ("train", "val", "cal"))
    with np.load(ROOT / "teacherE" / "splits.npz") as z:
        n_all = sum(len(z[k]) for k in ("train", "val", "cal"))
    assert n_normal < n_all


def test_e_is_d_trained_on_and_is_the_shipped_teacher():
    d, e = load_teacher(ROOT / "teacherD"), load_teacher(ROOT / "teacherE")
    assert (d.meta["steps"], e.meta["steps"]) == (54000, 64000) and d.cfg == e.cfg
    for k, v in d.ae.state_dict().items():  # the autoencoder is frozen after stage 1
        assert torch.equal(e.ae.state_dict()[k], v), k
    assert torch.equal(d.latent_scale, e.latent_scale)
    diff = max((e.unet.state_dict()[k] - v).abs().max().item() for k, v in d.unet.state_dict().items())
    assert diff > 1e-3  # 10,000 further steps moved the denoiser
    shipped = default_bundle_dir()  # since session 10 the bundle's teacher is E (D's parent, A, is in git history)
    for name in ("teacher.safetensors", "teacher.json"):
        assert file_sha256(shipped / name) == file_sha256(ROOT / "teacherE" / name), name


@pytest.mark.parametrize("name", ["teacherD", "teacherE"])
def test_cached_stages_cover_the_split_without_running_the_teacher(tmp_path, name):
    ckpt = ROOT / name
    for fname in ("teacher_targets.npz", "teacher_val.npz"):  # a run folder of its own: the cache may write there
        (tmp_path / fname).write_bytes((ckpt / fname).read_bytes())
    with np.load(ckpt / "splits.npz") as z:
        train, val = np.sort(z["train"]), z["val"]
    never = lambda n: pytest.fail("a cached stage fell back to the legacy index")  # noqa: E731
    # teacher=None, crops=None: computing any missing cell would fail, so this passes only from the cache
    tgt = cached_teacher(None, None, train, tmp_path, "teacher_targets", never)
    v = cached_teacher(None, None, val, tmp_path, "teacher_val", never)
    assert tgt["errors"].shape == (len(train), 8) and v["errors"].shape == (len(val), 8)
    assert np.isfinite(tgt["errors"]).all() and (tgt["label"] == tgt["errors"].argmin(1)).mean() > 0.99
    assert 100 < v["evals"].mean() < 130  # the pruned teacher's cost per cell (D 110.5, E 109.5 measured)


def _label_cache(pbc_dir: Path, path: Path) -> Path:
    """The crop cache's labels, classes and digest (no crops: the writer reads no pixels), from the PBC listing."""
    folder = load_labelled_folder(pbc_dir)
    np.savez(path, crops=np.zeros((len(folder.labels), 1, 1, 3), np.uint8), labels=folder.labels,
             classes=np.asarray(folder.classes), digest=np.asarray(file_digest(folder.paths)))
    return path


def _split_into_parts(stage: Path, run: Path, prefix: str, n: int = 2) -> None:
    """Write a whole cached stage as the n part files `cytoedge distill --part I/N` leaves behind."""
    with np.load(stage) as z:
        rows = {k: z[k] for k in z.files}
    for part in np.array_split(np.arange(len(rows["index"])), n):
        np.savez(run / f"{prefix}_c{rows['index'][part[0]]}n{len(part)}.npz", **{k: v[part] for k, v in rows.items()})


def test_export_checkpoint_rebuilds_teacher_d_from_its_parts(tmp_path, pbc_dir, capsys):
    cache = _label_cache(pbc_dir, tmp_path / "labels.npz")
    teacher, run, out = tmp_path / "teacher", tmp_path / "run", tmp_path / "teacherD"
    teacher.mkdir(), run.mkdir()
    for name in ("teacher.safetensors", "teacher.json", "splits.npz"):
        (teacher / name).write_bytes((CKPT / name).read_bytes())
    for prefix in ("teacher_val", "teacher_targets"):
        _split_into_parts(CKPT / f"{prefix}.npz", run, prefix)
    want = json.loads((CKPT / "manifest.json").read_text())
    argv = ["export", "checkpoint", "--teacher", str(teacher), "--run-dir", str(run), "--cache", str(cache),
            "--what", want["what"], "--out", str(out)] + [a for c in want["made_by"] for a in ("--made-by", c)]
    assert main(argv) == 0 and capsys.readouterr().out.strip() == str(out)
    got = json.loads((out / "manifest.json").read_text())
    assert got["made_by"] == want["made_by"] and got["steps"] == 54000 and got["cache_digest"] == want["cache_digest"]
    for k in ("val_accuracy", "val_balanced_accuracy", "val_evals_mean", "val_evals_p90", "train_accuracy",
              "val_cells", "train_cells"):
        assert got["metrics"][k] == want["metrics"][k], k
    assert set(got["files"]) == set(want["files"])
    for name in ("teacher.safetensors", "teacher.json", "splits.npz"):
        assert got["files"][name] == want["files"][name], name
    for name in ("teacher_val.npz", "teacher_targets.npz"):  # same rows, in the same order
        with np.load(out / name) as a, np.load(CKPT / name) as b:
            for k in ("index", "errors", "label", "evals"):
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # never overwrites


def test_export_checkpoint_refuses_a_stage_with_cells_missing(tmp_path, pbc_dir, capsys):
    cache = _label_cache(pbc_dir, tmp_path / "labels.npz")
    run = tmp_path / "run"
    run.mkdir()
    _split_into_parts(CKPT / "teacher_val.npz", run, "teacher_val", n=3)
    next(run.glob("teacher_val_c*.npz")).unlink()  # one part of three never finished
    argv = ["export", "checkpoint", "--teacher", str(CKPT), "--run-dir", str(run), "--cache", str(cache),
            "--what", "x", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "teacher_val has" in err and f"of {1367} cells" in err and "--part" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("name, steps, view, scale", [("student_heads", 12000, "flip_h", None),
                                                       ("student_heads_scale314", 8000, "rot270+flip_w", 314.0),
                                                       ("student_heads_h6", 6000, "identity", 314.0),
                                                       ("student_heads_h7b", 4500, "rot270+flip_w", 314.0)])
def test_the_multi_head_students_of_e_classify_real_cells_in_two_passes(pbc_cells, name, steps, view, scale):
    from export.engine import VIEWS, build_engine, load_student
    from export.models import MultiHeadDenoiser

    e = load_teacher(ROOT / "teacherE")
    unet, info = load_student(e, ROOT / name)
    assert isinstance(unet, MultiHeadDenoiser) and info["student_heads"] and info["steps"] == steps
    assert info["config"].get("logit_scale", 0.0) == (scale or 0.0) and (scale is None or info["logit_scale"] == pytest.approx(scale))
    eng = build_engine(e, unet, info["timesteps"], info["noise_seed"], view=info["view"])
    assert (eng.passes_per_cell, eng.evals_per_cell, VIEWS[eng.view]) == (2, 16, view)
    cells, labels = pbc_cells
    with torch.no_grad():
        pred = eng.class_errors(torch.from_numpy(cells)).argmin(1).numpy()
    assert np.mean(pred == labels) >= 0.8, f"accuracy {np.mean(pred == labels):.2f} on {len(labels)} real cells"
