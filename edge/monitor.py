"""The operator's monitor: a small local web app over the daemon's flags, the camera's frames and the database.

Threads
- feed: SUB on the camera's frames and on the daemon's flags (protocol v1). Keeps the last frames in a small
  ring; when the flags of a frame arrive it sends that very frame with its boxes to the page, at most
  ``frame_fps`` times a second (as the camera's JPEG, re-encoded only when the frame is not a JPEG or is
  large), and every flags message at full rate. New cells refresh the differential and the review queue
  from the database (the daemon commits before it publishes, so they are there); new abnormal or immature
  cells raise alerts. With no flags (daemon down) the raw frames are still shown.
- HTTP: stdlib ``ThreadingHTTPServer`` with ``edge.monitor_http.MonitorHandler``: the page, a JSON API,
  server-sent events (``/events``), the slide report and the reviewed cells.

Security: bound to 127.0.0.1 by default. Any other address needs a token (``MonitorConfig`` refuses to be
built without one); see ``edge.monitor_http`` for how requests are checked.
"""
from __future__ import annotations

import base64
import collections
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import cv2
import zmq

from edge.errors import ConfigError
from edge.monitor_http import MonitorHandler, is_loopback, public_cell, sse
from edge.monitor_report import (ALERT_LABELS, EXTRA_LABELS, active_session, differential, ensure_sessions, is_alert,
                                 slide_alerts)
from edge.protocol import (DEFAULT_FLAGS_ENDPOINT, DEFAULT_FRAMES_ENDPOINT, FLAGS_TOPIC, FRAME_TOPIC, Frame,
                           MessageError, decode_frame, encoded_size, parse_flags, parse_frame)
from edge.storage import connect, list_slides, review_queue

log = logging.getLogger("cytoedge.monitor")
DEFAULT_PORT = 8480


@dataclass(frozen=True)
class MonitorConfig:
    host: str = "127.0.0.1"  # any non-loopback address requires ``token``
    port: int = DEFAULT_PORT  # 0 = any free port
    token: str | None = None  # access token; required off loopback
    frames: str = DEFAULT_FRAMES_ENDPOINT  # camera PUB endpoint
    flags: str = DEFAULT_FLAGS_ENDPOINT  # daemon PUB endpoint
    db: str = ""  # the daemon's SQLite database; "" = $STATE_DIRECTORY/cytoedge.db under systemd, else ./cytoedge.db
    frame_fps: float = 3.0  # frames sent to the page per second (flags go at full rate)
    frame_max_side: int = 1024  # frames larger than this are downscaled for the page, px
    jpeg_quality: int = 80  # when a frame has to be re-encoded
    target: int = 100  # default differential size (100 or 200 white cells)
    live_timeout_s: float = 3.0  # camera/daemon shown as down after this long without messages

    def __post_init__(self):
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(f"refusing to listen on {self.host}: a non-loopback address needs an access token "
                              "(--token, at least 16 characters)")
        if self.token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,256}", self.token):
            raise ConfigError("the access token must be 16-256 characters from A-Z a-z 0-9 . _ ~ -")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if not 0.1 <= self.frame_fps <= 30:
            raise ConfigError(f"frame_fps must be in 0.1..30, got {self.frame_fps}")
        if not 10 <= self.target <= 10000:
            raise ConfigError(f"target must be in 10..10000 cells, got {self.target}")

    def db_path(self) -> Path:
        """The database file, resolved like the daemon's (same default, so both find the same file)."""
        if self.db:
            return Path(self.db)
        return Path(os.environ.get("STATE_DIRECTORY", ".").split(":")[0]) / "cytoedge.db"


class Db:
    """The monitor's one database connection, shared by its threads under a lock."""

    def __init__(self, path: str | Path):
        self.conn = connect(path)
        ensure_sessions(self.conn)
        self.lock = threading.Lock()

    def __call__(self, fn, *args, **kwargs):
        with self.lock:
            return fn(self.conn, *args, **kwargs)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


# ---- server-sent events ----

class Client:
    """One /events subscriber: a bounded queue of events plus a slot for the latest frame only (a slow page
    skips frames, never flags)."""

    def __init__(self, max_events: int = 512):
        self.cond = threading.Condition()
        self.events: collections.deque[str] = collections.deque(maxlen=max_events)
        self.frame: str | None = None
        self.closed = False

    def push(self, text: str, frame: bool = False) -> None:
        with self.cond:
            if frame:
                self.frame = text
            else:
                self.events.append(text)
            self.cond.notify()

    def take(self, timeout: float) -> list[str] | None:
        """Wait for events -> them (frame last), [] on timeout, None once closed."""
        with self.cond:
            if not self.events and self.frame is None and not self.closed:
                self.cond.wait(timeout)
            if self.closed:
                return None
            out = list(self.events)
            self.events.clear()
            if self.frame is not None:
                out.append(self.frame)
                self.frame = None
            return out

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()


class Hub:
    def __init__(self):
        self.lock = threading.Lock()
        self.clients: set[Client] = set()

    def add(self) -> Client:
        c = Client()
        with self.lock:
            self.clients.add(c)
        return c

    def remove(self, c: Client) -> None:
        with self.lock:
            self.clients.discard(c)

    def broadcast(self, event: str, data, frame: bool = False) -> None:
        text = sse(event, data)
        with self.lock:
            clients = list(self.clients)
        for c in clients:
            c.push(text, frame)

    def close_all(self) -> None:
        with self.lock:
            clients, self.clients = list(self.clients), set()
        for c in clients:
            c.close()


# ---- the ZeroMQ feed ----

class Feed:
    """Frames and flags in; events to the hub. Runs on its own thread (``run``) until ``stop``."""

    RING = 64  # frames kept to pair with their flags (6 s at 10 frames/s)

    def __init__(self, config: MonitorConfig, hub: Hub, db: Db, monitor: "Monitor", context: zmq.Context):
        self.cfg, self.hub, self.db, self.monitor, self.ctx = config, hub, db, monitor, context
        self.ring: collections.OrderedDict[tuple, Frame] = collections.OrderedDict()
        self.stopping = threading.Event()
        self.last_frame_ns = self.last_flags_ns = 0
        self.last_sent = 0.0
        self.camera_slide: str | None = None
        self.flags_slide: str | None = None
        self.latency_ms: float | None = None
        self.dropped = 0
        self.bad = collections.Counter()
        self.known: dict[str, tuple[str, str]] = {}  # cell id -> (label, state) already seen
        self.dirty = False
        self.error: str | None = None

    def stop(self) -> None:
        self.stopping.set()

    def status(self) -> dict:
        now = time.time_ns()
        live = self.cfg.live_timeout_s * 1e9
        return {"camera": now - self.last_frame_ns < live, "daemon": now - self.last_flags_ns < live,
                "camera_slide": self.camera_slide, "flags_slide": self.flags_slide,
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1), "dropped": self.dropped,
                "bad_messages": sum(self.bad.values()), "feed_error": self.error}

    def run(self) -> None:
        frames = self.ctx.socket(zmq.SUB)
        flags = self.ctx.socket(zmq.SUB)
        try:
            for s, ep, topic, hwm in ((frames, self.cfg.frames, FRAME_TOPIC, 16), (flags, self.cfg.flags, FLAGS_TOPIC, 10000)):
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.RCVHWM, hwm)
                s.setsockopt(zmq.SUBSCRIBE, topic)
                s.connect(ep)
            poller = zmq.Poller()
            poller.register(frames, zmq.POLLIN)
            poller.register(flags, zmq.POLLIN)
            last_status = 0.0
            while not self.stopping.is_set():
                ready = dict(poller.poll(100))
                if frames in ready:
                    self._drain(frames, self._on_frame)
                if flags in ready:
                    self._drain(flags, self._on_flags)
                now = time.monotonic()
                if self.dirty:
                    self.dirty = False
                    self.monitor.push_counts()
                if now - self.last_sent >= 1.0 / self.cfg.frame_fps and not self.status()["daemon"] and self.ring:
                    self._send_frame(next(reversed(self.ring.values())), None)  # daemon down: frames alone
                if now - last_status >= 1.0:
                    last_status = now
                    self.hub.broadcast("status", self.status())
        except (zmq.ZMQError, sqlite3.Error) as exc:  # the page shows the feed as stopped, with the reason
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("monitor feed stopped: %s", self.error)
            self.hub.broadcast("status", self.status())
        finally:
            frames.close()
            flags.close()

    def _drain(self, sock, handle) -> None:
        for _ in range(1000):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(parts)
            except MessageError as exc:
                if not self.bad[exc.kind]:
                    log.warning("skipping malformed message (%s): %s", exc.kind, exc)
                self.bad[exc.kind] += 1

    def _on_frame(self, parts) -> None:
        f = parse_frame(parts)
        self.last_frame_ns = time.time_ns()
        self.camera_slide = f.header.slide
        self.ring[(f.header.slide, f.header.seq, f.header.t_ns)] = f
        while len(self.ring) > self.RING:
            self.ring.popitem(last=False)

    def _on_flags(self, parts) -> None:
        msg = parse_flags(parts)
        self.last_flags_ns = time.time_ns()
        self.flags_slide, self.dropped = msg["slide"], msg["dropped"]
        self.latency_ms = (msg["t_done_ns"] - msg["t_ns"]) / 1e6
        cells = msg["cells"]
        self.hub.broadcast("flags", {"slide": msg["slide"], "seq": msg["seq"], "n_cells": len(cells),
                                     "latency_ms": round(self.latency_ms, 1), "dropped": msg["dropped"]})
        changed = [c for c in cells if self.known.get(c["id"]) != (c["label"], c["state"])]
        if len(self.known) > 100_000:  # bounded memory over a long day; at worst a cell is announced twice
            self.known.clear()
        for c in changed:
            new = c["id"] not in self.known
            self.known[c["id"]] = (c["label"], c["state"])
            if new and is_alert(c):
                self.hub.broadcast("alert", {**c, "slide": msg["slide"], "t_ns": msg["t_ns"]})
        if changed and msg["slide"] == self.monitor.current_slide():
            self.dirty = True
        f = self.ring.get((msg["slide"], msg["seq"], msg["t_ns"]))
        if f is not None and time.monotonic() - self.last_sent >= 1.0 / self.cfg.frame_fps:
            self._send_frame(f, cells)

    def _send_frame(self, f: Frame, cells: list | None) -> None:
        self.last_sent = time.monotonic()
        try:
            jpeg, w, h = self._page_jpeg(f)
        except MessageError as exc:
            self.bad[exc.kind] += 1
            return
        self.hub.broadcast("frame", {"slide": f.header.slide, "seq": f.header.seq, "t_ns": f.header.t_ns, "w": w, "h": h,
                                     "img": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"),
                                     "cells": cells}, frame=True)

    def _page_jpeg(self, f: Frame) -> tuple[bytes, int, int]:
        """A frame as the page gets it -> (JPEG bytes, width, height of the frame the boxes refer to)."""
        hd = f.header
        if hd.encoding == "jpeg":
            dims = encoded_size(f.payload, "jpeg")
            if dims is not None and max(dims) <= self.cfg.frame_max_side:
                return f.payload, dims[1], dims[0]
        rgb = decode_frame(f)
        h, w = rgb.shape[:2]
        k = min(1.0, self.cfg.frame_max_side / max(h, w))
        small = cv2.resize(rgb, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA) if k < 1 else rgb
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            raise MessageError("decode", "frame could not be re-encoded")
        return buf.tobytes(), w, h


# ---- the monitor ----

class Monitor:
    """The whole monitor in one object: ``start()`` (non-blocking), ``url``, ``stop()``."""

    def __init__(self, config: MonitorConfig, classes: list[str], context: zmq.Context | None = None):
        self.cfg, self.classes = config, list(classes)
        self.labels = self.classes + [x for x in EXTRA_LABELS if x not in self.classes]
        self.ctx = context or zmq.Context.instance()
        self.hub = Hub()
        self.db = Db(config.db_path())
        self.feed = Feed(config, self.hub, self.db, self, self.ctx)
        self.threads: list[threading.Thread] = []
        handler = type("Handler", (MonitorHandler,), {"monitor": self})
        try:
            self.httpd = ThreadingHTTPServer((config.host, config.port), handler)
        except OSError as exc:
            self.db.close()
            raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc} "
                              "(another monitor running? choose another --port)") from exc
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        u = f"http://{host}:{self.port}/"
        return u + f"?token={quote(self.cfg.token)}" if self.cfg.token else u

    def start(self) -> "Monitor":
        for name, target in (("monitor-feed", self.feed.run), ("monitor-http", self.httpd.serve_forever)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        log.info("monitor at %s (frames %s, flags %s, db %s)", self.url, self.cfg.frames, self.cfg.flags, self.cfg.db_path())
        return self

    def stop(self) -> None:
        self.feed.stop()
        self.hub.close_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self.threads:
            t.join(timeout=5)
        self.db.close()

    # -- state shared by the feed and the handlers --

    def current_slide(self) -> str | None:
        """The started slide, else the one the daemon is flagging, else the camera's, else the latest stored."""
        s = self.db(active_session)
        if s:
            return s["slide"]
        if self.feed.flags_slide or self.feed.camera_slide:
            return self.feed.flags_slide or self.feed.camera_slide
        slides = self.db(list_slides)
        return slides[0]["id"] if slides else None

    def target(self) -> int:
        s = self.db(active_session)
        return s["target"] if s else self.cfg.target

    def counts(self, slide: str | None) -> dict | None:
        return None if slide is None else self.db(differential, slide, self.classes, self.target())

    def review(self, slide: str | None, limit: int = 100) -> list[dict]:
        if slide is None:
            return []
        return [public_cell(c) for c in self.db(review_queue, slide, limit)]

    def push_counts(self) -> None:
        slide = self.current_slide()
        self.hub.broadcast("counts", self.counts(slide))
        self.hub.broadcast("review", {"slide": slide})

    def state(self) -> dict:
        slide = self.current_slide()
        return {"classes": self.classes, "labels": self.labels, "alert_labels": list(ALERT_LABELS),
                "target": self.target(), "session": self.db(active_session), "slide": slide,
                "counts": self.counts(slide), "review": self.review(slide), "status": self.feed.status(),
                "alerts": [] if slide is None else [public_cell(c) for c in self.db(slide_alerts, slide)[:50]]}
