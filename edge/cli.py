"""The ``cytoedge`` command line: one entry point, one module per subcommand.

Each module in ``edge.commands`` defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable ``run(args) -> int``. Modules that need torch import it inside ``run`` so that
``cytoedge --help`` and the runtime commands work on a box without the ``export`` extra.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge import __version__
from edge.errors import CytoEdgeError

# Order is the order shown in --help.
COMMANDS = [
    "classify",
    "detect",
    "camera",
    "daemon",
    "monitor",
    "demo",
    "evaluate",
    "calibrate",
    "train",
    "distill",
    "generate",
    "export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cytoedge",
        description="CytoEdge: live white-cell classification with a distilled diffusion classifier. "
        "Runtime commands (classify, detect, camera, daemon, monitor, demo) need only the base install; "
        "model-building commands (train, distill, export, generate) need the 'export' extra (torch).",
    )
    parser.add_argument("--version", action="version", version=f"cytoedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"edge.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except CytoEdgeError as exc:
        print(f"cytoedge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"torch", "diffusers", "onnx", "safetensors", "tensorrt", "pycuda"}:
            print(f"cytoedge {args.command}: error: this command needs '{exc.name}'; "
                  f"install the extra: pip install 'cytoedge[export]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"cytoedge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
