"""Cell detection on rendered smear frames (known truth) and on the BCCD frames when ../shared is present."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.commands import detect as detect_cmd
from edge.detect import DetectConfig, ScaleEstimator, detect_cells, rbc_diameter_px, white_balance
from smear import Wbc, render_smear

BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bccd"


def _centre(d):
    return (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2


def _matches(dets, wbcs, px_per_um):
    """-> per white cell, the detections whose box centre lies within its cytoplasm."""
    return [[d for d in dets if np.hypot(_centre(d)[0] - c.cx, _centre(d)[1] - c.cy) < c.cell_um * px_per_um / 2]
            for c in wbcs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_each_white_cell_once_and_no_platelets(seed):
    wbcs = [Wbc(150, 150, "round"), Wbc(420, 260, "lobed"), Wbc(250, 380, "lobed", nucleus_um=7), Wbc(540, 110, "round", nucleus_um=6)]
    rgb = render_smear(wbcs, seed=seed, n_platelets=10)
    dets = detect_cells(rgb)
    per_cell = _matches(dets, wbcs, 8.0)
    assert [len(m) for m in per_cell] == [1, 1, 1, 1]  # lobes merged: one detection per cell
    assert len(dets) == 4  # platelets (2.5 um) are not cells
    assert not any(d.edge for d in dets)
    for d, c in zip((m[0] for m in per_cell), wbcs):
        x0, y0, x1, y1 = d.box
        assert x0 <= c.cx <= x1 and y0 <= c.cy <= y1 and 0 < d.score <= 1
        assert abs(d.nucleus[0] - c.cx) < 3 * 8 and abs(d.nucleus[1] - c.cy) < 4 * 8


def test_cells_cut_by_the_frame_edge_are_marked():
    wbcs = [Wbc(4, 200, "round"), Wbc(320, 476, "lobed"), Wbc(320, 200, "round")]
    dets = detect_cells(render_smear(wbcs, seed=3))
    per_cell = _matches(dets, wbcs, 8.0)
    assert [len(m) for m in per_cell] == [1, 1, 1]
    assert [m[0].edge for m in per_cell] == [True, True, False]
    for d in dets:
        assert 0 <= d.box[0] < d.box[2] <= 640 and 0 <= d.box[1] < d.box[3] <= 480


def test_touching_nuclei_are_split():
    # Two large round nuclei in contact: one blob wider than any single nucleus, cut at its two cores.
    rgb = render_smear([Wbc(260, 240, "round", cell_um=15, nucleus_um=13), Wbc(364, 240, "round", cell_um=15, nucleus_um=13)],
                       seed=4, n_rbc=20)
    dets = detect_cells(rgb, um_per_px=1 / 8.0)
    xs = sorted(_centre(d)[0] for d in dets)
    assert len(dets) == 2 and xs[0] < 312 < xs[1]


@pytest.mark.parametrize("px_per_um", [4.0, 8.0, 12.0])
def test_scale_is_measured_from_red_cells(px_per_um):
    """Without um_per_px the red cells give the scale: same cells found at three magnifications."""
    s = px_per_um / 8.0
    h, w = int(480 * s), int(640 * s)
    wbcs = [Wbc(160 * s, 160 * s, "round"), Wbc(460 * s, 300 * s, "lobed")]
    rgb = render_smear(wbcs, h=h, w=w, px_per_um=px_per_um, seed=5)
    d = rbc_diameter_px(rgb)
    assert d == pytest.approx(7.5 * px_per_um, rel=0.15)
    dets = detect_cells(rgb)
    assert [len(m) for m in _matches(dets, wbcs, px_per_um)] == [1, 1] and len(dets) == 2


def test_scale_estimator_pools_frames():
    est = ScaleEstimator(n=5)
    for seed in range(3):
        um = est.update(render_smear([], seed=seed))
    assert um == pytest.approx(1 / 8.0, rel=0.15) and len(est.values) == 3


def test_known_scale_overrides_the_red_cells():
    wbcs = [Wbc(320, 240, "round", nucleus_um=8)]
    rgb = render_smear(wbcs, seed=6)
    assert len(detect_cells(rgb, um_per_px=1 / 8.0)) == 1
    # Told the frame is 6x finer than it is, the 8 um nucleus is a 1.3 um speck: dropped as a platelet would be.
    assert detect_cells(rgb, um_per_px=1 / 48.0) == []


def test_blank_and_red_cell_only_frames_give_nothing():
    blank = np.full((480, 640, 3), 225, np.uint8)
    assert detect_cells(blank) == []
    assert detect_cells(render_smear([], seed=7, n_platelets=12)) == []


@pytest.mark.parametrize("gains", [(1.1, 1.0, 0.8), (0.85, 0.95, 1.15), (0.7, 0.7, 0.7)])
def test_lamp_colour_and_brightness_do_not_matter(gains):
    wbcs = [Wbc(200, 200, "lobed"), Wbc(450, 300, "round")]
    rgb = np.clip(render_smear(wbcs, seed=8) * np.asarray(gains), 0, 255).astype(np.uint8)
    dets = detect_cells(rgb)
    assert [len(m) for m in _matches(dets, wbcs, 8.0)] == [1, 1] and len(dets) == 2


def test_white_balance_neutralises_the_background():
    rgb = np.clip(render_smear([], seed=9) * np.asarray([1.1, 1.0, 0.8]), 0, 255).astype(np.uint8)
    bg = white_balance(rgb)[:5, :5].reshape(-1, 3).mean(0)  # top-left corner is glass in this frame
    assert np.ptp(bg) < 0.1 * np.ptp(rgb[:5, :5].reshape(-1, 3).mean(0)) + 4


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    detect_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["detect", *argv])
    return args.func(args)


def test_detect_command_writes_jsonl_and_reports_bad_frames(tmp_path):
    wbcs = [Wbc(200, 200, "lobed"), Wbc(4, 300, "round")]
    good = tmp_path / "frames" / "a.png"
    good.parent.mkdir()
    cv2.imwrite(str(good), cv2.cvtColor(render_smear(wbcs, seed=10), cv2.COLOR_RGB2BGR))
    bad = tmp_path / "frames" / "b.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out.jsonl"
    rc = _run_cli(["--out", str(out), str(good.parent)])
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert rc == 1 and [Path(x["path"]).name for x in lines] == ["a.png", "b.jpg"]
    assert "error" in lines[1] and "cells" not in lines[1]
    cells = lines[0]["cells"]
    assert len(cells) == 2 and {c["edge"] for c in cells} == {True, False}
    for c in cells:
        assert set(c) == {"box", "score", "edge"} and len(c["box"]) == 4 and all(isinstance(v, int) for v in c["box"])
    assert _run_cli(["--out", str(out), str(good)]) == 0


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD frames not found at {BCCD} (../shared/data/bccd)")
def test_bccd_recall_and_precision():
    from export.datasets import load_bccd
    from edge.imageio import read_image
    frames = load_bccd(BCCD)[::6]  # 61 frames, spread over the set
    n_wbc = found = n_det = hits = 0
    for fr in frames:
        dets = detect_cells(read_image(fr.path), config=DetectConfig())
        wbc = fr.boxes.get("WBC", np.zeros((0, 4)))
        inside = np.array([[b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in wbc] for cx, cy in map(_centre, dets)],
                          bool).reshape(len(dets), len(wbc))
        n_wbc, found = n_wbc + len(wbc), found + int(inside.any(0).sum())
        n_det, hits = n_det + len(dets), hits + int(inside.any(1).sum())
    assert found / n_wbc >= 0.95 and hits / n_det >= 0.90
