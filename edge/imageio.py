"""Reading images from disk and bytes into uint8 RGB arrays, whatever the file holds.

Handles grey, RGBA, 16-bit and EXIF orientation. Every failure raises ``InputError`` naming the file.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def to_rgb_u8(img: np.ndarray, what: str = "image") -> np.ndarray:
    """Any OpenCV-decoded array (BGR/BGRA/grey, uint8/uint16/float) -> uint8 RGB [H, W, 3]."""
    if img is None or img.size == 0:
        raise InputError(f"{what}: empty image")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise InputError(f"{what}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        # Composite on white: transparent regions are slide background, not black ink.
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        bgr = img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)
        return cv2.cvtColor(bgr.round().astype(np.uint8), cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise InputError(f"{what}: unsupported image shape {img.shape}")


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Encoded bytes (JPEG/PNG/BMP/TIFF) -> uint8 RGB [H, W, 3]; EXIF orientation applied by OpenCV."""
    if not data:
        raise InputError(f"{what}: empty file")
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise InputError(f"{what}: not a readable image (corrupt, truncated or unsupported format)")
    if not (img.ndim == 3 and img.shape[2] == 4):
        # IMREAD_UNCHANGED ignores EXIF orientation; IMREAD_COLOR applies it (and ANYDEPTH keeps 16-bit).
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    return to_rgb_u8(img, what)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file -> uint8 RGB [H, W, 3]. Raises InputError naming the file on any failure."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{p}: no such file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{p}: is a folder, not an image") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror})") from exc
    img = decode_image(data, str(p))
    if min(img.shape[:2]) < 8:
        raise InputError(f"{p}: image too small ({img.shape[1]}x{img.shape[0]} px)")
    return img


def iter_image_paths(inputs: list[str | Path]) -> list[Path]:
    """Files and folders (searched recursively, sorted) -> image paths. A missing input raises InputError."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out
