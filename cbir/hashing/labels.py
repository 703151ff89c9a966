"""Labels files (formats/SPEC.md 7a): ``image_name, label[, label ...]`` a line, ``#``
comments; an image with several labels is multi-label, and two images are similar when they
share one. Every image named must be named once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CbirError, FormatError
from ..io.textfile import read_utf8, split_lines


def read_labels(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    path = Path(path)
    text = read_utf8(path, "labels file")
    out: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(split_lines(text), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not all(fields):
            raise FormatError(f"line {lineno}: expected 'image_name, label[, label ...]'", path)
        if fields[0] in out:
            raise FormatError(f"line {lineno}: {fields[0]!r} is named twice", path)
        out[fields[0]] = tuple(sorted(set(fields[1:])))
    if not out:
        raise FormatError("no labels", path)
    return out


def label_matrix(labels: dict[str, tuple[str, ...]], names: list[str], path: str | os.PathLike,
                 vocabulary: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """N x L booleans for ``names`` (every one must be labelled) over ``vocabulary`` (default:
    every label of the file, sorted)."""
    missing = [n for n in names if n not in labels]
    if missing:
        raise CbirError(f"{len(missing)} images have no label, e.g. {missing[0]!r}", Path(path))
    vocab = vocabulary if vocabulary is not None else sorted({lab for tags in labels.values() for lab in tags})
    column = {lab: i for i, lab in enumerate(vocab)}
    out = np.zeros((len(names), len(vocab)), bool)
    for row, name in enumerate(names):
        for lab in labels[name]:
            if lab in column:
                out[row, column[lab]] = True
    return out, vocab


def read_boxes(path: str | os.PathLike) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """A boxes file (formats/SPEC.md 7a): ``image_name, label, x_min, y_min, x_max, y_max`` a
    line (pixels, ``x_max``/``y_max`` exclusive), one line per object instance; the instances
    of each image in file order."""
    path = Path(path)
    text = read_utf8(path, "boxes file")
    out: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {}
    for lineno, line in enumerate(split_lines(text), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 6 or not all(fields):
            raise FormatError(f"line {lineno}: expected 'image_name, label, x_min, y_min, x_max, y_max'", path)
        try:
            x0, y0, x1, y1 = (float(f) for f in fields[2:])
        except ValueError:
            raise FormatError(f"line {lineno}: box coordinates must be numbers", path) from None
        if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
            raise FormatError(f"line {lineno}: the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty, negative or "
                              "not finite", path)
        out.setdefault(fields[0], []).append((fields[1], (x0, y0, x1, y1)))
    if not out:
        raise FormatError("no boxes", path)
    return out


def covisible_pairs(images: list[str], track_offsets: np.ndarray, track_images: np.ndarray, names: list[str],
                    min_shared: int) -> np.ndarray:
    """N x N booleans over ``names``: the pairs of images that observe at least ``min_shared``
    3D points of a map in common (a map's ``images``, ``track_offsets``, ``track_images``:
    :class:`cbir.io.map_store.PointMap`); an image is similar to itself. Names the map lacks
    are similar to themselves only."""
    from scipy import sparse

    points = np.repeat(np.arange(len(track_offsets) - 1), np.diff(track_offsets))
    seen = sparse.csr_matrix((np.ones(len(points), np.int32), (points, np.asarray(track_images, np.int64))),
                             shape=(len(track_offsets) - 1, len(images)))
    seen.data[:] = 1  # an image observing a point twice counts it once
    shared = (seen.T @ seen).tocsr()
    column = {n: i for i, n in enumerate(images)}
    rows = np.array([column.get(n, -1) for n in names])
    out = np.eye(len(names), dtype=bool)
    known = np.flatnonzero(rows >= 0)
    if len(known):
        counts = shared[rows[known]][:, rows[known]].toarray()
        out[np.ix_(known, known)] |= counts >= min_shared
    return out
