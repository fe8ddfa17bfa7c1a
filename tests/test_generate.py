"""`cytoedge generate`: class-conditional sampling from a bundle's teacher (the tiny test bundle: random weights,
so the cells are noise-like; what is checked is the contract: files, shapes, seeds, the all-classes sheet)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

from edge.cli import main  # noqa: E402


def read(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return img


def test_generate_all_classes_writes_crops_and_a_sheet_with_a_row_per_class(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--bundle", str(tiny_bundle), "--label", "all", "-n", "3", "--steps", "4",
                 "--guidance", "0", "--out", str(out)]) == 0
    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    for c in classes:
        crops = [read(out / f"{c}_{i:04d}.png") for i in range(3)]
        assert all(x.shape == (64, 64, 3) for x in crops) and (out / f"{c}_sheet.png").exists()
    sheet = read(out / "all_sheet.png")
    assert sheet.shape == (8 * 66 + 2, 3 * 66 + 2, 3)  # 8 rows x 3 columns of 64 px crops, 2 px gaps
    assert np.array_equal(sheet[2:66, 2:66], read(out / "basophil_0000.png"))
    assert np.array_equal(sheet[2 + 7 * 66:66 + 7 * 66, 2 + 2 * 66:66 + 2 * 66], read(out / "platelet_0002.png"))
    assert "rows: basophil, eosinophil" in capsys.readouterr().out


def test_generate_is_seeded_and_refuses_an_unknown_class(tiny_bundle, tmp_path, capsys):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["generate", "--bundle", str(tiny_bundle), "--label", "monocyte", "-n", "2", "--steps", "3",
                     "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
        runs[name] = read(tmp_path / name / "monocyte_0000.png")
    assert np.array_equal(runs["a"], runs["b"]) and not np.array_equal(runs["a"], runs["c"])
    capsys.readouterr()
    assert main(["generate", "--bundle", str(tiny_bundle), "--label", "megakaryocyte", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown class 'megakaryocyte'" in err and "neutrophil" in err and "Traceback" not in err
