"""``cytoedge demo``: the whole product with one command.

Starts the camera bridge on the bundled demo frames (``edge/demo/frames``, looping), the daemon on the bundled
model, and the monitor (in this process); prints the monitor's URL and one line per flags message that has
cells; stops everything on Ctrl-C, SIGTERM or after ``--seconds`` and exits 0. The camera and the daemon run as
child processes (``python -m edge.cli ...``) with their logs in the demo's work folder; when one of them dies
the demo says so, shows the end of its log and exits 1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from edge.bundle import BUNDLE_HELP
from edge.errors import ConfigError, InputError
from edge.monitor import DEFAULT_PORT
from edge.protocol import DEFAULT_FLAGS_ENDPOINT, DEFAULT_FRAMES_ENDPOINT

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEFAULT_METRICS_PORT = 9464
STATE_MARK = {"accepted": "ok", "review": "REVIEW", "abnormal": "ABNORMAL"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the camera bridge on bundled demo frames, the daemon and the monitor, all at once",
        description="Start the camera bridge on the bundled demo smear frames (made by the project's own generator, "
        "looping), the daemon on the bundled model and the operator's monitor; print the monitor's URL and a line "
        "per flags message with cells. Ctrl-C (or --seconds) stops everything cleanly. The standard ports are used "
        f"(frames {DEFAULT_FRAMES_ENDPOINT}, flags {DEFAULT_FLAGS_ENDPOINT}, monitor {DEFAULT_PORT}, metrics "
        f"{DEFAULT_METRICS_PORT}); a busy port stops the demo with a message naming the option that moves it.")
    p.add_argument("--seconds", type=float, default=0, metavar="N", help="stop after N seconds (default: run until Ctrl-C)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"monitor HTTP port (default {DEFAULT_PORT})")
    p.add_argument("--frames", default=DEFAULT_FRAMES_ENDPOINT, metavar="ENDPOINT", help=f"frames endpoint (default {DEFAULT_FRAMES_ENDPOINT})")
    p.add_argument("--flags", default=DEFAULT_FLAGS_ENDPOINT, metavar="ENDPOINT", help=f"flags endpoint (default {DEFAULT_FLAGS_ENDPOINT})")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"daemon's /metrics port (default {DEFAULT_METRICS_PORT}; -1 = off)")
    p.add_argument("--fps", type=float, default=5.0, help="frames per second from the demo camera (default 5)")
    p.add_argument("--frames-dir", metavar="DIR", help="folder of smear frames to loop over (default: the bundled demo frames)")
    p.add_argument("--slide", default="DEMO-001", help="slide id stamped on the demo frames (default DEMO-001)")
    p.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], help="inference backend (default: the daemon's)")
    p.add_argument("--db", metavar="PATH", help="keep the database here (default: a temporary folder, removed at the end)")
    p.add_argument("--quiet", action="store_true", help="print the URL only, not the live flags")
    p.set_defaults(func=run)


def _tcp_port(endpoint: str, what: str) -> tuple[str, int]:
    u = urlsplit(endpoint)
    if u.scheme != "tcp" or not u.port:
        raise ConfigError(f"{what} endpoint {endpoint!r}: the demo needs tcp://HOST:PORT")
    return u.hostname or "127.0.0.1", u.port


def check_free(host: str, port: int, what: str, option: str) -> None:
    """ConfigError naming ``option`` when ``host:port`` cannot be bound (another program holds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ and http.server do: TIME_WAIT is not busy
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"port {port} on {host} ({what}) is busy: {exc.strerror}. Stop what uses it, or move the "
                              f"demo with {option}") from None


def _spawn(name: str, args: list[str], work: Path) -> tuple[subprocess.Popen, Path]:
    logf = work / f"{name}.log"
    with open(logf, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # Ctrl-C reaches the demo only
    return proc, logf


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def flags_line(msg: dict) -> str:
    """A flags message with cells -> one compact terminal line."""
    lat = (msg["t_done_ns"] - msg["t_ns"]) / 1e6
    cells = "  ".join(f"#{c['track']} {c['label']} {c['p']:.2f} {STATE_MARK.get(c['state'], c['state'])}"
                      for c in msg["cells"])
    return f"[{msg['slide']} frame {msg['seq']:>5}] {lat:5.0f} ms  {cells}  ({sum(msg['counts'].values())} cells counted)"


def run(args: argparse.Namespace) -> int:
    import zmq

    from edge.bundle import load_bundle
    from edge.monitor import Monitor, MonitorConfig
    from edge.protocol import MessageError, parse_flags

    frames_dir = Path(args.frames_dir) if args.frames_dir else DEMO_DIR / "frames"
    if not frames_dir.is_dir() or not any(frames_dir.glob("*.jpg")) and not any(frames_dir.glob("*.png")):
        raise InputError(f"no demo frames in {frames_dir} (regenerate them: python -m export.demo_frames)")
    if args.seconds < 0 or args.fps <= 0:
        raise ConfigError("--seconds must be >= 0 and --fps > 0")
    classes = load_bundle(args.bundle).classes  # a broken bundle stops the demo here, with the bundle's message
    checks = [(*_tcp_port(args.frames, "frames"), "camera frames", "--frames tcp://127.0.0.1:PORT"),
              (*_tcp_port(args.flags, "flags"), "daemon flags", "--flags tcp://127.0.0.1:PORT"),
              ("127.0.0.1", args.port, "monitor web page", "--port PORT")]
    if args.metrics_port > 0:
        checks.append(("127.0.0.1", args.metrics_port, "daemon metrics", "--metrics-port PORT (or -1)"))
    for host, port, what, option in checks:
        check_free(host, port, what, option)
    um_per_px = None
    truth = frames_dir.parent / "truth.json"
    if truth.is_file():  # the demo microscope knows its scale, like a calibrated one
        um_per_px = json.loads(truth.read_text()).get("um_per_px")

    work = Path(tempfile.mkdtemp(prefix="cytoedge-demo-"))
    db = Path(args.db) if args.db else work / "demo.db"
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    children: list[tuple[str, subprocess.Popen, Path]] = []
    monitor = sub = None
    code = 0
    try:
        daemon_args = ["daemon", "--frames", args.frames, "--flags", args.flags, "--db", str(db),
                       "--metrics-port", str(args.metrics_port), "--log-format", "text"]
        daemon_args += ["--bundle", args.bundle] if args.bundle else []
        daemon_args += ["--backend", args.backend] if args.backend else []
        children.append(("daemon", *_spawn("daemon", daemon_args, work)))
        cam_args = ["camera", "--source", str(frames_dir), "--endpoint", args.frames, "--fps", str(args.fps), "--loop",
                    "--slide", args.slide]
        cam_args += ["--um-per-px", str(um_per_px)] if um_per_px else []
        children.append(("camera", *_spawn("camera", cam_args, work)))
        monitor = Monitor(MonitorConfig(port=args.port, frames=args.frames, flags=args.flags, db=str(db)), classes).start()
        print(f"CytoEdge demo: open {monitor.url}  (Ctrl-C to stop; logs in {work})", flush=True)
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"flags")
        sub.connect(args.flags)
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            dead = [(n, p, log) for n, p, log in children if p.poll() is not None]
            if dead:
                n, p, log = dead[0]
                print(f"cytoedge demo: the {n} exited with status {p.returncode}; end of {log}:\n{_tail(log)}",
                      file=sys.stderr, flush=True)
                code = 1
                break
            if sub.poll(200):
                try:
                    msg = parse_flags(sub.recv_multipart())
                except MessageError:
                    continue
                if msg["cells"] and not args.quiet:
                    print(flags_line(msg), flush=True)
    finally:
        if sub is not None:
            sub.close()
        for name in ("camera", "daemon"):  # camera first: the daemon then drains what it has and exits
            for n, p, _ in children:
                if n == name:
                    _stop(p, timeout=15.0)
        if monitor is not None:
            monitor.stop()
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
    print("cytoedge demo: stopped", flush=True)
    return code
