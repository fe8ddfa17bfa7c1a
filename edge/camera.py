"""The camera bridge: frames from an OpenCV source (camera index, video file, RTSP/HTTP URL) or a folder of
images, published over ZeroMQ with protocol v1 at a set rate, stamped with ``seq`` and capture ``t_ns``."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import zmq

from edge.errors import ConfigError, InputError
from edge.imageio import iter_image_paths, read_image, to_rgb_u8
from edge.protocol import DEFAULT_FRAMES_ENDPOINT, ENCODINGS, encode_frame, encode_image

log = logging.getLogger("cytoedge.camera")


@dataclass(frozen=True)
class CameraConfig:
    source: str = "0"  # camera index, video file, stream URL, or a folder of images
    endpoint: str = DEFAULT_FRAMES_ENDPOINT  # bound by the camera (PUB); "tcp://127.0.0.1:*" = any port
    fps: float = 10.0  # frames per second published
    loop: bool = False  # start again at the end of a file or folder
    slide: str = "slide-1"  # slide id stamped on every frame
    encoding: str = "jpeg"  # jpeg | png | raw
    quality: int = 90  # JPEG quality
    um_per_px: float | None = None  # microns per pixel, when the optics are known
    count: int = 0  # stop after this many frames (0 = run until the source ends or SIGTERM)
    start_seq: int = 0  # first seq number
    sndhwm: int = 4  # frames buffered per subscriber; beyond it PUB drops (the daemon counts the seq gap)
    warmup_s: float = 0.5  # wait after bind so subscribers connect before the first frame

    def __post_init__(self):
        if not self.fps > 0:
            raise ConfigError(f"CameraConfig: fps must be > 0, got {self.fps}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"CameraConfig: encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"CameraConfig: quality must be 1..100, got {self.quality}")
        if self.um_per_px is not None and not self.um_per_px > 0:
            raise ConfigError(f"CameraConfig: um_per_px must be > 0, got {self.um_per_px}")
        if self.count < 0 or self.start_seq < 0 or self.sndhwm < 1 or not self.slide:
            raise ConfigError("CameraConfig: count and start_seq must be >= 0, sndhwm >= 1, slide non-empty")


def iter_source(source: str, loop: bool = False) -> Iterator[np.ndarray]:
    """Yield uint8 RGB [H, W, 3] frames from a camera index ("0"), a video file, a stream URL or a folder.

    Raises InputError when the source cannot be opened; unreadable images in a folder are skipped (logged).
    """
    p = Path(source)
    if p.is_dir():
        paths = iter_image_paths([p])
        if not paths:
            raise InputError(f"{p}: no images in this folder")
        while True:
            shown = 0
            for path in paths:
                try:
                    img = read_image(path)
                except InputError as exc:
                    log.warning("skipped %s", exc)
                    continue
                shown += 1
                yield img
            if not loop or not shown:
                return
    is_index = source.isdigit()
    if not is_index and "://" not in source and not p.exists():
        raise InputError(f"{source}: no such file, folder or camera")
    cap = cv2.VideoCapture(int(source) if is_index else source)
    if not cap.isOpened():
        raise InputError(f"{source}: OpenCV cannot open this source")
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                if loop and not is_index and "://" not in source:
                    cap.release()
                    cap = cv2.VideoCapture(source)
                    ok, bgr = cap.read()
                if not ok:
                    return
            yield to_rgb_u8(bgr, source)
    finally:
        cap.release()


class Camera:
    """Publishes frames from ``iter_source`` at ``config.fps`` until the source ends, ``count`` frames are
    sent, or ``stop()``. ``run()`` returns the number of frames published."""

    def __init__(self, config: CameraConfig, context: zmq.Context | None = None):
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.stop_event = threading.Event()
        self.sent = 0
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, config.sndhwm)
        self.pub.setsockopt(zmq.LINGER, 1000)
        try:
            self.pub.bind(config.endpoint)
        except zmq.ZMQError as exc:
            self.pub.close(linger=0)
            raise ConfigError(f"cannot bind the frames endpoint {config.endpoint}: {exc}") from exc
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port when bound to "*"

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, frames: Iterator[np.ndarray] | None = None) -> int:
        c = self.config
        frames = iter_source(c.source, c.loop) if frames is None else frames
        period = 1.0 / c.fps
        if self.stop_event.wait(c.warmup_s):
            self.pub.close()
            return 0
        seq, next_t = c.start_seq, time.monotonic()
        try:
            for rgb in frames:
                t_ns = time.time_ns()
                payload, shape = encode_image(rgb, c.encoding, c.quality)
                self.pub.send_multipart(encode_frame(payload, seq=seq, t_ns=t_ns, slide=c.slide, encoding=c.encoding,
                                                     shape=shape, um_per_px=c.um_per_px))
                seq += 1
                self.sent += 1
                if c.count and self.sent >= c.count:
                    break
                next_t += period
                delay = next_t - time.monotonic()
                if delay < -period:  # the source is slower than fps: keep its pace, do not burst
                    next_t = time.monotonic()
                elif self.stop_event.wait(max(0.0, delay)):
                    break
                if self.stop_event.is_set():
                    break
        finally:
            self.pub.close()
        return self.sent
