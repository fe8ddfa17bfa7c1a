"""The multi-head denoiser (one pass predicts every class): its start from a class-conditional denoiser, the
engine's T-pass path against the per-class path, the ONNX export, imitation and loading back."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_NOISE_SEED, TINY_TIMESTEPS, random_cells, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(0)


@pytest.fixture(scope="module")
def heads(teacher):
    from export.models import MultiHeadDenoiser

    return MultiHeadDenoiser.from_conditional(teacher.cfg, teacher.unet).eval()


def test_every_head_starts_as_the_denoiser_conditioned_on_the_mean_class(teacher, heads):
    """from_conditional: class embedding averaged into the time embedding, conv_out copied per head."""
    z = teacher.latents(torch.from_numpy(random_cells(3, seed=4)))
    t = torch.tensor([100, 400, 900])
    unet = teacher.unet
    with torch.no_grad():
        ref_emb = unet.time_embedding(unet.time_proj(t)) + unet.class_embedding.weight.mean(0)
        got_emb = heads.trunk.time_embedding(heads.trunk.time_proj(t))
        eps = heads.all_classes(z, t)
    torch.testing.assert_close(got_emb, ref_emb, rtol=1e-5, atol=1e-6)
    assert eps.shape == (3, 8, 8, 16, 16)
    for k in range(1, 8):
        torch.testing.assert_close(eps[:, k], eps[:, 0])
    # the mean class embedding is not any one class: the heads differ from every conditional prediction
    with torch.no_grad():
        cond = unet(z, t, class_labels=torch.zeros(3, dtype=torch.long)).sample
    assert not torch.allclose(cond, eps[:, 0])


def test_forward_picks_the_head_of_each_samples_class(heads, teacher):
    z = teacher.latents(torch.from_numpy(random_cells(4, seed=5)))
    with torch.no_grad():
        heads.trunk.conv_out.bias.add_(torch.arange(64, dtype=torch.float32) * 0.01)  # make the heads differ
        try:
            t, y = torch.tensor([10, 200, 500, 999]), torch.tensor([7, 0, 3, 3])
            eps = heads.all_classes(z, t)
            one = heads(z, t, class_labels=y).sample
        finally:
            heads.trunk.conv_out.bias.sub_(torch.arange(64, dtype=torch.float32) * 0.01)
    assert one.shape == (4, 8, 16, 16)
    for b in range(4):
        torch.testing.assert_close(one[b], eps[b, y[b]])
    assert not torch.allclose(eps[:, 0], eps[:, 7])


def test_engine_runs_a_multi_head_denoiser_once_per_timestep_with_the_per_class_results(teacher):
    """The engine's T-pass path gives the errors of asking the denoiser class by class (K * T passes)."""
    from export.engine import build_engine
    from export.models import MultiHeadDenoiser

    torch.manual_seed(3)
    m = MultiHeadDenoiser(teacher.cfg).eval()  # random heads, all different
    eng = build_engine(teacher, m, TINY_TIMESTEPS, TINY_NOISE_SEED)
    assert eng.heads and eng.passes_per_cell == len(TINY_TIMESTEPS) and eng.evals_per_cell == 8 * len(TINY_TIMESTEPS)
    cells = torch.from_numpy(random_cells(3, seed=6))
    calls = []
    hook = m.trunk.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    with torch.no_grad():
        got = eng.timestep_errors(cells)
    hook.remove()
    assert calls == [3 * len(TINY_TIMESTEPS)]  # one batched call, one pass per (cell, timestep)

    class PerClass(torch.nn.Module):  # the same network, asked one class at a time
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z, t, class_labels):
            return self.inner(z, t, class_labels=class_labels)

    ref_eng = build_engine(teacher, PerClass(m), TINY_TIMESTEPS, TINY_NOISE_SEED)
    assert not ref_eng.heads and ref_eng.passes_per_cell == ref_eng.evals_per_cell
    with torch.no_grad():
        ref = ref_eng.timestep_errors(cells)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert float(got.std(dim=1).min()) > 0  # the classes' errors differ


def test_multi_head_engine_exports_to_onnx_and_matches_pytorch_on_real_cells(teacher, pbc_cells, tmp_path):
    import onnxruntime as ort

    from export.engine import build_engine
    from export.models import MultiHeadDenoiser
    from export.onnx_export import export_onnx

    torch.manual_seed(4)
    eng = build_engine(teacher, MultiHeadDenoiser(teacher.cfg).eval(), TINY_TIMESTEPS, TINY_NOISE_SEED,
                       logit_scale=5.0, view=6)
    path = export_onnx(eng, tmp_path / "heads.onnx", 64)
    cells = pbc_cells[0][:9]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = [v.numpy() for v in eng(torch.from_numpy(cells))]
    for n in (1, 9):  # dynamic batch
        got = sess.run(["logits", "errors", "anomaly"], {"cells": cells[:n]})
        np.testing.assert_allclose(got[1], ref[1][:n], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got[2], ref[2][:n], rtol=0, atol=1e-5)
        assert (got[0].argmax(1) == ref[0][:n].argmax(1)).all()


def test_multi_head_student_imitates_the_teacher_and_loads_back(teacher, tmp_path):
    from safetensors.torch import save_file

    from export.distill import DistillConfig, imitate
    from export.engine import build_engine, load_student
    from export.models import MultiHeadDenoiser

    torch.manual_seed(1)
    student = MultiHeadDenoiser(teacher.cfg)  # random start, so there is something to learn
    crops = random_cells(24, seed=3).transpose(0, 2, 3, 1).copy()
    labels = np.arange(24) % 8
    z0 = teacher.latents(torch.from_numpy(random_cells(4, seed=9)))
    t = torch.tensor(TINY_TIMESTEPS * 2)
    zt = teacher.noisy(z0, t, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)))

    def gap() -> float:  # every class, held-out inputs
        with torch.no_grad():
            ref = torch.stack([teacher.eps(zt, t, torch.full((4,), k)) for k in range(8)], 1)
            return float(((student.all_classes(zt, t) - ref) ** 2).mean())

    before = gap()
    cfg = DistillConfig(init_steps=60, init_batch=4, init_lr=3e-3, threads=1)
    losses = imitate(teacher, student, crops, labels, np.arange(24), TINY_TIMESTEPS, 7, cfg,
                     tmp_path / "student_init.safetensors", progress=False)
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert gap() < 0.8 * before  # the student's predictions for every class moved toward the teacher's

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "student.safetensors"))
    (tmp_path / "distill.json").write_text(json.dumps({"timesteps": TINY_TIMESTEPS, "noise_seed": 7,
                                                       "student_channels": list(teacher.cfg.unet_channels),
                                                       "student_heads": True}))
    unet, _ = load_student(teacher, tmp_path)
    assert isinstance(unet, MultiHeadDenoiser)
    cells = torch.from_numpy(random_cells(3, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(build_engine(teacher, unet, TINY_TIMESTEPS, 7).class_errors(cells),
                                   build_engine(teacher, student.eval(), TINY_TIMESTEPS, 7).class_errors(cells))


def test_heads_and_a_narrow_width_together_are_refused(tmp_path):
    from edge.errors import InputError
    from export.distill import DistillConfig, distill

    with pytest.raises(InputError, match="student_heads"):
        distill(DistillConfig(student_heads=True, student_channels=(8, 8), teacher_dir=str(tmp_path / "none"),
                              run_dir=str(tmp_path / "run")), progress=False)


def test_distill_a_multi_head_student_end_to_end_and_bundle_it(tmp_path):
    """`distill` with student_heads on a tiny teacher: imitation, KL stage (logit scale held), view, distill.json; the bundle built
    from it records 2 passes per cell and its ONNX engine runs in ONNX Runtime with the PyTorch engine's output."""
    from conftest import save_tiny_teacher
    from edge.backends import load_backend
    from edge.bundle import load_bundle
    from export.bundle import build_bundle
    from export.distill import DistillConfig, distill
    from export.engine import VIEWS, build_engine, load_student
    from export.models import MultiHeadDenoiser

    teacher = tiny_model(0)
    tdir = tmp_path / "teacher"
    tdir.mkdir()
    save_tiny_teacher(teacher, tdir)
    crops = random_cells(30, seed=8).transpose(0, 2, 3, 1).copy()
    np.savez(tmp_path / "cache.npz", crops=crops, labels=np.arange(30) % 8, classes=np.array(teacher.cfg.classes))
    np.savez(tdir / "splits.npz", train=np.arange(0, 16), val=np.arange(16, 24), cal=np.arange(24, 30))
    cfg = DistillConfig(teacher_dir=str(tdir), run_dir=str(tmp_path / "run"), cache=str(tmp_path / "cache.npz"),
                        grid=(200, 600), search_seeds=1, search_cells=8, target_cells=0, steps=4, batch=4,
                        init_steps=4, init_batch=2, threads=1, augment=True, student_heads=True, imitate_weight=1.0,
                        logit_scale=50.0)
    run = distill(cfg, progress=False)
    log = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)["state"]["log"]
    assert len(log) == 4 and all(row[4] > 0 for row in log)  # the imitation term was on
    assert [row[3] for row in log] == pytest.approx([50.0] * 4)  # the logit scale was held, not learnt
    info = json.loads((run / "distill.json").read_text())
    assert info["logit_scale"] == pytest.approx(50.0)
    assert info["student_heads"] is True and info["passes_per_cell"] == 2 and info["evals_per_cell"] == 16
    assert (run / "student_init.safetensors").exists()
    unet, info = load_student(teacher, run)
    assert isinstance(unet, MultiHeadDenoiser)
    out = tmp_path / "bundle"
    m = build_bundle(out, teacher, unet, timesteps=info["timesteps"], noise_seed=info["noise_seed"],
                     view=info["view"], weights=None, calib_cells=random_cells(8), precisions=("fp32",),
                     default_precision="fp32", int8_preset="tail", name="tiny-heads")
    assert m["passes_per_cell"] == 2 and m["denoiser"] == "multi_head" and m["evals_per_cell"] == 16
    cells = random_cells(5, seed=11)
    eng = build_engine(teacher, unet, info["timesteps"], info["noise_seed"], logit_scale=m["logit_scale"],
                       view=VIEWS.index(m["view"]))
    with torch.no_grad():
        ref = eng(torch.from_numpy(cells))[1].numpy()
    got = load_backend("onnxruntime", load_bundle(out), "fp32", max_batch=2).infer(cells)
    np.testing.assert_allclose(got["errors"], ref, rtol=1e-4, atol=1e-6)


def test_imitation_term_is_zero_for_the_teacher_itself_and_not_for_heads_at_the_mean_class(teacher, heads):
    import copy

    from export.distill import _imitation_term
    from export.engine import build_engine

    eng = build_engine(teacher, None, TINY_TIMESTEPS, TINY_NOISE_SEED, view=6)
    cells = torch.from_numpy(random_cells(3, seed=12))
    same = _imitation_term(teacher, copy.deepcopy(teacher.unet), cells, eng).item()  # bf16 autocast only
    mean_class = _imitation_term(teacher, heads, cells, eng).item()
    assert same < 0.1 * mean_class and mean_class > 0
