"""``cytoedge camera``: publish frames from a camera, video, stream or image folder (protocol v1)."""
from __future__ import annotations

import argparse
import logging
import signal

from edge.camera import Camera, CameraConfig
from edge.config import make_config

log = logging.getLogger("cytoedge.camera")


def register(subparsers) -> None:
    d = CameraConfig()
    p = subparsers.add_parser(
        "camera", help="publish frames from a camera, video file, stream URL or image folder",
        description="Publish frames over ZeroMQ (protocol v1, docs/protocol.md) at a set rate, stamped with seq and "
        "capture time. SRC is a camera index (0), a video file, an RTSP/HTTP URL, or a folder of images "
        "(sorted by name). Stops at the end of the source (unless --loop), after --count frames, or on SIGTERM.")
    p.add_argument("--source", required=True, metavar="SRC", help="camera index, video file, stream URL or image folder")
    p.add_argument("--endpoint", default=d.endpoint, metavar="ENDPOINT", help=f"endpoint to bind the PUB socket on (default {d.endpoint})")
    p.add_argument("--fps", type=float, default=d.fps, metavar="N", help=f"frames per second (default {d.fps:g})")
    p.add_argument("--loop", action="store_true", help="start again at the end of a file or folder")
    p.add_argument("--slide", default=d.slide, metavar="ID", help=f"slide id stamped on the frames (default {d.slide})")
    p.add_argument("--encoding", choices=["jpeg", "png", "raw"], default=d.encoding, help=f"payload encoding (default {d.encoding})")
    p.add_argument("--quality", type=int, default=d.quality, help=f"JPEG quality 1-100 (default {d.quality})")
    p.add_argument("--um-per-px", type=float, default=None, metavar="X", help="microns per pixel, when the optics are known")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N frames (default: run on)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = make_config(CameraConfig, {"source": args.source, "endpoint": args.endpoint, "fps": args.fps,
                                        "loop": args.loop, "slide": args.slide, "encoding": args.encoding,
                                        "quality": args.quality, "um_per_px": args.um_per_px, "count": args.count})
    cam = Camera(config)
    signal.signal(signal.SIGTERM, lambda *_: cam.stop())
    signal.signal(signal.SIGINT, lambda *_: cam.stop())
    log.info("publishing %s on %s at %g fps", config.source, config.endpoint, config.fps)
    sent = cam.run()
    log.info("published %d frames", sent)
    return 0
