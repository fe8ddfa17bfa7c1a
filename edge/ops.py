"""Running under systemd: Prometheus metrics and health over HTTP, JSON logs, sd_notify, rate-limited warnings.

All stdlib. The HTTP server listens on loopback by default and serves ``/metrics`` (Prometheus text format
0.0.4) and ``/healthz`` (JSON; HTTP 200 when healthy, 503 otherwise). ``Notifier`` speaks the systemd
notify protocol over the AF_UNIX datagram socket named by ``NOTIFY_SOCKET`` and is a no-op without it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# Latency buckets, ms: camera-rate work lives between 1 and 200 ms.
MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


class Counter:
    """A monotonically increasing count, optionally with labels."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down (set, or read from a callback at scrape time)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        super().__init__(name, help)
        self.fn = fn

    def set(self, v: float) -> None:
        with self._lock:
            self._values[()] = float(v)

    def render(self) -> list[str]:
        if self.fn is not None:
            self.set(self.fn())
        return super().render()


class Histogram:
    """Observations in cumulative buckets, with labels (e.g. stage)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = MS_BUCKETS):
        self.name, self.help, self.label_names, self.buckets = name, help, labels, tuple(buckets)
        self._data: dict[tuple[str, ...], list] = {}
        self._lock = threading.Lock()

    def observe(self, v: float, *labels: str) -> None:
        with self._lock:
            d = self._data.setdefault(labels, [[0] * len(self.buckets), 0, 0.0])
            for i, b in enumerate(self.buckets):
                if v <= b:
                    d[0][i] += 1
            d[1] += 1
            d[2] += v

    def snapshot(self, *labels: str) -> tuple[int, float]:
        """-> (count, sum) for one label set."""
        with self._lock:
            d = self._data.get(labels)
            return (0, 0.0) if d is None else (d[1], d[2])

    def render(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted((k, ([*v[0]], v[1], v[2])) for k, v in self._data.items())
        for labels, (counts, n, total) in items:
            for b, c in zip(self.buckets, counts):
                out.append(f"{self.name}_bucket{_labels(self.label_names + ('le',), labels + (_fmt(b),))} {c}")
            out.append(f"{self.name}_bucket{_labels(self.label_names + ('le',), labels + ('+Inf',))} {n}")
            out.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, labels)} {n}")
        return out


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


class Registry:
    """The metrics of one process."""

    def __init__(self):
        self.metrics: list = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines = []
        for m in self.metrics:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (for tests and the latency benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


class OpsServer:
    """``/metrics`` and ``/healthz`` on a background thread. ``health()`` -> (ok, details dict)."""

    def __init__(self, registry: Registry, health: Callable[[], tuple[bool, dict]], host: str = "127.0.0.1", port: int = 0):
        registry_, health_ = registry, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] == "/metrics":
                    body, code, ctype = registry_.render().encode(), 200, "text/plain; version=0.0.4; charset=utf-8"
                elif self.path.split("?")[0] == "/healthz":
                    ok, details = health_()
                    body = json.dumps({"status": "ok" if ok else "unhealthy", **details}).encode()
                    code, ctype = (200 if ok else 503), "application/json"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not news
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ops-http", daemon=True)

    def start(self) -> "OpsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- logging ----

class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        obj.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    """Replace the root handlers with one JSON-lines handler on stderr (journald keeps each line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RateLimitedLog:
    """Log the first event of each kind at once, then at most one line per ``interval_s`` per kind, with
    the number of events suppressed since (a flood of bad messages costs a few log lines)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self.clock = logger, interval_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str) -> bool:
        """-> True if a line was written."""
        now = self.clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            suppressed = self._suppressed.pop(kind, 0)
            self._last[kind] = now
        self.logger.warning("%s%s", message, f" ({suppressed} more like it suppressed)" if suppressed else "",
                            extra={"fields": {"kind": kind, "suppressed": suppressed}})
        return True


# ---- systemd ----

class Notifier:
    """sd_notify: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1. A no-op when NOTIFY_SOCKET is unset."""

    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.sock: socket.socket | None = None
        self.address = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:  # systemd gone or socket full: the service keeps running
            logging.getLogger(__name__).debug("sd_notify failed: %s", exc)

    @staticmethod
    def watchdog_interval_s() -> float | None:
        """Half of WATCHDOG_USEC in seconds (when the watchdog is on and meant for this process), else None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
