"""Triangulated maps: 3D points, colours, errors and tracks in one HDF5 file.

Layout (``formats/SPEC.md``): ``images`` (N names), ``points`` (P x 3 float64),
``colors`` (P x 3 uint8), ``errors`` (P float32, NaN when unknown), and the tracks
as a columnar list over points: ``track_offsets`` (P+1 int64), ``track_images``
(T int32, index into ``images``) and ``track_keypoints`` (T int32, index into that
image's keypoints in the local-feature store named by the ``local_features``
attribute). Track order is kept as written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import CbirError, FormatError
from .atomic import atomic_output
from .hdf5 import read_metadata, refuse_unstored
from .store import FORMAT_VERSION, STR_DTYPE, _check_major, _config_of, check_attr_types

MAP_KIND = "map"


@dataclass
class PointMap:
    images: list[str]
    points: np.ndarray  # (P, 3) float64
    colors: np.ndarray  # (P, 3) uint8
    errors: np.ndarray  # (P,) float32
    track_offsets: np.ndarray  # (P+1,) int64
    track_images: np.ndarray  # (T,) int32
    track_keypoints: np.ndarray  # (T,) int32
    local_features: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.points)

    def track(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.track_offsets[i], self.track_offsets[i + 1]
        return self.track_images[s:e], self.track_keypoints[s:e]

    @property
    def track_lengths(self) -> np.ndarray:
        return np.diff(self.track_offsets)

    def keypoint_to_point(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per image: (keypoint indices, 3D point indices) of its observations, sorted by keypoint."""
        point_of_obs = np.repeat(np.arange(len(self.points), dtype=np.int64), self.track_lengths)
        order = np.lexsort((self.track_keypoints, self.track_images))
        imgs, kps, pts = self.track_images[order], self.track_keypoints[order], point_of_obs[order]
        bounds = np.searchsorted(imgs, np.arange(len(self.images) + 1))
        return {name: (kps[bounds[i]:bounds[i + 1]], pts[bounds[i]:bounds[i + 1]])
                for i, name in enumerate(self.images)}

    def validate(self) -> str | None:
        P, T = len(self.points), len(self.track_images)
        if self.points.shape != (P, 3) or self.colors.shape != (P, 3) or self.errors.shape != (P,):
            return "points, colors and errors must have P rows of 3, 3 and 1 values"
        if self.track_offsets.shape != (P + 1,) or self.track_offsets[0] != 0 or self.track_offsets[-1] != T:
            return "track_offsets must have P+1 entries from 0 to the number of observations"
        if np.any(np.diff(self.track_offsets) < 0):
            return "track_offsets must not decrease"
        if len(self.track_keypoints) != T:
            return "track_images and track_keypoints differ in length"
        if T and (self.track_images.min() < 0 or self.track_images.max() >= len(self.images)):
            return "a track references an image index out of range"
        if T and self.track_keypoints.min() < 0:
            return "a track references a negative keypoint index"
        if not np.all(np.isfinite(self.points)):
            return "points have NaN or infinite coordinates"
        return None


def write_map(path: str | os.PathLike, m: PointMap) -> Path:
    problem = m.validate()
    if problem:
        raise CbirError(f"invalid map: {problem}", path)
    path = Path(path)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            f.attrs["cbir_format"] = MAP_KIND
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["cbir_version"] = __version__
            f.attrs["local_features"] = m.local_features
            f.attrs["config"] = json.dumps(m.config, sort_keys=True)
            f.create_dataset("images", data=np.array(m.images, dtype=object), dtype=STR_DTYPE)
            f.create_dataset("points", data=np.asarray(m.points, np.float64))
            f.create_dataset("colors", data=np.asarray(m.colors, np.uint8))
            f.create_dataset("errors", data=np.asarray(m.errors, np.float32))
            f.create_dataset("track_offsets", data=np.asarray(m.track_offsets, np.int64))
            f.create_dataset("track_images", data=np.asarray(m.track_images, np.int32))
            f.create_dataset("track_keypoints", data=np.asarray(m.track_keypoints, np.int32))
    return path


def read_map(path: str | os.PathLike) -> PointMap:
    """A map store, validated (see :meth:`PointMap.validate`). Attributes and image names are
    read in a time-limited child process (:mod:`cbir.io.hdf5`), so a corrupt file cannot hang."""
    path = Path(path)
    meta = read_metadata(path, ("images",))
    attrs = meta.attrs
    check_attr_types(attrs, path)
    if attrs.get("cbir_format") != MAP_KIND:
        raise FormatError("not a cbir map file", path)
    _check_major(str(attrs.get("format_version", "")), path)
    info = meta.datasets.get("images")
    if info is None or not info.is_string or len(info.shape) != 1:
        raise FormatError("'images' must be a 1-D dataset of strings", path)
    try:
        images = meta.string_items("images")
    except UnicodeDecodeError:
        raise FormatError("'images' holds a name that is not UTF-8", path) from None
    numeric = {"points": 2, "colors": 2, "errors": 1, "track_offsets": 1, "track_images": 1, "track_keypoints": 1}
    for name, ndim in numeric.items():
        d = meta.datasets.get(name)
        if d is None or d.dtype is None or len(d.shape) != ndim:
            raise FormatError(f"'{name}' must be a {ndim}-D numeric dataset", path)
        if name.startswith("track_") and d.dtype.kind not in "iu":
            raise FormatError(f"'{name}' must hold integers, got {d.dtype}", path)
    refuse_unstored(path, meta.datasets)
    local = attrs.get("local_features", "")
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][()] for name in numeric}
    except (KeyError, OSError, RuntimeError, ValueError) as e:
        raise FormatError(f"incomplete or corrupt map ({e})", path) from None
    m = PointMap(images=images, local_features=local, config=_config_of(attrs, path), **arrays)
    problem = m.validate()
    if problem:
        raise FormatError(problem, path)
    if len(set(images)) != len(images):
        raise FormatError("'images' names an image twice", path)
    return m
