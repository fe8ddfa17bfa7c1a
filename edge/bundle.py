"""Load and verify a model bundle (contract 4): a folder with ``manifest.json`` and the files it names.

Loading refuses, with a BundleError naming the problem, a missing or unparsable manifest, a manifest from a
newer (or unknown) format, a missing file, a file whose size or sha256 differs from the manifest, an engine or
calibration that the manifest names but does not hash, and a calibration for other classes. The ONNX graph's
inputs and outputs are checked against the manifest by the backend when it opens the engine.

No torch here: this runs on the box.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import BundleError, CalibrationError

FORMAT = 1  # the manifest format this runtime reads and writes
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
_REQUIRED = ("format", "name", "classes", "input", "timesteps", "noise_seed", "evals_per_cell", "precision",
             "engines", "files")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle. root: folder; manifest: parsed manifest.json; classes: K class names; crop_size: input
    side S in px; evals_per_cell: denoiser evaluations per cell; calibration: parsed calibration.json or None;
    bundle_id: 12 hex chars identifying the exact files; engines: precision -> ONNX file name; precision: the
    default precision; timesteps: the fixed timesteps; noise_seed: seed of the fixed noise; view: the dihedral
    view the engine turns each cell by inside its graph (export.engine.VIEWS; "identity" in older manifests)."""

    root: Path
    manifest: dict
    classes: list[str]
    crop_size: int
    evals_per_cell: int
    calibration: dict | None
    bundle_id: str
    engines: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    timesteps: list[int] = field(default_factory=list)
    noise_seed: int = 0
    view: str = "identity"
    tensorrt_sources: dict[str, str] = field(default_factory=dict)  # precision -> ONNX a TensorRT plan is built from

    def engine_path(self, precision: str | None = None) -> Path:
        """Path of the ONNX engine for ``precision`` (None = the bundle's default); BundleError if absent."""
        precision = precision or self.precision
        if precision not in self.engines:
            have = ", ".join(sorted(self.engines)) or "none"
            raise BundleError(f"{self.root}: bundle has no {precision} engine (it has: {have})")
        return self.root / self.engines[precision]

    def tensorrt_onnx(self, precision: str, missing_ok: bool = False) -> str | None:
        """File name of the ONNX model a TensorRT ``precision`` plan is built from: the manifest's
        ``tensorrt_sources`` entry (INT8: symmetric int8 Q/DQ, which TensorRT needs) or else the engine of that
        precision. When the bundle has neither: None with ``missing_ok``, else BundleError."""
        name = self.tensorrt_sources.get(precision) or self.engines.get(precision)
        if name is None and not missing_ok:
            have = ", ".join(sorted(set(self.engines) | set(self.tensorrt_sources))) or "none"
            raise BundleError(f"{self.root}: bundle has no {precision} ONNX model to build a TensorRT plan from (it has: {have})")
        return name


def default_bundle_dir() -> Path:
    """The bundle shipped inside the package: edge/models/default."""
    return Path(__file__).resolve().parent / "models" / "default"


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compute_bundle_id(files: dict) -> str:
    """First 12 hex of sha256 over the "name sha256" lines of every file, sorted by name."""
    lines = "".join(f"{name} {files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found (packaged bundles: {', '.join(packaged_bundles()) or 'none'})")
    if not path.is_file():
        raise BundleError(f"{path}: manifest missing (not a model bundle)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise BundleError(f"{path}: manifest has no integer 'format' (this runtime reads format {FORMAT})")
    if fmt > FORMAT:
        raise BundleError(f"{path}: bundle format {fmt} is newer than this runtime supports (format {FORMAT}); "
                          f"upgrade cytoedge")
    if fmt != FORMAT:
        raise BundleError(f"{path}: bundle format {fmt} is not supported (this runtime reads format {FORMAT})")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest


def _check_file(root: Path, name: str, entry: dict) -> None:
    path = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise BundleError(f"{root / MANIFEST}: file name {name!r} must be relative to the bundle")
    if not path.is_file():
        raise BundleError(f"{path}: file listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise BundleError(f"{path}: {size} bytes, the manifest says {entry.get('bytes')} (altered or truncated)")
    digest = file_sha256(path)
    if digest != entry.get("sha256"):
        raise BundleError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                          f"{str(entry.get('sha256'))[:12]}... (the file was altered)")


# --help text of every command's --bundle option (the names are the folders of edge/models; see packaged_bundles)
BUNDLE_HELP = ("model bundle folder, or a packaged bundle: default (2 denoiser passes per cell) or conditional "
               "(16 passes; docs/results.md)")


def packaged_bundles() -> list[str]:
    """Names of the bundles shipped in the package (folders of edge/models with a manifest): "conditional" (the
    16-pass conditional engine shipped until session 14) and "default" (the 2-pass multi-head engine)."""
    models = default_bundle_dir().parent
    return sorted(p.name for p in models.iterdir() if (p / MANIFEST).is_file()) if models.is_dir() else []


def resolve_bundle_dir(path: str | Path | None = None) -> Path:
    """A bundle folder, or the name of a packaged bundle ("conditional" = edge/models/conditional) where no such
    folder exists here; None = the default bundle."""
    if path is None:
        return default_bundle_dir()
    root = Path(path)
    if not root.exists() and str(path) in packaged_bundles():
        return default_bundle_dir().parent / str(path)
    return root


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Verify and load the bundle at ``path``: a folder, or a packaged bundle's name (``packaged_bundles``);
    None = the default bundle shipped in the package."""
    root = resolve_bundle_dir(path)
    m = _read_manifest(root)
    files = m["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{root / MANIFEST}: 'files' must map file names to {{sha256, bytes}}")
    for name, entry in files.items():
        _check_file(root, name, entry if isinstance(entry, dict) else {})
    engines = m["engines"]
    if not isinstance(engines, dict) or not engines:
        raise BundleError(f"{root / MANIFEST}: 'engines' must name at least one engine file")
    for prec, name in engines.items():
        if prec not in PRECISIONS:
            raise BundleError(f"{root / MANIFEST}: unknown engine precision {prec!r} (known: {', '.join(PRECISIONS)})")
        if name not in files:
            raise BundleError(f"{root / MANIFEST}: engine {name} is not hashed in 'files'")
    sources = m.get("tensorrt_sources", {})
    if not isinstance(sources, dict) or any(p not in PRECISIONS or n not in files for p, n in sources.items()):
        raise BundleError(f"{root / MANIFEST}: 'tensorrt_sources' must map precisions to ONNX files hashed in 'files'")
    if m["precision"] not in engines:
        raise BundleError(f"{root / MANIFEST}: default precision {m['precision']!r} has no engine "
                          f"(engines: {', '.join(engines)})")
    classes = m["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes):
        raise BundleError(f"{root / MANIFEST}: 'classes' must be a list of at least 2 distinct names")
    try:
        crop = int(m["input"]["size"])
        evals = int(m["evals_per_cell"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{root / MANIFEST}: bad input spec or evals_per_cell ({exc})") from exc
    if not isinstance(m["timesteps"], list) or evals != len(classes) * len(m["timesteps"]):
        raise BundleError(f"{root / MANIFEST}: evals_per_cell {evals} is not classes x timesteps "
                          f"({len(classes)} x {len(m['timesteps']) if isinstance(m['timesteps'], list) else '?'})")

    bundle_id = compute_bundle_id(files)
    if m.get("bundle_id", bundle_id) != bundle_id:
        raise BundleError(f"{root / MANIFEST}: bundle_id {m['bundle_id']} does not match its file hashes ({bundle_id}); "
                          f"the manifest was edited by hand")

    calibration = None
    cal_name = m.get("calibration")
    if cal_name:
        if cal_name not in files:
            raise BundleError(f"{root / MANIFEST}: calibration {cal_name} is not hashed in 'files'")
        try:
            calibration = json.loads((root / cal_name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{root / cal_name}: not valid JSON ({exc})") from exc
        from calibration.fit import check_calibration

        try:
            check_calibration(calibration, classes)
        except CalibrationError as exc:
            raise BundleError(f"{root / cal_name}: {exc}") from exc

    return Bundle(root=root, manifest=m, classes=list(classes), crop_size=crop, evals_per_cell=evals,
                  calibration=calibration, bundle_id=bundle_id, engines=dict(engines),
                  precision=m["precision"], timesteps=[int(t) for t in m["timesteps"]],
                  noise_seed=int(m["noise_seed"]), view=str(m.get("view", "identity")), tensorrt_sources=dict(sources))


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync, then rename over ``path``. The file keeps the
    permissions of the one it replaces (a new one gets 0644), not mkstemp's 0600: a daemon running as another
    user must still read a bundle that ``cytoedge calibrate`` rewrote."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Build a folder at ``out`` all or nothing: yields ``<out>.partial`` (an old one removed, not created: the
    caller makes it) to fill, renamed to ``out`` when the block ends cleanly and removed when it raises, so a
    stopped export never leaves a half-written bundle or checkpoint where a loader would find it."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def update_bundle_file(bundle_dir: str | Path, name: str, data: bytes, manifest_updates: dict | None = None) -> str:
    """Replace (or add) the file ``name`` in a bundle with ``data``, atomically, and record its size and sha256
    and the new bundle_id in manifest.json (also written atomically). Other files are not re-hashed, so an
    altered file elsewhere still fails the next load. Adding "calibration.json" makes it the bundle's
    calibration. ``manifest_updates``: top-level manifest entries that describe the new file (e.g. its
    "quantization"), replaced in the same write. Returns the new bundle_id."""
    root = Path(bundle_dir)
    m = _read_manifest(root)
    if Path(name).is_absolute() or ".." in Path(name).parts or Path(name).name == MANIFEST:
        raise BundleError(f"{root}: cannot update {name!r} (must be a file name inside the bundle, not the manifest)")
    fixed = sorted({"format", "files", "bundle_id"} & set(manifest_updates or {}))
    if fixed:
        raise BundleError(f"{root}: manifest entries {fixed} follow from the files and cannot be set")
    m.update(manifest_updates or {})
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, data)
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if name == "calibration.json" and not m.get("calibration"):
        m["calibration"] = name
    m["bundle_id"] = compute_bundle_id(m["files"])
    _atomic_write(root / MANIFEST, (json.dumps(m, indent=2) + "\n").encode())
    return m["bundle_id"]
