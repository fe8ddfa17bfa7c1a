"""benchmarks/engine.py's FLOP counts: the bundle's ONNX graph is counted as its own network."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

torch = pytest.importorskip("torch")


def test_onnx_flops_match_the_pytorch_count_of_the_same_engine(tiny_bundle):
    from conftest import TINY_NOISE_SEED, TINY_TIMESTEPS, tiny_model
    from engine import count_flops, onnx_flops

    from export.engine import build_engine, student_unet

    model = tiny_model()
    engine = build_engine(model, None, TINY_TIMESTEPS, TINY_NOISE_SEED)
    size = model.cfg.crop_size
    cell = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    expected = count_flops(engine, cell)
    got = onnx_flops(tiny_bundle / "engine_fp32.onnx")
    # the ONNX count also has the attention's two matrix products, which the module hooks miss (3% on this tiny
    # engine, 0.07% on the shipped one)
    assert expected <= got <= 1.05 * expected
    # a narrower student costs less: the bundle rows must not borrow the PyTorch student's count
    narrow = build_engine(model, student_unet(model, [8, 8]).eval(), TINY_TIMESTEPS, TINY_NOISE_SEED)
    assert count_flops(narrow, cell) < 0.8 * got


def test_a_multi_head_bundle_without_its_student_stops_before_the_teacher_is_timed(pbc_dir, capsys):
    """The shipped bundle runs a multi-head student; benchmarks/engine.py given only the teacher would time a
    16-pass engine against a 2-pass graph. It must say so at once, not after a minute of teacher timing."""
    from engine import main

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(root / "edge/models/default"), "--teacher", str(root / "export/checkpoints/teacherE"),
              "--data", str(pbc_dir), "--cells", "8", "--threads", "1"])
    msg = str(stop.value.code)
    assert "16 denoiser passes per cell, the bundle 2 (multi_head denoiser)" in msg and "--student" in msg
    assert "teacher on" not in capsys.readouterr().err


def test_the_benchmark_times_every_variant_of_the_shipped_bundle_and_draws_them(pbc_dir, tmp_path, capsys):
    """benchmarks/engine.py end to end on 8 real cells: the teacher, the PyTorch student and both ONNX Runtime
    engines of the shipped bundle, timed in 2 rounds, in engine.json, the printed table and engine.png."""
    import json

    import matplotlib.image as mpimg
    from engine import main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    assert main(["--bundle", str(root / "edge/models/default"), "--teacher", str(root / "export/checkpoints/teacherE"),
                 "--student", str(root / "export/checkpoints/student_heads_h7b"), "--data", str(pbc_dir),
                 "--cells", "8", "--teacher-cells", "2", "--threads", "1", "--rounds", "2", "--out", str(out)]) == 0
    res = json.loads((out / "engine.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["teacher (PyTorch)", "student (PyTorch)", "ONNX Runtime fp32", "ONNX Runtime int8"]
    assert rows["teacher (PyTorch)"]["speedup_by_round"] == [1.0, 1.0] and rows["teacher (PyTorch)"]["evals_per_cell"] > 16
    for name in list(rows)[1:]:
        r = rows[name]
        assert r["evals_per_cell"] == 16 and r["passes_per_cell"] == 2 and r["cells_per_s_best"] > 0
        assert r["best_batch"] in (1, 8) and 0 < r["fraction_of_peak"] and r["n_cells"] == 8
        # timed in 2 rounds, each variant after the teacher in the same round: the figure is their median
        assert len(r["speedup_by_round"]) == 2 and min(r["speedup_by_round"]) <= r["speedup_vs_teacher"] <= max(r["speedup_by_round"])
    assert rows["ONNX Runtime fp32"]["agreement_with_fp32"] == 1.0
    assert rows["student (PyTorch)"]["agreement_with_fp32"] >= 7 / 8  # the same network, float rounding apart
    printed = capsys.readouterr().out
    assert "ONNX Runtime int8" in printed and "in each of 2 timing rounds" in printed
    img = mpimg.imread(out / "engine.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 1000 and img.std() > 0.05  # drawn, not blank
