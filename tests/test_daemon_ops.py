"""Operations helpers: Prometheus text, the HTTP endpoints, JSON logs, rate limiting, sd_notify on a real socket."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.request

import pytest

from edge.config import load_config
from edge.daemon import DaemonConfig, FrameQueue
from edge.errors import ConfigError
from edge.ops import (Counter, Gauge, Histogram, JsonFormatter, Notifier, OpsServer, RateLimitedLog, Registry,
                      parse_metrics)


def test_prometheus_text():
    r = Registry()
    c = r.add(Counter("x_total", "things", ("kind",)))
    g = r.add(Gauge("depth", "queue", lambda: 3))
    h = r.add(Histogram("lat_ms", "latency", ("stage",), buckets=(1, 10)))
    c.inc(2, "a")
    c.inc(1, 'b"q')
    for v in (0.5, 5, 50):
        h.observe(v, "infer")
    text = r.render()
    assert "# TYPE x_total counter" in text and "# TYPE lat_ms histogram" in text and "# TYPE depth gauge" in text
    m = parse_metrics(text)
    assert m['x_total{kind="a"}'] == 2 and m['x_total{kind="b\\"q"}'] == 1 and m["depth"] == 3
    assert m['lat_ms_bucket{stage="infer",le="1"}'] == 1 and m['lat_ms_bucket{stage="infer",le="10"}'] == 2
    assert m['lat_ms_bucket{stage="infer",le="+Inf"}'] == 3 and m['lat_ms_sum{stage="infer"}'] == 55.5
    assert h.snapshot("infer") == (3, 55.5) and c.total() == 3


def test_http_metrics_and_health():
    r = Registry()
    r.add(Counter("frames_total", "frames")).inc()
    state = {"ok": True}
    srv = OpsServer(r, lambda: (state["ok"], {"queue": 0})).start()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain") and b"frames_total 1" in resp.read()
        with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "ok", "queue": 0}
        state["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(base + "/healthz", timeout=10)
        assert ei.value.code == 503 and json.loads(ei.value.read())["status"] == "unhealthy"
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(base + "/nope", timeout=10)
        assert ei.value.code == 404
    finally:
        srv.stop()


def test_rate_limited_log_counts_what_it_suppresses():
    now = [0.0]
    buf = io.StringIO()
    logger = logging.getLogger("test.ratelimit")
    logger.handlers[:] = [logging.StreamHandler(buf)]
    logger.handlers[0].setFormatter(JsonFormatter())
    logger.propagate = False
    rl = RateLimitedLog(logger, interval_s=10, clock=lambda: now[0])
    written = [rl.warning("json", "bad json") for _ in range(1000)]
    assert written.count(True) == 1
    assert rl.warning("version", "bad version")  # another kind is not held back
    now[0] = 11.0
    assert rl.warning("json", "bad json")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["kind"] for x in lines] == ["json", "version", "json"]
    assert lines[2]["suppressed"] == 999 and "999 more" in lines[2]["msg"] and lines[0]["level"] == "warning"


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_on_a_real_datagram_socket(abstract, monkeypatch):
    d = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    recv.settimeout(10)
    if abstract:
        name = f"cytoedge-test-{os.getpid()}"
        recv.bind("\0" + name)
        address = "@" + name
    else:
        address = os.path.join(d, "notify")
        recv.bind(address)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        n = Notifier()
        assert n.enabled
        n.notify("READY=1", "STATUS=hello")
        n.notify("WATCHDOG=1")
        assert recv.recv(1024) == b"READY=1\nSTATUS=hello" and recv.recv(1024) == b"WATCHDOG=1"
        n.close()
    finally:
        recv.close()
        shutil.rmtree(d, ignore_errors=True)


def test_sd_notify_is_a_no_op_off_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.notify("READY=1")  # nothing to send to, nothing raised
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.watchdog_interval_s() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert Notifier.watchdog_interval_s() is None


def test_frame_queue_drops_the_oldest():
    q = FrameQueue(3)
    assert [q.put(i) for i in range(5)] == [False, False, False, True, True]
    assert [q.get(0) for _ in range(4)] == [2, 3, 4, None]


def test_daemon_config_from_toml_with_overrides(tmp_path, monkeypatch):
    p = tmp_path / "d.toml"
    p.write_text('frames = "tcp://10.0.0.2:5555"\nmax_batch = 32\nmax_wait_ms = 2\n')
    c = load_config(DaemonConfig, p, {"max_batch": 8, "db": None})
    assert (c.frames, c.max_batch, c.max_wait_ms, c.backend) == ("tcp://10.0.0.2:5555", 8, 2.0, "onnxruntime")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert c.db_path() == tmp_path / "state" / "cytoedge.db"
    for bad in ('max_batch = "8"\n', "queue_size = 0\n", "nope = 1\n", 'log_format = "xml"\n'):
        p.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(DaemonConfig, p)
