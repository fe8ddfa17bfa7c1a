"""The monitor's HTTP side: routes, access checks, server-sent events. The state lives in ``edge.monitor``.

Routes (GET unless said): ``/`` the page and ``/static/<file>`` its assets (``edge/monitor_static``);
``/events`` server-sent events (hello, frame, flags, counts, review, alert, slide, status); ``/api/state``,
``/api/slides``, ``/api/review``, ``/api/cells``, ``/api/cell?id=``, ``/api/crop?id=`` (PNG);
``/report?slide=`` (printable HTML), ``/report.csv?slide=``, ``/export.zip?slide=`` (reviewed cells as class
folders); POST ``/api/decision``, ``/api/slide/start``, ``/api/slide/stop`` (JSON bodies); ``/healthz``.

Access: with a token configured every request must carry it (``?token=`` once, which sets an HttpOnly
SameSite=Strict cookie; or ``Authorization: Bearer``), else 401. Without a token the Host header must name
the loopback (a web page elsewhere cannot reach the monitor through DNS rebinding). POSTs must be
``application/json`` (a cross-site form cannot send that without a CORS preflight, which is never granted)
and, when the browser sends an Origin, from the page's own origin.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import mimetypes
import sqlite3
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edge.errors import InputError
from edge.monitor_report import render_report_html, report_csv, report_data, reviewed_zip, start_slide, stop_slide
from edge.storage import DECISIONS, cell_crop, get_cell, list_slides, record_decision, slide_cells

log = logging.getLogger("cytoedge.monitor")
STATIC = Path(__file__).resolve().parent / "monitor_static"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def public_cell(c: dict) -> dict:
    """A cell as the page needs it: no probabilities beyond the top 3."""
    top = sorted(c["probs"].items(), key=lambda kv: -kv[1])[:3]
    keep = ("id", "slide", "track", "t_ns", "box", "label", "p", "state", "anomaly", "reason", "has_crop", "decision",
            "final_label", "operator")
    return {**{k: c.get(k) for k in keep}, "top": [[k, round(v, 4)] for k, v in top]}


class MonitorHandler(BaseHTTPRequestHandler):
    monitor: "Monitor"  # set on the subclass the Monitor creates
    server_version = "cytoedge-monitor"

    def log_message(self, fmt, *args):  # requests are routine; debug only
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- plumbing --

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _token_given(self, query: dict) -> str | None:
        if "token" in query:
            return query["token"][0]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:].strip()
        for part in self.headers.get("Cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "cytoedge_token":
                return v
        return None

    def _allowed(self, query: dict) -> bool:
        """Token check (when configured), else a loopback Host header. Sends 401/403 and returns False."""
        token = self.monitor.cfg.token
        if token:
            given = self._token_given(query)
            if given is None or not hmac.compare_digest(given.encode(), token.encode()):
                self._send(401, b"401 Unauthorized: this monitor needs its access token; open the URL printed at "
                           b"start-up (it ends in ?token=...)\n", "text/plain; charset=utf-8",
                           {"WWW-Authenticate": 'Bearer realm="cytoedge-monitor"'})
                return False
            return True
        host = urlsplit("//" + (self.headers.get("Host") or "127.0.0.1")).hostname or ""
        if not is_loopback(host):
            self._send(403, b"403 Forbidden: this monitor answers loopback names only\n", "text/plain; charset=utf-8")
            return False
        return True

    def _route(self):
        u = urlsplit(self.path)
        return u.path, parse_qs(u.query)

    # -- GET --

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path, q = self._route()
        if not self._allowed(q):
            return
        m = self.monitor
        arg = lambda name: (q.get(name) or [None])[0]  # noqa: E731
        try:
            if path in ("/", "/index.html"):
                headers = {}
                if m.cfg.token and "token" in q:
                    headers["Set-Cookie"] = f"cytoedge_token={m.cfg.token}; HttpOnly; SameSite=Strict; Path=/"
                self._send(200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8", headers)
            elif path.startswith("/static/"):
                self._static(path[len("/static/"):])
            elif path == "/events":
                self._events()
            elif path == "/api/state":
                self._json(m.state())
            elif path == "/api/slides":
                self._json(m.db(list_slides))
            elif path == "/api/review":
                self._json(m.review(arg("slide") or m.current_slide()))
            elif path == "/api/cells":
                slide = arg("slide") or m.current_slide()
                self._json([] if slide is None else [public_cell(c) for c in m.db(slide_cells, slide)])
            elif path == "/api/cell":
                c = m.db(get_cell, arg("id") or "")
                self._json(c) if c else self._error(404, "no such cell")
            elif path == "/api/crop":
                png = m.db(cell_crop, arg("id") or "")
                self._send(200, png, "image/png") if png else self._error(404, "no crop stored for this cell")
            elif path in ("/report", "/report.csv"):
                slide = arg("slide") or m.current_slide()
                if slide is None:
                    return self._error(404, "no slide yet")
                rep = m.db(report_data, slide, m.classes, m.cfg.target)
                if path == "/report":
                    self._send(200, render_report_html(rep).encode(), "text/html; charset=utf-8")
                else:
                    self._send(200, m.db(lambda conn: report_csv(rep, conn)).encode(), "text/csv; charset=utf-8",
                               {"Content-Disposition": f'attachment; filename="{_safe(slide)}-report.csv"'})
            elif path == "/export.zip":
                slide = arg("slide")
                data = m.db(reviewed_zip, m.classes, slide)
                name = f"{_safe(slide)}-reviewed.zip" if slide else "reviewed.zip"
                self._send(200, data, "application/zip", {"Content-Disposition": f'attachment; filename="{name}"'})
            elif path == "/healthz":
                self._json({"ok": True, **m.feed.status()})
            else:
                self._error(404, f"no such page: {path}")
        except InputError as exc:
            self._error(404, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _static(self, name: str) -> None:
        f = STATIC / name
        if "/" in name or name.startswith(".") or not f.is_file():
            return self._error(404, "no such file")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, f.read_bytes(), ctype)

    def _events(self) -> None:
        m = self.monitor
        client = m.hub.add()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n" + sse("hello", m.state()).encode())
            self.wfile.flush()
            while True:
                events = client.take(timeout=15.0)
                if events is None:
                    return
                self.wfile.write("".join(events).encode() if events else b": ping\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            return
        finally:
            m.hub.remove(client)

    # -- POST --

    def do_POST(self):  # noqa: N802
        path, q = self._route()
        if not self._allowed(q):
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._error(415, "POST bodies must be application/json")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            return self._error(403, "cross-origin request refused")
        try:
            n = int(self.headers.get("Content-Length", "0"))
            if not 0 <= n <= 65536:
                return self._error(413, "request body too large")
            body = json.loads(self.rfile.read(n) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return self._error(400, f"body is not a JSON object: {exc}")
        m = self.monitor
        try:
            if path == "/api/decision":
                self._decision(body)
            elif path == "/api/slide/start":
                target = body.get("target", m.cfg.target)
                target = int(target) if isinstance(target, str) and target.isdigit() else target
                s = m.db(start_slide, str(body.get("slide", "")), str(body.get("operator", "")), target)
                m.hub.broadcast("slide", {"session": s, "slide": s["slide"]})
                m.push_counts()
                self._json({"session": s})
            elif path == "/api/slide/stop":
                s = m.db(stop_slide)
                m.hub.broadcast("slide", {"session": None, "slide": m.current_slide(), "stopped": s})
                m.push_counts()
                self._json({"stopped": s})
            else:
                self._error(404, f"no such action: {path}")
        except InputError as exc:
            self._error(400, str(exc))
        except sqlite3.Error as exc:
            self._error(503, f"database busy or unavailable: {exc}")

    def _decision(self, body: dict) -> None:
        m = self.monitor
        cell_id, decision = str(body.get("cell_id", "")), body.get("decision")
        operator, label = str(body.get("operator", "")).strip(), body.get("label")
        if decision not in DECISIONS:
            raise InputError(f"decision must be one of {', '.join(DECISIONS)}")
        if decision == "reclassify" and label not in m.labels:
            raise InputError(f"unknown label {label!r} (known: {', '.join(m.labels)})")
        did = m.db(record_decision, cell_id, operator, decision, label if decision == "reclassify" else None)
        cell = m.db(get_cell, cell_id)
        m.push_counts()
        self._json({"decision_id": did, "cell": public_cell(cell), "counts": m.counts(cell["slide"])})


def _safe(s: str | None) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in (s or "all"))
