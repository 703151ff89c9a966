"""The shared image loader: colour modes, bit depths, EXIF orientation, resizing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.io.images import read_image


def _gradient(h: int = 30, w: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 8, (x + y) * 3], -1).astype(np.uint8)  # RGB


def test_rgb_and_grayscale(tmp_path):
    rgb = _gradient()
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    img = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(img.array, rgb)
    gray = read_image(tmp_path / "a.png", grayscale=True)
    assert gray.array.shape == (30, 40) and gray.array.dtype == np.uint8


def test_grayscale_file_read_as_rgb(tmp_path):
    cv2.imwrite(str(tmp_path / "g.png"), np.full((10, 12), 77, np.uint8))
    img = read_image(tmp_path / "g.png")
    assert img.array.shape == (10, 12, 3) and np.all(img.array == 77)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([_gradient()[..., ::-1], np.full((30, 40), 10, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png").array, _gradient())


def test_16_bit_is_reduced_to_8_bit(tmp_path):
    cv2.imwrite(str(tmp_path / "d.png"), np.full((8, 8), 51400, np.uint16))
    img = read_image(tmp_path / "d.png", grayscale=True)
    assert img.array.dtype == np.uint8 and np.all(img.array == 51400 >> 8)


def test_exif_orientation_is_ignored_by_default_and_applied_on_request(tmp_path):
    """Stored pixels by default (kapture, COLMAP, hloc and the official extractors use them,
    and intrinsics describe them); ``apply_exif`` rotates as the image would be shown."""
    from PIL import Image

    rgb = _gradient(20, 50)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    stored = read_image(tmp_path / "r.jpg")
    assert stored.array.shape[:2] == (20, 50) and stored.original_size == (50, 20)
    img = read_image(tmp_path / "r.jpg", apply_exif=True)
    assert img.array.shape[:2] == (50, 20) and img.original_size == (20, 50)


def test_resize_reports_scale_and_maps_keypoints_back(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((769, 1024, 3), np.uint8))
    img = read_image(tmp_path / "a.png", max_size=512)
    assert img.size == (512, 384) and img.original_size == (1024, 769)
    assert img.scale == (0.5, 384 / 769)
    back = img.to_original(np.array([[0.0, 0.0], [511.0, 383.0]], np.float32))
    # pixel centres map to pixel centres: x0 = (x + 0.5) / s - 0.5
    np.testing.assert_allclose(back, [[0.5, 0.5 / img.scale[1] - 0.5], [1022.5, 383.5 / img.scale[1] - 0.5]],
                               rtol=1e-6)


def test_small_images_are_never_upsampled(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((5, 7, 3), np.uint8))
    img = read_image(tmp_path / "a.png", max_size=1024)
    assert img.size == (7, 5) and img.scale == (1.0, 1.0)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_unreadable_images_give_one_line_errors(tmp_path, content):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(CbirError, match="cannot decode image") as info:
        read_image(p)
    assert str(info.value).startswith(str(p))


def test_missing_image(tmp_path):
    with pytest.raises(CbirError, match="image not found"):
        read_image(tmp_path / "nope.jpg")


def test_non_ascii_file_names(tmp_path):
    p = tmp_path / "château_東京.png"
    cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tofile(str(p))
    assert read_image(p).size == (4, 4)
