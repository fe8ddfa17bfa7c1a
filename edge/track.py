"""Following cells across frames while the stage moves, so each physical cell is classified and counted once.

Each frame: (1) the global stage shift since the previous frame, by phase correlation of downscaled grey
frames (the whole field moves together under a microscope); (2) every live track's box moved by that shift;
(3) detections matched to the moved boxes, greedily by overlap (IoU), then by centre distance for boxes
that changed shape (a cell entering the field grows); (4) unmatched detections start new tracks; tracks
unseen for ``max_missed`` frames or moved out of the field end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edge.detect import Detection


@dataclass(frozen=True)
class TrackConfig:
    iou_min: float = 0.25  # overlap that links a detection to a track
    centre_frac: float = 0.5  # else: centre distance below this fraction of the box size links them
    max_missed: int = 8  # frames a track survives without a detection (blur, a missed frame)
    shift_side: int = 192  # long side of the grey frames used for phase correlation, px
    min_response: float = 0.03  # phase-correlation peak below this: the shift is not trusted (taken as 0)


@dataclass
class Track:
    """A physical cell. box: float [4] x0, y0, x1, y1 in the current frame's px; seen: frames matched;
    missed: consecutive frames unmatched; edge: cut by the frame edge when last seen; state: owner's data."""

    id: int
    box: np.ndarray
    seen: int = 1
    missed: int = 0
    edge: bool = False
    state: dict[str, Any] = field(default_factory=dict)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float [N, 4] and [M, 4] boxes -> IoU float [N, M]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


class StageShift:
    """Global shift between consecutive frames by phase correlation (px of the full frame)."""

    def __init__(self, side: int = 192, min_response: float = 0.03):
        self.side, self.min_response = side, min_response
        self.prev: np.ndarray | None = None
        self.window: np.ndarray | None = None
        self.response = 0.0

    def update(self, rgb: np.ndarray) -> tuple[float, float]:
        """uint8 RGB [H, W, 3] -> (dx, dy): how far the content moved since the previous frame, px."""
        h, w = rgb.shape[:2]
        f = min(1.0, self.side / max(h, w))
        grey = cv2.cvtColor(cv2.resize(rgb, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA),
                            cv2.COLOR_RGB2GRAY).astype(np.float32)
        prev, self.prev = self.prev, grey
        if prev is None or prev.shape != grey.shape:
            self.response = 0.0
            return 0.0, 0.0
        if self.window is None or self.window.shape != grey.shape:
            self.window = cv2.createHanningWindow(grey.shape[::-1], cv2.CV_32F)
        (dx, dy), self.response = cv2.phaseCorrelate(prev, grey, self.window)
        if self.response < self.min_response:
            return 0.0, 0.0
        return dx / f, dy / f


class Tracker:
    """Links detections across frames of one slide. Track ids count up from ``first_id``."""

    def __init__(self, config: TrackConfig = TrackConfig(), first_id: int = 1):
        self.config = config
        self.next_id = first_id
        self.tracks: list[Track] = []
        self.stage = StageShift(config.shift_side, config.min_response)
        self.shift = (0.0, 0.0)

    def update(self, rgb: np.ndarray, detections: list[Detection]) -> list[tuple[Track, Detection]]:
        """uint8 RGB [H, W, 3] frame and its detections -> (track, detection) for every detection, in order.

        Tracks that end are dropped from ``self.tracks``; the caller keeps what it needs from ``state``.
        """
        c = self.config
        h, w = rgb.shape[:2]
        dx, dy = self.shift = self.stage.update(rgb)
        for t in self.tracks:
            t.box = t.box + np.array([dx, dy, dx, dy])
        det_boxes = np.array([d.box for d in detections], float).reshape(-1, 4)
        trk_boxes = np.array([t.box for t in self.tracks], float).reshape(-1, 4)
        pairs: dict[int, int] = {}  # detection index -> track index
        iou = box_iou(det_boxes, trk_boxes)
        for i, j in zip(*np.unravel_index(np.argsort(-iou, axis=None), iou.shape)):
            if iou[i, j] < c.iou_min:
                break
            if i not in pairs and j not in pairs.values():
                pairs[int(i)] = int(j)
        if len(pairs) < min(len(det_boxes), len(trk_boxes)):
            dc = (det_boxes[:, :2] + det_boxes[:, 2:]) / 2
            tc = (trk_boxes[:, :2] + trk_boxes[:, 2:]) / 2
            dist = np.linalg.norm(dc[:, None] - tc[None], axis=2)
            size = np.maximum((det_boxes[:, 2:] - det_boxes[:, :2]).max(1)[:, None], (trk_boxes[:, 2:] - trk_boxes[:, :2]).max(1)[None])
            rel = dist / np.maximum(size, 1.0)
            for i, j in zip(*np.unravel_index(np.argsort(rel, axis=None), rel.shape)):
                if rel[i, j] > c.centre_frac:
                    break
                if i not in pairs and j not in pairs.values():
                    pairs[int(i)] = int(j)
        out = []
        matched = set(pairs.values())
        for i, d in enumerate(detections):
            if i in pairs:
                t = self.tracks[pairs[i]]
                t.box, t.seen, t.missed, t.edge = det_boxes[i].copy(), t.seen + 1, 0, d.edge
            else:
                t = Track(id=self.next_id, box=det_boxes[i].copy(), edge=d.edge)
                self.next_id += 1
                self.tracks.append(t)
            out.append((t, d))
        keep = []
        for j, t in enumerate(self.tracks[:len(trk_boxes)]):
            if j not in matched:
                t.missed += 1
            inside = t.box[2] > 0 and t.box[3] > 0 and t.box[0] < w and t.box[1] < h
            if t.missed <= c.max_missed and inside:
                keep.append(t)
        self.tracks = keep + self.tracks[len(trk_boxes):]
        return out
