"""Cell preprocessing shared by training and the runtime (numpy/OpenCV only).

Finds the main nucleated cell in a crop by its stain, centres on it and normalises its scale, so that the
model sees the cell at the same size whatever the microscope, magnification or image size.

Stain cue: in Romanowsky stains (May-Gruenwald-Giemsa, Wright) nuclei and basophilic granules absorb green
far more than blue, so ``B - G`` is high on nuclei (~+80 on PBC), near zero or negative on red cells and
background. The threshold adapts per image (Otsu) with a floor, so yellowish or bluish backgrounds do not
flip it.

Scale reference: the enclosing circle of the nucleus group (lobes merged). It is mapped to a fixed fraction
``NUCLEUS_FILL`` of the output side, so the nucleus-to-cytoplasm ratio, texture and colour are kept while
the absolute magnification is removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.errors import InputError

CROP_SIZE = 64  # model input side, px
NUCLEUS_FILL = 0.42  # nucleus-group enclosing diameter / CROP_SIZE
FALLBACK_DIAMETER = 0.30  # nucleus diameter / image short side when no nucleus is found (PBC median ~0.3)
_WORK_SIDE = 160  # short side of the working copy used to locate the nucleus, px
_MIN_THRESHOLD = 30.0  # floor of the B-G threshold (8-bit units)


@dataclass(frozen=True)
class CellCrop:
    """A centred, scale-normalised cell.

    crop: uint8 RGB [S, S, 3]; found: a nucleus was found (False = fell back to the image centre);
    centre: (x, y) in original px; diameter: nucleus-group diameter in original px;
    scale: output px per original px.
    """

    crop: np.ndarray
    found: bool
    centre: tuple[float, float]
    diameter: float
    scale: float


def stain_map(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [H, W] nuclear-stain strength (B - G, smoothed)."""
    m = rgb[:, :, 2].astype(np.float32) - rgb[:, :, 1].astype(np.float32)
    return cv2.GaussianBlur(m, (0, 0), 1.5)


def nucleus_mask(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 {0, 1} [H, W] mask of nuclear stain (Otsu on B-G, floored)."""
    m = stain_map(rgb)
    clipped = np.clip(m + 128, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(clipped, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(float(otsu) - 128.0, _MIN_THRESHOLD)
    mask = (m > thr).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def locate_cell(rgb: np.ndarray) -> tuple[float, float, float, bool]:
    """uint8 RGB [H, W, 3] -> (cx, cy, diameter, found) in original px.

    Picks the stained component that is large and near the centre, merges nearby components (lobes of a
    segmented nucleus, granules) and returns their enclosing circle.
    """
    h, w = rgb.shape[:2]
    f = _WORK_SIDE / min(h, w)
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    f = min(f, 1.0)
    sh, sw = small.shape[:2]
    n, labels, stats, cents = cv2.connectedComponentsWithStats(nucleus_mask(small), connectivity=8)
    min_area = 0.0015 * sh * sw
    idx = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    if not idx:
        return w / 2.0, h / 2.0, FALLBACK_DIAMETER * min(h, w), False
    centre = np.array([sw / 2.0, sh / 2.0])
    spread = 0.35 * np.hypot(sw, sh)
    score = [stats[i, cv2.CC_STAT_AREA] * np.exp(-(np.linalg.norm(cents[i] - centre) / spread) ** 2) for i in idx]
    best = idx[int(np.argmax(score))]
    r_best = np.sqrt(stats[best, cv2.CC_STAT_AREA] / np.pi)
    group = [i for i in idx if i == best or np.linalg.norm(cents[i] - cents[best]) < 2.2 * r_best + np.sqrt(stats[i, cv2.CC_STAT_AREA] / np.pi)]
    ys, xs = np.nonzero(np.isin(labels, group))
    (cx, cy), r = cv2.minEnclosingCircle(np.stack([xs, ys], 1).astype(np.float32))
    # Cap: a nucleus group wider than 60% of the crop means neighbours were merged in; do not zoom out further.
    diam = min(max(2.0 * r / f, 4.0), 0.6 * min(h, w))
    return (cx + 0.5) / f - 0.5, (cy + 0.5) / f - 0.5, diam, True


def crop_around(rgb: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Square window of ``side`` original px centred on (cx, cy), edge-replicated, resized to uint8 [size, size, 3]."""
    half = side / 2.0
    x0, y0 = int(np.floor(cx - half)), int(np.floor(cy - half))
    s = max(int(np.ceil(side)), 1)
    h, w = rgb.shape[:2]
    pad = max(0, -x0, -y0, x0 + s - w, y0 + s - h)
    src = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else rgb
    win = src[y0 + pad:y0 + pad + s, x0 + pad:x0 + pad + s]
    interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
    return cv2.resize(win, (size, size), interpolation=interp)


def normalise_cell(rgb: np.ndarray, size: int = CROP_SIZE, fill: float = NUCLEUS_FILL) -> CellCrop:
    """uint8 RGB [H, W, 3] (any size) -> CellCrop with crop uint8 [size, size, 3] centred on the main cell."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"normalise_cell expects uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
    cx, cy, diam, found = locate_cell(rgb)
    side = diam / fill
    crop = crop_around(rgb, cx, cy, side, size)
    return CellCrop(crop=crop, found=found, centre=(float(cx), float(cy)), diameter=float(diam), scale=size / side)
