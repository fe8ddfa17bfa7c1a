"""Synthetic smear frames for the edge tests: pink red cells with pale centres, lilac white cells with
round or lobed purple nuclei, small purple platelets, on a pale background, at a chosen magnification.

Colours follow a May-Gruenwald-Giemsa smear: nuclei absorb green far more than blue (B - G ~ +100).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BACKGROUND = (228, 224, 214)
RBC = (214, 150, 158)
RBC_PALLOR = (226, 192, 194)
CYTOPLASM = (206, 186, 214)
NUCLEUS = (118, 62, 172)
PLATELET = (160, 118, 190)


@dataclass(frozen=True)
class Wbc:
    """A white cell: centre (px), kind "round" | "lobed", cytoplasm and nucleus diameters in um."""

    cx: float
    cy: float
    kind: str = "round"
    cell_um: float = 12.0
    nucleus_um: float = 8.0


def _disc(img, cx, cy, r, colour):
    cv2.circle(img, (int(round(cx * 4)), int(round(cy * 4))), max(1, int(round(r * 4))), colour, -1, cv2.LINE_AA, shift=2)


def render_smear(wbcs: list[Wbc], h: int = 480, w: int = 640, px_per_um: float = 8.0, n_rbc: int = 40,
                 n_platelets: int = 6, seed: int = 0) -> np.ndarray:
    """-> uint8 RGB [h, w, 3]. Red cells (7.5 um) and platelets (2.5 um) avoid the white cells."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    s = px_per_um
    keep_out = [(c.cx, c.cy, c.cell_um * s / 2) for c in wbcs]
    r_rbc = 7.5 * s / 2
    placed = []
    for _ in range(n_rbc * 20):
        if len(placed) >= n_rbc:
            break
        x, y = rng.uniform(-r_rbc, w + r_rbc), rng.uniform(-r_rbc, h + r_rbc)
        if all(np.hypot(x - a, y - b) > r + r_rbc + 2 for a, b, r in keep_out + placed):
            placed.append((x, y, r_rbc))
            _disc(img, x, y, r_rbc, RBC)
            _disc(img, x, y, r_rbc * 0.45, RBC_PALLOR)
    for _ in range(n_platelets):
        for _ in range(50):
            x, y = rng.uniform(10, w - 10), rng.uniform(10, h - 10)
            if all(np.hypot(x - a, y - b) > r + 2 * s for a, b, r in keep_out + placed):
                _disc(img, x, y, 1.25 * s, PLATELET)
                keep_out.append((x, y, 1.25 * s))
                break
    for c in wbcs:
        _disc(img, c.cx, c.cy, c.cell_um * s / 2, CYTOPLASM)
        if c.kind == "round":
            _disc(img, c.cx, c.cy, c.nucleus_um * s / 2, NUCLEUS)
        else:  # segmented: 4 separate lobes of 3 um on an arc, ~0.6 um apart (each too small to be a cell)
            for k in range(4):
                a = np.pi * (0.15 + 0.7 * k / 3)
                _disc(img, c.cx + 5.0 * s * np.cos(a), c.cy - 5.0 * s * np.sin(a) + 2.5 * s, 1.5 * s, NUCLEUS)
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)
