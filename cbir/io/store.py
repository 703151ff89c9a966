"""Columnar HDF5 stores for local features, global features and matches (format 1.x).

One file holds the data of many items (images, or image pairs) in a handful of
datasets: the keys (``names`` or ``pairs``), ``offsets`` (N+1, int64) into the
concatenated variable-length columns, and fixed-size per-item columns. One item
is one slice; a million images cost a few datasets, not a million groups.
The written specification is ``formats/SPEC.md``.

Writing is atomic and resumable: items are buffered and flushed as batch files
(``X.h5.batches/batch-NNNNNN.h5``, each renamed into place when complete), and
closing the writer merges the previous store and every batch into
``X.h5.partial``, then renames it over ``X.h5``. A killed writer loses at most
the batch in flight; a re-run resumes from the batches already written.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from .. import __version__
from ..errors import CbirError, FormatError, VersionError
from .atomic import WriteLock, atomic_output, atomic_write_text

FORMAT_VERSION = "1.1"
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

class Store:
    """Read access to a columnar store. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike, expected_kind: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise CbirError("file not found", self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError:
            raise FormatError("not a readable HDF5 file (truncated or corrupt?)", self.path) from None
        self._views: dict[str, np.ndarray] = {}
        self._mmap: mmap.mmap | None = None
        try:
            self._init(expected_kind)
        except BaseException:
            self.close()
            raise

    def _init(self, expected_kind: str | None) -> None:
        attrs = self._file.attrs
        kind = attrs.get("cbir_format")
        if kind is None:
            raise FormatError("not a cbir store (no 'cbir_format' attribute)", self.path)
        kind = str(kind)
        if kind not in SCHEMAS:
            raise FormatError(f"unknown store kind {kind!r}", self.path)
        _check_major(str(attrs.get("format_version", "")), self.path)
        if expected_kind is not None and kind != expected_kind:
            raise FormatError(f"is a {kind} store, expected {expected_kind}", self.path)
        self.schema = SCHEMAS[kind]
        self.kind = kind
        self.attrs: dict[str, Any] = {k: _attr_value(v) for k, v in attrs.items()}
        try:
            self.config: dict[str, Any] = json.loads(self.attrs.get("config", "{}"))
        except json.JSONDecodeError:
            raise FormatError("the 'config' attribute is not valid JSON", self.path) from None
        self._datasets: dict[str, h5py.Dataset] = {}
        for name in (self.schema.key, "offsets", *self.schema.columns):
            if name in self._file:
                obj = self._file[name]
                if not isinstance(obj, h5py.Dataset):
                    raise FormatError(f"'{name}' is not a dataset", self.path)
                self._datasets[name] = obj
        for name, col in self.schema.columns.items():
            if col.required and name not in self._datasets:
                raise FormatError(f"missing dataset '{name}'", self.path)
        if self.schema.key not in self._datasets:
            raise FormatError(f"missing dataset '{self.schema.key}'", self.path)
        n = self._datasets[self.schema.key].shape[0]
        if self.schema.ragged:
            if "offsets" not in self._datasets:
                raise FormatError("missing dataset 'offsets'", self.path)
            self._offsets = self._read("offsets")
            if self._offsets.shape != (n + 1,):
                raise FormatError(f"'offsets' has shape {self._offsets.shape}, expected ({n + 1},)", self.path)
        self._n = n
        self._map_columns()
        self._keys: list[Key] | None = None
        self._index: dict[Key, int] | None = None

    def _map_columns(self) -> None:
        """Memory-map the contiguous numeric columns: one item is then a copy out of the
        page cache (microseconds) instead of an HDF5 selection. Columns HDF5 stores otherwise
        (chunked, compressed, or past the end of a truncated file) are read through h5py."""
        size = self.path.stat().st_size
        for name in self.schema.columns:
            ds = self._datasets.get(name)
            if ds is None or ds.size == 0 or ds.dtype.kind not in "biuf":
                continue
            offset = ds.id.get_offset()
            if offset is None or offset + ds.nbytes > size:
                continue
            if self._mmap is None:
                with open(self.path, "rb") as fh:
                    self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._views[name] = np.frombuffer(self._mmap, ds.dtype, ds.size, offset).reshape(ds.shape)

    def _read(self, name: str, sel: Any = ()) -> np.ndarray:
        view = self._views.get(name)
        if view is not None:
            return np.array(view[sel])
        try:
            return self._datasets[name][sel]
        except (OSError, RuntimeError, KeyError) as e:
            raise FormatError(f"cannot read dataset '{name}' ({e}): the file is corrupt", self.path) from None

    # -- keys
    def __len__(self) -> int:
        return self._n

    @property
    def keys(self) -> list[Key]:
        """Image names (features) or (name0, name1) pairs (matches), in storage order."""
        if self._keys is None:
            self._keys = self._keys_from_blob()
        if self._keys is None:
            try:
                raw = self._datasets[self.schema.key].asstr()[()]
            except (OSError, RuntimeError, UnicodeDecodeError) as e:
                raise FormatError(f"cannot read '{self.schema.key}' ({e}): the file is corrupt", self.path) from None
            if self.schema.key == "pairs":
                self._keys = [(a, b) for a, b in raw.tolist()]
            else:
                self._keys = raw.tolist()
        return self._keys

    names = keys

    def _keys_from_blob(self) -> list[Key] | None:
        """The keys from ``keys_blob`` (format 1.1): one read and one split instead of
        decoding N variable-length HDF5 strings (x5 faster at 100k). None when absent or
        inconsistent: the variable-length keys are then read."""
        ds = self._file.get(KEYS_BLOB)
        if not isinstance(ds, h5py.Dataset) or ds.dtype != np.uint8:
            return None
        try:
            text = ds[()].tobytes().decode("utf-8")
        except (OSError, RuntimeError, UnicodeDecodeError):
            return None
        items = text.split("\n") if self._n else []
        if len(items) != self._n:
            return None
        if self.schema.key == "pairs":
            pairs = [tuple(item.split("\0")) for item in items]
            return pairs if all(len(p) == 2 for p in pairs) else None  # type: ignore[return-value]
        return items

    def index(self, key: Key) -> int:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        try:
            return self._index[_as_key(key)]
        except KeyError:
            raise KeyError(key) from None

    def __contains__(self, key: Any) -> bool:
        try:
            self.index(key)
            return True
        except KeyError:
            return False

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    def count(self, key: Key) -> int:
        """Number of rows (keypoints, matches) of one item."""
        i = self.index(key)
        return int(self._offsets[i + 1] - self._offsets[i])

    @property
    def columns(self) -> list[str]:
        return [c for c in self.schema.columns if c in self._datasets]

    def dataset(self, name: str) -> h5py.Dataset:
        return self._datasets[name]

    # -- values
    def get(self, key: Key, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All (or the named) columns of one item, as arrays."""
        i = self.index(key)
        return self._get_index(i, columns)

    __getitem__ = get

    def _get_index(self, i: int, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        out = {}
        for name in columns or self.columns:
            if name in self.schema.ragged:
                out[name] = self._read(name, slice(int(self._offsets[i]), int(self._offsets[i + 1])))
            else:
                out[name] = self._read(name, i)
        return out

    def read_rows(self, column: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a per-item column in the given order, read through HDF5 (not the memory
        map), so that streaming over a large store does not keep its pages resident."""
        rows = np.asarray(rows, dtype=np.int64)
        ds = self._datasets[column]
        try:
            if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
                return ds[int(rows[0]):int(rows[-1]) + 1]
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows),) + ds.shape[1:], ds.dtype)
            if len(rows):
                out[order] = ds[rows[order]]
            return out
        except (OSError, RuntimeError, TypeError) as e:
            raise FormatError(f"cannot read dataset '{column}' ({e}): the file is corrupt", self.path) from None

    def read_all(self, column: str) -> np.ndarray:
        """A whole column at once (the N x D matrix of a global store, say)."""
        return self._read(column)

    def iter_batches(self, batch_size: int = 1024, columns: Sequence[str] | None = None,
                     max_rows: int = 4_000_000) -> Iterator[tuple[list[Key], dict[str, np.ndarray], np.ndarray]]:
        """Stream the store in order with bounded memory.

        Yields ``(keys, columns, offsets)`` where ragged columns are the concatenation
        over the batch and ``offsets`` (len(keys)+1) index into them. A batch ends at
        ``batch_size`` items or ``max_rows`` ragged rows, whichever comes first.
        """
        cols = list(columns or self.columns)
        keys = self.keys
        start = 0
        while start < self._n:
            stop = min(start + batch_size, self._n)
            if self.schema.ragged:
                limit = self._offsets[start] + max_rows
                stop = max(start + 1, min(stop, int(np.searchsorted(self._offsets, limit, side="right")) - 1))
                r0, r1 = int(self._offsets[start]), int(self._offsets[stop])
                offsets = self._offsets[start:stop + 1] - r0
            else:
                r0 = r1 = 0
                offsets = np.arange(stop - start + 1, dtype=np.int64)
            out = {}
            for name in cols:
                if name in self.schema.ragged:
                    out[name] = self._read(name, slice(r0, r1))
                else:
                    out[name] = self._read(name, slice(start, stop))
            yield keys[start:stop], out, offsets
            start = stop

    def close(self) -> None:
        self._views = {}
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, kind={self.kind}, items={len(self)})"


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def open_store(path: str | os.PathLike, kind: str | None = None) -> Store:
    return Store(path, kind)


# ================================================================================ writing

def _write_arrays(path: Path, schema: Schema, attrs: dict[str, Any], keys: list[Key],
                  arrays: dict[str, np.ndarray], offsets: np.ndarray | None) -> None:
    """Write one complete store file (used for batch files)."""
    with h5py.File(path, "w", libver=("earliest", "v110")) as f:
        _set_attrs(f, schema, attrs)
        f.create_dataset(schema.key, data=_encode_keys(keys, schema), dtype=STR_DTYPE)
        _write_blob(f, keys)
        if offsets is not None:
            f.create_dataset("offsets", data=offsets.astype(np.int64))
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr)


def _encode_keys(keys: list[Key], schema: Schema) -> np.ndarray:
    if schema.key == "pairs":
        arr = np.empty((len(keys), 2), dtype=object)
        for i, (a, b) in enumerate(keys):
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


class StoreWriter:
    """Append items to a store; atomic, resumable, single-writer.

    >>> with StoreWriter(path, "local-features", {"name": "sift", "config": conf}) as w:
    ...     for name in names:
    ...         if name not in w:
    ...             w.add(name, keypoints=kp, descriptors=desc, scores=sc)

    ``attrs`` must contain ``name`` and ``config`` (a dict); a store or unfinished
    batches written with another kind, name or config are refused unless
    ``overwrite=True``, which replaces the store (atomically, when the writer closes).
    """

    def __init__(self, path: str | os.PathLike, kind: str, attrs: dict[str, Any], *,
                 overwrite: bool = False, batch_size: int = 256, batch_rows: int = 2_000_000):
        self.path = Path(path)
        self.schema = SCHEMAS[kind]
        self.attrs = dict(attrs)
        self.attrs.setdefault("config", {})
        if "name" not in self.attrs:
            raise ValueError("attrs must contain 'name'")
        self.batch_size = batch_size
        self.batch_rows = batch_rows
        self.batch_dir = self.path.with_name(self.path.name + ".batches")
        self._lock = WriteLock(self.path).acquire()
        try:
            self._prepare(overwrite)
        except BaseException:
            self._lock.release()
            raise
        self._buffer_keys: list[Key] = []
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._buffer_rows = 0
        self.added = 0

    # -- set-up and resume
    def _identity(self) -> dict[str, Any]:
        return {"cbir_format": self.schema.kind, "name": self.attrs["name"],
                "config": json.loads(json.dumps(self.attrs["config"], sort_keys=True))}

    def _prepare(self, overwrite: bool) -> None:
        identity = self._identity()
        self._base: Path | None = None
        self._present: set[Key] = set()
        if self.path.exists() and not overwrite:
            with Store(self.path) as old:
                found = {"cbir_format": old.kind, "name": old.attrs.get("name"), "config": old.config}
                if found != identity:
                    raise CbirError(_mismatch(found, identity), self.path)
                self._present.update(old.keys)
            self._base = self.path
        meta = self.batch_dir / "meta.json"
        if self.batch_dir.exists():
            found = None
            try:
                found = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                pass
            if found != identity:
                if not overwrite:
                    raise CbirError(f"unfinished batches in {self.batch_dir.name} were written with another "
                                    "configuration: use --overwrite to discard them", self.path)
                shutil.rmtree(self.batch_dir)
            elif overwrite:
                shutil.rmtree(self.batch_dir)
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta, json.dumps(identity, sort_keys=True))
        for batch in self._batches():
            try:
                with Store(batch, self.schema.kind) as b:
                    self._present.update(b.keys)
            except CbirError:
                batch.unlink()  # a batch file is renamed into place complete: this cannot be ours
        self._next_batch = len(self._batches())

    def _batches(self) -> list[Path]:
        return sorted(self.batch_dir.glob("batch-*.h5"))

    def __contains__(self, key: Any) -> bool:
        return _as_key(key) in self._present

    @property
    def present(self) -> set[Key]:
        return set(self._present)

    # -- appending
    def add(self, key: Key, **columns: np.ndarray) -> None:
        key = _as_key(key)
        if key in self._present:
            raise ValueError(f"{key!r} is already in {self.path}")
        schema = self.schema
        unknown = set(columns) - set(schema.columns)
        if unknown:
            raise ValueError(f"unknown columns for a {schema.kind} store: {sorted(unknown)}")
        rows = None
        for name, col in schema.columns.items():
            if name not in columns:
                if col.required:
                    raise ValueError(f"column {name!r} is required")
                continue
            arr = np.asarray(columns[name])
            if col.dtype is not None:
                arr = arr.astype(col.dtype, copy=False)
            if name in schema.ragged:
                if rows is None:
                    rows = arr.shape[0]
                elif arr.shape[0] != rows:
                    raise ValueError(f"column {name!r} has {arr.shape[0]} rows, expected {rows}")
                self._check_row_shape(name, col, arr.shape[1:])
            else:
                self._check_row_shape(name, col, arr.shape)
            self._buffer.setdefault(name, []).append(arr)
        present_cols = set(columns)
        expected_cols = set(self._buffer) if self._buffer_keys else present_cols
        if present_cols != expected_cols:
            # roll back what this call appended, then refuse
            for name in present_cols:
                self._buffer[name].pop()
            raise ValueError(f"every item of a batch needs the same columns: {sorted(expected_cols)}")
        self._buffer_keys.append(key)
        self._present.add(key)
        self._buffer_rows += rows or 0
        self.added += 1
        if len(self._buffer_keys) >= self.batch_size or self._buffer_rows >= self.batch_rows:
            self.flush()

    def _check_row_shape(self, name: str, col: Column, shape: tuple[int, ...]) -> None:
        if len(shape) != len(col.shape) or any(c is not None and c != s for c, s in zip(col.shape, shape)):
            raise ValueError(f"column {name!r} rows have shape {shape}, expected {col.shape}")

    def flush(self) -> None:
        """Write the buffered items as one batch file (atomically)."""
        if not self._buffer_keys:
            return
        arrays = {}
        offsets = None
        if self.schema.ragged:
            first = next(n for n in self.schema.ragged if n in self._buffer)
            counts = [a.shape[0] for a in self._buffer[first]]
            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
        for name, parts in self._buffer.items():
            if name in self.schema.ragged:
                arrays[name] = np.concatenate(parts, axis=0)
            else:
                arrays[name] = np.stack(parts, axis=0)
        target = self.batch_dir / f"batch-{self._next_batch:06d}.h5"
        with atomic_output(target) as tmp:
            _write_arrays(tmp, self.schema, self.attrs, self._buffer_keys, arrays, offsets)
        self._next_batch += 1
        self._buffer_keys, self._buffer, self._buffer_rows = [], {}, 0

    # -- finishing
    def close(self) -> Path:
        """Flush, merge the previous store and all batches into the final file, release the lock."""
        try:
            self.flush()
            parts = ([self._base] if self._base is not None else []) + self._batches()
            if parts or not self.path.exists():
                with atomic_output(self.path) as tmp:
                    merge_stores(parts, tmp, self.schema, self.attrs)
            shutil.rmtree(self.batch_dir, ignore_errors=True)
        finally:
            self._lock.release()
        return self.path

    def abort(self) -> None:
        """Stop without merging: finished batches stay on disk for a later resume."""
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    diffs = []
    for k in ("cbir_format", "name"):
        if found.get(k) != wanted.get(k):
            diffs.append(f"{k} {found.get(k)!r} != {wanted.get(k)!r}")
    fc, wc = found.get("config") or {}, wanted.get("config") or {}
    for k in sorted(set(fc) | set(wc)):
        if fc.get(k) != wc.get(k):
            diffs.append(f"{k}={fc.get(k)!r} != {wc.get(k)!r}")
    return ("exists with another configuration (" + "; ".join(diffs) +
            "): use --overwrite to replace it, or write to another name")


def merge_stores(parts: Sequence[Path], out: Path, schema: Schema, attrs: dict[str, Any]) -> None:
    """Concatenate stores of one schema into a new contiguous file, streaming part by part."""
    n_items, n_rows = 0, 0
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for part in parts:
        with Store(part, schema.kind) as s:
            n_items += len(s)
            if schema.ragged:
                n_rows += int(s.offsets[-1])
            for name in s.columns:
                d = s.dataset(name)
                if name in shapes and shapes[name] != (d.shape[1:], d.dtype):
                    raise CbirError(f"column {name!r} has rows {d.shape[1:]} {d.dtype}, other parts "
                                    f"{shapes[name][0]} {shapes[name][1]}: cannot merge", part)
                shapes[name] = (d.shape[1:], d.dtype)
    for name, col in schema.columns.items():
        if col.required and name not in shapes:  # an empty store still has its required columns
            shapes[name] = (tuple(c or 0 for c in col.shape), np.dtype(col.dtype or "float32"))
    with h5py.File(out, "w", libver=("earliest", "v110")) as f:
        _set_attrs(f, schema, attrs)
        key_shape = (n_items, 2) if schema.key == "pairs" else (n_items,)
        keys_ds = f.create_dataset(schema.key, shape=key_shape, dtype=STR_DTYPE)
        offsets_ds = f.create_dataset("offsets", shape=(n_items + 1,), dtype=np.int64) if schema.ragged else None
        out_ds = {}
        for name, (row_shape, dtype) in shapes.items():
            length = n_rows if name in schema.ragged else n_items
            out_ds[name] = f.create_dataset(name, shape=(length,) + row_shape, dtype=dtype)
        if offsets_ds is not None:
            offsets_ds[0] = 0
        i0, r0 = 0, 0
        all_keys: list[Key] = []
        for part in parts:
            with h5py.File(part, "r") as src:
                n = src[schema.key].shape[0]
                if n == 0:
                    continue
                raw = src[schema.key][()]
                keys_ds[i0:i0 + n] = raw
                all_keys += [(a.decode(), b.decode()) for a, b in raw] if schema.key == "pairs" \
                    else [k.decode() for k in raw]
                rows = 0
                if offsets_ds is not None:
                    offs = src["offsets"][()]
                    rows = int(offs[-1])
                    offsets_ds[i0 + 1:i0 + n + 1] = offs[1:] + r0
                missing = set(shapes) - set(src)
                if missing:
                    raise CbirError(f"lacks columns {sorted(missing)} that other parts have: cannot merge", part)
                for name, ds in out_ds.items():
                    if name in schema.ragged:
                        _copy_rows(src[name], ds, r0, rows)
                    else:
                        ds[i0:i0 + n] = src[name][()]
                i0 += n
                r0 += rows
        _write_blob(f, all_keys)


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, start: int, rows: int, block: int = 1 << 20) -> None:
    for b in range(0, rows, block):
        e = min(rows, b + block)
        dst[start + b:start + e] = src[b:e]
