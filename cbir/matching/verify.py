"""Geometric verification of a pair's matches with pycolmap's two-view geometry.

COLMAP's estimator is used as it is: with known intrinsics (a kapture camera is a
calibration) it estimates the essential matrix, otherwise the fundamental matrix, and
in both cases a homography, and decides the configuration (calibrated, uncalibrated,
planar, panoramic, degenerate, ...). The inlier mask of the chosen model is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pycolmap

from ..errors import CbirError
from ..geometry.cameras import CAMERA_MODELS, Camera
from ..io.colmap import COLMAP_PIXEL_OFFSET, pycolmap_camera
from ..validate import check_integer, check_number
from . import VERIFY_METHODS  # re-exported: cbir.matching.verify.VERIFY_METHODS

UNDEFINED = int(pycolmap.TwoViewGeometryConfiguration.UNDEFINED)
#: fewer matches than this cannot define any two-view model (the 5-point solver needs 5)
MIN_MATCHES_FOR_MODEL = 5




@dataclass(frozen=True)
class VerifyConf:
    """``method`` (``VERIFY_METHODS``); ``max_error``: the error bound in pixels (RANSAC's,
    or the Sampson error under the known poses); RANSAC's confidence and trial bounds;
    ``min_inliers``: fewer inliers make the pair unverified (no inlier kept)."""

    method: str = "ransac"
    max_error: float = 4.0
    confidence: float = 0.999
    min_inliers: int = 15
    min_inlier_ratio: float = 0.25
    max_trials: int = 10000
    seed: int = 0  # RANSAC seed, so that a re-run gives the same inliers

    def __post_init__(self) -> None:  # the rules of `cbir match --verify` and the pipeline alike
        if self.method not in VERIFY_METHODS:
            raise CbirError(f"unknown verification {self.method!r} (known: {', '.join(VERIFY_METHODS)})")
        check_number("max_error", self.max_error, 0.0, None, low_open=True)
        check_number("confidence", self.confidence, 0.0, 1.0)
        check_number("min_inlier_ratio", self.min_inlier_ratio, 0.0, 1.0)
        check_integer("min_inliers", self.min_inliers, 0)
        check_integer("max_trials", self.max_trials, 1)
        check_integer("seed", self.seed, 0)

    def options(self) -> pycolmap.TwoViewGeometryOptions:
        opts = pycolmap.TwoViewGeometryOptions()
        opts.min_num_inliers = self.min_inliers
        opts.ransac.max_error = self.max_error
        opts.ransac.confidence = self.confidence
        opts.ransac.max_num_trials = self.max_trials
        opts.ransac.min_inlier_ratio = self.min_inlier_ratio
        opts.ransac.random_seed = self.seed
        return opts


@dataclass
class Verified:
    inliers: np.ndarray  # (M,) bool, per match
    config: int  # pycolmap TwoViewGeometryConfiguration value
    F: np.ndarray  # 3x3, NaN when not estimated
    E: np.ndarray
    H: np.ndarray


def verification_camera(cam: Camera | None, width: int, height: int) -> pycolmap.Camera:
    """The pycolmap camera of an image; without usable intrinsics a SIMPLE_PINHOLE guess
    without focal prior, so that COLMAP falls back to the fundamental matrix."""
    if cam is not None and cam.model in CAMERA_MODELS:
        return pycolmap_camera(cam)
    f = 1.2 * max(width, height)
    camera = pycolmap.Camera(model="SIMPLE_PINHOLE", width=width, height=height,
                             params=[f, width / 2, height / 2])
    camera.has_prior_focal_length = False
    return camera


def _matrix(m: np.ndarray | None) -> np.ndarray:
    """A 3x3 model as pycolmap gave it, or NaN where it gave none (None, or zeros)."""
    m = np.asarray(m if m is not None else np.nan, dtype=np.float64)
    return m if m.shape == (3, 3) and np.any(m) else np.full((3, 3), np.nan)


def verify_pair(cam0: pycolmap.Camera, kp0: np.ndarray, cam1: pycolmap.Camera, kp1: np.ndarray,
                matches: np.ndarray, conf: VerifyConf = VerifyConf()) -> Verified:
    """Verify ``matches`` (M, 2) between keypoints ``kp0`` and ``kp1`` (cbir convention)."""
    m = len(matches)
    nan = np.full((3, 3), np.nan)
    if m < max(MIN_MATCHES_FOR_MODEL, 1):
        return Verified(np.zeros(m, bool), UNDEFINED, nan, nan.copy(), nan.copy())
    p0 = np.asarray(kp0, np.float64)[matches[:, 0], :2] + COLMAP_PIXEL_OFFSET
    p1 = np.asarray(kp1, np.float64)[matches[:, 1], :2] + COLMAP_PIXEL_OFFSET
    idx = np.arange(m, dtype=np.uint32)
    geom = pycolmap.estimate_two_view_geometry(cam0, p0, cam1, p1, np.stack([idx, idx], 1),
                                               conf.options())
    inliers = np.zeros(m, bool)
    found = np.asarray(geom.inlier_matches)
    if found.size and len(found) >= conf.min_inliers:
        inliers[found[:, 0].astype(np.int64)] = True
    return Verified(inliers, int(geom.config), _matrix(geom.F), _matrix(geom.E), _matrix(geom.H))
