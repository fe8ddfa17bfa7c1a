"""Datasets (numpy/OpenCV only, no torch at import): labelled class folders, a stratified split, BCCD frames.

Also builds the preprocessed crop cache that training reads (uint8 [N, S, S, 3] in one .npz).
"""
from __future__ import annotations

import csv
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import InputError
from edge.imageio import iter_image_paths, read_image
from edge.preprocess import CROP_SIZE, normalise_cell


@dataclass(frozen=True)
class LabelledFolder:
    """paths: image files; labels: int64 [N] indices into classes; classes: sorted folder names."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]


def load_labelled_folder(root: str | Path, classes: list[str] | None = None, min_classes: int = 2) -> LabelledFolder:
    """A folder of class folders (PBC layout, searched recursively, any image size) -> LabelledFolder.

    ``classes`` fixes the class list (a folder naming another class is an error); otherwise the sorted
    non-empty sub-folder names are used. Empty class folders and too few classes raise InputError.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of class folders")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not subdirs:
        raise InputError(f"{root}: has no class sub-folders (expected <root>/<class>/<image>)")
    per_class = {d.name: iter_image_paths([d]) for d in subdirs}
    empty = [c for c, ps in per_class.items() if not ps]
    if empty:
        raise InputError(f"{root}: empty class folder(s): {', '.join(empty)}")
    if classes is None:
        classes = sorted(per_class)
        if len(classes) < min_classes:
            raise InputError(f"{root}: found {len(classes)} class folder(s) ({', '.join(classes)}); need at least {min_classes}")
    else:
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise InputError(f"{root}: class folder(s) {', '.join(unknown)} not known to the model (known: {', '.join(classes)})")
    paths, labels = [], []
    for c, ps in per_class.items():
        paths.extend(ps)
        labels.extend([classes.index(c)] * len(ps))
    return LabelledFolder(paths=paths, labels=np.asarray(labels, np.int64), classes=list(classes))


HELD_OUT_SPLITS = ("cal", "val")  # splits no training or distillation saw: the ones calibration may use


def held_out_index(splits: dict, names: list[str] | tuple[str, ...]) -> np.ndarray:
    """The concatenated indices int64 [M] of the named held-out splits of a splits file's arrays (``splits``:
    name -> int64 indices). Raises InputError for a name the file lacks or one the model was trained on."""
    if not names:
        raise InputError("name at least one split to calibrate on (e.g. cal or cal,val)")
    bad = [n for n in names if n not in HELD_OUT_SPLITS]
    if bad:
        raise InputError(f"cannot calibrate on split(s) {', '.join(bad)}: only the held-out splits "
                         f"{', '.join(HELD_OUT_SPLITS)} (the model was fitted on the others)")
    missing = [n for n in names if n not in splits]
    if missing:
        raise InputError(f"the splits file has no {', '.join(missing)} split (it has {', '.join(sorted(splits))})")
    return np.concatenate([np.asarray(splits[n], np.int64) for n in names])


def select_splits(folder: LabelledFolder, splits_path: str | Path, names: list[str] | tuple[str, ...]) -> LabelledFolder:
    """The cells of ``folder`` in the named held-out splits of ``splits_path`` (a teacher's splits.npz: indices into
    the folder's image list, with the listing's ``digest``). Raises InputError when the file is missing, was made
    for another listing of images (digest mismatch) or names a split that is absent or not held out."""
    splits_path = Path(splits_path)
    if not splits_path.is_file():
        raise InputError(f"{splits_path}: splits file not found")
    with np.load(splits_path, allow_pickle=False) as z:
        splits = {k: z[k] for k in z.files}
    digest = str(splits.pop("digest", ""))
    if digest != file_digest(folder.paths):
        raise InputError(f"{splits_path}: made for another set of images (digest {digest[:12] or 'missing'}, this "
                         f"folder's {file_digest(folder.paths)[:12]}); give the folder the splits were drawn from")
    idx = held_out_index(splits, names)
    return LabelledFolder(paths=[folder.paths[i] for i in idx], labels=folder.labels[idx], classes=folder.classes)


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int = 0) -> list[np.ndarray]:
    """Split indices per class by ``fractions`` (summing to <= 1; the remainder is the first part).

    Returns [rest, part1, part2, ...] as sorted int64 index arrays; deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        start = 0
        for k, frac in enumerate(fractions):
            n = int(round(frac * len(idx)))
            parts[k + 1].extend(idx[start:start + n])
            start += n
        parts[0].extend(idx[start:])
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def file_digest(paths: list[Path]) -> str:
    """sha256 over the relative names and sizes of ``paths`` (cheap identity of a dataset listing)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.parent.name}/{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def build_crop_cache(folder: LabelledFolder, out: str | Path, size: int = CROP_SIZE, progress: bool = True) -> Path:
    """Preprocess every image once -> ``out`` .npz with crops uint8 [N, size, size, 3], labels, classes, found, names."""
    out = Path(out)
    crops = np.zeros((len(folder.paths), size, size, 3), np.uint8)
    found = np.zeros(len(folder.paths), bool)
    it = folder.paths
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="preprocess", unit="img")
    for i, p in enumerate(it):
        c = normalise_cell(read_image(p), size=size)
        crops[i], found[i] = c.crop, c.found
    out.parent.mkdir(parents=True, exist_ok=True)
    names = np.asarray([f"{p.parent.name}/{p.name}" for p in folder.paths])
    np.savez(out, crops=crops, labels=folder.labels, classes=np.asarray(folder.classes), found=found, names=names,
             digest=np.asarray(file_digest(folder.paths)))
    return out


# ---- BCCD (whole smear frames, another microscope) ----

BCCD_TO_PBC = {"NEUTROPHIL": "neutrophil", "EOSINOPHIL": "eosinophil", "LYMPHOCYTE": "lymphocyte",
               "MONOCYTE": "monocyte", "BASOPHIL": "basophil"}


@dataclass(frozen=True)
class BccdFrame:
    """path: the JPEG; boxes: {"WBC"|"RBC"|"Platelets": int [M, 4] x0, y0, x1, y1 px}; label: PBC class or None."""

    path: Path
    boxes: dict[str, np.ndarray]
    label: str | None


def load_bccd(root: str | Path) -> list[BccdFrame]:
    """BCCD root (holding BCCD/Annotations, BCCD/JPEGImages, wbc_labels.csv) -> frames with boxes and labels.

    ``label`` is set only for frames whose wbc_labels.csv row holds exactly one category.
    """
    root = Path(root)
    ann_dir, img_dir = root / "BCCD" / "Annotations", root / "BCCD" / "JPEGImages"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise InputError(f"{root}: not a BCCD folder (expected BCCD/Annotations and BCCD/JPEGImages)")
    labels: dict[int, str] = {}
    csv_path = root / "wbc_labels.csv"
    if csv_path.exists():
        with csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                cats = [c.strip() for c in (row.get("Category") or "").split(",") if c.strip()]
                if len(cats) == 1 and cats[0] in BCCD_TO_PBC and (row.get("Image") or "").strip().isdigit():
                    labels[int(row["Image"])] = BCCD_TO_PBC[cats[0]]
    frames = []
    for xml in sorted(ann_dir.glob("*.xml")):
        tree = ET.parse(xml).getroot()
        fname = tree.findtext("filename") or (xml.stem + ".jpg")
        if not fname.lower().endswith(".jpg"):
            fname += ".jpg"
        path = img_dir / fname
        if not path.exists():
            continue
        boxes: dict[str, list[list[int]]] = {}
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            box = [int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")]
            boxes.setdefault((obj.findtext("name") or "").strip(), []).append(box)
        digits = "".join(ch for ch in path.stem if ch.isdigit())
        frames.append(BccdFrame(path=path, boxes={k: np.asarray(v, np.int64) for k, v in boxes.items()},
                                label=labels.get(int(digits)) if digits else None))
    if not frames:
        raise InputError(f"{root}: no annotated BCCD frames found")
    return frames
