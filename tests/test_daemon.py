"""The daemon as a real subprocess over real ZeroMQ sockets on loopback, with a real SQLite file.

Frames in -> flags out with the right seq; malformed messages of every kind (and hypothesis-generated ones)
are counted and skipped while it keeps running; kill -9 mid-stream then restart loses nothing published;
the watchdog pings a test NOTIFY_SOCKET; SIGTERM drains and exits 0; bad bundles and backends stop start-up.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.ops import parse_metrics
from edge.protocol import KINDS, encode_frame, encode_image, parse_flags
from edge.storage import connect, frame_keys
from smear import Wbc, render_smear

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide_image():
    wbcs = [Wbc(300, 300), Wbc(700, 420, "lobed"), Wbc(1100, 300), Wbc(1500, 450, "lobed")]
    return render_smear(wbcs, h=800, w=1800, n_rbc=160, n_platelets=12, seed=11)


def window(big: np.ndarray, i: int, step: int = 40) -> bytes:
    """JPEG of the i-th 640x480 field of a stage moving right by ``step`` px per frame."""
    x0 = (i * step) % (big.shape[1] - 640)
    return encode_image(big[150:630, x0:x0 + 640])[0]


class DaemonProc:
    """``cytoedge daemon`` in a subprocess; its JSON log on stderr tells the flags endpoint and metrics port."""

    def __init__(self, bundle: Path, frames_ep: str, db: Path, extra: list[str] = (), env: dict | None = None):
        cmd = [sys.executable, "-m", "edge.cli", "daemon", "--bundle", str(bundle), "--frames", frames_ep,
               "--flags", "tcp://127.0.0.1:*", "--db", str(db), "--metrics-port", "0", "--log-format", "json", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.info: dict = {}
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if '"daemon ready"' in line:
                self.info = json.loads(line)
                self.ready.set()
        self.ready.set()

    def wait_ready(self) -> "DaemonProc":
        self.ready.wait(180)
        assert self.info, "daemon did not start:\n" + "".join(self.lines)
        return self

    @property
    def flags_ep(self) -> str:
        return self.info["flags"]

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.info['metrics_port']}/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.info['metrics_port']}/healthz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)


class Camera:
    """The test's camera: a PUB socket on a random loopback port."""

    def __init__(self, ctx: zmq.Context):
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    def send(self, payload: bytes, seq: int, slide: str = "S1", t_ns: int | None = None, **kw) -> int:
        t_ns = time.time_ns() if t_ns is None else t_ns
        self.pub.send_multipart(encode_frame(payload, seq=seq, t_ns=t_ns, slide=slide, encoding=kw.pop("encoding", "jpeg"), **kw))
        return t_ns


def flags_socket(ctx: zmq.Context, endpoint: str, timeout_ms: int = 20000) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sub.setsockopt(zmq.SUBSCRIBE, b"flags")
    sub.connect(endpoint)
    return sub


def warm_up(cam: Camera, sub: zmq.Socket, payload: bytes, slide: str = "warmup") -> None:
    """PUB/SUB drops what is sent before both connections are up: send until a flags message comes back."""
    sub.setsockopt(zmq.RCVTIMEO, 300)
    try:
        for seq in range(400):
            cam.send(payload, seq, slide=slide)
            try:
                if parse_flags(sub.recv_multipart())["slide"] == slide:
                    break
            except zmq.Again:
                continue
        else:
            raise AssertionError("no flags came back")
        while True:  # drain the rest of the warm-up
            try:
                sub.recv_multipart()
            except zmq.Again:
                break
    finally:
        sub.setsockopt(zmq.RCVTIMEO, 20000)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_frames_in_flags_out_with_the_right_seq(tiny_bundle, slide_image, ctx, tmp_path):
    cam = Camera(ctx)
    d = DaemonProc(tiny_bundle, cam.endpoint, tmp_path / "c.db").wait_ready()
    try:
        sub = flags_socket(ctx, d.flags_ep)
        warm_up(cam, sub, window(slide_image, 0))
        sent = {}
        for i in range(12):
            sent[100 + i] = cam.send(window(slide_image, i), 100 + i)
            time.sleep(0.05)
        got = [parse_flags(sub.recv_multipart()) for _ in range(12)]
        assert [g["seq"] for g in got] == list(sent)  # one per frame, in order
        assert all(g["t_ns"] == sent[g["seq"]] and g["t_done_ns"] >= g["t_ns"] and g["slide"] == "S1" for g in got)
        classes = set(json.loads((tiny_bundle / "manifest.json").read_text())["classes"])
        cells = [c for g in got for c in g["cells"]]
        assert cells and all(c["label"] in classes for c in cells)
        ids = {c["id"] for c in cells}
        last = got[-1]["counts"]
        assert sum(last.values()) == len(ids)  # counted once per physical cell, not per frame
        assert len(ids) < len(cells)  # the same cells were seen in several frames
        assert set(got[-1]["timing_ms"]) >= {"decode", "detect", "track", "preprocess", "infer", "post", "store"}
        m = d.metrics()
        assert m["cytoedge_frames_processed_total"] >= 13 and m['cytoedge_stage_ms_count{stage="infer"}'] >= 1
        assert d.health()[0] == 200
    finally:
        assert d.stop() == 0
    conn = connect(tmp_path / "c.db", readonly=True)
    assert {("S1", s, t) for s, t in sent.items()} <= frame_keys(conn, "S1")
    assert {r["id"] for r in conn.execute("SELECT id FROM cells WHERE slide='S1'")} == ids


# ---- malformed input against one running daemon ----

@pytest.fixture(scope="module")
def running(tiny_bundle, slide_image, tmp_path_factory):
    ctx = zmq.Context()
    tmp = tmp_path_factory.mktemp("bad")
    cfg = tmp / "daemon.toml"
    cfg.write_text("max_payload_bytes = 1000000\nmax_pixels = 4000000\nqueue_size = 4\nbad_log_interval_s = 3600.0\n")
    cam = Camera(ctx)
    d = DaemonProc(tiny_bundle, cam.endpoint, tmp / "bad.db", ["--config", str(cfg)]).wait_ready()
    sub = flags_socket(ctx, d.flags_ep)
    warm_up(cam, sub, window(slide_image, 0))
    yield d, cam, sub, slide_image
    assert d.stop() == 0
    ctx.destroy(linger=0)


def _still_serving(d: DaemonProc, cam: Camera, sub: zmq.Socket, big: np.ndarray, seq: int) -> None:
    """A good frame after the bad ones still gives its flags message (and nothing else is pending)."""
    assert d.proc.poll() is None
    seq0 = seq
    sub.setsockopt(zmq.RCVTIMEO, 500)
    try:
        for _ in range(200):
            t = cam.send(window(big, 3), seq, slide=f"after{seq0}")
            try:
                while True:
                    g = parse_flags(sub.recv_multipart())
                    if g["slide"] == f"after{seq0}" and g["seq"] == seq and g["t_ns"] == t:
                        return
            except zmq.Again:
                seq += 1
        raise AssertionError("no flags after the malformed messages")
    finally:
        sub.setsockopt(zmq.RCVTIMEO, 20000)


def _header(**kw) -> bytes:
    h = {"v": 1, "seq": 1, "t_ns": 1, "slide": "bad", "encoding": "jpeg", "um_per_px": None}
    h.update(kw)
    return json.dumps({k: v for k, v in h.items() if v is not ...}).encode()


def test_every_malformed_kind_is_counted_and_skipped(running):
    d, cam, sub, big = running
    good = window(big, 1)
    png = encode_image(big[:64, :64], "png")[0]
    forged = png[:16] + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big") + png[24:]
    before = d.metrics()
    bad = {
        "parts": [[b"frame", _header()], [b"frame", _header(), good, b"extra"], [b"frame"]],
        "topic": [[b"frames", _header(), good], [b"", _header(), good]],
        "json": [[b"frame", b"{not json", good], [b"frame", b"\xff\xfe\x00", good], [b"frame", b"[1]", good]],
        "version": [[b"frame", _header(v=2), good], [b"frame", _header(v="1"), good]],
        "field": [[b"frame", _header(seq=...), good], [b"frame", _header(slide=""), good],
                  [b"frame", _header(encoding="gif"), good]],
        "payload_size": [[b"frame", _header(), os.urandom(1_200_000)]],
        "raw_size": [[b"frame", _header(encoding="raw", shape=[480, 640, 3]), b"\x00" * 1000]],
        "frame_size": [[b"frame", _header(), b""], [b"frame", _header(encoding="png"), forged],
                       [b"frame", _header(encoding="raw", shape=[0, 0, 3]), b""]],
        "decode": [[b"frame", _header(), b"\xff\xd8\xff\xe0 this is not a jpeg"], [b"frame", _header(encoding="png"), good]],
    }
    assert set(bad) == set(KINDS)
    for msgs in bad.values():
        for m in msgs:
            cam.pub.send_multipart(m)
    _still_serving(d, cam, sub, big, 1000)
    after = d.metrics()
    for kind, msgs in bad.items():
        key = f'cytoedge_bad_messages_total{{kind="{kind}"}}'
        assert after.get(key, 0) - before.get(key, 0) == len(msgs), kind
    logged = [json.loads(x) for x in d.lines if '"kind"' in x]
    assert {x["kind"] for x in logged} >= set(KINDS)


def test_a_flood_is_dropped_counted_and_memory_stays_bounded(running):
    d, cam, sub, big = running
    rss0 = d.rss_mb()
    before = d.metrics()
    raw = np.ascontiguousarray(big[100:580, 200:840])  # 640x480 raw: 900 KB a frame
    for i in range(600):  # far faster than the daemon can detect and classify
        cam.send(raw.tobytes(), 5000 + i, slide="flood", encoding="raw", shape=raw.shape)
    for i in range(3000):
        cam.pub.send_multipart([b"frame", b"{flood", b"x"])
    _still_serving(d, cam, sub, big, 2000)
    after = d.metrics()
    dropped = sum(v for k, v in after.items() if k.startswith("cytoedge_frames_dropped_total")) - \
        sum(v for k, v in before.items() if k.startswith("cytoedge_frames_dropped_total"))
    processed = after["cytoedge_frames_processed_total"] - before["cytoedge_frames_processed_total"]
    assert dropped > 0 and processed >= 1
    assert processed - 1 + dropped <= 600  # each flood frame was processed or counted as dropped, at most once
    assert d.rss_mb() - rss0 < 250  # 600 raw frames would be 540 MB if they were all queued
    flood_lines = [x for x in d.lines if '"kind": "json"' in x and "flood" not in x]
    assert len(flood_lines) <= 2  # 3000 bad messages, logged once (the interval here is an hour)


def test_seq_gaps_are_counted_as_dropped(running):
    d, cam, sub, big = running
    _still_serving(d, cam, sub, big, 7000)  # connected and idle
    got = []
    for seq in (0, 1, 5, 6, 3):  # 2-4 never arrive; 3 after 6 is a publisher restart, not a loss
        t = cam.send(window(big, seq), seq, slide="gaps")
        while True:
            g = parse_flags(sub.recv_multipart())
            if g["slide"] == "gaps" and g["t_ns"] == t:
                got.append(g["dropped"])
                break
    assert [x - got[0] for x in got] == [0, 0, 3, 3, 3]


def test_a_message_over_the_transport_limit_resets_the_connection_and_it_recovers(running):
    d, cam, sub, big = running
    before = d.metrics().get("cytoedge_frames_disconnects_total", 0)
    cam.pub.send_multipart([b"frame", _header(), os.urandom(3_000_000)])  # over 2x the payload limit
    _still_serving(d, cam, sub, big, 4000)
    assert d.metrics()["cytoedge_frames_disconnects_total"] >= before + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.one_of(
    st.lists(st.binary(max_size=200), max_size=5),
    st.tuples(st.just(b"frame"),
              st.dictionaries(st.sampled_from(["v", "seq", "t_ns", "slide", "encoding", "shape", "um_per_px", "x"]),
                              st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(),
                                        st.text(max_size=8), st.lists(st.integers(-2, 5000), max_size=4)))
              .map(lambda h: json.dumps(h).encode()),
              st.binary(max_size=2000)).map(list)))
def test_generated_malformed_messages_leave_it_running(running, parts):
    d, cam, _, _ = running
    cam.pub.send_multipart(parts if parts else [b""])
    assert d.proc.poll() is None


def test_still_serving_after_the_generated_messages(running):
    d, cam, sub, big = running
    _still_serving(d, cam, sub, big, 3000)
    status, health = d.health()
    assert status == 200 and health["status"] == "ok"


# ---- crash and restart ----

def test_kill_9_mid_stream_loses_nothing_published(tiny_bundle, slide_image, ctx, tmp_path):
    db = tmp_path / "crash.db"
    cam = Camera(ctx)
    received: list[dict] = []

    def stream(d: DaemonProc, first_seq: int, n: int, kill_after: int | None):
        sub = flags_socket(ctx, d.flags_ep, timeout_ms=8000)
        warm_up(cam, sub, window(slide_image, 0), slide=f"warm{first_seq}")
        stop = threading.Event()

        def send():
            for i in range(n):
                if stop.is_set():
                    return
                cam.send(window(slide_image, first_seq + i), first_seq + i, slide="K")
                time.sleep(0.05)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            while True:
                try:
                    g = parse_flags(sub.recv_multipart())
                except zmq.Again:
                    break
                if g["slide"] == "K":
                    received.append(g)
                if kill_after is not None and len([r for r in received if r["seq"] >= first_seq]) == kill_after:
                    d.proc.kill()  # SIGKILL, mid-stream: frames queued and in flight are lost, never half-written
        finally:
            stop.set()
            sender.join()
            sub.close()

    d1 = DaemonProc(tiny_bundle, cam.endpoint, db).wait_ready()
    stream(d1, 0, 40, kill_after=10)
    assert d1.proc.wait(timeout=60) == -signal.SIGKILL
    n1 = len(received)
    assert n1 >= 10
    conn = connect(db, readonly=True)
    max_track_1 = conn.execute("SELECT MAX(track) FROM cells WHERE slide='K'").fetchone()[0] or 0
    conn.close()

    d2 = DaemonProc(tiny_bundle, cam.endpoint, db).wait_ready()
    try:
        stream(d2, 100, 10, kill_after=None)
    finally:
        assert d2.stop() == 0
    assert len(received) > n1
    conn = connect(db, readonly=True)
    stored = frame_keys(conn, "K")
    cell_ids = {r["id"] for r in conn.execute("SELECT id FROM cells")}
    for g in received:  # every flags message anyone received is in the database
        assert ("K", g["seq"], g["t_ns"]) in stored
        assert {c["id"] for c in g["cells"]} <= cell_ids
    new_tracks = {c["track"] for g in received[n1:] for c in g["cells"]}
    assert new_tracks and min(new_tracks) > max_track_1  # the restarted daemon does not reuse track ids
    assert received[-1]["counts"] == {k: v for k, v in sorted(
        {r["label"]: r["n"] for r in conn.execute("SELECT label, COUNT(*) AS n FROM cells WHERE slide='K' GROUP BY label")}.items())}


# ---- systemd ----

def test_watchdog_pings_arrive_on_notify_socket_and_sigterm_drains(tiny_bundle, slide_image, ctx, tmp_path):
    sock_dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # AF_UNIX paths must be short
    path = os.path.join(sock_dir, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(60)
    cam = Camera(ctx)
    d = DaemonProc(tiny_bundle, cam.endpoint, tmp_path / "n.db", ["--queue-size", "64"],
                   env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    try:
        msgs = []
        while sum(m.startswith("WATCHDOG=1") for m in msgs) < 3:
            msgs.append(notify.recv(4096).decode())
        assert msgs[0].startswith("READY=1") and any("STATUS=" in m for m in msgs[1:])
        d.wait_ready()
        sub = flags_socket(ctx, d.flags_ep)
        warm_up(cam, sub, window(slide_image, 0))
        base = d.metrics()["cytoedge_frames_received_total"]
        for i in range(20):
            cam.send(window(slide_image, i), i, slide="T")
        for _ in range(3000):  # SIGTERM once all 20 have arrived, while most are still queued
            if d.metrics()["cytoedge_frames_received_total"] >= base + 20:
                break
            time.sleep(0.01)
        rc = d.stop(signal.SIGTERM)
        assert rc == 0
        got = []
        sub.setsockopt(zmq.RCVTIMEO, 3000)
        while True:
            try:
                g = parse_flags(sub.recv_multipart())
            except zmq.Again:
                break
            if g["slide"] == "T":
                got.append(g["seq"])
        assert got == list(range(20))  # every frame received before SIGTERM was finished and published
        while not msgs[-1].startswith("STOPPING=1"):
            msgs.append(notify.recv(4096).decode())
    finally:
        d.stop()
        notify.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    conn = connect(tmp_path / "n.db", readonly=True)
    assert {s for _, s, _ in frame_keys(conn, "T")} == set(range(20))


# ---- start-up failures ----

def _start_fails(tmp_path, bundle, extra=()) -> str:
    cmd = [sys.executable, "-m", "edge.cli", "daemon", "--bundle", str(bundle), "--frames", "tcp://127.0.0.1:1",
           "--flags", "tcp://127.0.0.1:*", "--db", str(tmp_path / "x.db"), "--metrics-port", "-1", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def test_missing_bundle_stops_start_up(tmp_path):
    err = _start_fails(tmp_path, tmp_path / "no-such-bundle")
    assert "no-such-bundle" in err


def test_corrupt_bundle_stops_start_up(tiny_bundle, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    onnx = next(bad.glob("engine_*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    err = _start_fails(tmp_path, bad)
    assert onnx.name in err


def test_unknown_backend_or_config_key_stops_start_up(tiny_bundle, tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text('backend = "tpu"\n')
    assert "tpu" in _start_fails(tmp_path, tiny_bundle, ["--config", str(cfg)])
    cfg.write_text("queue_sise = 3\n")
    assert "queue_sise" in _start_fails(tmp_path, tiny_bundle, ["--config", str(cfg)])
