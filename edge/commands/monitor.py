"""``cytoedge monitor``: the operator's web page over the live frames, the daemon's flags and its database."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edge.config import load_config
from edge.monitor import DEFAULT_PORT, MonitorConfig

TOKEN_ENV = "CYTOEDGE_MONITOR_TOKEN"


def register(subparsers) -> None:
    d = MonitorConfig()
    p = subparsers.add_parser(
        "monitor", help="the operator's web page: live frame with boxes, differential, alerts, review queue, reports",
        description="Serve the operator's monitor: the live camera frame with a box per cell (accepted / review / "
        "abnormal), the running differential of the current slide, alerts for abnormal and immature cells, a "
        "review queue where the operator confirms or reclassifies cells (stored in the daemon's database with "
        "time and name), slide start/stop, and per-slide reports (printable HTML, CSV) and reviewed cells as a "
        "labelled folder for 'cytoedge calibrate'. Updates reach the page by server-sent events. "
        "SECURITY: it listens on 127.0.0.1 only unless --host says otherwise; any non-loopback --host requires "
        f"--token (or ${TOKEN_ENV}) and the monitor refuses to start without one; every request must then carry "
        "the token (the URL printed at start-up does), others get 401. Settings: defaults < --config FILE "
        "(TOML, top level or a [monitor] table, keys = option names with underscores) < options.")
    p.add_argument("--config", metavar="FILE", help="TOML file, top level or a [monitor] table (unknown keys are errors)")
    p.add_argument("--host", help=f"address to listen on (default {d.host}; anything but loopback requires --token)")
    p.add_argument("--port", type=int, help=f"HTTP port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--token", help=f"access token, 16+ characters of A-Z a-z 0-9 . _ ~ - (default ${TOKEN_ENV}); "
                   "required off loopback")
    p.add_argument("--frames", metavar="ENDPOINT", help=f"camera PUB endpoint (default {d.frames})")
    p.add_argument("--flags", metavar="ENDPOINT", help=f"daemon flags PUB endpoint (default {d.flags})")
    p.add_argument("--db", metavar="PATH", help="the daemon's database (default $STATE_DIRECTORY/cytoedge.db, else ./cytoedge.db)")
    p.add_argument("--bundle", metavar="DIR", help="model bundle the daemon runs, for its class names (a folder or a packaged bundle: default, conditional)")
    p.add_argument("--frame-fps", type=float, help=f"frames per second sent to the page (default {d.frame_fps}; flags go at full rate)")
    p.add_argument("--target", type=int, help=f"default differential size in white cells, e.g. 100 or 200 (default {d.target})")
    p.add_argument("--export-reviewed", metavar="DIR", help="do not serve: write the reviewed cells as DIR/<class>/<cell>.png "
                   "(input for 'cytoedge calibrate') and exit")
    p.add_argument("--slide", help="with --export-reviewed: only this slide (default: every slide)")
    p.set_defaults(func=run)


def _section(path: str | None) -> str | None:
    """The TOML table to read: "monitor" when the file has a [monitor] table (a file shared with other
    tools), else None (top level). An unreadable file is left to ``load_config``, which reports it."""
    if path is None:
        return None
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return "monitor" if isinstance(data.get("monitor"), dict) else None


def run(args: argparse.Namespace) -> int:
    from edge.bundle import load_bundle

    overrides = {k: getattr(args, k) for k in ("host", "port", "token", "frames", "flags", "db", "frame_fps", "target")}
    if overrides["token"] is None and os.environ.get(TOKEN_ENV):
        overrides["token"] = os.environ[TOKEN_ENV]
    config = load_config(MonitorConfig, args.config, overrides, section=_section(args.config))
    classes = load_bundle(args.bundle).classes
    if args.export_reviewed:
        from edge.monitor_report import export_reviewed
        from edge.storage import connect

        conn = connect(config.db_path())
        try:
            counts = export_reviewed(conn, args.export_reviewed, classes, args.slide)
        finally:
            conn.close()
        print(f"wrote {sum(counts.values())} reviewed cells to {args.export_reviewed}: "
              + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
        return 0
    from edge.monitor import Monitor

    mon = Monitor(config, classes).start()
    print(f"cytoedge monitor: open {mon.url}", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        mon.stop()
    return 0
