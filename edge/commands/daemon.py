"""``cytoedge daemon``: the edge daemon (frames in over ZeroMQ, flags out), meant to run under systemd."""
from __future__ import annotations

import argparse
import logging
import signal

from edge.bundle import BUNDLE_HELP
from edge.config import load_config
from edge.daemon import Daemon, DaemonConfig
from edge.ops import setup_json_logging


def register(subparsers) -> None:
    d = DaemonConfig()
    p = subparsers.add_parser(
        "daemon", help="run the edge daemon: classify the cells of live frames and publish flags",
        description="Subscribe to frames (protocol v1, docs/protocol.md), find, track and classify the nucleated "
        "cells, store every result in SQLite, and publish one flags message per frame. Settings come from "
        "the defaults, then --config FILE (TOML, keys = the long option names with underscores), then the "
        "options below. Runs until SIGTERM or Ctrl-C, then finishes the frames already received and exits 0. "
        "A missing or corrupt bundle or an unknown backend stops it at start-up with exit status 2.")
    p.add_argument("--config", metavar="FILE", help="TOML file with daemon settings (unknown keys are errors)")
    p.add_argument("--frames", metavar="ENDPOINT", help=f"camera PUB endpoint to connect to (default {d.frames})")
    p.add_argument("--flags", metavar="ENDPOINT", help=f"endpoint to bind the flags PUB socket on (default {d.flags})")
    p.add_argument("--db", metavar="PATH", help="SQLite database (default $STATE_DIRECTORY/cytoedge.db, else ./cytoedge.db)")
    p.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], help=f"inference backend (default {d.backend}; never falls back)")
    p.add_argument("--precision", help="backend precision, e.g. int8, fp16, fp32 (default: the bundle's)")
    p.add_argument("--metrics-host", help=f"address for /metrics and /healthz (default {d.metrics_host})")
    p.add_argument("--metrics-port", type=int, help=f"port for /metrics and /healthz; 0 = any free port, -1 = off (default {d.metrics_port})")
    p.add_argument("--queue-size", type=int, help=f"frames waiting for the worker before the oldest is dropped (default {d.queue_size})")
    p.add_argument("--max-batch", type=int, help=f"cells per inference call (default {d.max_batch})")
    p.add_argument("--max-wait-ms", type=float, help=f"longest a cell waits for a batch to fill, ms (default {d.max_wait_ms})")
    p.add_argument("--um-per-px", type=float, help="camera scale when frames do not carry um_per_px (default: measured from red cells)")
    p.add_argument("--log-format", choices=["json", "text"], help=f"log lines on stderr (default {d.log_format})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge.backends import load_backend  # the runtime stack, loaded only for this command
    from edge.bundle import load_bundle

    overrides = {k: getattr(args, k) for k in ("frames", "flags", "db", "bundle", "backend", "precision", "metrics_host",
                                               "metrics_port", "queue_size", "max_batch", "max_wait_ms", "um_per_px",
                                               "log_format")}
    config = load_config(DaemonConfig, args.config, overrides)
    if config.log_format == "json":
        setup_json_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    bundle = load_bundle(config.bundle)
    backend = load_backend(config.backend, bundle, config.precision)
    daemon = Daemon(config, bundle, backend)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    return daemon.run()
