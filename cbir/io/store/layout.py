"""How a store file is laid out when written: attributes, keys, the keys blob, columns
(large ones page-aligned), shared by the writer and the merge."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ... import __version__
from .checksums import _checksums_json
from .schema import (
    ALIGN_PAGE,
    ALIGN_THRESHOLD,
    CHECKSUMS,
    FORMAT_VERSION,
    KEYS_BLOB,
    STR_DTYPE,
    Key,
    Schema,
    _keys_bytes,
    encode_keys_blob,
    pair_keys,
)


def _write_arrays(path: Path, schema: Schema, attrs: dict[str, Any], keys: list[Key],
                  arrays: dict[str, np.ndarray], offsets: np.ndarray | None) -> None:
    """Write one complete store file (used for batch files), with its checksums: merging it
    then copies its columns without reading them (:func:`copy_part`)."""
    arrays = {name: np.ascontiguousarray(arr) for name, arr in arrays.items()}
    crcs = {name: zlib.crc32(arr.data) for name, arr in arrays.items()}
    with _create_file(path) as f:
        _set_attrs(f, schema, attrs)
        f.create_dataset(schema.key, data=_encode_keys(keys, schema), dtype=STR_DTYPE)
        _write_blob(f, keys)
        if offsets is not None:
            offsets = np.ascontiguousarray(offsets, dtype=np.int64)
            f.create_dataset("offsets", data=offsets)
            crcs["offsets"] = zlib.crc32(offsets.data)
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr)
        f.attrs[CHECKSUMS] = _checksums_json(zlib.crc32(_keys_bytes(keys)), crcs)


def _create_file(path: Path) -> h5py.File:
    """A new store file. Datasets of 1 MiB and more start on a 4 KiB page, so that a row of
    whole pages (2048-D float32: 8 KiB) is read from two pages, not three: scattered rows
    (an index's candidates) are read 30% faster (formats/SPEC.md, 2)."""
    return h5py.File(path, "w", libver=("earliest", "v110"), alignment_threshold=ALIGN_THRESHOLD,
                     alignment_interval=ALIGN_PAGE)


def _encode_keys(keys: list[Key], schema: Schema) -> np.ndarray:
    if schema.key == "pairs":
        arr = np.empty((len(keys), 2), dtype=object)
        for i, (a, b) in enumerate(pair_keys(keys)):
            arr[i, 0], arr[i, 1] = a, b
        return arr
    return np.array(keys, dtype=object)


def _write_blob(f: h5py.File, keys: Sequence[Key]) -> None:
    blob = encode_keys_blob(keys)
    if blob is not None:
        f.create_dataset(KEYS_BLOB, data=blob)


def _set_attrs(f: h5py.File, schema: Schema, attrs: dict[str, Any]) -> None:
    f.attrs["cbir_format"] = schema.kind
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["cbir_version"] = __version__
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v


#: buffered items are written at least this often (seconds), so that an interruption of a slow
#: extractor (R2D2 on a CPU: 15 s an image) loses at most the image in flight and a few seconds
