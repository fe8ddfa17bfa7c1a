"""What the operator's monitor keeps and hands out: slide sessions, the differential, the per-slide report
(printable HTML and CSV) and the export of reviewed cells as a labelled folder.

Everything reads the daemon's SQLite database through ``edge.storage`` (cells, decisions); the monitor adds
one table of its own, ``slide_sessions`` (who started counting a slide, toward how many cells, when it
stopped), created on first use next to the daemon's tables.

The differential follows haematology practice: white cells are counted toward the target (100 or 200);
erythroblasts (nucleated red cells) are reported per 100 white cells instead of inside the differential;
platelets, smudge cells and artefacts are not part of it. A cell enters the differential when the model
accepted it or an operator decided on it; undecided review/abnormal cells are "pending".
"""
from __future__ import annotations

import csv
import html
import io
import re
import sqlite3
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from edge.errors import InputError
from edge.storage import cell_crop, slide_cells, slide_counts

# Labels an operator may give beyond the model's classes (reclassify): cells the model does not know.
EXTRA_LABELS = ("blast", "smudge", "artefact", "other")
# Labels outside the white-cell differential: reported per 100 white cells (erythroblast) or not counted.
PER_100_WBC = ("erythroblast",)
NOT_COUNTED = ("platelet", "smudge", "artefact")
# Labels that raise an alert in peripheral blood (abnormal-state cells always do).
ALERT_LABELS = ("ig", "erythroblast", "blast")

_SESSIONS = """
CREATE TABLE IF NOT EXISTS slide_sessions (
    id INTEGER PRIMARY KEY,
    slide TEXT NOT NULL,
    operator TEXT NOT NULL,
    target INTEGER NOT NULL,
    started_ns INTEGER NOT NULL,
    stopped_ns INTEGER
);
CREATE INDEX IF NOT EXISTS slide_sessions_slide ON slide_sessions(slide, id);
"""


# ---- slide sessions ----

def ensure_sessions(conn: sqlite3.Connection) -> None:
    """Create the monitor's ``slide_sessions`` table if the database does not have it yet."""
    conn.executescript(_SESSIONS)


def active_session(conn: sqlite3.Connection) -> dict | None:
    """The session started and not stopped (at most one), or None."""
    row = conn.execute("SELECT * FROM slide_sessions WHERE stopped_ns IS NULL ORDER BY id DESC LIMIT 1").fetchone()
    return None if row is None else dict(row)


def start_slide(conn: sqlite3.Connection, slide: str, operator: str, target: int) -> dict:
    """Start counting ``slide`` toward ``target`` cells (stops any running session first) -> the session."""
    slide, operator = (slide or "").strip(), (operator or "").strip()
    if not slide or len(slide) > 256:
        raise InputError("a slide id (1-256 characters) is required")
    if not operator:
        raise InputError("an operator name is required to start a slide")
    if not isinstance(target, int) or not 10 <= target <= 10000:
        raise InputError(f"the differential target must be an integer in 10..10000, got {target!r}")
    now = time.time_ns()
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("UPDATE slide_sessions SET stopped_ns=? WHERE stopped_ns IS NULL", (now,))
        conn.execute("INSERT INTO slide_sessions(slide, operator, target, started_ns) VALUES (?,?,?,?)",
                     (slide, operator, target, now))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return active_session(conn)


def stop_slide(conn: sqlite3.Connection) -> dict | None:
    """Stop the running session -> it (with ``stopped_ns``), or None when nothing was running."""
    s = active_session(conn)
    if s is None:
        return None
    conn.execute("UPDATE slide_sessions SET stopped_ns=? WHERE id=?", (time.time_ns(), s["id"]))
    return dict(conn.execute("SELECT * FROM slide_sessions WHERE id=?", (s["id"],)).fetchone())


def slide_sessions(conn: sqlite3.Connection, slide: str) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT * FROM slide_sessions WHERE slide=? ORDER BY id", (slide,))]


# ---- differential ----

def differential(conn: sqlite3.Connection, slide: str, classes: list[str], target: int) -> dict:
    """Counts for the page and the report.

    -> {slide, target, rows: [{label, n, pct, model}] (white cells, pct of ``wbc``), wbc (cells in the
    differential), per_100_wbc: [{label, n, per100}], not_counted: {label: n}, pending, abnormal, total,
    model: {label: n}}. ``n`` counts accepted cells and operator decisions; ``model`` the model's labels.
    """
    c = slide_counts(conn, slide)
    final, model = c["final"], c["model"]
    wbc_labels = [k for k in classes if k not in PER_100_WBC and k not in NOT_COUNTED]
    wbc_labels += [k for k in EXTRA_LABELS if k not in NOT_COUNTED and k not in wbc_labels]
    wbc_labels += sorted(k for k in final if k not in wbc_labels and k not in PER_100_WBC and k not in NOT_COUNTED)
    wbc = sum(final.get(k, 0) for k in wbc_labels)
    rows = [{"label": k, "n": final.get(k, 0), "pct": round(100.0 * final.get(k, 0) / wbc, 1) if wbc else 0.0,
             "model": model.get(k, 0)} for k in wbc_labels if k in classes or final.get(k, 0)]
    per100 = [{"label": k, "n": final.get(k, 0), "per100": round(100.0 * final.get(k, 0) / wbc, 1) if wbc else None}
              for k in PER_100_WBC if k in classes or final.get(k, 0)]
    return {"slide": slide, "target": target, "rows": rows, "wbc": wbc, "per_100_wbc": per100,
            "not_counted": {k: final[k] for k in NOT_COUNTED if final.get(k)}, "pending": c["pending"],
            "abnormal": c["abnormal"], "total": c["total"], "model": model}


def is_alert(cell: dict) -> bool:
    """A cell the operator must be told about at once: flagged abnormal, or labelled immature/blast-like."""
    return cell.get("state") == "abnormal" or cell.get("label") in ALERT_LABELS or \
        cell.get("final_label", cell.get("label")) in ALERT_LABELS


def slide_alerts(conn: sqlite3.Connection, slide: str) -> list[dict]:
    """Alert cells of a slide, most recent first."""
    return sorted((c for c in slide_cells(conn, slide, limit=10**9) if is_alert(c)), key=lambda c: -c["t_ns"])


# ---- report ----

def report_data(conn: sqlite3.Connection, slide: str, classes: list[str], target: int) -> dict:
    """Everything in a slide's report. InputError when the slide is unknown."""
    row = conn.execute("SELECT id, first_ns, last_ns, frames FROM slides WHERE id=?", (slide,)).fetchone()
    sessions = slide_sessions(conn, slide)
    if row is None and not sessions:
        raise InputError(f"no slide {slide!r} in the database")
    cells = slide_cells(conn, slide, limit=10**9)
    bundles = sorted({c["bundle_id"] for c in cells} | {r["bundle_id"] for r in conn.execute(
        "SELECT DISTINCT bundle_id FROM frames WHERE slide=?", (slide,))})
    if sessions:
        target = sessions[-1]["target"]
    return {"slide": slide, "frames": int(row["frames"]) if row else 0, "first_ns": row["first_ns"] if row else None,
            "last_ns": row["last_ns"] if row else None, "sessions": sessions, "bundle_ids": bundles,
            "differential": differential(conn, slide, classes, target), "cells": cells,
            "flagged": [c for c in cells if c["state"] != "accepted"], "generated_ns": time.time_ns()}


def _when(t_ns: int | None) -> str:
    if not t_ns:
        return ""
    return datetime.fromtimestamp(t_ns / 1e9, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _crop_url(cell_id: str) -> str:
    from urllib.parse import quote

    return "/api/crop?id=" + quote(cell_id, safe="")


def render_report_html(rep: dict) -> str:
    """The printable report page (self-contained HTML; crops load from the monitor)."""
    e = html.escape
    d = rep["differential"]
    ops = ", ".join(sorted({s["operator"] for s in rep["sessions"]} | {c["operator"] for c in rep["cells"] if c["operator"]}))
    if rep["sessions"]:
        stopped = rep["sessions"][-1]["stopped_ns"]
        times = [("Started", _when(rep["sessions"][0]["started_ns"])), ("Stopped", _when(stopped) if stopped else "running")]
    else:  # counted without a started session: the frames tell when
        times = [("First frame", _when(rep["first_ns"])), ("Last frame", _when(rep["last_ns"]))]
    head = [("Slide", rep["slide"]), ("Model bundle", ", ".join(rep["bundle_ids"]) or "-"), ("Operator(s)", ops or "-"),
            *times, ("Frames processed", rep["frames"]), ("Cells found", d["total"]),
            ("Differential", f"{d['wbc']} / {d['target']} white cells"), ("Pending review", d["pending"]),
            ("Flagged abnormal", d["abnormal"]), ("Report generated", _when(rep["generated_ns"]))]
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>CytoEdge report {e(rep['slide'])}</title>",
           "<link rel='stylesheet' href='/static/report.css'></head><body>",
           f"<h1>Differential report: slide {e(rep['slide'])}</h1>",
           "<p class='noprint'><a href='/'>&larr; monitor</a> | "
           f"<a id='csv' href='/report.csv?slide={e(rep['slide'])}'>CSV</a> | "
           f"<a href='/export.zip?slide={e(rep['slide'])}'>reviewed cells (labelled folder, zip)</a> | "
           "<a href='javascript:window.print()'>print</a></p>",
           "<table class='meta'>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in head) + "</table>"]
    if d["pending"]:
        out.append(f"<p class='warn'>{d['pending']} cell(s) still await review: the differential is not final.</p>")
    out.append("<h2>Differential</h2><table class='diff'><tr><th>Class</th><th>Count</th><th>%</th>"
               "<th>Model's count</th></tr>")
    out += [f"<tr data-class='{e(r['label'])}'><td>{e(r['label'])}</td><td>{r['n']}</td><td>{r['pct']:.1f}</td>"
            f"<td>{r['model']}</td></tr>" for r in d["rows"]]
    out.append(f"<tr class='total'><td>white cells</td><td>{d['wbc']}</td><td>100</td><td></td></tr></table>")
    for r in d["per_100_wbc"]:
        per = "no white cells counted yet" if r["per100"] is None else f"{r['per100']:.1f} per 100 white cells"
        out.append(f"<p>{e(r['label'])}: {r['n']} ({per})</p>")
    if d["not_counted"]:
        out.append("<p>Not in the differential: " + ", ".join(f"{e(k)} {n}" for k, n in d["not_counted"].items()) + "</p>")
    out.append(f"<h2>Flagged cells ({len(rep['flagged'])})</h2><div class='flagged'>")
    for c in rep["flagged"]:
        top = sorted(c["probs"].items(), key=lambda kv: -kv[1])[:3]
        dec = (f"{e(c['decision'])} &rarr; <b>{e(c['decided_label'])}</b> by {e(c['operator'] or '')}"
               if c["decision"] else "<i>not reviewed</i>")
        img = f"<img src='{_crop_url(c['id'])}' alt='crop of {e(c['id'])}'>" if c["has_crop"] else "<span>no crop</span>"
        out.append(f"<div class='fcell {e(c['state'])}' data-cell-id='{e(c['id'])}'>{img}<div>"
                   f"<b>{e(c['id'])}</b> <span class='state'>{e(c['state'])}</span><br>"
                   f"model: {e(c['label'])} {c['p']:.2f}; " + ", ".join(f"{e(k)} {v:.2f}" for k, v in top[1:]) +
                   f"<br>anomaly {c['anomaly']:.3g}{'; ' + e(c['reason']) if c['reason'] else ''}<br>{dec}</div></div>")
    out.append("</div>")
    out.append(f"<h2>All cells ({len(rep['cells'])})</h2><table class='cells'><tr><th>Cell</th><th>Frame</th>"
               "<th>Box</th><th>Model label</th><th>p</th><th>State</th><th>Anomaly</th><th>Decision</th>"
               "<th>Final label</th><th>Operator</th><th>Bundle</th></tr>")
    for c in rep["cells"]:
        out.append(f"<tr data-cell-id='{e(c['id'])}'><td>{e(c['id'])}</td><td>{c['frame_seq']}</td>"
                   f"<td>{' '.join(str(v) for v in c['box'])}</td><td>{e(c['label'])}</td><td>{c['p']:.3f}</td>"
                   f"<td class='{e(c['state'])}'>{e(c['state'])}</td><td>{c['anomaly']:.3g}</td>"
                   f"<td>{e(c['decision'] or '')}</td><td>{e(c['final_label'])}</td><td>{e(c['operator'] or '')}</td>"
                   f"<td>{e(c['bundle_id'])}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


CSV_COLUMNS = ("record", "slide", "label", "count", "percent", "cell_id", "track", "frame_seq", "time", "x0", "y0",
               "x1", "y1", "model_label", "p", "state", "anomaly", "reason", "decision", "final_label", "operator",
               "decision_time", "bundle_id")


def report_csv(rep: dict, conn: sqlite3.Connection | None = None) -> str:
    """The report as one CSV: ``record`` = "differential" rows (label, count, percent of white cells), then
    "per_100_wbc", then one "cell" row per cell (with the latest decision's time when ``conn`` is given)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    d, s = rep["differential"], rep["slide"]
    bundle = ";".join(rep["bundle_ids"])
    for r in d["rows"]:
        w.writerow({"record": "differential", "slide": s, "label": r["label"], "count": r["n"], "percent": r["pct"],
                    "bundle_id": bundle})
    for r in d["per_100_wbc"]:
        w.writerow({"record": "per_100_wbc", "slide": s, "label": r["label"], "count": r["n"],
                    "percent": "" if r["per100"] is None else r["per100"],
                    "bundle_id": bundle})
    for c in rep["cells"]:
        t_dec = None
        if conn is not None and c["decision"]:
            t_dec = conn.execute("SELECT t_ns FROM decisions WHERE cell_id=? ORDER BY id DESC LIMIT 1",
                                 (c["id"],)).fetchone()["t_ns"]
        x0, y0, x1, y1 = c["box"]
        w.writerow({"record": "cell", "slide": s, "cell_id": c["id"], "track": c["track"], "frame_seq": c["frame_seq"],
                    "time": _when(c["t_ns"]), "x0": x0, "y0": y0, "x1": x1, "y1": y1, "model_label": c["label"],
                    "p": f"{c['p']:.4f}", "state": c["state"], "anomaly": f"{c['anomaly']:.4g}", "reason": c["reason"],
                    "decision": c["decision"] or "", "final_label": c["final_label"], "operator": c["operator"] or "",
                    "decision_time": _when(t_dec), "bundle_id": c["bundle_id"]})
    return buf.getvalue()


# ---- reviewed cells as a labelled folder (input of `cytoedge calibrate`) ----

def _file_name(cell_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", cell_id) + ".png"


def reviewed_cells(conn: sqlite3.Connection, classes: list[str], slide: str | None = None):
    """Yield (label, file name, PNG bytes) for every cell with an operator decision and a stored crop whose
    final label is one of the model's ``classes``. Cells labelled outside them (blast, smudge...) are skipped:
    a calibration folder may only hold classes the bundle knows."""
    q = ("SELECT c.id, (SELECT d.label FROM decisions d WHERE d.cell_id=c.id ORDER BY d.id DESC LIMIT 1) AS final "
         "FROM cells c WHERE c.crop IS NOT NULL AND EXISTS (SELECT 1 FROM decisions d WHERE d.cell_id=c.id)")
    args: tuple = ()
    if slide is not None:
        q, args = q + " AND c.slide=?", (slide,)
    for r in conn.execute(q + " ORDER BY c.slide, c.track", args).fetchall():
        if r["final"] in classes:
            yield r["final"], _file_name(r["id"]), cell_crop(conn, r["id"])


def export_reviewed(conn: sqlite3.Connection, out: str | Path, classes: list[str], slide: str | None = None) -> dict:
    """Write ``out/<class>/<cell>.png`` for every reviewed cell (see ``reviewed_cells``) -> {class: n}.
    InputError when no reviewed cell has a known class."""
    out = Path(out)
    counts: dict[str, int] = {}
    for label, name, png in reviewed_cells(conn, classes, slide):
        (out / label).mkdir(parents=True, exist_ok=True)
        (out / label / name).write_bytes(png)
        counts[label] = counts.get(label, 0) + 1
    if not counts:
        raise InputError("no reviewed cells with a crop and one of the model's classes" + (f" on slide {slide!r}" if slide else ""))
    return counts


def reviewed_zip(conn: sqlite3.Connection, classes: list[str], slide: str | None = None) -> bytes:
    """The same labelled folder as a zip (``<class>/<cell>.png``); an empty zip when nothing is reviewed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
        for label, name, png in reviewed_cells(conn, classes, slide):
            z.writestr(f"{label}/{name}", png)
    return buf.getvalue()
