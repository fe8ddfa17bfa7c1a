"""Tracking across a moving stage: windows of one large rendered smear, real detections, one id per cell."""
from __future__ import annotations

import numpy as np
import pytest

from edge.detect import detect_cells
from edge.track import StageShift, Tracker, box_iou
from smear import Wbc, render_smear

PX_PER_UM = 8.0


@pytest.fixture(scope="module")
def slide():
    rng = np.random.default_rng(0)
    wbcs, pts = [], []
    while len(wbcs) < 9:
        x, y = rng.uniform(120, 1480), rng.uniform(120, 880)
        if all(np.hypot(x - a, y - b) > 200 for a, b in pts):
            pts.append((x, y))
            wbcs.append(Wbc(x, y, "lobed" if len(wbcs) % 2 else "round"))
    return render_smear(wbcs, h=1000, w=1600, n_rbc=200, n_platelets=25, seed=1), wbcs


def _path(steps):
    x, y, out = 0.0, 0.0, []
    for dx, dy in steps:
        out.append((int(round(x)), int(round(y))))
        x, y = x + dx, y + dy
    return out


def test_box_iou():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    assert box_iou(a, b).round(3).tolist() == [[1.0, 0.333, 0.0]]


@pytest.mark.parametrize("move", [(37, 0), (-12, 25), (0, -60)])
def test_stage_shift_by_phase_correlation(slide, move):
    big, _ = slide
    est = StageShift()
    x0, y0 = 400, 250
    est.update(big[y0:y0 + 480, x0:x0 + 640])
    # The stage moves the window by +move, so the content moves by -move.
    dx, dy = est.update(big[y0 + move[1]:y0 + move[1] + 480, x0 + move[0]:x0 + move[0] + 640])
    assert abs(dx + move[0]) <= 2 and abs(dy + move[1]) <= 2


def test_each_cell_gets_one_track_while_the_stage_moves(slide):
    big, wbcs = slide
    # Scan right, then down, then back left over cells seen before: steps of 20-70 px per frame, as a hand
    # on the stage would; a cell that leaves the field and comes back keeps its id.
    steps = [(45, 0)] * 10 + [(70, 10)] * 4 + [(0, 40)] * 8 + [(-60, 5)] * 10 + [(-20, 30)] * 5
    tracker = Tracker()
    seen: dict[int, set[int]] = {}
    owners: dict[int, set[int]] = {}
    for x0, y0 in _path(steps):
        x0, y0 = min(max(x0, 0), 1600 - 640), min(max(y0, 0), 1000 - 480)
        frame = big[y0:y0 + 480, x0:x0 + 640]
        for track, det in tracker.update(frame, detect_cells(frame, um_per_px=1 / PX_PER_UM)):
            cx, cy = det.nucleus[0] + x0, det.nucleus[1] + y0
            k = int(np.argmin([np.hypot(cx - c.cx, cy - c.cy) for c in wbcs]))
            assert np.hypot(cx - wbcs[k].cx, cy - wbcs[k].cy) < 6 * PX_PER_UM  # no false detections
            seen.setdefault(k, set()).add(track.id)
            owners.setdefault(track.id, set()).add(k)
    assert len(seen) >= 5  # the path passes over most cells
    assert all(len(ids) == 1 for ids in seen.values()), seen  # one id per physical cell
    assert all(len(ks) == 1 for ks in owners.values()), owners  # one cell per id


def test_tracks_end_when_cells_leave_and_ids_continue(slide):
    big, _ = slide
    tracker = Tracker(first_id=100)
    f1 = big[0:480, 0:640]
    ids1 = {t.id for t, _ in tracker.update(f1, detect_cells(f1, um_per_px=1 / PX_PER_UM))}
    assert ids1 and min(ids1) == 100
    far = big[520:1000, 960:1600]  # no overlap with the first field
    for _ in range(tracker.config.max_missed + 2):
        tracker.update(far, detect_cells(far, um_per_px=1 / PX_PER_UM))
    assert not ids1 & {t.id for t in tracker.tracks}
    assert tracker.next_id > max(ids1)


def test_a_cell_seen_again_after_leaving_keeps_its_id(slide):
    big, _ = slide
    tracker = Tracker()
    path = [(x, 200) for x in range(300, 900, 50)] + [(x, 200) for x in range(900, 250, -50)]
    first_ids: dict[int, int] = {}  # rounded slide x of a cell -> id
    for x0, y0 in path:
        frame = big[y0:y0 + 480, x0:x0 + 640]
        for track, det in tracker.update(frame, detect_cells(frame, um_per_px=1 / PX_PER_UM)):
            key = int(round((det.nucleus[0] + x0) / 100))
            assert first_ids.setdefault(key, track.id) == track.id
    assert len(set(first_ids.values())) == len(first_ids) >= 3


def test_unrelated_fields_are_a_cut(slide):
    big, _ = slide
    tracker = Tracker()
    a, b = big[0:480, 0:640], big[520:1000, 960:1600]
    ids_a = {t.id for t, _ in tracker.update(a, detect_cells(a, um_per_px=1 / PX_PER_UM))}
    tracker.update(b, detect_cells(b, um_per_px=1 / PX_PER_UM))
    assert tracker.cut
    # Back to the first field after a cut: the slide position is lost, so its cells are new tracks.
    ids_again = {t.id for t, _ in tracker.update(a, detect_cells(a, um_per_px=1 / PX_PER_UM))}
    assert tracker.cut and ids_a and not ids_a & ids_again
