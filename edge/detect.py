"""Nucleated-cell detection in whole smear frames (numpy/OpenCV only).

Method, in a frame resampled to a fixed working magnification:
1. Scale. Microns per pixel come from the frame header when the microscope knows them; otherwise from the
   red cells in view, the ruler every smear carries (about 7.5 um across): the mean chord length of the
   red-cell mask, 4 * area / perimeter (Cauchy's formula; equals the diameter for separate discs), with the
   pale centres filled. The daemon pools this per slide (``ScaleEstimator``), since the scale of a stream
   does not change from frame to frame.
2. Stain. ``B - G`` is high on nuclei in Romanowsky stains (see ``edge.preprocess``). Threshold: Otsu on
   the frame's ``B - G`` histogram, floored, so the cut adapts to the stain and the background.
3. Lobes. Stained components closer than ``merge_gap_um`` are one nucleus group (segmented neutrophils,
   eosinophils, granules).
4. Size limits (in um^2 and um, turned into pixels by the scale): groups smaller than ``min_nucleus_um2``
   are platelets or debris; groups wider than ``max_nucleus_um`` are touching cells and are split
   (components clustered, single blobs cut by a distance-transform watershed).
5. Cell box: the nucleus group box grown by a cytoplasm margin. A box that leaves the frame is marked
   ``edge`` (cut by the frame edge: reported, never classified).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge.preprocess import stain_map

RBC_DIAMETER_UM = 7.5  # normal red cell; the ruler when the microscope gives no scale


@dataclass(frozen=True)
class DetectConfig:
    """Detector settings. Sizes are physical (um), turned into pixels by the frame's scale."""

    work_rbc_px: float = 28.0  # working magnification: a red cell spans this many px
    min_nucleus_um2: float = 20.0  # smallest nucleus group, ~5 um across (platelets 2-3 um, small lymphocyte nuclei >= 6 um)
    max_nucleus_um: float = 20.0  # widest single nucleus group; wider groups are split
    merge_gap_um: float = 1.6  # lobes and granules closer than this are one cell
    cyto_margin: float = 0.25  # cytoplasm margin around the nucleus group, fraction of its size
    cyto_min_um: float = 1.0  # and at least this many um
    min_threshold: float = 30.0  # floor of the B - G threshold (8-bit units)
    default_um_per_px: float | None = None  # used when neither the frame nor the red cells give a scale
    max_work_side: int = 1024  # cap on the working image's long side, px


@dataclass(frozen=True)
class Detection:
    """One nucleated cell. box: (x0, y0, x1, y1) px of the original frame (x1/y1 exclusive, inside the
    frame); score: confidence in [0, 1]; edge: cut by the frame edge (not classified);
    nucleus: (cx, cy, diameter) of the nucleus group, px."""

    box: tuple[int, int, int, int]
    score: float
    edge: bool
    nucleus: tuple[float, float, float]

    def to_json(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4), "edge": self.edge}


def shrink(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize down to (w, h) px cheaply: exact halvings by pixel averaging, then linear for the last < 2x
    (OpenCV's area filter is 10x slower at non-integer ratios and buys nothing visible here)."""
    ih, iw = rgb.shape[:2]
    if (iw, ih) == (w, h):
        return rgb
    if iw < w or ih < h:
        return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    while iw // 2 >= w and ih // 2 >= h:
        rgb = cv2.resize(rgb, (iw // 2, ih // 2), interpolation=cv2.INTER_AREA) if iw % 2 == 0 and ih % 2 == 0 \
            else cv2.pyrDown(rgb)
        ih, iw = rgb.shape[:2]
    return rgb if (iw, ih) == (w, h) else cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)


# ---- scale ----

def _work_grey(rgb: np.ndarray, f: float) -> np.ndarray:
    """uint8 RGB -> green channel resized by ``f``, contrast-stretched to 0..255 (all zero if blank)."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    g = cv2.GaussianBlur(small[:, :, 1], (0, 0), 1.0).astype(np.float32)
    lo, hi = np.percentile(g, [1, 99])
    if hi - lo < 20:  # a blank field: nothing to measure
        return np.zeros(g.shape, np.uint8)
    return np.clip((g - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


HOUGH_BIAS = 0.86  # measured circle diameter / true disc diameter at the working size below (synthetic discs)


def rbc_diameter_px(rgb: np.ndarray, coarse_side: int = 200, work_rbc_px: float = 32.0) -> float | None:
    """uint8 RGB [H, W, 3] -> typical red-cell diameter in px of ``rgb``, or None if no red cells are seen.

    Two passes. Coarse: the mean chord length of the filled dark mask, 4 * area / perimeter (Cauchy's
    formula), which needs no round cells but is thrown off by overlaps. Fine: the median diameter of the
    circles a gradient Hough transform finds once the frame is resized so that a red cell spans about
    ``work_rbc_px`` px (the transform's bias depends on the size in px, so fixing it makes the ruler the
    same at every magnification); with fewer than 3 circles, the coarse value.
    """
    h, w = rgb.shape[:2]
    f0 = min(1.0, coarse_side / max(h, w))
    g0 = _work_grey(rgb, f0)
    if not g0.any():
        return None
    coarse = _chord_length(g0, f0)
    if coarse is None:
        return None
    f = min(1.0, work_rbc_px / coarse)
    g = _work_grey(rgb, f)
    r = coarse * f / 2
    circles = cv2.HoughCircles(g, cv2.HOUGH_GRADIENT_ALT, dp=1.5, minDist=4, param1=60, param2=0.75,
                               minRadius=max(3, int(0.4 * r)), maxRadius=max(5, int(1.6 * r) + 1))
    if circles is not None:
        c = circles[0]
        # Drop circles nested in a clearly larger one: pale centres of red cells, granules of white cells.
        d = np.hypot(c[:, None, 0] - c[None, :, 0], c[:, None, 1] - c[None, :, 1])
        nested = ((c[None, :, 2] > 1.25 * c[:, None, 2]) & (d < c[None, :, 2])).any(axis=1)
        radii = c[~nested, 2]
        if radii.size >= 3:
            return float(2.0 * np.median(radii) / f / HOUGH_BIAS)
    return coarse


def _chord_length(g: np.ndarray, f: float) -> float | None:
    thr, _ = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = (g < thr).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    filled = np.pad(fg, 1)
    cv2.floodFill(filled, None, (0, 0), 1)
    fg |= (filled[1:-1, 1:-1] == 0).astype(np.uint8)  # pale centres and enclosed gaps
    area = float(fg.sum())
    sh, sw = fg.shape
    if area < 0.02 * sh * sw or area > 0.95 * sh * sw:
        return None
    perim = 0.0
    for c in cv2.findContours(fg, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)[0]:
        p = c[:, 0, :]
        inside = (p[:, 0] > 0) & (p[:, 1] > 0) & (p[:, 0] < sw - 1) & (p[:, 1] < sh - 1)
        perim += cv2.arcLength(c, True) * float(inside.mean())
    if perim <= 0:
        return None
    return 4.0 * area / perim / f


class ScaleEstimator:
    """Pools per-frame red-cell rulers over a stream (median of the last ``n``), for one slide."""

    def __init__(self, n: int = 31):
        self.n = n
        self.values: list[float] = []

    def update(self, rgb: np.ndarray) -> float | None:
        """Add this frame's measure; return the pooled um per px (None until one frame gave a measure)."""
        d = rbc_diameter_px(rgb)
        if d is not None:
            self.values = (self.values + [RBC_DIAMETER_UM / d])[-self.n:]
        return float(np.median(self.values)) if self.values else None


# ---- detection ----

def white_balance(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 RGB with the slide background made neutral grey.

    The background (the brightest tenth of the frame: glass between cells) is white light through the
    slide, so its colour is the lamp's and the camera's; dividing it out makes the stain cue (B - G)
    independent of lamp colour and white balance. The background's brightness is kept.
    """
    sample = rgb[::2, ::2].reshape(-1, 3)
    grey = sample.sum(axis=1, dtype=np.int32)
    bright = sample[grey >= np.percentile(grey, 90)].astype(np.float32)
    ref = np.median(bright, axis=0)
    if ref.min() < 1:
        return rgb
    gains = ref.mean() / ref
    return np.clip(rgb.astype(np.float32) * gains, 0, 255).astype(np.uint8)


def _threshold(m: np.ndarray, floor: float) -> float:
    clipped = np.clip(m + 128, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(clipped, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max(float(otsu) - 128.0, floor)


def _split_group(comp_ids: list[int], labels: np.ndarray, stats: np.ndarray, cents: np.ndarray,
                 max_px: float, min_area: float) -> list[np.ndarray]:
    """Split a too-wide nucleus group into plausible nuclei (bool masks in the group's window).

    Components are clustered by complete linkage so that no cluster is wider than ``max_px``; a cluster
    too small to be a nucleus joins its nearest neighbour (a lobe or granule, not a cell). A single blob
    that is still too wide is cut at its distance-transform peaks. A split whose parts are not all
    nucleus-sized is refused: one cell is the safer answer than two half-cells.
    """
    area = {i: float(stats[i, cv2.CC_STAT_AREA]) for i in comp_ids}
    clusters = [[i] for i in comp_ids]

    def span(a, b):
        return max(np.linalg.norm(cents[i] - cents[j]) for i in a for j in b)

    while len(clusters) > 1:
        pairs = [(span(clusters[a], clusters[b]), a, b) for a in range(len(clusters)) for b in range(a + 1, len(clusters))]
        d, a, b = min(pairs)
        small = [k for k, c in enumerate(clusters) if sum(area[i] for i in c) < min_area]
        if d > max_px and not small:
            break
        if d > max_px:  # join the smallest fragment to its nearest cluster
            k = min(small, key=lambda k: sum(area[i] for i in clusters[k]))
            d, a, b = min((span(clusters[k], clusters[j]), min(k, j), max(k, j)) for j in range(len(clusters)) if j != k)
        clusters[a] += clusters.pop(b)
    parts = []
    for cl in clusters:
        mask = np.isin(labels, cl)
        ys, xs = np.nonzero(mask)
        if len(clusters) == 1 and max(np.ptp(xs), np.ptp(ys)) + 1 > max_px:
            parts.extend(_watershed_split(mask, max_px))
        else:
            parts.append(mask)
    if len(parts) > 1 and min(int(p.sum()) for p in parts) < min_area:
        return [np.isin(labels, comp_ids)]
    return parts


def _watershed_split(mask: np.ndarray, max_px: float) -> list[np.ndarray]:
    """One blob holding several touching nuclei -> one mask per distance-transform peak."""
    m8 = mask.astype(np.uint8)
    dist = cv2.distanceTransform(m8, cv2.DIST_L2, 5)
    k = max(3, int(max_px * 0.25) | 1)
    peaks = (dist == cv2.dilate(dist, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))) & (dist > 0.35 * dist.max())
    n, markers = cv2.connectedComponents(peaks.astype(np.uint8))
    if n <= 2:
        return [mask]
    canvas = cv2.cvtColor(m8 * 255, cv2.COLOR_GRAY2BGR)
    markers = markers.astype(np.int32)
    markers[(m8 == 0)] = n  # background marker
    cv2.watershed(canvas, markers)
    return [(markers == i) for i in range(1, n) if (markers == i).any()]


def detect_cells(rgb: np.ndarray, um_per_px: float | None = None, config: DetectConfig = DetectConfig()) -> list[Detection]:
    """uint8 RGB [H, W, 3] whole frame -> nucleated cells, in original px, sorted by score (highest first).

    ``um_per_px``: the frame's scale when known; otherwise measured from the red cells in the frame
    (``config.default_um_per_px`` when there are none; with neither, an empty list: nothing can be sized).
    """
    h, w = rgb.shape[:2]
    if um_per_px is None:
        d = rbc_diameter_px(rgb)
        um_per_px = RBC_DIAMETER_UM / d if d is not None else config.default_um_per_px
    if um_per_px is None or not math.isfinite(um_per_px) or um_per_px <= 0:
        return []
    px_per_um = 1.0 / um_per_px
    f = config.work_rbc_px / (RBC_DIAMETER_UM * px_per_um)  # work px per original px
    f = min(f, 2.0, config.max_work_side / max(h, w))
    sw, sh = max(1, round(w * f)), max(1, round(h * f))
    small = shrink(rgb, sw, sh)
    fx, fy = sw / w, sh / h
    wpu = px_per_um * f  # work px per um

    m = stain_map(white_balance(small))
    mask = (m > _threshold(m, config.min_threshold)).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return []
    gap = max(1, int(round(config.merge_gap_um * wpu / 2)))
    grown = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1, 2 * gap + 1)))
    _, groups = cv2.connectedComponents(grown, connectivity=8)
    comp_group = np.zeros(n, np.int32)
    comp_group[labels.ravel()] = groups.ravel()  # every pixel of a component lies in one group

    min_area = config.min_nucleus_um2 * wpu * wpu
    max_px = config.max_nucleus_um * wpu
    thr = _threshold(m, config.min_threshold)
    out: list[Detection] = []
    for g in np.unique(comp_group[1:]):
        ids = [i for i in range(1, n) if comp_group[i] == g]
        if sum(stats[i, cv2.CC_STAT_AREA] for i in ids) < min_area:
            continue
        x0 = min(stats[i, cv2.CC_STAT_LEFT] for i in ids)
        y0 = min(stats[i, cv2.CC_STAT_TOP] for i in ids)
        x1 = max(stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH] for i in ids)
        y1 = max(stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT] for i in ids)
        if max(x1 - x0, y1 - y0) > max_px:
            sub = _split_group(ids, labels[y0:y1, x0:x1], stats, cents - [x0, y0], max_px, min_area)
        else:
            sub = [np.isin(labels[y0:y1, x0:x1], ids)]
        for part in sub:
            ys, xs = np.nonzero(part)
            if ys.size < min_area:
                continue
            det = _make_detection(xs + x0, ys + y0, m, thr, min_area, wpu, config, (sw, sh), (fx, fy), (w, h))
            out.append(det)
    out.sort(key=lambda d: -d.score)
    return out


def _make_detection(xs, ys, m, thr, min_area, wpu, config, work_wh, fxy, orig_wh) -> Detection:
    sw, sh = work_wh
    fx, fy = fxy
    w, h = orig_wh
    nx0, nx1, ny0, ny1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    size = max(nx1 - nx0, ny1 - ny0)
    pad = max(config.cyto_margin * size, config.cyto_min_um * wpu)
    bx0, by0, bx1, by1 = nx0 - pad, ny0 - pad, nx1 + pad, ny1 + pad
    edge = bx0 < 0 or by0 < 0 or bx1 > sw or by1 > sh
    box = (int(np.clip(np.floor(bx0 / fx), 0, w - 1)), int(np.clip(np.floor(by0 / fy), 0, h - 1)),
           int(np.clip(np.ceil(bx1 / fx), 1, w)), int(np.clip(np.ceil(by1 / fy), 1, h)))
    contrast = float(m[ys, xs].mean()) - thr
    area_ratio = ys.size / min_area
    score = float(np.clip(0.5 * (1 - math.exp(-contrast / 30.0)) + 0.5 * (1 - math.exp(-(area_ratio - 1.0))), 0.0, 1.0))
    ncx, ncy = (xs.mean() + 0.5) / fx - 0.5, (ys.mean() + 0.5) / fy - 0.5
    return Detection(box=box, score=score, edge=bool(edge), nucleus=(float(ncx), float(ncy), float(size / fx)))
