"""The box's record of what it saw: SQLite in WAL mode (one writer, the daemon; readers, the monitor).

Tables
- ``slides``: one row per slide id (first/last frame time, frames processed).
- ``frames``: one row per processed frame = per published flags message (slide, seq, t_ns, t_done_ns,
  the ids of the cells in view, frames dropped so far, bundle id).
- ``cells``: one row per physical cell (tracked across frames), keyed ``"<slide>#<track>"``: the frame it
  was classified in, its box there, label, calibrated probabilities (JSON), state, anomaly score, reason,
  model bundle id, views pooled, and a PNG crop for cells in ``review`` or ``abnormal``.
- ``decisions``: operator decisions on cells (``confirm`` or ``reclassify`` to a new label), append-only;
  the latest decision for a cell is the one that counts.

Durability: the daemon commits a frame's rows (``Store.commit_frame``) before it publishes the frame's
flags, with ``synchronous=FULL`` by default, so nothing published is lost to a crash or a power cut.
Every function takes an open connection (``connect``); connections are not shared between threads.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.errors import InputError

SCHEMA_VERSION = 1
DECISIONS = ("confirm", "reclassify")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slides (
    id TEXT PRIMARY KEY,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    frames INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    slide TEXT NOT NULL REFERENCES slides(id),
    seq INTEGER NOT NULL,
    t_ns INTEGER NOT NULL,
    t_done_ns INTEGER NOT NULL,
    cell_ids TEXT NOT NULL,
    dropped INTEGER NOT NULL,
    bundle_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_slide_seq ON frames(slide, seq);
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    slide TEXT NOT NULL REFERENCES slides(id),
    track INTEGER NOT NULL,
    frame_seq INTEGER NOT NULL,
    t_ns INTEGER NOT NULL,
    x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL, y1 INTEGER NOT NULL,
    label TEXT NOT NULL,
    p REAL NOT NULL,
    probs TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('accepted', 'review', 'abnormal')),
    anomaly REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    bundle_id TEXT NOT NULL,
    views INTEGER NOT NULL DEFAULT 1,
    crop BLOB,
    updated_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_slide_state ON cells(slide, state);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    cell_id TEXT NOT NULL REFERENCES cells(id),
    operator TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('confirm', 'reclassify')),
    label TEXT NOT NULL,
    t_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_cell ON decisions(cell_id, id);
"""


def connect(path: str | Path, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` in WAL mode -> connection (rows as sqlite3.Row).

    ``readonly`` opens an existing database for reading only (the monitor); the schema is not touched.
    """
    path = Path(path)
    if readonly:
        if not path.exists():
            raise InputError(f"{path}: no such database")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10.0,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise InputError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=10.0, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path}: cannot open the database ({exc})") from exc
    if row is None:
        conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row["value"]) != SCHEMA_VERSION:
        raise InputError(f"{path}: database schema version {row['value']}, this version of cytoedge uses {SCHEMA_VERSION}")
    return conn


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG bytes."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"cannot encode a {rgb.shape} crop as PNG")
    return buf.tobytes()


class Store:
    """The daemon's writer. One instance per process, used from one thread."""

    def __init__(self, path: str | Path, synchronous: str = "FULL"):
        self.path = Path(path)
        self.conn = connect(path, synchronous)

    def close(self) -> None:
        self.conn.close()

    def commit_frame(self, frame: dict, cells: list[dict]) -> None:
        """Write one processed frame and the cells classified (or re-pooled) in it, in one transaction.

        frame: slide, seq, t_ns, t_done_ns, cell_ids (list[str]), dropped, bundle_id.
        cells: id, slide, track, frame_seq, t_ns, box [4], label, p, probs {class: p}, state, anomaly,
        reason, bundle_id, views, crop (uint8 RGB [S, S, 3] or None). Returns once the commit is durable.
        """
        self.commit_frames([(frame, cells)])

    def commit_frames(self, frames: list[tuple[dict, list[dict]]]) -> None:
        """Several ``(frame, cells)`` as in ``commit_frame``, in one transaction (one sync to disk)."""
        now = time.time_ns()
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for frame, cells in frames:
                self._write(frame, cells, now)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _write(self, frame: dict, cells: list[dict], now: int) -> None:
        c = self.conn
        c.execute("INSERT INTO slides(id, first_ns, last_ns, frames) VALUES (?, ?, ?, 1) "
                  "ON CONFLICT(id) DO UPDATE SET last_ns=excluded.last_ns, frames=frames+1",
                  (frame["slide"], frame["t_ns"], frame["t_ns"]))
        for cell in cells:
            crop = cell.get("crop")
            blob = encode_png(crop) if crop is not None and cell["state"] in ("review", "abnormal") else None
            x0, y0, x1, y1 = (int(v) for v in cell["box"])
            c.execute(
                "INSERT INTO cells(id, slide, track, frame_seq, t_ns, x0, y0, x1, y1, label, p, probs, state, "
                "anomaly, reason, bundle_id, views, crop, updated_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET label=excluded.label, p=excluded.p, probs=excluded.probs, "
                "state=excluded.state, anomaly=excluded.anomaly, reason=excluded.reason, views=excluded.views, "
                "crop=COALESCE(excluded.crop, cells.crop), updated_ns=excluded.updated_ns",
                (cell["id"], cell["slide"], int(cell["track"]), int(cell["frame_seq"]), int(cell["t_ns"]),
                 x0, y0, x1, y1, cell["label"], float(cell["p"]), json.dumps(cell["probs"]), cell["state"],
                 float(cell["anomaly"]), cell.get("reason", ""), cell["bundle_id"], int(cell.get("views", 1)),
                 blob, now))
        c.execute("INSERT INTO frames(slide, seq, t_ns, t_done_ns, cell_ids, dropped, bundle_id) VALUES (?,?,?,?,?,?,?)",
                  (frame["slide"], int(frame["seq"]), int(frame["t_ns"]), int(frame["t_done_ns"]),
                   json.dumps(frame["cell_ids"]), int(frame["dropped"]), frame["bundle_id"]))


# ---- queries (the daemon at start-up, the monitor, tests) ----

def max_track(conn: sqlite3.Connection, slide: str) -> int:
    """Highest track number stored for ``slide`` (0 if none): a restarted daemon continues above it."""
    row = conn.execute("SELECT MAX(track) AS m FROM cells WHERE slide=?", (slide,)).fetchone()
    return int(row["m"] or 0)


def label_counts(conn: sqlite3.Connection, slide: str) -> dict[str, int]:
    """{label: unique cells} on ``slide`` as the model labelled them (every state): the flags' ``counts``."""
    return {r["label"]: int(r["n"]) for r in
            conn.execute("SELECT label, COUNT(*) AS n FROM cells WHERE slide=? GROUP BY label ORDER BY label", (slide,))}


def list_slides(conn: sqlite3.Connection) -> list[dict]:
    """All slides, most recent first: id, first_ns, last_ns, frames, cells, review (undecided review or
    abnormal cells)."""
    rows = conn.execute(
        "SELECT s.id, s.first_ns, s.last_ns, s.frames, "
        "(SELECT COUNT(*) FROM cells c WHERE c.slide=s.id) AS cells, "
        "(SELECT COUNT(*) FROM cells c WHERE c.slide=s.id AND c.state IN ('review','abnormal') "
        " AND NOT EXISTS (SELECT 1 FROM decisions d WHERE d.cell_id=c.id)) AS review "
        "FROM slides s ORDER BY s.last_ns DESC")
    return [dict(r) for r in rows]


_CELL_COLUMNS = ("c.id, c.slide, c.track, c.frame_seq, c.t_ns, c.x0, c.y0, c.x1, c.y1, c.label, c.p, c.probs, c.state, "
                 "c.anomaly, c.reason, c.bundle_id, c.views, c.updated_ns, c.crop IS NOT NULL AS has_crop, "
                 "(SELECT d.decision FROM decisions d WHERE d.cell_id=c.id ORDER BY d.id DESC LIMIT 1) AS decision, "
                 "(SELECT d.label FROM decisions d WHERE d.cell_id=c.id ORDER BY d.id DESC LIMIT 1) AS decided_label, "
                 "(SELECT d.operator FROM decisions d WHERE d.cell_id=c.id ORDER BY d.id DESC LIMIT 1) AS operator")


def _cell_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["box"] = [d.pop("x0"), d.pop("y0"), d.pop("x1"), d.pop("y1")]
    d["probs"] = json.loads(d["probs"])
    d["has_crop"] = bool(d["has_crop"])
    d["final_label"] = d["decided_label"] or d["label"]
    return d


def slide_cells(conn: sqlite3.Connection, slide: str, state: str | None = None, limit: int = 1000,
                offset: int = 0) -> list[dict]:
    """Cells of ``slide`` in track order (optionally one state), without crops: id, track, frame_seq, t_ns,
    box, label, p, probs, state, anomaly, reason, bundle_id, views, has_crop, decision, decided_label,
    operator, final_label (the operator's label when there is a decision, else the model's)."""
    q = f"SELECT {_CELL_COLUMNS} FROM cells c WHERE c.slide=?"
    args: list[Any] = [slide]
    if state is not None:
        q += " AND c.state=?"
        args.append(state)
    q += " ORDER BY c.track LIMIT ? OFFSET ?"
    return [_cell_dict(r) for r in conn.execute(q, (*args, int(limit), int(offset)))]


def get_cell(conn: sqlite3.Connection, cell_id: str) -> dict | None:
    """One cell (as in ``slide_cells``) with ``decisions`` (all of them, oldest first), or None."""
    row = conn.execute(f"SELECT {_CELL_COLUMNS} FROM cells c WHERE c.id=?", (cell_id,)).fetchone()
    if row is None:
        return None
    d = _cell_dict(row)
    d["decisions"] = [dict(r) for r in conn.execute(
        "SELECT id, operator, decision, label, t_ns FROM decisions WHERE cell_id=? ORDER BY id", (cell_id,))]
    return d


def cell_crop(conn: sqlite3.Connection, cell_id: str) -> bytes | None:
    """The PNG crop of a review/abnormal cell, or None."""
    row = conn.execute("SELECT crop FROM cells WHERE id=?", (cell_id,)).fetchone()
    return None if row is None or row["crop"] is None else bytes(row["crop"])


def review_queue(conn: sqlite3.Connection, slide: str | None = None, limit: int = 50) -> list[dict]:
    """Review and abnormal cells with no operator decision yet, abnormal first, then oldest first."""
    q = (f"SELECT {_CELL_COLUMNS} FROM cells c WHERE c.state IN ('review','abnormal') "
         "AND NOT EXISTS (SELECT 1 FROM decisions d WHERE d.cell_id=c.id)")
    args: list[Any] = []
    if slide is not None:
        q += " AND c.slide=?"
        args.append(slide)
    q += " ORDER BY c.state='abnormal' DESC, c.t_ns, c.track LIMIT ?"
    return [_cell_dict(r) for r in conn.execute(q, (*args, int(limit)))]


def slide_counts(conn: sqlite3.Connection, slide: str) -> dict:
    """Counts for a slide: ``model`` {label: n} as classified; ``final`` {label: n} where operator decisions
    replace the model's label and undecided review/abnormal cells are left out; ``pending`` (undecided
    review + abnormal), ``abnormal`` (cells flagged abnormal, decided or not), ``total`` cells."""
    cells = slide_cells(conn, slide, limit=10**9)
    model: dict[str, int] = {}
    final: dict[str, int] = {}
    pending = abnormal = 0
    for c in cells:
        model[c["label"]] = model.get(c["label"], 0) + 1
        abnormal += c["state"] == "abnormal"
        if c["decision"] is not None:
            final[c["decided_label"]] = final.get(c["decided_label"], 0) + 1
        elif c["state"] == "accepted":
            final[c["label"]] = final.get(c["label"], 0) + 1
        else:
            pending += 1
    return {"model": dict(sorted(model.items())), "final": dict(sorted(final.items())), "pending": pending,
            "abnormal": abnormal, "total": len(cells)}


def record_decision(conn: sqlite3.Connection, cell_id: str, operator: str, decision: str,
                    label: str | None = None) -> int:
    """Append an operator decision -> its id. ``confirm`` keeps the model's label (``label`` must be None or
    equal to it); ``reclassify`` needs ``label``. Unknown cell, empty operator or bad decision: InputError."""
    if decision not in DECISIONS:
        raise InputError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    if not operator or not isinstance(operator, str):
        raise InputError("an operator name is required")
    row = conn.execute("SELECT label FROM cells WHERE id=?", (cell_id,)).fetchone()
    if row is None:
        raise InputError(f"no cell {cell_id!r}")
    if decision == "confirm":
        if label not in (None, row["label"]):
            raise InputError(f"confirm keeps the model's label {row['label']!r}; use reclassify for {label!r}")
        label = row["label"]
    elif not label:
        raise InputError("reclassify needs the new label")
    cur = conn.execute("INSERT INTO decisions(cell_id, operator, decision, label, t_ns) VALUES (?,?,?,?,?)",
                       (cell_id, operator, decision, label, time.time_ns()))
    return int(cur.lastrowid)


def frame_keys(conn: sqlite3.Connection, slide: str | None = None) -> set[tuple[str, int, int]]:
    """{(slide, seq, t_ns)} of the stored frames (each one a published flags message)."""
    q, args = "SELECT slide, seq, t_ns FROM frames", ()
    if slide is not None:
        q, args = q + " WHERE slide=?", (slide,)
    return {(r["slide"], int(r["seq"]), int(r["t_ns"])) for r in conn.execute(q, args)}
