"""The operator's monitor over HTTP (no browser): a real SQLite file written by the daemon's Store, real ZeroMQ
sockets on loopback with random ports, a real HTTP server on a random port. Browser tests: test_browser.py."""
from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request
import zipfile

import cv2
import numpy as np
import pytest
import zmq

from edge.cli import main
from edge.errors import ConfigError
from edge.monitor import Monitor, MonitorConfig, is_loopback
from edge.monitor_report import export_reviewed
from edge.protocol import encode_flags, encode_frame, encode_image
from edge.storage import Store, connect, slide_counts
from export.datasets import load_labelled_folder
from export.demo_frames import placeholder_cells

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
TOKEN = "t0ken-for-tests-0123456789"


def _probs(label: str, p: float) -> dict:
    rest = (1 - p) / (len(CLASSES) - 1)
    return {c: (p if c == label else rest) for c in CLASSES}


def _cell(slide, track, label, state, p=0.9, seq=1):
    crop = placeholder_cells(label if label != "platelet" else "lymphocyte", 1, seed=track)[0]
    return {"id": f"{slide}#{track}", "slide": slide, "track": track, "frame_seq": seq, "t_ns": 10**18 + seq,
            "box": [10 * track, 20, 10 * track + 60, 80], "label": label, "p": p, "probs": _probs(label, p),
            "state": state, "anomaly": 0.9 if state == "abnormal" else 0.1,
            "reason": {"accepted": "", "review": "p below the review threshold", "abnormal": "anomaly above threshold"}[state],
            "bundle_id": "bundle123456", "views": 1, "crop": crop}


CELLS = [("neutrophil", "accepted"), ("neutrophil", "accepted"), ("lymphocyte", "accepted"), ("monocyte", "review"),
         ("neutrophil", "review"), ("ig", "abnormal"), ("erythroblast", "accepted")]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "cytoedge.db"
    store = Store(path)
    cells = [_cell("S-1", i + 1, lab, st) for i, (lab, st) in enumerate(CELLS)]
    store.commit_frame({"slide": "S-1", "seq": 1, "t_ns": 10**18 + 1, "t_done_ns": 10**18 + 2,
                        "cell_ids": [c["id"] for c in cells], "dropped": 0, "bundle_id": "bundle123456"}, cells)
    store.close()
    return path


def _ports(ctx):
    """Two PUB sockets on random loopback ports (the camera's and the daemon's) -> (frames, flags, endpoints)."""
    frames, flags = ctx.socket(zmq.PUB), ctx.socket(zmq.PUB)
    eps = []
    for s in (frames, flags):
        s.setsockopt(zmq.LINGER, 0)
        eps.append(f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}")
    return frames, flags, eps


@pytest.fixture
def monitor(db):
    ctx = zmq.Context()
    frames, flags, (fe, fl) = _ports(ctx)
    mon = Monitor(MonitorConfig(port=0, frames=fe, flags=fl, db=str(db), frame_fps=20), CLASSES, context=ctx).start()
    mon.test_pubs = (frames, flags)
    yield mon
    mon.stop()
    frames.close()
    flags.close()
    ctx.term()


def _get(mon, path, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{mon.port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers, r.read()


def _post(mon, path, body, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{mon.port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_non_loopback_needs_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.3.2.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("box.local")
    with pytest.raises(ConfigError, match="token"):
        MonitorConfig(host="0.0.0.0")
    with pytest.raises(ConfigError, match="16"):
        MonitorConfig(host="0.0.0.0", token="short")
    with pytest.raises(ConfigError):
        MonitorConfig(token="has spaces in it but long enough")
    assert MonitorConfig(host="0.0.0.0", token=TOKEN).token == TOKEN


def test_cli_refuses_non_loopback_without_token(capsys, monkeypatch):
    monkeypatch.delenv("CYTOEDGE_MONITOR_TOKEN", raising=False)
    assert main(["monitor", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "needs an access token" in capsys.readouterr().err


def test_config_file_top_level_or_monitor_table(tmp_path, capsys, monkeypatch):
    from edge.commands.monitor import _section
    from edge.config import load_config

    monkeypatch.delenv("CYTOEDGE_MONITOR_TOKEN", raising=False)
    top, table, bad = tmp_path / "top.toml", tmp_path / "table.toml", tmp_path / "bad.toml"
    top.write_text('port = 9000\ntarget = 200\n')
    table.write_text('[daemon]\nqueue_size = 4\n[monitor]\nhost = "0.0.0.0"\ntoken = "' + TOKEN + '"\n')
    bad.write_text('prot = 9000\n')
    cfg = load_config(MonitorConfig, top, {}, section=_section(str(top)))
    assert (cfg.port, cfg.target) == (9000, 200)
    cfg = load_config(MonitorConfig, table, {}, section=_section(str(table)))
    assert (cfg.host, cfg.token) == ("0.0.0.0", TOKEN)
    assert main(["monitor", "--config", str(bad)]) == 2
    assert "unknown MonitorConfig key(s): prot" in capsys.readouterr().err


def test_help_says_a_token_is_needed_off_loopback(capsys):
    with pytest.raises(SystemExit):
        main(["monitor", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "non-loopback --host requires --token" in out and "401" in out


def test_state_counts_and_review_queue(monitor):
    status, _, body = _get(monitor, "/api/state")
    st = json.loads(body)
    assert status == 200 and st["slide"] == "S-1" and st["classes"] == CLASSES and "blast" in st["labels"]
    c = st["counts"]
    rows = {r["label"]: r for r in c["rows"]}
    # accepted white cells: 2 neutrophils, 1 lymphocyte; the erythroblast is reported per 100 WBC, not in the count
    assert c["wbc"] == 3 and rows["neutrophil"]["n"] == 2 and rows["neutrophil"]["pct"] == pytest.approx(66.7)
    assert c["per_100_wbc"] == [{"label": "erythroblast", "n": 1, "per100": pytest.approx(33.3)}]
    assert c["pending"] == 3 and c["abnormal"] == 1 and c["total"] == 7
    assert [x["id"] for x in st["review"]] == ["S-1#6", "S-1#4", "S-1#5"]  # abnormal first
    assert st["review"][0]["top"][0] == ["ig", 0.9]
    assert {a["id"] for a in st["alerts"]} == {"S-1#6", "S-1#7"}  # abnormal ig, erythroblast in blood
    status, headers, png = _get(monitor, "/api/crop?id=S-1%234")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)


def test_confirm_and_reclassify_change_db_and_counts(monitor, db):
    status, r = _post(monitor, "/api/decision", {"cell_id": "S-1#4", "decision": "confirm", "operator": "Ada"})
    assert status == 200 and r["cell"]["decision"] == "confirm" and r["cell"]["operator"] == "Ada"
    rows = {x["label"]: x["n"] for x in r["counts"]["rows"]}
    assert rows["monocyte"] == 1 and r["counts"]["pending"] == 2 and r["counts"]["wbc"] == 4
    status, r = _post(monitor, "/api/decision", {"cell_id": "S-1#6", "decision": "reclassify", "label": "blast",
                                                  "operator": "Ada"})
    assert status == 200 and r["cell"]["final_label"] == "blast"
    rows = {x["label"]: x["n"] for x in r["counts"]["rows"]}
    assert rows["blast"] == 1 and r["counts"]["wbc"] == 5 and r["counts"]["pending"] == 1
    conn = connect(db, readonly=True)
    dec = [dict(x) for x in conn.execute("SELECT cell_id, operator, decision, label, t_ns FROM decisions ORDER BY id")]
    assert [(d["cell_id"], d["operator"], d["decision"], d["label"]) for d in dec] == \
        [("S-1#4", "Ada", "confirm", "monocyte"), ("S-1#6", "Ada", "reclassify", "blast")]
    assert all(abs(d["t_ns"] - time.time_ns()) < 60e9 for d in dec)
    assert slide_counts(conn, "S-1")["final"]["blast"] == 1
    conn.close()
    assert [x["id"] for x in json.loads(_get(monitor, "/api/review")[2])] == ["S-1#5"]


def test_bad_decisions_are_refused(monitor):
    assert _post(monitor, "/api/decision", {"cell_id": "S-1#4", "decision": "confirm", "operator": ""})[0] == 400
    assert _post(monitor, "/api/decision", {"cell_id": "S-1#4", "decision": "reclassify", "label": "dragon",
                                            "operator": "Ada"})[0] == 400
    assert _post(monitor, "/api/decision", {"cell_id": "nope", "decision": "confirm", "operator": "Ada"})[0] == 400
    req = urllib.request.Request(f"http://127.0.0.1:{monitor.port}/api/decision", method="POST",
                                 data=b"cell_id=S-1%234&decision=confirm", headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as e:  # a cross-site form post cannot record a decision
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 415
    assert _post(monitor, "/api/decision", {"cell_id": "S-1#4", "decision": "confirm", "operator": "Ada"},
                 {"Origin": "http://evil.example"})[0] == 403


def test_slide_start_stop(monitor):
    status, r = _post(monitor, "/api/slide/start", {"slide": "S-2", "operator": "Ada", "target": 200})
    assert status == 200 and r["session"]["slide"] == "S-2" and r["session"]["target"] == 200
    st = json.loads(_get(monitor, "/api/state")[2])
    assert st["slide"] == "S-2" and st["target"] == 200 and st["counts"]["total"] == 0
    assert _post(monitor, "/api/slide/start", {"slide": "S-3", "operator": ""})[0] == 400
    status, r = _post(monitor, "/api/slide/stop", {})
    assert status == 200 and r["stopped"]["slide"] == "S-2" and r["stopped"]["stopped_ns"] >= r["stopped"]["started_ns"]
    assert json.loads(_get(monitor, "/api/state")[2])["session"] is None


def test_report_html_csv_and_export(monitor, db, tmp_path):
    _post(monitor, "/api/decision", {"cell_id": "S-1#4", "decision": "confirm", "operator": "Ada"})
    _post(monitor, "/api/decision", {"cell_id": "S-1#5", "decision": "reclassify", "label": "lymphocyte", "operator": "Bo"})
    _post(monitor, "/api/decision", {"cell_id": "S-1#6", "decision": "reclassify", "label": "blast", "operator": "Bo"})
    status, _, body = _get(monitor, "/report?slide=S-1")
    page = body.decode()
    assert status == 200 and "bundle123456" in page
    for i in range(1, 8):
        assert f"data-cell-id='S-1#{i}'" in page
    assert "Ada" in page and "Bo" in page and "/api/crop?id=S-1%234" in page
    status, headers, body = _get(monitor, "/report.csv?slide=S-1")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert "attachment" in headers["Content-Disposition"]
    diff = {r["label"]: int(r["count"]) for r in rows if r["record"] == "differential"}
    assert diff["neutrophil"] == 2 and diff["lymphocyte"] == 2 and diff["monocyte"] == 1 and diff["blast"] == 1
    cells = {r["cell_id"]: r for r in rows if r["record"] == "cell"}
    assert len(cells) == 7 and cells["S-1#5"]["final_label"] == "lymphocyte" and cells["S-1#5"]["operator"] == "Bo"
    assert cells["S-1#5"]["decision_time"] and cells["S-1#1"]["bundle_id"] == "bundle123456"
    # reviewed cells as a labelled folder: known classes only (the blast is not a class of the model)
    z = zipfile.ZipFile(io.BytesIO(_get(monitor, "/export.zip?slide=S-1")[2]))
    assert sorted(z.namelist()) == ["lymphocyte/S-1_5.png", "monocyte/S-1_4.png"]
    out = tmp_path / "reviewed"
    conn = connect(db)
    assert export_reviewed(conn, out, CLASSES, "S-1") == {"lymphocyte": 1, "monocyte": 1}
    conn.close()
    folder = load_labelled_folder(out, classes=CLASSES, min_classes=1)  # what `cytoedge calibrate` reads
    assert sorted(CLASSES[i] for i in folder.labels) == ["lymphocyte", "monocyte"]


def _events(mon, want, deadline_s=20.0, publish=None):
    """Read /events until ``want(event, data)`` is true -> [(event, data)] seen; ``publish`` is called between reads."""
    def open_stream():
        c = http.client.HTTPConnection("127.0.0.1", mon.port, timeout=0.5)
        c.request("GET", "/events")
        r = c.getresponse()
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        return c, r

    conn, resp = open_stream()
    seen, event, buf = [], None, b""
    end = time.monotonic() + deadline_s
    try:
        while time.monotonic() < end:
            if publish:
                publish()
            try:
                chunk = resp.fp.read1(65536)
            except TimeoutError:
                # a socket file that timed out cannot be read again: reconnect (the stream re-sends state)
                conn.close()
                conn, resp = open_stream()
                buf = b""
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.decode()
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    seen.append((event, data))
                    if want(event, data):
                        return seen
        raise AssertionError(f"no matching event within {deadline_s} s; saw {[e for e, _ in seen]}")
    finally:
        conn.close()


def test_frames_and_flags_reach_the_page(monitor):
    frames_pub, flags_pub = monitor.test_pubs
    rgb = np.full((120, 160, 3), 230, np.uint8)
    cv2.circle(rgb, (50, 60), 20, (120, 60, 170), -1)
    payload, _ = encode_image(rgb, "jpeg")
    cell = {"id": "S-1#6", "track": 6, "box": [30, 40, 70, 80], "label": "ig", "p": 0.9, "state": "abnormal", "anomaly": 0.9}
    new = {"id": "S-1#99", "track": 99, "box": [90, 10, 130, 50], "label": "blast", "p": 0.5, "state": "abnormal",
           "anomaly": 2.0}
    seq = [0]

    def publish():
        s = seq[0] = seq[0] + 1
        t = time.time_ns()
        frames_pub.send_multipart(encode_frame(payload, seq=s, t_ns=t, slide="S-1", encoding="jpeg"))
        time.sleep(0.02)
        flags_pub.send_multipart(encode_flags({"seq": s, "slide": "S-1", "t_ns": t, "t_done_ns": t + 5_000_000,
                                               "cells": [cell, new], "counts": {"ig": 1}, "dropped": 0}))

    got = set()

    def want(e, d):
        got.update({"frame"} if e == "frame" and d["cells"] else {"alert"} if e == "alert" and d["id"] == "S-1#99" else ())
        return got == {"frame", "alert"}

    seen = _events(monitor, want, publish=publish)
    hello = [d for e, d in seen if e == "hello"][0]
    assert hello["slide"] == "S-1"
    frame = [d for e, d in seen if e == "frame" and d["cells"]][-1]
    assert (frame["w"], frame["h"], frame["slide"]) == (160, 120, "S-1")
    assert [c["id"] for c in frame["cells"]] == ["S-1#6", "S-1#99"]
    img = cv2.imdecode(np.frombuffer(base64.b64decode(frame["img"].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (120, 160, 3)
    assert any(e == "flags" and d["n_cells"] == 2 and d["latency_ms"] == 5.0 for e, d in seen)
    alerts = {d["id"]: d for e, d in seen if e == "alert"}
    assert alerts["S-1#99"]["label"] == "blast" and alerts["S-1#99"]["slide"] == "S-1"


def test_malformed_messages_are_counted_not_fatal(monitor):
    frames_pub, flags_pub = monitor.test_pubs

    def publish():
        frames_pub.send_multipart([b"frame", b"{not json", b"x"])
        flags_pub.send_multipart([b"flags", json.dumps({"v": 2}).encode()])

    _events(monitor, lambda e, d: e == "status" and d["bad_messages"] >= 2, publish=publish)
    assert _get(monitor, "/healthz")[0] == 200


@pytest.fixture
def token_monitor(db):
    ctx = zmq.Context()
    mon = Monitor(MonitorConfig(host="0.0.0.0", port=0, token=TOKEN, frames="tcp://127.0.0.1:1", flags="tcp://127.0.0.1:2",
                                db=str(db)), CLASSES, context=ctx).start()
    yield mon
    mon.stop()
    ctx.term()


def test_token_required_on_every_request(token_monitor):
    mon = token_monitor
    for path in ("/", "/api/state", "/events", "/report?slide=S-1", "/api/crop?id=S-1%234"):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(mon, path)
        assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(mon, "/api/state?token=wrong-token-0123456789")
    assert e.value.code == 401
    status, headers, _ = _get(mon, f"/?token={TOKEN}")
    assert status == 200 and f"cytoedge_token={TOKEN}" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    assert _get(mon, "/api/state", {"Cookie": f"cytoedge_token={TOKEN}"})[0] == 200
    assert _get(mon, "/api/state", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert mon.url.endswith(f"?token={TOKEN}")


def test_loopback_monitor_refuses_foreign_host_header(monitor):
    with pytest.raises(urllib.error.HTTPError) as e:  # DNS rebinding: a page on evil.example reaching 127.0.0.1
        _get(monitor, "/api/state", {"Host": "evil.example:8480"})
    assert e.value.code == 403
    assert _get(monitor, "/api/state", {"Host": f"localhost:{monitor.port}"})[0] == 200


def test_busy_port_is_a_clear_error(monitor, db):
    with pytest.raises(ConfigError, match="cannot listen"):
        Monitor(MonitorConfig(port=monitor.port, db=str(db)), CLASSES)


def test_cli_export_reviewed(db, tiny_bundle, tmp_path, capsys):
    conn = connect(db)
    from edge.storage import record_decision

    record_decision(conn, "S-1#4", "Ada", "confirm")
    conn.close()
    out = tmp_path / "labelled"
    assert main(["monitor", "--db", str(db), "--bundle", str(tiny_bundle), "--export-reviewed", str(out)]) == 0
    assert "wrote 1 reviewed cells" in capsys.readouterr().out
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.png")] == ["monocyte/S-1_4.png"]


def test_page_assets_are_served(monitor):
    status, headers, body = _get(monitor, "/")
    assert status == 200 and b"<canvas id=\"frame\"" in body and "text/html" in headers["Content-Type"]
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css"), ("report.css", "text/css")):
        status, headers, _ = _get(monitor, f"/static/{name}")
        assert status == 200 and ctype in headers["Content-Type"]
    for bad in ("/static/../monitor.py", "/static/.hidden", "/nope"):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(monitor, bad)
        assert e.value.code == 404


def test_events_thread_safety_under_many_clients(monitor):
    """Several pages at once each get the hello event; closing them leaves the server serving."""
    results = []

    def one():
        results.append(_events(monitor, lambda e, d: e == "hello", deadline_s=10)[0][0])

    ts = [threading.Thread(target=one) for _ in range(5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert results == ["hello"] * 5
    assert _get(monitor, "/api/state")[0] == 200
