"""The one image loader of cbir (OpenCV): every extractor reads images through it.

EXIF orientation is applied (as the image would be shown), 16-bit images are
reduced to 8 bits, alpha is dropped, and an optional resize to a maximum edge
returns the per-axis scale factors so keypoints can be mapped back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import CbirError


@dataclass(frozen=True)
class LoadedImage:
    array: np.ndarray  # H x W (grayscale) or H x W x 3 (RGB), uint8
    original_size: tuple[int, int]  # (width, height) after EXIF orientation, before resizing
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
               interpolation: int = cv2.INTER_AREA) -> LoadedImage:
    """Read an image as uint8 RGB (or grayscale), resized so that its longest edge is
    at most ``max_size`` (never upsampled)."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # handles any file name, unlike cv2.imread
    except FileNotFoundError:
        raise CbirError("image not found", path) from None
    except OSError as e:
        raise CbirError(f"cannot read image: {e.strerror}", path) from None
    flags = (cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR) | cv2.IMREAD_ANYDEPTH
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise CbirError("cannot decode image (empty, corrupt or unsupported format)", path)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
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
