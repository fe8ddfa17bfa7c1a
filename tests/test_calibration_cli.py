"""``cytoedge calibrate`` on a real (random-weight) bundle: refusals, and a re-calibration that the loader accepts."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.commands import calibrate

PBC = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    calibrate.register(parser.add_subparsers())
    return parser.parse_args(["calibrate", *argv])


def bundle_copy(request, tmp_path: Path) -> Path:
    """A private copy of the session's tiny_bundle (the command rewrites it in place)."""
    try:
        src = request.getfixturevalue("tiny_bundle")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py does not provide the tiny_bundle fixture yet")
    return Path(shutil.copytree(src, tmp_path / "bundle"))


def write_cells(root: Path, per_class: dict[str, int]) -> Path:
    """Small synthetic stained-cell images (a purple disc on a pink field) in <root>/<class>/."""
    rng = np.random.default_rng(0)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = np.full((96, 96, 3), (200, 170, 210), np.uint8)
            cv2.circle(img, (48 + int(rng.integers(-5, 6)), 48), int(rng.integers(12, 20)), (150, 40, 90), -1)
            cv2.imwrite(str(root / cls / f"{i}.png"), img)
    return root


def test_parser_defaults():
    args = parse(["--bundle", "b", "folder"])
    assert (args.alpha, args.delta, args.false_alarm, args.backend) == (0.01, 0.1, 0.02, "onnxruntime")
    assert args.func is calibrate.run


def test_refuses_too_few_cells_naming_the_minimum(request, tmp_path, capsys):
    from edge.cli import main

    bundle = bundle_copy(request, tmp_path)
    folder = write_cells(tmp_path / "cells", {"neutrophil": 6, "lymphocyte": 6})
    assert main(["calibrate", "--bundle", str(bundle), str(folder)]) == 2
    assert "need at least 230" in capsys.readouterr().err


def test_refuses_classes_unknown_to_the_bundle(request, tmp_path, capsys):
    from edge.cli import main

    bundle = bundle_copy(request, tmp_path)
    folder = write_cells(tmp_path / "cells", {"neutrophil": 3, "blast": 3, "smudge": 2})
    assert main(["calibrate", "--bundle", str(bundle), str(folder)]) == 2
    err = capsys.readouterr().err
    assert "blast" in err and "smudge" in err


def link_pbc_cells(folder: Path, classes: list[str], per_class: int) -> Path:
    """<folder>/<class>/ with links (never copies) to the first ``per_class`` PBC images of each class."""
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for src in sorted((PBC / cls).glob("*.jpg"))[:per_class]:
            (folder / cls / src.name).symlink_to(src)
    return folder


def test_held_out_index_concatenates_named_splits_and_refuses_the_others():
    from edge.errors import InputError
    from export.datasets import held_out_index

    splits = {"train": np.arange(5), "val": np.array([7, 9]), "cal": np.array([5, 6, 8])}
    assert held_out_index(splits, ["cal", "val"]).tolist() == [5, 6, 8, 7, 9]
    assert held_out_index(splits, ("val",)).tolist() == [7, 9]
    with pytest.raises(InputError, match="cannot calibrate on split.s. train"):
        held_out_index(splits, ["cal", "train"])
    with pytest.raises(InputError, match="has no val split"):
        held_out_index({"cal": np.arange(3)}, ["cal", "val"])
    with pytest.raises(InputError, match="at least one split"):
        held_out_index(splits, [])


def test_split_selection_refuses_splits_of_another_folder(request, tmp_path, capsys):
    from edge.cli import main

    bundle = bundle_copy(request, tmp_path)
    folder = write_cells(tmp_path / "cells", {"neutrophil": 4, "lymphocyte": 4})
    np.savez(tmp_path / "splits.npz", train=np.arange(4), cal=np.arange(4, 8), digest=np.array("0" * 64))
    before = (bundle / "calibration.json").read_bytes()
    assert main(["calibrate", "--bundle", str(bundle), "--splits", str(tmp_path / "splits.npz"), str(folder)]) == 2
    assert "made for another set of images" in capsys.readouterr().err
    assert main(["calibrate", "--bundle", str(bundle), "--split", "cal,val", str(folder)]) == 2
    assert "give --splits too" in capsys.readouterr().err
    assert (bundle / "calibration.json").read_bytes() == before  # nothing rewritten


@pytest.mark.skipif(not PBC.is_dir(), reason="needs the PBC dev images in ../shared/data/pbc")
def test_recalibrates_on_the_named_splits_of_a_real_folder(request, tmp_path, capsys):
    from calibration.calibset import crops_sha256
    from edge.bundle import load_bundle
    from edge.cli import main
    from edge.imageio import read_image
    from edge.preprocess import normalise_cell
    from export.datasets import file_digest, load_labelled_folder

    bundle = bundle_copy(request, tmp_path)
    classes = load_bundle(bundle).classes
    folder = link_pbc_cells(tmp_path / "cells", classes, 8)
    listing = load_labelled_folder(folder, classes=classes).paths
    n = len(listing)
    np.savez(tmp_path / "splits.npz", train=np.arange(0, n, 2), cal=np.arange(1, n, 4), val=np.arange(3, n, 4),
             digest=np.array(file_digest(listing)))
    argv = ["calibrate", "--bundle", str(bundle), "--alpha", "0.95", "--delta", "0.5", "--false-alarm", "0.2",
            "--splits", str(tmp_path / "splits.npz"), str(folder)]
    assert main([*argv, "--split", "cal,train"]) == 2
    assert "cannot calibrate on split(s) train" in capsys.readouterr().err
    assert main([*argv, "--split", "cal,val"]) == 0
    cal = load_bundle(bundle).calibration
    assert cal["n_cells"] == n // 2 and cal["splits"] == ["cal", "val"]
    chosen = [listing[i] for i in np.concatenate([np.arange(1, n, 4), np.arange(3, n, 4)])]
    crops = np.stack([normalise_cell(read_image(p), size=load_bundle(bundle).crop_size).crop for p in chosen])
    assert cal["calibset_sha256"] == crops_sha256(crops)  # exactly the cal then val cells, in that order
    assert main([*argv, "--split", "cal"]) == 0
    assert load_bundle(bundle).calibration["n_cells"] == n // 4


@pytest.mark.skipif(not PBC.is_dir(), reason="needs the PBC dev images in ../shared/data/pbc")
def test_recalibrates_a_bundle_on_real_cells(request, tmp_path, capsys):
    bundle = bundle_copy(request, tmp_path)
    from edge.bundle import load_bundle
    from edge.cli import main

    classes = load_bundle(bundle).classes
    folder = link_pbc_cells(tmp_path / "cells", classes, 5)
    # a random-weight engine is right about 1 time in 8: only a loose bound can be certified
    argv = ["calibrate", "--bundle", str(bundle), "--alpha", "0.95", "--delta", "0.5", "--false-alarm", "0.2",
            "--batch-size", "16", str(folder)]
    assert main(argv) == 0
    assert "calibrated" in capsys.readouterr().out
    reloaded = load_bundle(bundle)  # hashes were updated, so the loader accepts the rewritten file
    cal = reloaded.calibration
    assert cal is not None and cal["n_cells"] == 5 * len(classes) and cal["alpha"] == 0.95
    assert len(cal["calibset_sha256"]) == 64
    assert json.loads((bundle / "calibration.json").read_text()) == cal
