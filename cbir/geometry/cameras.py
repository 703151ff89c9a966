"""Camera models shared by kapture 1.1 and COLMAP (same names, same parameter order).

kapture writes ``MODEL, width, height, params...``; COLMAP stores width and height
apart and ``params`` alone. ``CAMERA_MODELS`` maps a model name to the names of
its ``params`` (width and height excluded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CAMERA_MODELS: dict[str, tuple[str, ...]] = {
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fx", "fy", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"),
    "OPENCV_FISHEYE": ("fx", "fy", "cx", "cy", "k1", "k2", "k3", "k4"),
    "FULL_OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
    "FOV": ("fx", "fy", "cx", "cy", "omega"),
    "SIMPLE_RADIAL_FISHEYE": ("f", "cx", "cy", "k"),
    "RADIAL_FISHEYE": ("f", "cx", "cy", "k1", "k2"),
    "THIN_PRISM_FISHEYE": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "sx1", "sy1"),
    # COLMAP >= 3.10 only (kapture does not know them; cbir reads and writes them).
    "RAD_TAN_THIN_PRISM_FISHEYE": ("fx", "fy", "cx", "cy", "k0", "k1", "k2", "k3", "k4", "k5",
                                   "p0", "p1", "s0", "s1", "s2", "s3"),
    "SIMPLE_DIVISION": ("f", "cx", "cy", "k"),
    "DIVISION": ("fx", "fy", "cx", "cy", "k"),
    "SIMPLE_FISHEYE": ("f", "cx", "cy"),
    "FISHEYE": ("fx", "fy", "cx", "cy"),
}

#: largest width or height accepted (the int32 of COLMAP and of cbir's image_sizes column)
MAX_IMAGE_SIDE = 2**31 - 1

#: kapture's model for a camera whose intrinsics are not known (any number of params).
UNKNOWN_CAMERA = "UNKNOWN_CAMERA"


@dataclass(frozen=True)
class Camera:
    """Intrinsics of one camera, in kapture/COLMAP conventions (pixels, centre of the
    top-left pixel at (0.5, 0.5) as COLMAP uses for its principal point)."""

    model: str
    width: int
    height: int
    params: tuple[float, ...]
    name: str = ""

    @property
    def param_names(self) -> tuple[str, ...]:
        return CAMERA_MODELS.get(self.model, ())

    def focal_lengths(self) -> tuple[float, float]:
        names = self.param_names
        if "f" in names:
            f = self.params[names.index("f")]
            return f, f
        return self.params[names.index("fx")], self.params[names.index("fy")]

    def principal_point(self) -> tuple[float, float]:
        names = self.param_names
        return self.params[names.index("cx")], self.params[names.index("cy")]

    def calibration_matrix(self) -> np.ndarray:
        """3x3 K of the pinhole part (distortion ignored)."""
        fx, fy = self.focal_lengths()
        cx, cy = self.principal_point()
        return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def validate_camera(model: str, width: float, height: float, params: tuple[float, ...]) -> str | None:
    """Return a description of what is wrong with these intrinsics, or None."""
    if not all(math.isfinite(v) and 0 < v <= MAX_IMAGE_SIDE and v == int(v) for v in (width, height)):
        return f"image size must be integers from 1 to {MAX_IMAGE_SIDE}, got {width} x {height}"
    if model == UNKNOWN_CAMERA:
        return None
    if model not in CAMERA_MODELS:
        return f"unknown camera model {model!r} (known: {', '.join(CAMERA_MODELS)}, {UNKNOWN_CAMERA})"
    expected = CAMERA_MODELS[model]
    if len(params) != len(expected):
        return (f"camera model {model} takes width, height and {len(expected)} parameters "
                f"({', '.join(expected)}), got {len(params)}")
    if not np.all(np.isfinite(params)):
        return "camera parameters must be finite numbers"
    f_names = [n for n in expected if n in ("f", "fx", "fy")]
    if any(params[expected.index(n)] <= 0 for n in f_names):
        return "focal length must be positive"
    return None
