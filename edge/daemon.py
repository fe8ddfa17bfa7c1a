"""The edge daemon: frames in over ZeroMQ, cells found, tracked and classified, stored, flags out.

Threads
- receiver: SUB socket -> ``parse_frame`` (cheap checks) -> bounded queue. When the queue is full the
  oldest frame is dropped and counted. Gaps in ``seq`` within a slide (frames lost before they reached us)
  are counted as dropped too.
- worker: decode -> detect -> track -> crop (``edge.preprocess.normalise_cell`` on a window around each
  new cell) -> micro-batch across frames (``max_batch`` cells or ``max_wait_ms``) -> ``backend.infer`` ->
  ``edge.postprocess.decide`` -> store and commit -> PUB flags, one message per frame, in frame order.
- ops: HTTP ``/metrics`` and ``/healthz`` on loopback; the systemd watchdog pinger (pings only while the
  worker makes progress).

A frame's records are committed before its flags are published (nothing published is lost to a crash).
``stop()`` (SIGTERM) stops the receiver, lets the worker finish every frame already received, then returns.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from edge.errors import ConfigError
from edge.detect import DetectConfig, ScaleEstimator, detect_cells
from edge.ops import Counter, Gauge, Histogram, Notifier, OpsServer, RateLimitedLog, Registry
from edge.postprocess import decide
from edge.preprocess import crop_around, normalise_cell
from edge.protocol import (DEFAULT_FLAGS_ENDPOINT, DEFAULT_FRAMES_ENDPOINT, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PIXELS,
                           MAX_HEADER_BYTES, Frame, MessageError, decode_frame, encode_flags, parse_frame)
from edge.storage import Store, label_counts, max_track
from edge.track import TrackConfig, Tracker

log = logging.getLogger("cytoedge.daemon")
WINDOW_PX = 192  # largest side of the window handed to normalise_cell, px
MAX_SEQ_GAP = 10000  # a larger jump in seq is a publisher restart, not frames lost


def cell_crop(rgb: np.ndarray, det, window: float, size: int) -> np.ndarray:
    """The model's crop of one detected cell: uint8 RGB frame [H, W, 3], a Detection, the window factor (window
    side / detection box side, around the nucleus centre) -> uint8 [size, size, 3] from ``normalise_cell``."""
    cx, cy, _ = det.nucleus
    side = max(det.box[2] - det.box[0], det.box[3] - det.box[1]) * window
    # At most WINDOW_PX across: normalise_cell works on a ~160 px copy anyway, and the model was trained on
    # crops made from images of that size.
    win = crop_around(rgb, cx, cy, side, max(8, min(int(round(side)), WINDOW_PX)))
    return normalise_cell(win, size=size).crop


@dataclass(frozen=True)
class DaemonConfig:
    """One daemon process. TOML (``[daemon]`` table or top level) and CLI options map onto these fields."""

    frames: str = DEFAULT_FRAMES_ENDPOINT  # camera PUB endpoint to connect to
    flags: str = DEFAULT_FLAGS_ENDPOINT  # endpoint to bind the flags PUB socket on ("tcp://127.0.0.1:*": any port)
    db: str = ""  # SQLite path; "" = $STATE_DIRECTORY/cytoedge.db under systemd, else ./cytoedge.db
    bundle: str | None = None  # model bundle folder; None = the bundle shipped in the package
    backend: str = "onnxruntime"  # onnxruntime | tensorrt (never falls back)
    precision: str | None = None  # backend precision; None = the bundle's default
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # /metrics and /healthz; 0 = any free port, -1 = off
    queue_size: int = 8  # frames waiting for the worker; beyond it the oldest is dropped
    rcvhwm: int = 8  # ZeroMQ receive high-water mark, messages
    max_batch: int = 16  # cells per inference call
    max_wait_ms: float = 5.0  # longest a cell waits for others to fill a batch
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    um_per_px: float | None = None  # scale of the camera when frames do not carry it (else measured)
    scale_every: int = 10  # measure the red-cell ruler on every Nth frame of a slide (pooled per slide)
    views_per_track: int = 1  # classifications pooled per physical cell (mean of engine outputs)
    # crop window side / detection box side, around the nucleus centre. The model crop spans the nucleus group
    # / NUCLEUS_FILL = 2.4 nucleus diameters, about 2 cell diameters: a smaller window would be padded.
    window: float = 2.4
    synchronous: str = "FULL"  # SQLite durability: FULL survives power loss, NORMAL only process crashes
    timing: bool = True  # add the optional "timing_ms" field to flags
    log_format: str = "json"  # json | text
    bad_log_interval_s: float = 10.0  # at most one log line per malformed-message kind per interval
    stall_s: float = 10.0  # health fails when the worker has made no progress for this long

    def __post_init__(self):
        checks = [(self.queue_size >= 1, "queue_size >= 1"), (self.max_batch >= 1, "max_batch >= 1"),
                  (self.max_wait_ms >= 0, "max_wait_ms >= 0"), (self.rcvhwm >= 1, "rcvhwm >= 1"),
                  (self.views_per_track >= 1, "views_per_track >= 1"), (self.scale_every >= 1, "scale_every >= 1"),
                  (self.max_payload_bytes >= 1024, "max_payload_bytes >= 1024"), (self.window >= 1.0, "window >= 1"),
                  (-1 <= self.metrics_port <= 65535, "metrics_port in -1..65535"),
                  (self.um_per_px is None or self.um_per_px > 0, "um_per_px > 0"),
                  (self.log_format in ("json", "text"), "log_format json or text"),
                  (self.synchronous in ("NORMAL", "FULL", "EXTRA"), "synchronous NORMAL, FULL or EXTRA")]
        bad = [what for ok, what in checks if not ok]
        if bad:
            raise ConfigError(f"DaemonConfig: need {', '.join(bad)}")

    def db_path(self) -> Path:
        if self.db:
            return Path(self.db)
        return Path(os.environ.get("STATE_DIRECTORY", ".").split(":")[0]) / "cytoedge.db"


class Metrics:
    """The daemon's Prometheus metrics."""

    def __init__(self, queue_depth, last_frame_age):
        r = self.registry = Registry()
        self.frames_in = r.add(Counter("cytoedge_frames_received_total", "Messages received on the frames socket"))
        self.processed = r.add(Counter("cytoedge_frames_processed_total", "Frames processed and flagged"))
        self.dropped = r.add(Counter("cytoedge_frames_dropped_total",
                                     "Frames not processed: queue overflow (oldest dropped) or lost before arrival (seq gaps)",
                                     ("reason",)))
        self.bad = r.add(Counter("cytoedge_bad_messages_total", "Malformed messages skipped, by kind", ("kind",)))
        self.resets = r.add(Counter("cytoedge_frames_disconnects_total",
                                    "Frames connection lost (publisher gone or a message over the transport limit)"))
        self.cells = r.add(Counter("cytoedge_cells_total", "Unique cells classified, by state", ("state",)))
        self.edge_cells = r.add(Counter("cytoedge_edge_detections_total", "Detections cut by the frame edge (not classified)"))
        self.inferred = r.add(Counter("cytoedge_cells_inferred_total", "Cell crops sent through the backend"))
        self.batches = r.add(Counter("cytoedge_batches_total", "Backend calls"))
        self.stage_ms = r.add(Histogram("cytoedge_stage_ms", "Time per stage, ms (infer: per batch)", ("stage",)))
        self.latency_ms = r.add(Histogram("cytoedge_frame_latency_ms", "Capture (t_ns) to flags published, ms"))
        self.queue = r.add(Gauge("cytoedge_queue_depth", "Frames waiting for the worker", queue_depth))
        self.age = r.add(Gauge("cytoedge_last_frame_age_seconds", "Seconds since the last frame was processed", last_frame_age))

    def dropped_total(self) -> int:
        return int(self.dropped.total())


class FrameQueue:
    """Bounded FIFO; a put on a full queue drops the oldest item and says so."""

    def __init__(self, size: int):
        self.items: collections.deque = collections.deque()
        self.size = size
        self.cond = threading.Condition()

    def put(self, item) -> bool:
        """-> True when an older item was dropped to make room."""
        with self.cond:
            dropped = len(self.items) >= self.size
            if dropped:
                self.items.popleft()
            self.items.append(item)
            self.cond.notify()
            return dropped

    def get(self, timeout: float):
        """-> the oldest item, or None after ``timeout`` seconds."""
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            return self.items.popleft() if self.items else None

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class SlideState:
    """What the worker knows about the slide in view."""

    id: str
    tracker: Tracker
    counts: dict[str, int]
    scale: ScaleEstimator = field(default_factory=ScaleEstimator)
    frames: int = 0


@dataclass
class Pending:
    """A frame between detection and publication. cells: [(track, detection)] in view; new: tracks
    whose crops await inference in this frame; timing: ms per stage."""

    frame: Frame
    slide: SlideState
    cells: list
    new: list = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


class Daemon:
    """Wire a bundle and a backend to the sockets, the store and the metrics. ``run()`` blocks."""

    def __init__(self, config: DaemonConfig, bundle, backend, context: zmq.Context | None = None):
        self.config = config
        self.bundle = bundle
        self.backend = backend
        self.classes = list(bundle.classes)
        self.crop_size = int(bundle.crop_size)
        self.ctx = context or zmq.Context.instance()
        self.queue = FrameQueue(config.queue_size)
        self.stop_event = threading.Event()
        self.receiver_done = threading.Event()
        self.started = time.monotonic()
        self.heartbeat = time.monotonic()
        self.last_frame = 0.0
        self.metrics = Metrics(lambda: len(self.queue),
                               lambda: time.monotonic() - self.last_frame if self.last_frame else -1.0)
        self.badlog = RateLimitedLog(log, config.bad_log_interval_s)
        self.notifier = Notifier()
        self.detect_config = DetectConfig()
        self.slide: SlideState | None = None
        self.last_seq: dict[str, int] = {}
        self.store = Store(config.db_path(), config.synchronous)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 2000)  # let the last flags leave on shutdown
        self.pub.setsockopt(zmq.SNDHWM, 1000)
        self.ops: OpsServer | None = None
        try:
            self.pub.bind(config.flags)
            if config.metrics_port >= 0:
                self.ops = OpsServer(self.metrics.registry, self.health, config.metrics_host, config.metrics_port)
        except (zmq.ZMQError, OSError) as exc:
            self.pub.close(linger=0)
            self.store.close()
            what = f"flags endpoint {config.flags}" if isinstance(exc, zmq.ZMQError) else \
                f"metrics port {config.metrics_host}:{config.metrics_port}"
            raise ConfigError(f"cannot listen on {what}: {exc}") from exc

    # ---- control ----

    def stop(self) -> None:
        """Ask for a drained shutdown (safe from a signal handler)."""
        self.stop_event.set()

    def health(self) -> tuple[bool, dict]:
        now = time.monotonic()
        stalled = now - self.heartbeat > self.config.stall_s
        receiving = not self.receiver_done.is_set() or self.stop_event.is_set()
        m = self.metrics
        return (not stalled and receiving), {
            "uptime_s": round(now - self.started, 1), "frames_received": int(m.frames_in.value()),
            "frames_processed": int(m.processed.value()), "dropped": m.dropped_total(),
            "bad_messages": int(m.bad.total()), "queue_depth": len(self.queue), "worker_stalled": stalled,
            "receiver_running": not self.receiver_done.is_set(), "backend": self.backend.name,
            "precision": getattr(self.backend, "precision", None), "bundle_id": self.bundle.bundle_id,
            "slide": self.slide.id if self.slide else None,
        }

    def run(self) -> int:
        """Serve until ``stop()``; drain what was received; return 0."""
        if self.ops is not None:
            self.ops.start()
        recv = threading.Thread(target=self._receive, name="receiver", daemon=True)
        recv.start()
        watchdog = threading.Thread(target=self._watchdog, name="watchdog", daemon=True)
        watchdog.start()
        log.info("daemon ready", extra={"fields": {
            "frames": self.config.frames, "flags": self.pub.getsockopt_string(zmq.LAST_ENDPOINT), "db": str(self.store.path),
            "metrics_port": self.ops.port if self.ops else None, "backend": self.backend.name,
            "precision": getattr(self.backend, "precision", None), "bundle_id": self.bundle.bundle_id}})
        self.notifier.notify("READY=1", "STATUS=waiting for frames")
        try:
            self._work()
        finally:
            self.notifier.notify("STOPPING=1", "STATUS=stopped")
            recv.join(timeout=5)
            self.pub.close()
            self.store.close()
            if self.ops is not None:
                self.ops.stop()
            self.notifier.close()
            log.info("daemon stopped", extra={"fields": {"frames_processed": int(self.metrics.processed.value()),
                                                         "dropped": self.metrics.dropped_total()}})
        return 0

    # ---- receiver thread ----

    def _subscribe(self) -> tuple[zmq.Socket, zmq.Socket]:
        c = self.config
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, c.rcvhwm)
        # Transport guard: a message part over twice the payload limit makes ZeroMQ drop the connection before
        # the part is allocated (memory stays bounded whatever a peer sends); parts between the limit and
        # that are received, counted as payload_size and skipped.
        sub.setsockopt(zmq.MAXMSGSIZE, 2 * c.max_payload_bytes + MAX_HEADER_BYTES)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # everything, so malformed topics are counted too
        monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sub.connect(c.frames)
        return sub, monitor

    def _receive(self) -> None:
        sub, monitor = self._subscribe()
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                ready = dict(poller.poll(100))
                if sub in ready:
                    self._drain(sub)
                if monitor in ready and self._disconnected(monitor):
                    # ZeroMQ does not reconnect after a protocol error (an oversized message): start afresh.
                    # A camera that merely restarted costs nothing more than a new connection.
                    self._drain(sub)
                    poller.unregister(sub)
                    poller.unregister(monitor)
                    sub.disable_monitor()
                    monitor.close()
                    sub.close()
                    sub, monitor = self._subscribe()
                    poller.register(sub, zmq.POLLIN)
                    poller.register(monitor, zmq.POLLIN)
            self._drain(sub)  # frames that arrived before the stop are in flight: keep them
        finally:
            sub.disable_monitor()
            monitor.close()
            sub.close()
            self.receiver_done.set()
            with self.queue.cond:
                self.queue.cond.notify_all()

    def _disconnected(self, monitor: zmq.Socket) -> bool:
        from zmq.utils.monitor import recv_monitor_message
        seen = False
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return seen
            if event["event"] == zmq.EVENT_DISCONNECTED:
                seen = True
                self.metrics.resets.inc()
                self.badlog.warning("disconnected", "frames connection lost (publisher gone, or a message over "
                                                    "the transport limit); reconnecting")

    def _drain(self, sub: zmq.Socket) -> None:
        while True:
            try:
                parts = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._accept(parts)

    def _accept(self, parts: list[bytes]) -> None:
        m = self.metrics
        m.frames_in.inc()
        try:
            frame = parse_frame(parts, self.config.max_payload_bytes, self.config.max_pixels)
        except MessageError as exc:
            m.bad.inc(1, exc.kind)
            self.badlog.warning(exc.kind, f"skipped a malformed frame message: {exc}")
            return
        hd = frame.header
        last = self.last_seq.get(hd.slide)
        if last is not None and last + 1 < hd.seq <= last + MAX_SEQ_GAP:
            m.dropped.inc(hd.seq - last - 1, "lost")
        self.last_seq[hd.slide] = hd.seq  # a lower seq: the publisher restarted; follow it
        if len(self.last_seq) > 10000:  # bounded: forget the oldest slides
            self.last_seq.pop(next(iter(self.last_seq)))
        if self.queue.put(frame):
            m.dropped.inc(1, "queue")
            self.badlog.warning("queue_full", "worker behind: dropped the oldest queued frame")

    # ---- watchdog thread ----

    def _watchdog(self) -> None:
        interval = Notifier.watchdog_interval_s()
        if interval is None or not self.notifier.enabled:
            return
        while not self.stop_event.wait(interval):
            if time.monotonic() - self.heartbeat < max(2 * interval, 1.0):
                m = self.metrics
                self.notifier.notify("WATCHDOG=1", f"STATUS={int(m.processed.value())} frames processed, "
                                                   f"{m.dropped_total()} dropped, {int(m.cells.total())} cells")

    # ---- worker ----

    def _work(self) -> None:
        c = self.config
        pending: list[Pending] = []
        deadline = None
        while True:
            self.heartbeat = time.monotonic()
            n_new = sum(len(p.new) for p in pending)
            if pending and (n_new == 0 or n_new >= c.max_batch or time.monotonic() >= deadline):
                self._flush(pending)
                pending, deadline = [], None
                continue
            timeout = 0.1 if not pending else max(0.0, deadline - time.monotonic())
            frame = self.queue.get(timeout)
            if frame is None:
                if self.stop_event.is_set() and self.receiver_done.is_set() and not len(self.queue):
                    if pending:
                        self._flush(pending)
                    return
                continue
            p = self._front(frame)
            if p is not None:
                pending.append(p)
                if p.new and deadline is None:
                    deadline = time.monotonic() + c.max_wait_ms / 1e3

    def _slide_state(self, slide: str) -> SlideState:
        if self.slide is None or self.slide.id != slide:
            conn = self.store.conn
            self.slide = SlideState(id=slide, tracker=Tracker(TrackConfig(), first_id=max_track(conn, slide) + 1),
                                    counts=label_counts(conn, slide))
        return self.slide

    def _front(self, frame: Frame) -> Pending | None:
        """Decode, detect, track, crop. None when the frame cannot be decoded (counted, logged)."""
        c, m, hd = self.config, self.metrics, frame.header
        timing = {}
        t0 = time.perf_counter()
        try:
            rgb = decode_frame(frame, c.max_pixels)
        except MessageError as exc:
            m.bad.inc(1, exc.kind)
            self.badlog.warning(exc.kind, f"skipped frame seq {hd.seq} of slide {hd.slide!r}: {exc}")
            return None
        t1 = time.perf_counter()
        slide = self._slide_state(hd.slide)
        um = hd.um_per_px or c.um_per_px
        if um is None:
            if slide.frames % c.scale_every == 0 or len(slide.scale.values) < 3:
                slide.scale.update(rgb)
            um = float(np.median(slide.scale.values)) if slide.scale.values else None
        slide.frames += 1
        dets = detect_cells(rgb, um_per_px=um, config=self.detect_config)
        t2 = time.perf_counter()
        pairs = slide.tracker.update(rgb, dets)
        t3 = time.perf_counter()
        p = Pending(frame=frame, slide=slide, cells=pairs)
        for track, det in pairs:
            if det.edge:
                m.edge_cells.inc()
                continue
            st = track.state
            if st.get("views", 0) + st.get("queued", 0) >= c.views_per_track:
                continue
            crop = cell_crop(rgb, det, c.window, self.crop_size)
            st["queued"] = st.get("queued", 0) + 1
            p.new.append((track, det, crop))
        t4 = time.perf_counter()
        timing.update(decode=(t1 - t0) * 1e3, detect=(t2 - t1) * 1e3, track=(t3 - t2) * 1e3, preprocess=(t4 - t3) * 1e3)
        for k, v in timing.items():
            m.stage_ms.observe(v, k)
        p.timing = timing
        return p

    def _flush(self, pending: list[Pending]) -> None:
        """Infer every queued crop, decide; then store all the frames in one commit and publish them in order."""
        m, c = self.metrics, self.config
        todo = [(p, track, det, crop) for p in pending for track, det, crop in p.new]
        rows: dict[int, list[dict]] = {id(p): [] for p in pending}  # cell records first decided in each frame
        infer_ms = post_ms = 0.0
        if todo:
            outs = {"logits": [], "errors": [], "anomaly": []}
            t0 = time.perf_counter()
            for i in range(0, len(todo), c.max_batch):
                chunk = np.stack([crop for _, _, _, crop in todo[i:i + c.max_batch]]).transpose(0, 3, 1, 2)
                o = self.backend.infer(np.ascontiguousarray(chunk))
                for k in outs:
                    outs[k].append(np.asarray(o[k], np.float32))
                m.batches.inc()
            infer_ms = (time.perf_counter() - t0) * 1e3
            m.stage_ms.observe(infer_ms, "infer")
            m.inferred.inc(len(todo))
            t1 = time.perf_counter()
            outs = {k: np.concatenate(v) for k, v in outs.items()}
            # Pool views per track: the mean of the engine outputs over the views so far.
            pooled = {k: np.empty_like(v) for k, v in outs.items()}
            for i, (_, track, _, _) in enumerate(todo):
                st = track.state
                st["views"] = st.get("views", 0) + 1
                st["queued"] -= 1
                for k in pooled:
                    st["sum_" + k] = st.get("sum_" + k, 0.0) + outs[k][i]
                    pooled[k][i] = st["sum_" + k] / st["views"]
            for (p, track, det, crop), d in zip(todo, decide(pooled, self.classes, self.bundle.calibration)):
                st, counts = track.state, p.slide.counts
                old = st.get("decision")
                if old is None:
                    counts[d.label] = counts.get(d.label, 0) + 1
                    m.cells.inc(1, d.state)
                elif old.label != d.label:
                    counts[old.label] -= 1
                    counts[d.label] = counts.get(d.label, 0) + 1
                st["decision"] = d
                rows[id(p)].append({"id": f"{p.slide.id}#{track.id}", "slide": p.slide.id, "track": track.id,
                                    "frame_seq": p.frame.header.seq, "t_ns": p.frame.header.t_ns, "box": list(det.box),
                                    "label": d.label, "p": d.p, "probs": d.probs, "state": d.state,
                                    "anomaly": d.anomaly, "reason": d.reason, "bundle_id": self.bundle.bundle_id,
                                    "views": st["views"], "crop": crop})
            post_ms = (time.perf_counter() - t1) * 1e3
            m.stage_ms.observe(post_ms, "post")

        t0 = time.perf_counter()
        dropped = m.dropped_total()
        records, messages = [], []
        for p in pending:
            hd = p.frame.header
            cells = []
            for track, det in p.cells:
                d = track.state.get("decision")
                if d is not None:
                    cells.append({"id": f"{p.slide.id}#{track.id}", "track": track.id, "box": list(det.box),
                                  "label": d.label, "p": round(d.p, 6), "state": d.state,
                                  "anomaly": round(float(d.anomaly), 6)})
            t_done = time.time_ns()
            records.append(({"slide": hd.slide, "seq": hd.seq, "t_ns": hd.t_ns, "t_done_ns": t_done,
                             "cell_ids": [x["id"] for x in cells], "dropped": dropped,
                             "bundle_id": self.bundle.bundle_id}, rows[id(p)]))
            flags: dict[str, Any] = {"seq": hd.seq, "slide": hd.slide, "t_ns": hd.t_ns, "t_done_ns": t_done,
                                     "cells": cells, "counts": {k: v for k, v in sorted(p.slide.counts.items()) if v > 0},
                                     "dropped": dropped}
            if c.timing:
                flags["timing_ms"] = {k: round(v, 3) for k, v in
                                      {**p.timing, "infer": infer_ms if p.new else 0.0,
                                       "post": post_ms if p.new else 0.0}.items()}
            messages.append(flags)
        self.store.commit_frames(records)  # durable before anything is published
        t1 = time.perf_counter()
        store_ms = (t1 - t0) * 1e3
        m.stage_ms.observe(store_ms, "store")
        for flags in messages:
            if c.timing:
                flags["timing_ms"]["store"] = round(store_ms, 3)
            self.pub.send_multipart(encode_flags(flags))
            m.processed.inc()
            m.latency_ms.observe((time.time_ns() - flags["t_ns"]) / 1e6)
        m.stage_ms.observe((time.perf_counter() - t1) * 1e3, "publish")
        self.last_frame = time.monotonic()
