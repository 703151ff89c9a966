"""Kept faiss index files (``MAP/cbir/index/<stores>.<kind>.h5``, ``cbir index build``):
the serialized indexes, one per global store, and the record of what they were built from.
The layout only; faiss (de)serializes in ``cbir.retrieval.index``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FormatError
from .atomic import atomic_output
from .dataset import Dataset
from .hdf5 import read_metadata

#: ``cbir_format`` of a kept index file, and its version
INDEX_FORMAT, INDEX_FORMAT_VERSION = "faiss-index", "1.0"


def index_path(dataset: Dataset, stores: list[str], kind: str, rows: tuple[int, int] | None = None) -> Path:
    """Where the kept indexes of ``stores`` (fused in this order) of ``dataset`` live; with
    ``rows``, those of the map images ``rows[0]:rows[1]`` (a shard, ``--executor ray``)."""
    for name in stores:
        dataset.store_path("global", name)  # checks the name
    base = dataset.root / "cbir" / "index" / f"{'+'.join(stores)}.{kind}"
    return base.with_name(base.name + ".h5") if rows is None else \
        base.with_name(base.name + ".shards") / f"{rows[0]:09d}-{rows[1]:09d}.h5"


def write_index_file(path: Path, blobs: list[np.ndarray], record: dict[str, Any]) -> None:
    """The serialized indexes (uint8 arrays, ``index_<j>``) and their record, atomically."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["cbir_format"] = INDEX_FORMAT
        f.attrs["format_version"] = INDEX_FORMAT_VERSION
        f.attrs["record"] = json.dumps(record, sort_keys=True)
        for j, blob in enumerate(blobs):
            f.create_dataset(f"index_{j}", data=np.asarray(blob, np.uint8))


def read_index_record(path: Path) -> dict[str, Any]:
    """The record of a kept index file: ``config`` (index options), ``stores``,
    ``fingerprints``, ``images``, ``names`` (the image names in index order: formats/SPEC.md 11a)."""
    attrs = read_metadata(path).attrs  # in a time-limited child: a corrupt file cannot hang
    if attrs.get("cbir_format") != INDEX_FORMAT:
        raise FormatError("not a cbir index file", path)
    try:
        record = json.loads(attrs["record"])
        if not isinstance(record, dict) or not isinstance(record.get("stores"), list) or \
                not isinstance(record.get("fingerprints"), list):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise FormatError("the index file has no valid record", path) from None
    return record


def index_extents(path: Path, count: int) -> list[tuple[int, int]]:
    """``(offset, size)`` in ``path`` of each serialized index, so that faiss reads it straight
    from the file (one copy, not three: 0.06 s instead of 0.2-0.5 s for 170 MB). Written
    contiguous; anything else, or an extent beyond the file, is a corrupt file."""
    try:
        size = path.stat().st_size
        with h5py.File(path, "r") as f:
            extents = []
            for j in range(count):
                ds = f[f"index_{j}"]
                offset = ds.id.get_offset()
                if ds.dtype != np.uint8 or ds.ndim != 1 or ds.chunks is not None or offset is None \
                        or offset + ds.shape[0] > size:
                    raise ValueError(f"index_{j} is not a contiguous byte array inside the file")
                extents.append((int(offset), int(ds.shape[0])))
            return extents
    except (OSError, KeyError, ValueError) as e:
        raise FormatError(f"cannot read the indexes ({e}): the file is corrupt", path) from None
