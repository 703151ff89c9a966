"""The store format: kinds, columns, keys and the version (formats/SPEC.md section 5-8)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np

from ...errors import FormatError, VersionError

FORMAT_VERSION = "1.2"
ALIGN_THRESHOLD, ALIGN_PAGE = 1 << 20, 4096  # datasets this large start on a page (_create_file)
FORMAT_MAJOR = 1
STR_DTYPE = h5py.string_dtype("utf-8")
#: format 1.1: the keys again as one UTF-8 byte string, '\n' between items, NUL inside a pair
KEYS_BLOB = "keys_blob"


def encode_keys_blob(keys: Sequence[Key]) -> np.ndarray | None:
    """The ``keys_blob`` of ``keys``, or None when a name holds a separator (then readers use
    the variable-length keys alone)."""
    names = [n for k in keys for n in (k if isinstance(k, tuple) else (k,))]
    if any("\n" in n or "\0" in n for n in names):
        return None
    parts = ["\0".join(k) if isinstance(k, tuple) else k for k in keys]
    return np.frombuffer("\n".join(parts).encode("utf-8"), dtype=np.uint8)


@dataclass(frozen=True)
class Column:
    """One dataset of a store. ``shape`` is the per-row shape; None marks a free dimension."""

    shape: tuple[int | None, ...]
    dtype: str | None  # None: chosen by the writer (descriptors)
    required: bool = False


@dataclass(frozen=True)
class Schema:
    kind: str
    key: str  # "names" or "pairs"
    #: variable number of rows per item, addressed through ``offsets``
    ragged: dict[str, Column] = field(default_factory=dict)
    #: exactly one row per item
    per_item: dict[str, Column] = field(default_factory=dict)

    @property
    def columns(self) -> dict[str, Column]:
        return {**self.ragged, **self.per_item}


SCHEMAS: dict[str, Schema] = {
    "local-features": Schema(
        "local-features", "names",
        ragged={
            "keypoints": Column((2,), "float32", required=True),
            "descriptors": Column((None,), None, required=True),
            "scores": Column((), "float32"),
            "keypoint_params": Column((None,), "float32"),
        },
        per_item={"image_sizes": Column((2,), "int32")},
    ),
    "global-features": Schema(
        "global-features", "names",
        per_item={"descriptors": Column((None,), None, required=True)},
    ),
    "matches": Schema(
        "matches", "pairs",
        ragged={
            "matches": Column((2,), "int32", required=True),
            "scores": Column((), None),
            "inliers": Column((), "bool"),
        },
        per_item={
            "geometry_config": Column((), "int8"),
            "F": Column((3, 3), "float64"),
            "E": Column((3, 3), "float64"),
            "H": Column((3, 3), "float64"),
        },
    ),
}

Key = str | tuple[str, str]


def image_keys(keys: Sequence[Key]) -> list[str]:
    """The keys of a features store, as what they are there: image names (no copy)."""
    return cast("list[str]", keys)


def pair_keys(keys: Sequence[Key]) -> Sequence[tuple[str, str]]:
    """The keys of a matches store, as what they are there: pairs of image names (no copy)."""
    return cast("Sequence[tuple[str, str]]", keys)


def _as_key(key: Any) -> Key:
    if isinstance(key, (tuple, list, np.ndarray)):
        return (str(key[0]), str(key[1]))
    return str(key)


def _check_major(version: str, path: Path) -> None:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise FormatError(f"invalid format_version attribute {version!r}", path) from None
    if major > FORMAT_MAJOR:
        raise VersionError(f"cbir format {version} is newer than this cbir supports ({FORMAT_MAJOR}.x): "
                           "upgrade cbir", path)


# ================================================================================ reading


CHECKSUMS = "checksums"


def _keys_bytes(keys: Sequence[Key]) -> bytes:
    """The bytes the keys' checksum is computed over (unambiguous for any name)."""
    return json.dumps([list(k) if isinstance(k, tuple) else k for k in keys], ensure_ascii=False).encode("utf-8")
