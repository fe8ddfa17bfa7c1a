"""The diffusion teacher: training on real (rendered) images, resume, the full classifier's pruning,
shared noise, zeta, and refusal of bad checkpoints."""
from __future__ import annotations

import types

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.errors import BundleError, InputError  # noqa: E402
from export.datasets import build_crop_cache, load_labelled_folder  # noqa: E402
from export.diffusion_classifier import ClassifierConfig, classify_cell, spread_timesteps, zeta_score  # noqa: E402
from export.models import ModelConfig, disc_mask  # noqa: E402
from export.teacher import Teacher, load_teacher  # noqa: E402
from export.models import to_unit  # noqa: E402
from export.train import TrainConfig, drop_classes, lr_at, random_blur, sample_t, stain_jitter, train  # noqa: E402
from smear import Wbc, render_smear  # noqa: E402

TINY = (8, 16)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two classes of rendered cells (round vs lobed nuclei), 12 images each, cached and trained briefly."""
    root = tmp_path_factory.mktemp("cells")
    for kind in ("lobed", "round"):
        (root / kind).mkdir()
        for i in range(12):
            img = render_smear([Wbc(80 + i % 5, 80 - i % 3, kind=kind)], h=160, w=160, px_per_um=3.0,
                               n_rbc=10, n_platelets=0, seed=i)
            cv2.imwrite(str(root / kind / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cache = build_crop_cache(load_labelled_folder(root), root / "cache.npz", progress=False)
    run = root / "run"
    cfg = TrainConfig(cache=str(cache), run_dir=str(run), steps=100, batch=16, lr=2e-3, ckpt_every=20,
                      threads=1, unet_channels=TINY, val_frac=0.2, cal_frac=0.0)
    train(cfg, progress=False)
    return cfg, run


def test_tiny_teacher_loss_falls_and_saves(tiny_run):
    cfg, run = tiny_run
    state = torch.load(run / "ckpt.pt", weights_only=False)["state"]
    losses = [loss for _, loss in state["losses"]]
    assert state["step"] == 100 and len(losses) == 10
    assert losses[-1] < 0.85 * losses[0]
    teacher = load_teacher(run)
    assert teacher.cfg.classes == ("lobed", "round") and teacher.latent_scale.shape == (1, 8, 1, 1)


def test_resume_continues_and_refuses_other_config(tiny_run):
    cfg, run = tiny_run
    # Resume with the fine-tuning options on: stain jitter, blur, timestep focus and an lr anneal.
    more = TrainConfig(**{**cfg.__dict__, "steps": 110, "stain_jitter": 0.05, "blur_prob": 0.5, "t_focus": (100, 500),
                          "t_focus_frac": 0.5, "lr_decay_steps": 10})
    train(more, progress=False)
    c = torch.load(run / "ckpt.pt", weights_only=False)
    assert c["state"]["step"] == 110
    assert c["opt"]["param_groups"][0]["lr"] == pytest.approx(lr_at(109, more)) and lr_at(109, more) < 0.1 * cfg.lr
    other = TrainConfig(**{**cfg.__dict__, "steps": 120, "unet_channels": (16, 16)})
    with pytest.raises(InputError, match="another config"):
        train(other, progress=False)


def test_init_from_a_saved_teacher_starts_at_its_weights_and_step(tiny_run, tmp_path):
    cfg, run = tiny_run
    saved = load_teacher(run)
    cont = TrainConfig(**{**cfg.__dict__, "run_dir": str(tmp_path / "next"), "init_from": str(run),
                          "steps": saved.meta["steps"] + 5, "lr": 1e-9})
    train(cont, progress=False)
    c = torch.load(tmp_path / "next" / "ckpt.pt", weights_only=False)
    assert c["state"]["step"] == saved.meta["steps"] + 5 and c["state"]["init_from"] == str(run)
    assert c["state"]["latent_scale"] == pytest.approx(saved.latent_scale.flatten().tolist())
    # At lr ~0 five steps leave the (fp16-rounded) weights where they were; the autoencoder is the saved one.
    for k, v in saved.unet.state_dict().items():
        assert torch.allclose(c["unet"][k], v, atol=1e-5), k
    assert torch.equal(c["ae"]["encoder.weight"], saved.ae.state_dict()["encoder.weight"])
    narrow = TrainConfig(**{**cont.__dict__, "run_dir": str(tmp_path / "other"), "unet_channels": (16, 16)})
    with pytest.raises(InputError, match="another architecture"):
        train(narrow, progress=False)


def test_exclude_classes_leaves_their_cells_out_and_renumbers(tiny_run, tmp_path):
    labels = np.array([0, 1, 2, 1, 0, 2, 2])
    data = {"crops": np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1), "labels": labels,
            "classes": np.array(["a", "b", "c"]), "found": np.ones(7, bool),
            "names": np.array([f"{'abc'[v]}/{i}.png" for i, v in enumerate(labels)]), "digest": np.array("d")}
    kept = drop_classes(data, ("b",))
    assert list(kept["classes"]) == ["a", "c"] and list(kept["labels"]) == [0, 1, 0, 1, 1]
    assert list(kept["crops"].ravel()) == [0, 2, 4, 5, 6] and all(not n.startswith("b/") for n in kept["names"])
    assert str(kept["digest"]) == "d"
    with pytest.raises(InputError, match="not in the cache"):
        drop_classes(data, ("blast",))
    cfg, _ = tiny_run  # two classes: leaving one out would train a one-class model
    with pytest.raises(InputError, match="fewer than 2"):
        train(TrainConfig(**{**cfg.__dict__, "run_dir": str(tmp_path / "r"), "exclude_classes": ("lobed",)}), progress=False)


def test_lr_is_constant_then_anneals_to_the_final_fraction():
    cfg = TrainConfig(steps=1000, lr=1e-3, lr_decay_steps=400, lr_final_frac=0.1)
    lrs = [lr_at(s, cfg) for s in range(0, 1001, 50)]
    assert all(v == 1e-3 for v in lrs[:13]) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[14] < 1e-3
    assert lr_at(999, TrainConfig(steps=1000, lr=1e-3)) == 1e-3  # no anneal by default


def test_timestep_focus_draws_its_share_from_the_range():
    torch.manual_seed(0)
    inside = lambda t: ((t >= 100) & (t < 500)).float().mean().item()  # noqa: E731
    assert inside(sample_t(20000, TrainConfig(), 1000)) == pytest.approx(0.4, abs=0.02)
    focused = sample_t(20000, TrainConfig(t_focus=(100, 500), t_focus_frac=0.5), 1000)
    assert inside(focused) == pytest.approx(0.5 + 0.5 * 0.4, abs=0.02) and focused.min() >= 0 and focused.max() < 1000


def _smear_cells() -> torch.Tensor:
    img = render_smear([Wbc(80, 80, kind="lobed")], h=160, w=160, px_per_um=3.0, n_rbc=10, n_platelets=0, seed=1)
    return to_unit(torch.from_numpy(cv2.resize(img, (64, 64))).permute(2, 0, 1)[None].repeat(4, 1, 1, 1))


def test_stain_jitter_shifts_colour_per_cell_and_keeps_the_structure():
    x = _smear_cells()
    same = stain_jitter(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(same, x.clamp(-1, 1), atol=2e-2)  # strength 0: only the 1/255 clamp of the density
    y = stain_jitter(x, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(y, stain_jitter(x, 0.05, torch.Generator().manual_seed(0)))  # seeded
    assert y.min() >= -1 and y.max() <= 1 and y.shape == x.shape
    colour = y.mean(dim=(2, 3))
    assert (colour - x.mean(dim=(2, 3))).abs().max() > 0.02 and (colour[0] - colour[1]).abs().max() > 0.005  # per cell
    for a, b in zip(x.mean(1), y.mean(1)):  # grey-level structure (nucleus vs background) survives
        assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.9


def test_random_blur_softens_the_picked_cells_only():
    x = _smear_cells()
    assert torch.equal(random_blur(x, 0.0, torch.Generator().manual_seed(0)), x)
    y = random_blur(x, 1.0, torch.Generator().manual_seed(0))
    lap = lambda t: (t[..., 1:-1, 1:-1] * 4 - t[..., :-2, 1:-1] - t[..., 2:, 1:-1] - t[..., 1:-1, :-2] - t[..., 1:-1, 2:]).var()  # noqa: E731
    assert lap(y) < 0.8 * lap(x) and (y.mean() - x.mean()).abs() < 0.01


def test_truncated_or_mismatched_weights_are_refused(tiny_run, tmp_path):
    _, run = tiny_run
    (tmp_path / "teacher.json").write_bytes((run / "teacher.json").read_bytes())
    data = (run / "teacher.safetensors").read_bytes()
    (tmp_path / "teacher.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="teacher.safetensors"):
        load_teacher(tmp_path)
    cfg = ModelConfig(classes=("lobed", "round"), unet_channels=(16, 32))
    (tmp_path / "teacher.safetensors").write_bytes(data)
    (tmp_path / "teacher.json").write_text(__import__("json").dumps({"model": cfg.to_dict(), "latent_scale": [1.0] * 8}))
    with pytest.raises(BundleError, match="do not match"):
        load_teacher(tmp_path)
    with pytest.raises(BundleError, match="missing"):
        load_teacher(tmp_path / "nowhere")


class _BiasUnet(torch.nn.Module):
    """A fake denoiser: predicts a constant per class, so class errors are known in closed form."""

    def __init__(self, bias):
        super().__init__()
        self.bias = torch.tensor(bias, dtype=torch.float32)

    def forward(self, zt, t, class_labels):
        return types.SimpleNamespace(sample=torch.zeros_like(zt) + self.bias[class_labels].view(-1, 1, 1, 1))


def _fake_teacher(bias) -> Teacher:
    cfg = ModelConfig(classes=tuple(f"c{i}" for i in range(len(bias))), unet_channels=TINY)
    from export.models import AutoEncoder, build_scheduler

    ae = AutoEncoder(cfg)
    return Teacher(cfg=cfg, ae=ae, unet=_BiasUnet(bias), latent_scale=torch.ones(1, 8, 1, 1),
                   abar=build_scheduler(cfg).alphas_cumprod.float(), mask=disc_mask(cfg), meta={})


def test_pruning_removes_clearly_worse_class_and_keeps_a_tie():
    teacher = _fake_teacher([0.0, 0.0, 1.0])  # c0 and c1 tie exactly, c2 is much worse
    cell = np.full((3, 64, 64), 128, np.uint8)
    res = classify_cell(teacher, cell, ClassifierConfig(max_trials=32, min_trials=8, test_every=8), np.random.default_rng(0))
    assert res.trials[2] == 8  # pruned at the first test
    assert res.trials[0] == res.trials[1] == 32  # the tie is never pruned
    assert res.label in (0, 1) and res.errors[2] > res.errors[0] + 0.5
    assert res.evals == 8 * 3 + 24 * 2
    no_prune = classify_cell(teacher, cell, ClassifierConfig(max_trials=32, prune=False), np.random.default_rng(0))
    assert no_prune.evals == 32 * 3 and no_prune.evals > res.evals


def test_noise_is_shared_across_classes():
    """With a denoiser that ignores the class, every class sees the same noise, so errors are identical."""
    teacher = _fake_teacher([0.3, 0.3, 0.3, 0.3])
    res = classify_cell(teacher, np.full((3, 64, 64), 90, np.uint8), ClassifierConfig(max_trials=16),
                        np.random.default_rng(1))
    assert np.ptp(res.errors) == 0.0


def test_zeta_clear_winner_beats_three_way_tie():
    clear = np.array([0.2, 1.0, 1.05, 1.1, 1.0, 1.02, 0.98, 1.01])
    tie = np.array([0.2, 0.2, 0.2, 1.1, 1.0, 1.02, 0.98, 1.01])
    assert zeta_score(clear) > zeta_score(tie)


def test_timesteps_spread_over_schedule():
    ts = spread_timesteps(8, 50, 950)
    assert len(set(ts.tolist())) == 8 and ts.min() >= 50 and ts.max() <= 950
    assert ts[:2].min() < 400 and ts[:2].max() > 450  # the first trials already cover both halves
