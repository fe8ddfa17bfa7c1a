"""Following cells across frames while the stage moves, so each physical cell is classified and counted once.

Each frame: (1) the global stage shift since the previous frame, by phase correlation of downscaled grey
frames (the whole field moves together under a microscope); (2) every live track's box moved by that shift;
(3) detections matched to the moved boxes, greedily by overlap (IoU), then by centre distance for boxes
that changed shape (a cell entering the field grows); (4) unmatched detections start new tracks; tracks
unseen for ``max_missed`` frames or moved out of the field end.

The shifts are also summed into a slide position, and ended tracks are remembered (bounded) in slide
coordinates: when the operator moves back over a cell already seen, the detection takes up its old track
(and so its classification and its place in the count) instead of starting a new one.

When consecutive frames do not correlate (a jump to another field, a refocus, a new slide under the same
id) the motion is unknown: that is a cut; every track ends and the slide position starts afresh, so cells
in view after it are new tracks (a cell may then be counted twice, never two cells once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edge.detect import Detection, shrink


@dataclass(frozen=True)
class TrackConfig:
    iou_min: float = 0.25  # overlap that links a detection to a track
    centre_frac: float = 0.5  # else: centre distance below this fraction of the box size links them
    max_missed: int = 8  # frames a track survives without a detection (blur, a missed frame)
    shift_side: int = 160  # long side of the grey frames used for phase correlation, px
    min_response: float = 0.15  # phase-correlation peak below this: a cut (unrelated field), no linking
    remember: int = 4096  # ended tracks kept (in slide coordinates) to recognise revisited cells


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

    def __init__(self, side: int = 160, min_response: float = 0.15):
        self.side, self.min_response = side, min_response
        self.prev: np.ndarray | None = None
        self.window: np.ndarray | None = None
        self.response = 0.0

    def update(self, rgb: np.ndarray) -> tuple[float, float] | None:
        """uint8 RGB [H, W, 3] -> (dx, dy): how far the content moved since the previous frame, px;
        (0, 0) for the first frame; None when the frames do not correlate (a cut)."""
        h, w = rgb.shape[:2]
        f = min(1.0, self.side / max(h, w))
        grey = cv2.cvtColor(shrink(rgb, max(8, round(w * f)), max(8, round(h * f))), cv2.COLOR_RGB2GRAY).astype(np.float32)
        prev, self.prev = self.prev, grey
        if prev is None:
            self.response = 0.0
            return 0.0, 0.0
        if prev.shape != grey.shape:
            self.response = 0.0
            return None
        if self.window is None or self.window.shape != grey.shape:
            self.window = cv2.createHanningWindow(grey.shape[::-1], cv2.CV_32F)
        (dx, dy), self.response = cv2.phaseCorrelate(prev, grey, self.window)
        if self.response < self.min_response:
            return None
        return dx / f, dy / f


class Tracker:
    """Links detections across frames of one slide. Track ids count up from ``first_id``."""

    def __init__(self, config: TrackConfig = TrackConfig(), first_id: int = 1):
        self.config = config
        self.next_id = first_id
        self.tracks: list[Track] = []
        self.ended: list[tuple[np.ndarray, Track]] = []  # (box in slide coordinates, track)
        self.stage = StageShift(config.shift_side, config.min_response)
        self.shift = (0.0, 0.0)
        self.cut = False  # the last update was a cut
        self.offset = np.zeros(2)  # frame px = slide px + offset

    def update(self, rgb: np.ndarray, detections: list[Detection]) -> list[tuple[Track, Detection]]:
        """uint8 RGB [H, W, 3] frame and its detections -> (track, detection) for every detection, in order.

        Tracks that end are dropped from ``self.tracks``; the caller keeps what it needs from ``state``.
        """
        c = self.config
        h, w = rgb.shape[:2]
        shift = self.stage.update(rgb)
        self.cut = shift is None
        if shift is None:
            self.tracks, self.ended, self.offset = [], [], np.zeros(2)
            shift = (0.0, 0.0)
        dx, dy = self.shift = shift
        for t in self.tracks:
            t.box = t.box + np.array([dx, dy, dx, dy])
        self.offset += (dx, dy)
        det_boxes = np.array([d.box for d in detections], float).reshape(-1, 4)
        trk_boxes = np.array([t.box for t in self.tracks], float).reshape(-1, 4)
        pairs = self._match(det_boxes, trk_boxes)
        # Detections no live track claims: a cell seen before on this slide, back in view?
        rest = [i for i in range(len(det_boxes)) if i not in pairs]
        revived: dict[int, Track] = {}
        if rest and self.ended:
            old = np.array([b for b, _ in self.ended]) + np.tile(self.offset, 2)
            for i, k in self._match(det_boxes[rest], old).items():
                revived[rest[i]] = self.ended[k][1]
            taken = {id(t) for t in revived.values()}
            self.ended = [(b, t) for b, t in self.ended if id(t) not in taken]
        out = []
        matched = set(pairs.values())
        for i, d in enumerate(detections):
            if i in pairs or i in revived:
                t = self.tracks[pairs[i]] if i in pairs else revived[i]
                t.box, t.seen, t.missed, t.edge = det_boxes[i].copy(), t.seen + 1, 0, d.edge
                if i in revived:
                    self.tracks.append(t)
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
            else:
                self.ended.append((t.box - np.tile(self.offset, 2), t))
        self.ended = self.ended[-c.remember:]
        self.tracks = keep + self.tracks[len(trk_boxes):]
        return out

    def _match(self, det_boxes: np.ndarray, trk_boxes: np.ndarray) -> dict[int, int]:
        """Greedy one-to-one matching: by IoU first, then by relative centre distance -> {det: track}."""
        c = self.config
        pairs: dict[int, int] = {}
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
            size = np.maximum((det_boxes[:, 2:] - det_boxes[:, :2]).max(1)[:, None],
                              (trk_boxes[:, 2:] - trk_boxes[:, :2]).max(1)[None])
            rel = dist / np.maximum(size, 1.0)
            for i, j in zip(*np.unravel_index(np.argsort(rel, axis=None), rel.shape)):
                if rel[i, j] > c.centre_frac:
                    break
                if i not in pairs and j not in pairs.values():
                    pairs[int(i)] = int(j)
        return pairs
