"""One HDF5 column written back in each way HDF5 can store it: shared by the hostile-input
tests and the fuzzers of a stranger's stores (issue 31)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

#: how a column's data can be stored; "unwritten" declares rows it never writes
STORAGE_KINDS = ["chunked", "gzip", "soft link", "external storage", "external link", "virtual", "unwritten"]
#: the kinds whose data lives in another file
FOREIGN_STORAGE = {"external storage", "external link", "virtual"}


def store_column_as(f: h5py.File, name: str, kind: str, data: np.ndarray, elsewhere: Path) -> None:
    """Write ``data`` as dataset ``name`` of the open file ``f``, stored the ``kind`` way; the
    foreign kinds put the data in ``elsewhere`` (an HDF5 file, or raw bytes beside it)."""
    if kind in ("chunked", "gzip"):
        f.create_dataset(name, data=data, chunks=True, **({"compression": "gzip"} if kind == "gzip" else {}))
    elif kind == "soft link":
        f.create_dataset(f"_{name}", data=data)
        f[name] = h5py.SoftLink(f"/_{name}")
    elif kind == "external storage":
        raw = elsewhere.with_suffix(".raw")
        raw.write_bytes(np.ascontiguousarray(data).tobytes())
        f.create_dataset(name, shape=data.shape, dtype=data.dtype, external=[(str(raw), 0, data.nbytes)])
    elif kind in ("external link", "virtual"):
        with h5py.File(elsewhere, "w") as g:
            g["x"] = data
        if kind == "external link":
            f[name] = h5py.ExternalLink(str(elsewhere), "x")
        else:
            layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
            layout[...] = h5py.VirtualSource(str(elsewhere), "x", shape=data.shape)
            f.create_virtual_dataset(name, layout)
    elif kind == "unwritten":  # the header claims more rows than were ever written
        f.create_dataset(name, shape=(len(data) + 1 + (1 << 20), *data.shape[1:]), dtype=data.dtype)
    else:
        raise ValueError(f"unknown storage kind {kind!r}")
