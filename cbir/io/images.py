"""The one image loader of cbir (OpenCV): every extractor reads images through it.

Pixels are used as stored: EXIF orientation is ignored by default, as kapture, COLMAP,
hloc and the official extractors do, because intrinsics describe the stored pixels
(``apply_exif=True`` rotates first). 16-bit images are reduced to 8 bits, alpha is
dropped, and an optional resize to a maximum edge returns the per-axis scale factors so
keypoints can be mapped back. The image size is read from the header before decoding,
and an image over ``max_pixels`` is refused without being decoded.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import CbirError
from .child import in_child
from .hdf5 import timeout_s
from .textfile import read_file_bytes

#: images with more pixels are refused before decoding (a PNG header may claim 10^10 pixels)
DEFAULT_MAX_PIXELS = 1 << 28  # 268 Mpx, e.g. 16384 x 16384
MAX_PIXELS_ENV = "CBIR_MAX_IMAGE_PIXELS"
#: memory a decoder may need beyond the pixels themselves (its tables, buffers)
DECODE_SLACK = 128 << 20


def max_pixels_default() -> int:
    """``$CBIR_MAX_IMAGE_PIXELS`` if set to a positive integer, else :data:`DEFAULT_MAX_PIXELS`."""
    try:
        value = int(os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS))
    except ValueError:
        return DEFAULT_MAX_PIXELS
    return value if value > 0 else DEFAULT_MAX_PIXELS


def header_pixels(path: str | os.PathLike) -> int | None:
    """The number of stored pixels, from the image header alone (Pillow reads no pixel
    data), or None when Pillow does not know the format (OpenCV may still decode it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return int(im.size[0]) * int(im.size[1])
    except Image.DecompressionBombError as e:  # over Pillow's own limit: its message has the count
        m = re.search(r"\((\d+) pixels\)", str(e))
        return int(m.group(1)) if m else sys.maxsize
    except (OSError, ValueError, SyntaxError):
        return None


@dataclass(frozen=True)
class LoadedImage:
    array: np.ndarray  # H x W (grayscale) or H x W x 3 (RGB), uint8
    original_size: tuple[int, int]  # (width, height) as decoded (stored pixels by default), before resizing
    scale: tuple[float, float]  # (sx, sy) = resized size / original size

    @property
    def size(self) -> tuple[int, int]:
        return self.array.shape[1], self.array.shape[0]

    def to_original(self, keypoints: np.ndarray) -> np.ndarray:
        """Map (x, y) keypoints of the resized image to the original one (pixel-centre convention)."""
        sx, sy = self.scale
        out = np.array(keypoints, dtype=np.float64, copy=True)
        out[:, 0] = (out[:, 0] + 0.5) / sx - 0.5
        out[:, 1] = (out[:, 1] + 0.5) / sy - 0.5
        return out.astype(np.asarray(keypoints).dtype if np.asarray(keypoints).dtype.kind == "f" else np.float32)


def read_image(path: str | os.PathLike, *, grayscale: bool = False, max_size: int | None = None,
               interpolation: int = cv2.INTER_AREA, apply_exif: bool = False,
               max_pixels: int | None = None) -> LoadedImage:
    """Read an image as uint8 RGB (or grayscale), resized so that its longest edge is
    at most ``max_size`` (never upsampled). Any problem (missing, corrupt, too large) is a
    one-line :class:`CbirError` naming the file."""
    path = Path(path)
    # a regular file only (a FIFO would block, a device never end), read within its size; and
    # read from its bytes, which handles any file name, unlike cv2.imread
    data = np.frombuffer(read_file_bytes(path, "image"), dtype=np.uint8)
    limit = max_pixels_default() if max_pixels is None else max_pixels
    flags = (cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR) | cv2.IMREAD_ANYDEPTH
    if not apply_exif:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    pixels = header_pixels(path) if data.size else None
    if pixels is None and data.size:  # a format Pillow cannot identify (Radiance HDR, PFM...)
        pixels = _decoded_pixels(data, flags, limit, path)
    if pixels is not None and pixels > limit:
        raise CbirError(f"image of {pixels} pixels (by its header) is over the limit of {limit} "
                        f"(raise it with ${MAX_PIXELS_ENV})", path)
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as e:  # OpenCV's own limits and decoder failures
        m = re.search(r"error: \([^)]*\) (.*)", str(e))
        reason = (m.group(1) if m else str(e).strip().splitlines()[-1])[:200]
        raise CbirError(f"cannot decode image ({reason})", path) from None
    if image is None:
        raise CbirError("cannot decode image (empty, corrupt or unsupported format)", path)
    if image.dtype == np.uint16:
        image = (image.astype(np.uint16) >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if not grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    if w == 0 or h == 0:
        raise CbirError("image has zero size", path)
    scale = (1.0, 1.0)
    if max_size is not None and max(w, h) > max_size:
        s = max_size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        image = cv2.resize(image, (nw, nh), interpolation=interpolation)
        scale = (nw / w, nh / h)
    return LoadedImage(np.ascontiguousarray(image), (w, h), scale)


def _decoded_pixels(data: np.ndarray, flags: int, limit: int, path: Path) -> int | None:
    """The pixels of an image whose header Pillow cannot read, from a decode in a child
    process that may not use more memory than an image of ``limit`` pixels needs (3 float
    channels, twice); an image over it is refused without being decoded here."""
    status, result = in_child(_decoded_size, (data, flags), timeout_s(), memory=24 * limit + DECODE_SLACK)
    if status == "ok" and result != OUT_OF_MEMORY:
        return result
    if status in ("ok", "memory"):
        raise CbirError(f"image is over the limit of {limit} pixels (decoding it needs more memory than that many "
                        f"pixels take; raise the limit with ${MAX_PIXELS_ENV})", path)
    if status == "timeout" or "the reading process died" in str(result):
        raise CbirError("cannot decode image (the decoder did not finish)", path)
    return None  # the decoder's own error: decoding here says it


#: what :func:`_decoded_size` answers when the decoder ran out of its memory budget
OUT_OF_MEMORY = -1


def _decoded_size(data: np.ndarray, flags: int) -> int | None:
    """Runs in the child of :func:`_decoded_pixels`. OpenCV catches its own allocation
    failure and returns no image, as for a corrupt file, saying which only in its log: the
    log (stderr) is read back to tell them apart."""
    log = os.memfd_create("cbir-decode-log")
    os.dup2(log, 2)
    image = cv2.imdecode(data, flags)
    if image is not None:
        return int(image.shape[0]) * int(image.shape[1])
    os.lseek(log, 0, os.SEEK_SET)
    said = os.read(log, 1 << 16)
    return OUT_OF_MEMORY if b"Insufficient memory" in said or b"Failed to allocate" in said else None


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: its stored size and the EXIF tags that name its
    camera (Make, Model, FocalLengthIn35mmFilm; None when absent)."""

    width: int
    height: int
    make: str | None = None
    model: str | None = None
    focal_35mm: float | None = None

    @property
    def focal_px(self) -> float | None:
        """The focal length in pixels: the 36 mm frame width maps to the longest image edge."""
        return self.focal_35mm / 36.0 * max(self.width, self.height) if self.focal_35mm else None


def read_header(path: str | os.PathLike) -> ImageHeader:
    """The header of an image (Pillow reads no pixels); a file Pillow cannot identify is a
    :class:`CbirError` naming it."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            exif = im.getexif()
            make, model = exif.get(0x010F), exif.get(0x0110)
            f35 = exif.get_ifd(0x8769).get(0xA405)  # FocalLengthIn35mmFilm, in the Exif IFD
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CbirError(f"not an image Pillow can read ({e})", path) from None

    def text(v: object) -> str | None:
        return " ".join(str(v).replace("\x00", " ").split()) or None if v is not None else None

    try:
        focal = float(f35) if f35 else None
    except (TypeError, ValueError):
        focal = None
    return ImageHeader(int(width), int(height), text(make), text(model),
                       focal if focal is not None and 0 < focal < 10_000 else None)


def exif_focal_px(path: str | os.PathLike, width: int, height: int) -> float | None:
    """Focal length in pixels of a ``width`` x ``height`` image from its EXIF
    FocalLengthIn35mmFilm (see :attr:`ImageHeader.focal_px`); None without the tag."""
    try:
        f35 = read_header(path).focal_35mm
    except CbirError:
        return None
    return ImageHeader(width, height, focal_35mm=f35).focal_px

