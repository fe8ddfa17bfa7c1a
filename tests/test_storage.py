"""Storage on a real SQLite file: WAL, frame/cell records, crops, operator decisions and counts."""
from __future__ import annotations

import sqlite3

import cv2
import numpy as np
import pytest

from edge.errors import InputError
from edge.storage import (Store, cell_crop, connect, frame_keys, get_cell, label_counts, list_slides, max_track,
                          record_decision, review_queue, slide_cells, slide_counts)


def _cell(track, label, state, slide="S1", seq=1, crop=True):
    rgb = np.full((64, 64, 3), 200, np.uint8)
    cv2.circle(rgb, (32, 32), 12, (110, 60, 170), -1)
    return {"id": f"{slide}#{track}", "slide": slide, "track": track, "frame_seq": seq, "t_ns": 1000 + seq,
            "box": [10, 20, 110, 120], "label": label, "p": 0.8, "probs": {label: 0.8, "other": 0.2}, "state": state,
            "anomaly": 0.5, "reason": "" if state == "accepted" else "uncertain", "bundle_id": "b1", "views": 1,
            "crop": rgb if crop else None}


def _frame(seq, cell_ids, slide="S1"):
    return {"slide": slide, "seq": seq, "t_ns": 1000 + seq, "t_done_ns": 2000 + seq, "cell_ids": cell_ids,
            "dropped": 0, "bundle_id": "b1"}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state" / "cytoedge.db")
    s.commit_frame(_frame(1, ["S1#1", "S1#2"]), [_cell(1, "neutrophil", "accepted"), _cell(2, "lymphocyte", "review")])
    s.commit_frame(_frame(2, ["S1#1", "S1#2", "S1#3"]), [_cell(3, "monocyte", "abnormal", seq=2)])
    s.commit_frame(_frame(3, []), [])
    s.commit_frame(_frame(1, ["S2#1"], slide="S2"), [_cell(1, "neutrophil", "accepted", slide="S2")])
    yield s
    s.close()


def test_wal_mode_and_frames_recorded(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reader = connect(store.path, readonly=True)
    assert frame_keys(reader) == {("S1", 1, 1001), ("S1", 2, 1002), ("S1", 3, 1003), ("S2", 1, 1001)}
    assert frame_keys(reader, "S2") == {("S2", 1, 1001)}
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("DELETE FROM frames")
    reader.close()


def test_slides_cells_and_tracks(store):
    c = store.conn
    slides = {s["id"]: s for s in list_slides(c)}
    assert slides["S1"]["frames"] == 3 and slides["S1"]["cells"] == 3 and slides["S1"]["review"] == 2
    assert max_track(c, "S1") == 3 and max_track(c, "nope") == 0
    assert label_counts(c, "S1") == {"lymphocyte": 1, "monocyte": 1, "neutrophil": 1}
    cells = slide_cells(c, "S1")
    assert [x["id"] for x in cells] == ["S1#1", "S1#2", "S1#3"]
    assert cells[0]["box"] == [10, 20, 110, 120] and cells[0]["probs"]["neutrophil"] == 0.8
    assert [x["has_crop"] for x in cells] == [False, True, True]  # crops kept for review/abnormal only
    assert [x["id"] for x in slide_cells(c, "S1", state="review")] == ["S1#2"]


def test_crop_is_a_png_of_the_cell(store):
    png = cell_crop(store.conn, "S1#2")
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (64, 64, 3) and tuple(img[32, 32]) == (170, 60, 110)  # BGR of the nucleus colour
    assert cell_crop(store.conn, "S1#1") is None and cell_crop(store.conn, "nope") is None


def test_pooled_update_keeps_the_row(store):
    updated = _cell(2, "monocyte", "accepted", crop=False)
    updated["views"] = 2
    store.commit_frame(_frame(4, ["S1#2"]), [updated])
    cell = get_cell(store.conn, "S1#2")
    assert (cell["label"], cell["state"], cell["views"], cell["has_crop"]) == ("monocyte", "accepted", 2, True)
    assert len(slide_cells(store.conn, "S1")) == 3


def test_review_queue_decisions_and_counts(store):
    c = store.conn
    assert [x["id"] for x in review_queue(c)] == ["S1#3", "S1#2"]  # abnormal first
    assert slide_counts(c, "S1") == {"model": {"lymphocyte": 1, "monocyte": 1, "neutrophil": 1},
                                     "final": {"neutrophil": 1}, "pending": 2, "abnormal": 1, "total": 3}
    record_decision(c, "S1#2", "dr.a", "confirm")
    record_decision(c, "S1#3", "dr.a", "reclassify", "neutrophil")
    assert review_queue(c) == [] and review_queue(c, slide="S2") == []
    assert slide_counts(c, "S1")["final"] == {"lymphocyte": 1, "neutrophil": 2}
    # A later decision replaces an earlier one; history is kept.
    record_decision(c, "S1#3", "dr.b", "reclassify", "monocyte")
    cell = get_cell(c, "S1#3")
    assert cell["final_label"] == "monocyte" and cell["operator"] == "dr.b" and len(cell["decisions"]) == 2
    assert slide_counts(c, "S1")["final"] == {"lymphocyte": 1, "monocyte": 1, "neutrophil": 1}
    assert label_counts(c, "S1") == {"lymphocyte": 1, "monocyte": 1, "neutrophil": 1}  # model view unchanged


@pytest.mark.parametrize("args", [("nope", "dr", "confirm", None), ("S1#2", "", "confirm", None),
                                  ("S1#2", "dr", "approve", None), ("S1#2", "dr", "reclassify", None),
                                  ("S1#2", "dr", "confirm", "monocyte")])
def test_bad_decisions_are_refused(store, args):
    with pytest.raises(InputError):
        record_decision(store.conn, *args)


def test_failed_write_leaves_nothing_behind(store):
    bad = _cell(9, "neutrophil", "weird")  # violates the state CHECK
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_frame(_frame(9, ["S1#9"]), [bad])
    assert ("S1", 9, 1009) not in frame_keys(store.conn) and get_cell(store.conn, "S1#9") is None


def test_readonly_needs_an_existing_database(tmp_path):
    with pytest.raises(InputError):
        connect(tmp_path / "missing.db", readonly=True)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(InputError):
        connect(tmp_path / "junk.db")
