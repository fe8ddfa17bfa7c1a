"""benchmarks/shift.py on real PBC images and the tiny bundle: every perturbation changes the image but keeps its
shape, the unaltered row keeps every label, and the rates are what the bundle's own decision gives."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark


def test_perturbations_alter_real_images_mildly_and_keep_their_shape(pbc_dir):
    from edge.imageio import read_image

    shift = load_benchmark("shift")
    rgb = read_image(sorted((pbc_dir / "neutrophil").iterdir())[0])
    for name, f in shift.PERTURBATIONS.items():
        out = f(rgb, 0)
        assert out.shape == rgb.shape and out.dtype == np.uint8, name
        mean_abs = float(np.abs(out.astype(np.int16) - rgb).mean())
        if name == "none":
            assert mean_abs == 0
        else:  # visible, but mild: a few grey levels on average
            assert 0.2 < mean_abs < 25, f"{name}: mean |change| {mean_abs:.2f} grey levels"


def test_flag_rates_match_the_bundle_decision_on_real_cells(pbc_dir, tiny_bundle):
    from edge.backends import load_backend
    from edge.bundle import load_bundle
    from edge.postprocess import decide

    shift = load_benchmark("shift")
    paths = [sorted((pbc_dir / c).iterdir())[0] for c in ("basophil", "lymphocyte", "neutrophil", "platelet")]
    names = ["none", "darker 10%", "JPEG quality 60"]
    cells = shift.perturbed_cells(paths, 64, names)
    assert set(cells) == set(names) and all(v.shape == (4, 3, 64, 64) for v in cells.values())
    truth = np.array([0, 4, 6, 7])
    rows = shift.flag_rates(str(tiny_bundle), cells, truth, batch=3)
    bundle = load_bundle(tiny_bundle)
    dec = decide(load_backend("onnxruntime", bundle).infer(cells["darker 10%"]), bundle.classes, bundle.calibration)
    assert rows["none"]["label_kept"] == 1.0
    assert rows["darker 10%"]["abnormal"] == pytest.approx(np.mean([d.state == "abnormal" for d in dec]))
    assert rows["darker 10%"]["accuracy"] == pytest.approx(np.mean([bundle.classes.index(d.label) == t for d, t in zip(dec, truth)]))
    for r in rows.values():
        assert r["accepted"] + r["review"] + r["abnormal"] == pytest.approx(1.0)


def test_summary_averages_the_perturbations_and_names_the_worst():
    shift = load_benchmark("shift")
    row = lambda ab, kept: {"abnormal": ab, "label_kept": kept}  # noqa: E731
    s = shift.summarise({"none": row(0.02, 1.0), "a": row(0.10, 0.9), "b": row(0.30, 0.8)})
    assert s["perturbations"] == 2 and s["worst"] == "b" and s["worst_abnormal"] == 0.30
    assert s["mean_abnormal"] == pytest.approx(0.20) and s["mean_label_kept"] == pytest.approx(0.85)
    assert shift.summarise({"none": row(0.02, 1.0)}) == {"perturbations": 0}
