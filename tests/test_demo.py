"""The bundled demo frames, the script that makes them, and ``cytoedge demo`` end to end (real child processes,
real ZeroMQ sockets and HTTP on random loopback ports, the tiny test bundle)."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.commands.demo import DEMO_DIR, check_free, flags_line
from edge.detect import detect_cells
from edge.imageio import read_image
from export.demo_frames import DemoFramesConfig, compose, main as demo_frames_main, placeholder_cells

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bundled_frames_are_small_and_match_their_truth():
    truth = json.loads((DEMO_DIR / "truth.json").read_text())
    files = sorted((DEMO_DIR / "frames").iterdir())
    assert [f.name for f in files] == sorted(t["file"] for t in truth["frames"])
    assert 8 <= len(files) <= 40 and sum(f.stat().st_size for f in files) <= 5_000_000
    for f in files[:3]:
        assert read_image(f).shape == (480, 640, 3)
    labels = {c["label"] for t in truth["frames"] for c in t["cells"]}
    assert {"neutrophil", "lymphocyte", "blast", "smudge", "ig", "erythroblast"} <= labels
    assert truth["um_per_px"] == pytest.approx(0.2) and truth["generator"]["cells"] in ("teacher", "placeholder")


def test_stage_drifts_between_frames_of_a_field():
    """Consecutive frames of a field are the same scene shifted by the recorded offset (so tracking matters)."""
    truth = json.loads((DEMO_DIR / "truth.json").read_text())
    fr = [t for t in truth["frames"] if t["field"] == 0][:4]
    grey = [cv2.cvtColor(read_image(DEMO_DIR / "frames" / t["file"]), cv2.COLOR_RGB2GRAY).astype(np.float32) for t in fr]
    for a, b, ta, tb in zip(grey, grey[1:], fr, fr[1:]):
        (dx, dy), _ = cv2.phaseCorrelate(a, b)
        want = np.subtract(ta["offset"], tb["offset"])  # the window moves by +offset: content moves by -offset
        assert np.hypot(*want) > 2 and np.hypot(dx - want[0], dy - want[1]) < 1.0


def test_detector_finds_the_demo_cells():
    truth = json.loads((DEMO_DIR / "truth.json").read_text())
    found = total = 0
    for t in truth["frames"][::4]:
        dets = [d for d in detect_cells(read_image(DEMO_DIR / "frames" / t["file"]), um_per_px=truth["um_per_px"])
                if not d.edge]
        for c in t["cells"]:
            if not c["whole"]:
                continue
            x0, y0, x1, y1 = c["box"]
            total += 1
            found += any(x0 <= (d.box[0] + d.box[2]) / 2 <= x1 and y0 <= (d.box[1] + d.box[3]) / 2 <= y1 for d in dets)
    assert total >= 30 and found / total >= 0.9


def test_placeholder_cells_have_the_normalised_geometry():
    from edge.preprocess import NUCLEUS_FILL, normalise_cell

    cells = placeholder_cells("lymphocyte", 3, seed=1)
    assert cells.shape == (3, 64, 64, 3) and cells.dtype == np.uint8
    c = normalise_cell(cells[0])  # the runtime finds the nucleus where the teacher's crops have it
    assert c.found and c.diameter == pytest.approx(NUCLEUS_FILL * 64, rel=0.2)


def test_demo_frames_script_writes_frames_and_truth(tmp_path):
    assert demo_frames_main(["--placeholder", "--out", str(tmp_path), "--frames-per-field", "2", "--seed", "3"]) == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    files = sorted(p.name for p in (tmp_path / "frames").glob("*.jpg"))
    assert files == [f"f{i}_{j:02d}.jpg" for i in range(4) for j in range(2)] == sorted(t["file"] for t in truth["frames"])
    assert truth["generator"] == {"cells": "placeholder", "seed": 3}
    with pytest.raises(SystemExit):  # a source is required: the teacher or --placeholder
        demo_frames_main(["--out", str(tmp_path)])


@pytest.mark.parametrize("bad", ["eosinophil", "eosinophil=high", "blast=1"])
def test_demo_frames_refuses_a_bad_class_guidance(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        demo_frames_main(["--placeholder", "--out", str(tmp_path), "--class-guidance", bad])
    assert exc.value.code == 2 and "--class-guidance" in capsys.readouterr().err
    assert not (tmp_path / "truth.json").exists()


def test_seen_by_runtime_finds_the_placed_cell_and_crops_it_like_the_daemon():
    from export.demo_frames import seen_by_runtime

    cand = placeholder_cells("neutrophil", 3, 1)
    seen = seen_by_runtime(cand, "neutrophil", DemoFramesConfig(), seed=2)
    assert len(seen) == 3 and all(c is not None and c.shape == (64, 64, 3) and c.dtype == np.uint8 for c in seen)
    # The runtime's crop is the same cell, re-found and re-normalised: close to the candidate, not identical.
    for c, s in zip(cand, seen):
        d = np.abs(c.astype(float) - s.astype(float)).mean()
        assert 0 < d < 40, d
        centre = s[24:40, 24:40].mean(axis=2).mean()
        assert centre < s[:8].mean(axis=2).mean() - 30  # the dark nucleus is in the middle of the crop


def test_pick_typical_keeps_the_candidates_the_engine_finds_most_typical_in_a_frame(tiny_bundle):
    from edge.backends import load_backend
    from edge.bundle import load_bundle
    from edge.postprocess import decide
    from export.demo_frames import pick_typical, seen_by_runtime, typicality

    drawn = {}

    def sample(label, n, seed):
        drawn[label] = placeholder_cells(label, n, seed)
        return drawn[label]

    cfg = DemoFramesConfig()
    wrapped, bundle_id = pick_typical(sample, str(tiny_bundle), oversample=3, cfg=cfg)
    kept = wrapped("monocyte", 4, 5)
    assert kept.shape == (4, 64, 64, 3) and len(drawn["monocyte"]) == 12 and bundle_id == load_bundle(tiny_bundle).bundle_id
    b = load_bundle(tiny_bundle)
    seen = seen_by_runtime(drawn["monocyte"], "monocyte", cfg, 5)
    assert all(c is not None for c in seen)
    dec = decide(load_backend("onnxruntime", b).infer(np.stack(seen).transpose(0, 3, 1, 2).copy()), b.classes, b.calibration)
    p = typicality(dec, "monocyte", b.calibration)
    best = np.argsort(-p, kind="stable")[:4]
    assert all(0 < v <= 1.001 for v in p)
    assert sorted(map(bytes, kept)) == sorted(bytes(drawn["monocyte"][i]) for i in best)


def test_typicality_prefers_clear_normal_cells():
    from edge.postprocess import CellDecision
    from export.demo_frames import typicality

    cal = {"anomaly_threshold": 10.0}
    mk = lambda p, a, state: CellDecision(label="monocyte", p=p, probs={"monocyte": p}, state=state, anomaly=a, reason="")  # noqa: E731
    t = typicality([mk(0.9, 2.0, "accepted"), mk(0.95, 9.0, "review"), mk(0.99, 12.0, "abnormal"), mk(0.5, 1.0, "review")],
                   "monocyte", cal)
    assert list(np.argsort(-t)) == [0, 3, 1, 2] and t.min() > 0


def test_compose_is_deterministic_and_uses_the_sampler():
    calls = []

    def sample(label, n, seed):
        calls.append((label, n))
        return placeholder_cells(label, n, seed)

    cfg = DemoFramesConfig(frames_per_field=1)
    a = [(n, f) for n, f, _ in compose(sample, "teacher", cfg)]
    b = [(n, f) for n, f, _ in compose(placeholder_cells, "placeholder", cfg)]
    assert dict(calls)["neutrophil"] == 8 and "blast" not in dict(calls)  # odd cells are drawn, not sampled
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def test_flags_line_is_compact():
    msg = {"slide": "S", "seq": 7, "t_ns": 0, "t_done_ns": 42_000_000, "counts": {"neutrophil": 3, "ig": 1},
           "cells": [{"track": 3, "label": "neutrophil", "p": 0.97, "state": "accepted"},
                     {"track": 4, "label": "ig", "p": 0.51, "state": "abnormal"}]}
    line = flags_line(msg)
    assert "\n" not in line and "42 ms" in line and "#3 neutrophil 0.97 ok" in line and "#4 ig 0.51 ABNORMAL" in line
    assert "4 cells counted" in line


def _demo(args, tiny_bundle, tmp_path) -> tuple[subprocess.Popen, queue.Queue, dict, threading.Thread]:
    ports = {"port": free_port(), "frames": free_port(), "flags": free_port()}
    cmd = [sys.executable, "-m", "edge.cli", "demo", "--bundle", str(tiny_bundle), "--port", str(ports["port"]),
           "--frames", f"tcp://127.0.0.1:{ports['frames']}", "--flags", f"tcp://127.0.0.1:{ports['flags']}",
           "--metrics-port", "-1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    return proc, lines, ports, reader


def _rest(lines: queue.Queue, reader: threading.Thread) -> str:
    reader.join(30)
    out = []
    while not lines.empty():
        out.append(lines.get())
    return "".join(out)


def _wait_line(lines: queue.Queue, pred, timeout: float, seen: list) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if pred(line):
            return line
    raise AssertionError("no matching line; output so far:\n" + "".join(seen[-30:]))


def test_demo_runs_end_to_end_and_stops_on_ctrl_c(tiny_bundle, tmp_path):
    proc, lines, ports, reader = _demo(["--db", str(tmp_path / "demo.db")], tiny_bundle, tmp_path)
    seen: list[str] = []
    try:
        url = _wait_line(lines, lambda s: "open http://" in s, 60, seen).split("open ", 1)[1].split()[0]
        assert url == f"http://127.0.0.1:{ports['port']}/"
        flags = _wait_line(lines, lambda s: s.startswith("[DEMO-001 frame"), 120, seen)
        assert " ms " in flags and "cells counted" in flags
        with urllib.request.urlopen(url + "api/state", timeout=10) as r:
            assert json.loads(r.read())["slide"] == "DEMO-001"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "cytoedge demo: stopped" in _rest(lines, reader)
    for p in ports.values():  # every child is gone: the ports are free again
        check_free("127.0.0.1", p, "test", "-")
    from edge.storage import connect, slide_cells

    conn = connect(tmp_path / "demo.db", readonly=True)
    assert len(slide_cells(conn, "DEMO-001")) >= 1
    conn.close()


def test_demo_stops_after_seconds(tiny_bundle, tmp_path):
    proc, lines, ports, reader = _demo(["--seconds", "3", "--quiet"], tiny_bundle, tmp_path)
    try:
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = _rest(lines, reader)
    assert "open http://127.0.0.1:" in text and "cytoedge demo: stopped" in text and "[DEMO-001" not in text
    assert not list(tmp_path.glob("cytoedge-demo-*"))  # the work folder (database, logs) is removed


def test_demo_refuses_a_busy_port(tiny_bundle, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "edge.cli", "demo", "--bundle", str(tiny_bundle), "--port", str(busy),
                            "--frames", f"tcp://127.0.0.1:{free_port()}", "--flags", f"tcp://127.0.0.1:{free_port()}",
                            "--metrics-port", "-1", "--seconds", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"port {busy}" in r.stderr and "--port" in r.stderr and "busy" in r.stderr


def test_matte_keeps_the_cells_surroundings_and_fades_the_crops_background():
    """The matte keeps a ring of the crop's own context (MATTE_CONTEXT cell radii): a red cell just outside the
    white cell stays, the crop's plain background and its corners go (the field's background shows there)."""
    from edge.preprocess import NUCLEUS_FILL
    from export.demo_frames import CELL_UM, MATTE_CONTEXT, matte_cell

    s, label = 64, "neutrophil"
    r_cell = NUCLEUS_FILL * s / 2 * CELL_UM[label][0] / CELL_UM[label][1]
    yy, xx = np.mgrid[0:s, 0:s]
    crop = np.full((s, s, 3), (253, 230, 205), np.uint8)
    crop[np.hypot(xx - 32, yy - 32) < r_cell] = (120, 80, 170)  # the white cell
    rx = 32 + 1.3 * r_cell  # a red cell beyond the cell's edge, inside the kept context
    crop[np.hypot(xx - rx, yy - 32) < 3] = (200, 120, 130)
    alpha = matte_cell(crop, label)
    assert MATTE_CONTEXT > 1.3
    assert alpha[32, 32] > 0.95 and alpha[32, int(round(rx))] > 0.6
    assert alpha[32 - int(1.3 * r_cell), 32] < 0.05  # plain background at the same distance: faded
    assert alpha[0, 0] == pytest.approx(0, abs=1e-3) and alpha[2, 32] < 0.05
