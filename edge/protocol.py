"""The frame and flags wire protocol, version 1 (documented for vendors in ``docs/protocol.md``).

Frames (camera PUB -> daemon SUB), 3 parts: ``b"frame"``, a UTF-8 JSON header, the payload bytes.
Flags (daemon PUB -> monitor SUB), 2 parts: ``b"flags"``, a UTF-8 JSON object.

Everything that arrives from the network is checked here before use: part count, topic, JSON, version,
required fields and their types, payload size, the raw size against ``shape``, and the frame size declared
by JPEG/PNG headers (read without decoding, so a decompression bomb is refused before it allocates).
Each failure raises ``MessageError`` (a ``ProtocolError``) whose ``kind`` names the failure for counting.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge.errors import ProtocolError

VERSION = 1
FRAME_TOPIC = b"frame"
FLAGS_TOPIC = b"flags"
ENCODINGS = ("jpeg", "png", "raw")
STATES = ("accepted", "review", "abnormal")
DEFAULT_FRAMES_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_FLAGS_ENDPOINT = "tcp://127.0.0.1:5556"
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 32 * 1024 * 1024  # e.g. 8192 x 4096
MIN_SIDE = 16  # px; smaller frames cannot hold a cell
MAX_HEADER_BYTES = 64 * 1024
MAX_SLIDE_CHARS = 256

# Failure kinds, used as metric labels and for rate-limited logging.
KINDS = ("parts", "topic", "json", "version", "field", "payload_size", "raw_size", "frame_size", "decode")


class MessageError(ProtocolError):
    """A message that breaks the protocol. ``kind`` is one of ``KINDS``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class FrameHeader:
    """A validated frame header. t_ns: capture time, Unix ns; shape: (H, W, 3) for raw, else None;
    um_per_px: microns per pixel of the frame, or None when unknown."""

    seq: int
    t_ns: int
    slide: str
    encoding: str
    shape: tuple[int, int, int] | None
    um_per_px: float | None


@dataclass(frozen=True)
class Frame:
    header: FrameHeader
    payload: bytes


# ---- helpers ----

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(data: bytes, what: str) -> dict:
    if len(data) > MAX_HEADER_BYTES:
        raise MessageError("json", f"{what} JSON is {len(data)} bytes (limit {MAX_HEADER_BYTES})")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError("json", f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError("json", f"{what} JSON must be an object, got {type(obj).__name__}")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_version(obj: dict, what: str) -> None:
    if "v" not in obj:
        raise MessageError("field", f"{what}: missing field 'v'")
    if not _is_int(obj["v"]) or obj["v"] != VERSION:
        raise MessageError("version", f"{what}: protocol version {obj['v']!r} is not supported (this is v{VERSION})")


def _field(obj: dict, name: str, ok, expected: str, what: str) -> Any:
    if name not in obj:
        raise MessageError("field", f"{what}: missing field '{name}'")
    v = obj[name]
    if not ok(v):
        raise MessageError("field", f"{what}: field '{name}' must be {expected}, got {v!r:.80}")
    return v


def _topic(parts: list, topic: bytes, n: int, what: str) -> None:
    if len(parts) != n:
        raise MessageError("parts", f"{what} message has {len(parts)} part(s), expected {n}")
    if bytes(parts[0]) != topic:
        raise MessageError("topic", f"{what} message topic {bytes(parts[0])[:32]!r}, expected {topic!r}")


def _check_side(h: int, w: int, max_pixels: int) -> None:
    if h < MIN_SIDE or w < MIN_SIDE:
        raise MessageError("frame_size", f"frame {w}x{h} px is smaller than {MIN_SIDE} px on a side")
    if h * w > max_pixels:
        raise MessageError("frame_size", f"frame {w}x{h} px exceeds the {max_pixels} pixel limit")


# ---- frames ----

def encode_frame(payload: bytes, *, seq: int, t_ns: int, slide: str, encoding: str,
                 shape: tuple[int, int, int] | None = None, um_per_px: float | None = None) -> list[bytes]:
    """Build the 3 parts of a v1 frame message. ``payload`` is JPEG/PNG bytes or raw uint8 RGB row-major."""
    header: dict[str, Any] = {"v": VERSION, "seq": int(seq), "t_ns": int(t_ns), "slide": str(slide),
                              "encoding": encoding, "um_per_px": None if um_per_px is None else float(um_per_px)}
    if shape is not None:
        header["shape"] = [int(s) for s in shape]
    return [FRAME_TOPIC, json.dumps(header, separators=(",", ":")).encode("utf-8"), bytes(payload)]


def encode_image(rgb: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> tuple[bytes, tuple[int, int, int] | None]:
    """uint8 RGB [H, W, 3] -> (payload bytes, shape for the header: (H, W, 3) for raw, else None)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ProtocolError(f"frames are uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if encoding == "raw":
        return np.ascontiguousarray(rgb).tobytes(), tuple(int(s) for s in rgb.shape)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif encoding == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise ProtocolError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    if not ok:
        raise ProtocolError(f"OpenCV could not encode a {rgb.shape} frame as {encoding}")
    return buf.tobytes(), None


def parse_frame(parts: list, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Frame:
    """Validate a received frame message (list of 3 bytes-like parts) -> Frame. Raises MessageError.

    Cheap (no decoding): safe to call on the receiving thread. ``decode_frame`` does the rest.
    """
    _topic(parts, FRAME_TOPIC, 3, "frame")
    obj = _load_json(parts[1], "frame header")
    _check_version(obj, "frame header")
    w = "frame header"
    seq = _field(obj, "seq", lambda v: _is_int(v) and v >= 0, "an integer >= 0", w)
    t_ns = _field(obj, "t_ns", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (Unix ns)", w)
    slide = _field(obj, "slide", lambda v: isinstance(v, str) and 0 < len(v) <= MAX_SLIDE_CHARS,
                   f"a non-empty string of at most {MAX_SLIDE_CHARS} characters", w)
    encoding = _field(obj, "encoding", lambda v: v in ENCODINGS, " or ".join(ENCODINGS), w)
    um = obj.get("um_per_px")
    if um is not None and not (_is_num(um) and um > 0):
        raise MessageError("field", f"{w}: field 'um_per_px' must be a positive number or null, got {um!r:.80}")
    shape = None
    if encoding == "raw":
        s = _field(obj, "shape", lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x >= 0 for x in v)
                   and v[2] == 3, "[H, W, 3] (integers) for raw frames", w)
        shape = (s[0], s[1], 3)
        _check_side(s[0], s[1], max_pixels)
    payload = parts[2]
    size = len(payload)
    if size == 0:
        raise MessageError("frame_size", "frame payload is empty")
    if size > max_payload_bytes:
        raise MessageError("payload_size", f"frame payload is {size} bytes (limit {max_payload_bytes})")
    if shape is not None and size != shape[0] * shape[1] * 3:
        raise MessageError("raw_size", f"raw payload is {size} bytes but shape {list(shape)} needs {shape[0] * shape[1] * 3}")
    header = FrameHeader(seq=seq, t_ns=t_ns, slide=slide, encoding=encoding, shape=shape,
                         um_per_px=None if um is None else float(um))
    return Frame(header=header, payload=bytes(payload))


def encoded_size(data: bytes, encoding: str) -> tuple[int, int] | None:
    """(height, width) declared by a PNG IHDR or a JPEG SOF marker, read without decoding; None if not found."""
    if encoding == "png":
        if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return h, w
        return None
    i, n = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return h, w
        i += 2 + seg
    return None


def decode_frame(frame: Frame, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Frame -> uint8 RGB [H, W, 3]. Checks the declared size before decoding; raises MessageError."""
    hd = frame.header
    if hd.encoding == "raw":
        h, w, _ = hd.shape
        _check_side(h, w, max_pixels)
        if len(frame.payload) != h * w * 3:
            raise MessageError("raw_size", f"raw payload is {len(frame.payload)} bytes but shape {list(hd.shape)} needs {h * w * 3}")
        return np.frombuffer(frame.payload, np.uint8).reshape(h, w, 3)
    dims = encoded_size(frame.payload, hd.encoding)
    if dims is None:
        raise MessageError("decode", f"payload is not a {hd.encoding.upper()} image (no size header found)")
    _check_side(dims[0], dims[1], max_pixels)
    bgr = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3:
        raise MessageError("decode", f"{hd.encoding.upper()} payload could not be decoded (corrupt or truncated)")
    _check_side(bgr.shape[0], bgr.shape[1], max_pixels)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---- flags ----

def encode_flags(flags: dict) -> list[bytes]:
    """Build the 2 parts of a v1 flags message from a dict holding the fields of ``parse_flags``."""
    return [FLAGS_TOPIC, json.dumps({"v": VERSION, **flags}, separators=(",", ":"), allow_nan=False).encode("utf-8")]


def _check_cell(c: Any, i: int) -> None:
    w = f"flags cell {i}"
    if not isinstance(c, dict):
        raise MessageError("field", f"{w} must be an object")
    _field(c, "id", lambda v: isinstance(v, str) and v, "a non-empty string", w)
    _field(c, "track", lambda v: _is_int(v) and v >= 0, "an integer >= 0", w)
    _field(c, "box", lambda v: isinstance(v, list) and len(v) == 4 and all(_is_num(x) for x in v), "[x0, y0, x1, y1]", w)
    _field(c, "label", lambda v: isinstance(v, str) and v, "a class name", w)
    _field(c, "p", lambda v: _is_num(v) and 0 <= v <= 1, "a probability", w)
    _field(c, "state", lambda v: v in STATES, " or ".join(STATES), w)
    _field(c, "anomaly", _is_num, "a number", w)


def parse_flags(parts: list) -> dict:
    """Validate a received flags message -> its JSON object (with ``v``). Raises MessageError."""
    _topic(parts, FLAGS_TOPIC, 2, "flags")
    obj = _load_json(parts[1], "flags")
    _check_version(obj, "flags")
    w = "flags"
    _field(obj, "seq", lambda v: _is_int(v) and v >= 0, "an integer >= 0", w)
    _field(obj, "slide", lambda v: isinstance(v, str) and v, "a non-empty string", w)
    _field(obj, "t_ns", lambda v: _is_int(v) and v >= 0, "an integer >= 0", w)
    _field(obj, "t_done_ns", lambda v: _is_int(v) and v >= 0, "an integer >= 0", w)
    cells = _field(obj, "cells", lambda v: isinstance(v, list), "a list", w)
    for i, c in enumerate(cells):
        _check_cell(c, i)
    _field(obj, "counts", lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(n) and n >= 0
                                                                 for k, n in v.items()), "{class: count}", w)
    _field(obj, "dropped", lambda v: _is_int(v) and v >= 0, "an integer >= 0", w)
    if "timing_ms" in obj:
        _field(obj, "timing_ms", lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_num(x)
                                                                       for k, x in v.items()), "{stage: ms}", w)
    return obj
