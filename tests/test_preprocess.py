"""Cell preprocessing and image reading: centring, scale normalisation, odd pixel formats, bad files."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge.errors import InputError
from edge.imageio import decode_image, iter_image_paths, read_image
from edge.preprocess import CROP_SIZE, NUCLEUS_FILL, locate_cell, normalise_cell
from smear import Wbc, render_smear


def _nucleus_centre(crop: np.ndarray) -> tuple[float, float, float]:
    """Centroid (x, y) and equivalent diameter of the purple pixels of a crop."""
    m = (crop[:, :, 2].astype(int) - crop[:, :, 1].astype(int)) > 60
    ys, xs = np.nonzero(m)
    return xs.mean(), ys.mean(), 2 * np.sqrt(m.sum() / np.pi)


def test_off_centre_cell_is_centred():
    img = render_smear([Wbc(110, 55)], h=160, w=160, px_per_um=3.0, n_rbc=12, n_platelets=0)
    c = normalise_cell(img)
    assert c.found
    assert abs(c.centre[0] - 110) < 3 and abs(c.centre[1] - 55) < 3
    cx, cy, _ = _nucleus_centre(c.crop)
    assert abs(cx - CROP_SIZE / 2) < 2.5 and abs(cy - CROP_SIZE / 2) < 2.5


def test_two_scales_normalise_to_same_size():
    small = render_smear([Wbc(60, 60)], h=120, w=120, px_per_um=2.5, n_rbc=8, n_platelets=0, seed=1)
    large = render_smear([Wbc(180, 180)], h=360, w=360, px_per_um=7.5, n_rbc=12, n_platelets=0, seed=2)
    d_small = _nucleus_centre(normalise_cell(small).crop)[2]
    d_large = _nucleus_centre(normalise_cell(large).crop)[2]
    assert abs(d_small - d_large) / d_large < 0.1
    assert abs(d_large - NUCLEUS_FILL * CROP_SIZE) / (NUCLEUS_FILL * CROP_SIZE) < 0.15


def test_cell_filling_the_frame_and_yellow_background():
    img = render_smear([Wbc(50, 50, cell_um=12)], h=100, w=100, px_per_um=8.0, n_rbc=0, n_platelets=0)
    yellow = np.clip(img.astype(int) + np.array([10, 5, -35]), 0, 255).astype(np.uint8)
    c = normalise_cell(yellow)
    assert c.found and abs(c.centre[0] - 50) < 3


def test_no_nucleus_falls_back_to_centre_and_says_so():
    img = np.full((120, 90, 3), (230, 200, 190), np.uint8)
    c = normalise_cell(img)
    assert not c.found
    assert c.centre == (45.0, 60.0)
    assert c.crop.shape == (CROP_SIZE, CROP_SIZE, 3)


def test_lobed_nucleus_is_one_cell():
    img = render_smear([Wbc(80, 80, kind="lobed")], h=160, w=160, px_per_um=3.0, n_rbc=10, n_platelets=0)
    cx, cy, diam, found = locate_cell(img)
    assert found and abs(cx - 80) < 5 and diam > 8 * 3.0  # the lobes span ~ 13 um; one lobe is 3 um


@pytest.fixture
def cell_png(tmp_path):
    img = render_smear([Wbc(80, 80)], h=160, w=160, px_per_um=3.0, n_rbc=10, n_platelets=0)
    return img


def test_pixel_formats(tmp_path, cell_png):
    bgr = cv2.cvtColor(cell_png, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(tmp_path / "grey.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(tmp_path / "deep.png"), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "cell.tif"), bgr)
    cv2.imwrite(str(tmp_path / "cell.bmp"), bgr)
    for name in ("grey.png", "rgba.png", "deep.png", "cell.tif", "cell.bmp"):
        img = read_image(tmp_path / name)
        assert img.dtype == np.uint8 and img.shape == (160, 160, 3), name
    assert np.abs(read_image(tmp_path / "deep.png").astype(int) - cell_png).max() <= 1
    assert np.array_equal(read_image(tmp_path / "rgba.png"), cell_png)


def test_exif_orientation_is_applied(cell_png):
    """A JPEG stored sideways with EXIF Orientation = 6 (rotate 90 CW to display) comes back upright."""
    pil = pytest.importorskip("PIL.Image")
    import io

    upright = np.zeros((40, 80, 3), np.uint8)
    upright[:, :40] = (255, 0, 0)  # red left half
    stored = np.rot90(upright, k=1).copy()  # what a sideways camera writes (80 x 40)
    exif = pil.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    pil.fromarray(stored).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    img = decode_image(buf.getvalue(), "rotated.jpg")
    assert img.shape == (40, 80, 3)
    assert img[:, :40, 0].mean() > 200 and img[:, 40:, 0].mean() < 60


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"this is not an image", "not a readable image"),
])
def test_bad_files_raise_naming_the_file(tmp_path, content, message):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message) as exc:
        read_image(p)
    assert "bad.jpg" in str(exc.value)


def test_truncated_jpeg_and_missing_file(tmp_path, cell_png):
    ok, buf = cv2.imencode(".jpg", cell_png)
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.tobytes()[:200])
    with pytest.raises(InputError, match="cut.jpg"):
        read_image(p)
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="no such file or folder"):
        iter_image_paths([tmp_path / "missing_dir"])
