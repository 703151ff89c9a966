"""Columnar HDF5 stores for local features, global features and matches (format 1.x).

One file holds the data of many items (images, or image pairs) in a handful of
datasets: the keys (``names`` or ``pairs``), ``offsets`` (N+1, int64) into the
concatenated variable-length columns, and fixed-size per-item columns. One item
is one slice; a million images cost a few datasets, not a million groups.
The written specification is ``formats/SPEC.md``.

Writing is atomic and resumable: items are buffered and flushed as batch files
(``X.h5.batches/batch-NNNNNN.h5``, each renamed into place when complete), and
closing the writer merges the previous store and every batch into
``X.h5.partial``, then renames it over ``X.h5``. Buffered items are flushed when a
batch is full, every ``FLUSH_INTERVAL_S`` seconds, and when the writer stops on an
error, Ctrl-C or SIGTERM: a killed writer loses at most a few seconds of work, an
interrupted one only the item in flight; a re-run resumes from the batches written.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np

from .. import __version__
from ..errors import CbirError, FormatError, VersionError
from .atomic import WriteLock, atomic_output, atomic_write_text, is_no_space
from .hdf5 import DatasetInfo, Metadata, read_metadata, refuse_unstored
from .paths import check_relative_name, refuse_links
from .provenance import differences, digest

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

class Store:
    """Read access to a columnar store. Use as a context manager or call :meth:`close`.

    Opening validates the structure every reader relies on (O(N) integer checks, see
    ``formats/SPEC.md`` section "Validation on open"): kind and version, the configuration
    is a JSON object, keys are unique strings of the right shape and agree with
    ``keys_blob``, ``offsets`` start at 0, never decrease and end at the row count of every
    ragged column, per-item columns have one row per item, and every column has its
    schema's row shape and dtype. A store that fails is a :class:`FormatError`; values
    inside a column are only verified by :meth:`verify_checksums` (``cbir check --deep``).
    """

    def __init__(self, path: str | os.PathLike, expected_kind: str | None = None):
        self.path = Path(path)
        self._views: dict[str, np.ndarray] = {}
        self._fd: int | None = None  # raw reads of scattered rows (_gather)
        self._mmap: mmap.mmap | None = None
        self._file: h5py.File | None = None
        meta = read_metadata(self.path, ("names", "pairs"))  # refuses links and data in other files
        try:
            self._file = h5py.File(self.path, "r")
        except OSError:
            raise FormatError("not a readable HDF5 file (truncated or corrupt?)", self.path) from None
        try:
            self._init(meta, expected_kind)
        except BaseException:
            self.close()
            raise

    def _init(self, meta: Metadata, expected_kind: str | None) -> None:
        attrs = meta.attrs
        check_attr_types(attrs, self.path)
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
        self.attrs: dict[str, Any] = dict(attrs)
        self.config: dict[str, Any] = _config_of(attrs, self.path)
        infos = meta.datasets
        for key in (self.schema.key, "offsets", KEYS_BLOB, *self.schema.columns):
            if key in meta.groups:
                raise FormatError(f"'{key}' is a group, expected a dataset", self.path)
        self._infos = {n: infos[n] for n in (self.schema.key, "offsets", *self.schema.columns) if n in infos}
        refuse_unstored(self.path, {n: infos[n] for n in (*self._infos, KEYS_BLOB) if n in infos})
        self._keys, names_blob = _decode_keys(meta, self.schema, self.path)
        self._n = len(self._keys)
        self._check_blob(infos.get(KEYS_BLOB), names_blob)
        self._index: dict[Key, int] | None = None
        self._check_unique()
        self._datasets: dict[str, h5py.Dataset] = {n: self._file[n] for n in self._infos}  # type: ignore[index]
        self._map_columns()
        self._check_columns()

    def _check_blob(self, info: DatasetInfo | None, names_blob: bytes | None) -> None:
        """``keys_blob`` must say what the keys say (readers of other tools may list keys from it alone)."""
        if info is None:
            return
        if info.dtype != np.uint8 or len(info.shape) != 1:
            raise FormatError(f"'{KEYS_BLOB}' must be a 1-D uint8 dataset", self.path)
        if names_blob is None:
            encoded = encode_keys_blob(self._keys)
            names_blob = None if encoded is None else encoded.tobytes()
        try:
            blob = self._file[KEYS_BLOB][()]  # type: ignore[index]
        except (OSError, RuntimeError) as e:
            raise FormatError(f"cannot read '{KEYS_BLOB}' ({e}): the file is corrupt", self.path) from None
        if names_blob is None or blob.tobytes() != names_blob:
            raise FormatError(f"'{KEYS_BLOB}' disagrees with '{self.schema.key}' (edited without the other?): "
                              "the store cannot say which image is which", self.path)

    def _check_unique(self) -> None:
        if len(set(self._keys)) != self._n:
            seen: set[Key] = set()
            dup = next(k for k in self._keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise FormatError(f"duplicate item {dup!r} in '{self.schema.key}'", self.path)

    def _check_columns(self) -> None:
        schema, n = self.schema, self._n
        for name, col in schema.columns.items():
            if col.required and name not in self._infos:
                raise FormatError(f"missing dataset '{name}'", self.path)
        if schema.ragged:
            info = self._infos.get("offsets")
            if info is None:
                raise FormatError("missing dataset 'offsets'", self.path)
            if info.dtype is None or info.dtype.kind not in "iu" or info.shape != (n + 1,):
                raise FormatError(f"'offsets' must be {n + 1} integers (one more than the items), "
                                  f"got shape {info.shape} {info.dtype or 'strings'}", self.path)
            self._offsets = self._read("offsets").astype(np.int64)
            if self._offsets[0] != 0 or np.any(np.diff(self._offsets) < 0):
                raise FormatError("'offsets' must start at 0 and never decrease", self.path)
        rows = int(self._offsets[-1]) if schema.ragged else n
        for name, col in schema.columns.items():
            info = self._infos.get(name)
            if info is None:
                continue
            if info.dtype is None:
                raise FormatError(f"'{name}' is not numeric", self.path)
            if col.dtype is not None and info.dtype != np.dtype(col.dtype):
                raise FormatError(f"'{name}' is {info.dtype}, expected {col.dtype}", self.path)
            row_shape = info.shape[1:]
            if len(row_shape) != len(col.shape) or \
                    any(c is not None and c != s for c, s in zip(col.shape, row_shape, strict=True)):
                expected = ", ".join("D" if c is None else str(c) for c in col.shape)
                raise FormatError(f"'{name}' rows have shape {row_shape}, expected ({expected})", self.path)
            want = rows if name in schema.ragged else n
            if not info.shape or info.shape[0] != want:
                what = "offsets end at" if name in schema.ragged else "items:"
                raise FormatError(f"'{name}' has {info.shape[0] if info.shape else 0} rows, {what} {want}",
                                  self.path)
        dim = self.attrs.get("descriptor_dim")
        if dim is not None and "descriptors" in self._infos and self._infos["descriptors"].shape[1] != dim:
            raise FormatError(f"descriptors have {self._infos['descriptors'].shape[1]} dimensions, the "
                              f"descriptor_dim attribute says {dim}", self.path)

    def _map_columns(self) -> None:
        """Memory-map the contiguous numeric columns: one item is then a copy out of the
        page cache (microseconds) instead of an HDF5 selection. Columns HDF5 stores otherwise
        (chunked, compressed, or past the end of a truncated file) are read through h5py."""
        size = self.path.stat().st_size
        for name, info in self._infos.items():
            if info.dtype is None or info.nbytes == 0 or info.offset is None or info.offset + info.nbytes > size:
                continue
            if self._mmap is None:
                with open(self.path, "rb") as fh:
                    self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            count = int(np.prod(info.shape, dtype=np.int64))
            self._views[name] = np.frombuffer(self._mmap, info.dtype, count, info.offset).reshape(info.shape)

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
        return self._keys

    names = keys

    def index(self, key: Key) -> int:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._keys)}
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
        """Rows of a per-item column in the given order. A contiguous range is read through
        HDF5, so that streaming over a large store keeps none of its pages resident; scattered
        rows (the candidates of an index, say) are read row by row into place when the column
        is contiguous on disk (:meth:`_gather`)."""
        rows = np.asarray(rows, dtype=np.int64)
        ds = self._datasets[column]
        try:
            if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
                return ds[int(rows[0]):int(rows[-1]) + 1]
            if column in self._views:  # contiguous on disk
                return self._gather(column, rows)
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows),) + ds.shape[1:], ds.dtype)
            if len(rows):
                out[order] = ds[rows[order]]
            return out
        except (OSError, RuntimeError, TypeError) as e:
            raise FormatError(f"cannot read dataset '{column}' ({e}): the file is corrupt", self.path) from None

    def _gather(self, column: str, rows: np.ndarray) -> np.ndarray:
        """Scattered rows of a contiguous column, each read into place with one ``preadv``, in
        file order. Neither an HDF5 selection per row (about 90 us each) nor the memory map
        (whose page faults map the cached neighbourhood of every row: 4.9 GB of resident pages
        for 100k rows of an 8 GB store, and 20 us a row). One thread: the loop holds the GIL
        between reads, and two threads measured slower than one (0.31 s against 0.26 s for
        100k rows of 8 KB out of the page cache, 2 cores)."""
        info = self._infos[column]
        out = np.empty((len(rows),) + tuple(info.shape[1:]), info.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= info.shape[0]:
            raise IndexError(f"rows beyond the {info.shape[0]} of '{column}'")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        row_bytes = out[0].nbytes
        order = np.argsort(rows, kind="stable")
        offsets = (info.offset + rows[order] * row_bytes).tolist()
        targets = (order * row_bytes).tolist()
        buffer = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs: no Buffer
        fd, preadv = self._fd, os.preadv
        for offset, at in zip(offsets, targets, strict=True):
            if preadv(fd, [buffer[at:at + row_bytes]], offset) != row_bytes:
                raise OSError(f"short read of '{column}'")
        return out

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

    def fingerprint(self) -> str:
        """A digest of what the store holds: kind, name, configuration and the checksums
        of its keys and columns (a store without checksums: its keys and offsets). Outputs
        made from a store record it, so that they are redone when the store changes."""
        raw = self.attrs.get(CHECKSUMS)
        content = raw if raw is not None else \
            f"{zlib.crc32(_keys_bytes(self._keys)):08x}:" + \
            (f"{zlib.crc32(np.ascontiguousarray(self._offsets).data):08x}" if self.schema.ragged else str(self._n))
        return digest({"kind": self.kind, "name": self.attrs.get("name"), "config": self.config, "content": content})

    def verify_checksums(self) -> list[str]:
        """Recompute the CRC-32 of the keys and of every column (one streaming pass) and
        return what disagrees with the ``checksums`` attribute; a store written before
        checksums existed gives ``["no checksums recorded"]``."""
        raw = self.attrs.get(CHECKSUMS)
        if raw is None:
            return ["no checksums recorded (written before cbir recorded them, or by another tool)"]
        try:
            recorded = json.loads(raw)
            columns = dict(recorded["columns"])
            if recorded.get("algorithm") != "crc32":
                return [f"unknown checksum algorithm {recorded.get('algorithm')!r}"]
        except (TypeError, ValueError, KeyError):
            return ["the 'checksums' attribute is not valid"]
        problems = []
        if f"{zlib.crc32(_keys_bytes(self._keys)):08x}" != recorded.get("keys"):
            problems.append(f"'{self.schema.key}' changed since the store was written (checksum)")
        present = set(self.columns) | ({"offsets"} if self.schema.ragged else set())
        for name in sorted(present | set(columns)):
            if name not in columns or name not in present:
                problems.append(f"'{name}' is {'not recorded in' if name in present else 'missing but in'} "
                                "the checksums")
                continue
            crc = 0
            info = self._infos[name]
            for span in _row_blocks(info.shape[0], info.nbytes // max(1, info.shape[0])):
                crc = zlib.crc32(np.ascontiguousarray(self._read(name, span)).data, crc)
            if f"{crc:08x}" != columns[name]:
                problems.append(f"'{name}' changed since the store was written (checksum)")
        return problems

    def close(self) -> None:
        self._views = {}
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # an array still views the map (e.g. held by a traceback): unmapped when it dies
            self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None and self._file.id.valid:
            self._file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, kind={self.kind}, items={len(self)})"


#: the type of every attribute a reader relies on (stores and maps)
ATTR_TYPES: dict[str, type] = {"cbir_format": str, "format_version": str, "cbir_version": str, "name": str,
                               "config": str, "descriptor_dim": int, "descriptor_dtype": str,
                               "keypoint_params": str, "local_features": str, "checksums": str}


def check_attr_types(attrs: dict[str, Any], path: Path) -> None:
    """Refuse attributes of the wrong type (an array where a name is expected, say)."""
    for key, kind in ATTR_TYPES.items():
        if key not in attrs:
            continue
        value = attrs[key]
        ok = isinstance(value, str) if kind is str else \
            isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if not ok:
            raise FormatError(f"the '{key}' attribute is not {'a string' if kind is str else 'an integer'}: "
                              f"{str(value)[:60]!r}", path)


def _config_of(attrs: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``config`` attribute: a JSON object (absent: empty)."""
    raw = attrs.get("config", "{}")
    if not isinstance(raw, str):
        raise FormatError("the 'config' attribute is not a JSON string", path)
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError("the 'config' attribute is not valid JSON", path) from None
    if not isinstance(config, dict):
        raise FormatError(f"the 'config' attribute is not a JSON object: {raw[:60]!r}", path)
    return config


def _decode_keys(meta: Metadata, schema: Schema, path: Path) -> tuple[list[Key], bytes | None]:
    """The keys of a store from its (already read) key dataset, checked for shape and type,
    and the names as ``keys_blob`` would hold them when that is cheap to know (else None)."""
    info = meta.datasets.get(schema.key)
    if info is None:
        raise FormatError(f"missing dataset '{schema.key}'", path)
    expected = "(N, 2)" if schema.key == "pairs" else "(N,)"
    if not info.is_string:
        raise FormatError(f"'{schema.key}' must hold strings, got {info.dtype}", path)
    if (schema.key == "pairs") != (len(info.shape) == 2) or info.shape[1:] not in ((), (2,)):
        raise FormatError(f"'{schema.key}' has shape {info.shape}, expected {expected}", path)
    n = info.shape[0]
    if n == 0:
        return [], b""
    try:
        items = meta.string_items(schema.key)
    except UnicodeDecodeError:
        raise FormatError(f"'{schema.key}' holds a name that is not UTF-8", path) from None
    raw = meta.strings.get(schema.key)
    blob = raw if schema.key == "names" and isinstance(raw, bytes) else None
    if len(items) != n * (2 if schema.key == "pairs" else 1):
        raise FormatError(f"'{schema.key}' could not be read ({len(items)} names for {n} items)", path)
    if schema.key == "pairs":
        return list(zip(items[0::2], items[1::2], strict=True)), None
    return list[Key](items), blob


def check_match_indices(matches: np.ndarray, counts: tuple[int | None, int | None], path: Path,
                        pair: tuple[str, str]) -> None:
    """Refuse matches of ``pair`` that index outside the keypoints of its images (``counts``:
    keypoints of each image, None where unknown): a store of matches made on other
    features, or damaged, must not index the wrong keypoints (or crash a consumer)."""
    if not len(matches):
        return
    if matches.min() < 0:
        raise FormatError(f"pair {pair[0]}, {pair[1]}: negative match index", path)
    for side, n in enumerate(counts):
        if n is not None and matches[:, side].max() >= n:
            raise FormatError(f"pair {pair[0]}, {pair[1]}: match index {int(matches[:, side].max())} beyond the "
                              f"{n} keypoints of {pair[side]} (matches made on other features?)", path)


def check_matches_provenance(matches: Store, local: str, features: Store) -> None:
    """Refuse to use ``matches`` with the local features ``features`` (the store named
    ``local``) unless they were made on them: the store they name (or, for matches
    imported from kapture, its keypoints type) and, when recorded, the same configuration.
    Indices into other keypoints would give a wrong result, not an error."""
    made_on = matches.attrs.get("local_features") or matches.config.get("local_features")
    if made_on and made_on not in (local, features.config.get("keypoints_type")):
        raise CbirError(f"these matches were made on the local features {made_on!r}, not {local!r}: "
                        f"pass --local {made_on}, or match {local!r} again", matches.path)
    recorded = matches.config.get("features_config")
    if recorded is not None and recorded != features.config:
        diffs = differences(recorded, features.config)
        raise CbirError(f"these matches were made on another configuration of {local!r} ({'; '.join(diffs)}): "
                        f"match {local!r} again (cbir match ... --overwrite)", matches.path)


def open_store(path: str | os.PathLike, kind: str | None = None) -> Store:
    return Store(path, kind)


# ================================================================================ writing

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
FLUSH_INTERVAL_S = 5.0


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
                 overwrite: bool = False, batch_size: int = 256, batch_rows: int = 2_000_000,
                 flush_interval_s: float = FLUSH_INTERVAL_S):
        self.path = Path(path)
        self.schema = SCHEMAS[kind]
        self.attrs = dict(attrs)
        self.attrs.setdefault("config", {})
        if "name" not in self.attrs:
            raise ValueError("attrs must contain 'name'")
        self.batch_size = batch_size
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self.batch_dir = self.path.with_name(self.path.name + ".batches")
        self._lock = WriteLock(self.path).acquire()
        try:
            self._prepare(overwrite)
        except BaseException:
            self._lock.release()
            raise
        #: complete items waiting for the next batch; one list append commits an item, so that an
        #: interruption anywhere in :meth:`add` leaves only whole items to flush
        self._buffer: list[tuple[Key, dict[str, np.ndarray]]] = []
        self._buffer_rows = 0
        self.added = 0

    # -- set-up and resume
    def _identity(self) -> dict[str, Any]:
        return store_identity(self.schema.kind, self.attrs)

    def _prepare(self, overwrite: bool) -> None:
        identity = self._identity()
        self._base: Path | None = None
        self._present: set[Key] = set()
        if self.path.exists() and not overwrite:
            self._present.update(present_keys(self.path, self.schema.kind, self.attrs))
            self._base = self.path
        meta = refuse_links(self.batch_dir / "meta.json")
        if self.batch_dir.exists():
            found = None
            try:
                found = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                if not self._batches():  # left by a process killed before it wrote anything: nothing to keep
                    found = identity
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
        """Buffer one item. Keys are image names as records_camera.txt has them (relative,
        normalized, no '..'): a name that could not be a path below records_data/ is a
        :class:`CbirError`, since exports turn keys into paths."""
        key = _as_key(key)
        if key in self._present:
            raise ValueError(f"{key!r} is already in {self.path}")
        for name in key if isinstance(key, tuple) else (key,):
            problem = check_relative_name(name, "image name")
            if problem:
                raise CbirError(problem, self.path)
        schema = self.schema
        unknown = set(columns) - set(schema.columns)
        if unknown:
            raise ValueError(f"unknown columns for a {schema.kind} store: {sorted(unknown)}")
        rows = None
        staged: dict[str, np.ndarray] = {}
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
            staged[name] = arr
        if self._buffer and set(staged) != set(self._buffer[0][1]):
            raise ValueError(f"every item of a batch needs the same columns: {sorted(self._buffer[0][1])}")
        self._buffer.append((key, staged))
        self._present.add(key)
        self._buffer_rows += rows or 0
        self.added += 1
        if len(self._buffer) >= self.batch_size or self._buffer_rows >= self.batch_rows \
                or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def _check_row_shape(self, name: str, col: Column, shape: tuple[int, ...]) -> None:
        if len(shape) != len(col.shape) or any(c is not None and c != s for c, s in zip(col.shape, shape, strict=True)):
            raise ValueError(f"column {name!r} rows have shape {shape}, expected {col.shape}")

    def flush(self) -> None:
        """Write the buffered items as one batch file (atomically)."""
        self._last_flush = time.monotonic()
        items = list(self._buffer)
        if not items:
            return
        keys = [k for k, _ in items]
        arrays = {}
        offsets = None
        if self.schema.ragged:
            first = next(n for n in self.schema.ragged if n in items[0][1])
            counts = [cols[first].shape[0] for _, cols in items]
            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
        for name in items[0][1]:
            parts = [cols[name] for _, cols in items]
            arrays[name] = np.concatenate(parts, axis=0) if name in self.schema.ragged else np.stack(parts, axis=0)
        target = self.batch_dir / f"batch-{self._next_batch:06d}.h5"
        with atomic_output(target) as tmp:
            _write_arrays(tmp, self.schema, self.attrs, keys, arrays, offsets)
        self._next_batch += 1
        del self._buffer[:len(items)]
        self._buffer_rows = 0

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
        """Stop without merging (an error, Ctrl-C, SIGTERM): the items added so far are written as
        a last batch when possible, and every batch stays on disk for a later resume."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - e.g. the disk is full: the batches already written remain
            pass
        finally:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def store_identity(kind: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """What a store must have been written with to be resumed: its kind, name and configuration."""
    return {"cbir_format": kind, "name": attrs["name"],
            "config": json.loads(json.dumps(attrs.get("config", {}), sort_keys=True))}


def present_keys(path: Path, kind: str, attrs: dict[str, Any], overwrite: bool = False) -> frozenset[Key]:
    """The keys the store at ``path`` holds, which a writer of ``kind`` with ``attrs`` resumes
    after; none where there is no store or with ``overwrite``. A store written with another
    kind, name or configuration is refused (one line): the one resume rule of every writer,
    in this process or on a cluster."""
    if overwrite or not path.exists():
        return frozenset()
    wanted = store_identity(kind, attrs)
    with Store(path) as old:
        found = {"cbir_format": old.kind, "name": old.attrs.get("name"), "config": old.config}
        if found != wanted:
            raise CbirError(_mismatch(found, wanted), path)
        return frozenset(old.keys)


def _mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    diffs = differences(found, wanted)
    return ("exists with another configuration (" + "; ".join(diffs) +
            "): pass --overwrite to replace it, or write to another name (--name)")


def merge_stores(parts: Sequence[Path], out: Path, schema: Schema, attrs: dict[str, Any]) -> None:
    """Concatenate stores of one schema into a new contiguous file, part by part, and record
    the CRC-32 of every column and of the keys (``checksums``, verified by
    :meth:`Store.verify_checksums`). Parts without items add nothing (their column shapes
    never block a merge). In three steps, so that the copies may run elsewhere (a Ray
    cluster copies every part on its own task): :func:`plan_merge`, :func:`copy_part` of
    each part, :func:`finish_merge`."""
    plan = plan_merge(parts, out, schema, attrs)
    finish_merge(plan, [copy_part(job) for job in plan.jobs])


@dataclass(frozen=True)
class CopyJob:
    """One part's columns to copy into a merged file: ``(column, offset in the part or None
    where it is not contiguous, offset in the merged file, bytes, the CRC the part records
    or None)`` each."""

    part: Path
    out: Path
    columns: tuple[tuple[str, int | None, int, int, int | None], ...]


@dataclass(frozen=True)
class MergePlan:
    """A merged file created with its keys and offsets and its columns allocated, waiting
    for every part's :class:`CopyJob`."""

    out: Path
    jobs: tuple[CopyJob, ...]
    columns: tuple[str, ...]
    keys_crc: int
    offsets_crc: int | None


#: a part to merge, validated: its path, keys, offsets (ragged schemas), columns, recorded CRCs
_Part = tuple[Path, list[Key], "np.ndarray | None", dict[str, DatasetInfo], dict[str, int]]


#: a column's row shape and dtype
_RowShape = tuple[tuple[int, ...], np.dtype]


def _merge_parts_validated(parts: Sequence[Path],
                           schema: Schema) -> tuple[list[_Part], dict[str, _RowShape], int, int]:
    """The parts that hold items, each validated once (the copies read numbers only), with
    their columns' row shapes (one per column across parts), items and rows."""
    n_items, n_rows = 0, 0
    shapes: dict[str, _RowShape] = {}
    validated: list[_Part] = []
    for part in parts:
        with Store(part, schema.kind) as s:  # validated once; the copies read numbers only
            if not len(s):
                continue
            # a column HDF5 stores otherwise than contiguously in the file is copied through it
            infos = {name: s._infos[name] if name in s._views else replace(s._infos[name], offset=None)
                     for name in s.columns}
            validated.append((part, s.keys, s.offsets if schema.ragged else None, infos, _recorded_crcs(s)))
            n_items += len(s)
            if schema.ragged:
                n_rows += int(s.offsets[-1])
            for name in s.columns:
                d = s.dataset(name)
                if name in shapes and shapes[name] != (d.shape[1:], d.dtype):
                    raise CbirError(f"column {name!r} has rows {d.shape[1:]} {d.dtype}, other parts "
                                    f"{shapes[name][0]} {shapes[name][1]}: cannot merge", part)
                shapes[name] = (d.shape[1:], d.dtype)
    return validated, shapes, n_items, n_rows


def _copy_jobs(validated: list[_Part], shapes: dict[str, Any], extents: dict[str, int | None],
               out: Path) -> list[CopyJob]:
    """Where each part's columns go in the allocated file ``out``, part after part."""
    written = dict.fromkeys(shapes, 0)
    jobs = []
    for part, _, _, infos, crcs in validated:
        columns = []
        for name in shapes:
            info = infos[name]
            if not info.nbytes:
                continue
            start = extents[name]
            if start is None:
                raise CbirError(f"column {name!r} was not allocated: cannot merge", out)
            columns.append((name, info.offset, start + written[name], info.nbytes, crcs.get(name)))
            written[name] += info.nbytes
        jobs.append(CopyJob(part, out, tuple(columns)))
    return jobs


def plan_merge(parts: Sequence[Path], out: Path, schema: Schema, attrs: dict[str, Any]) -> MergePlan:
    """Validate the parts and create ``out``: attributes, keys, offsets and the columns,
    allocated (contiguous, not filled) so that each part's bytes have a known place."""
    validated, shapes, n_items, n_rows = _merge_parts_validated(parts, schema)
    for name, col in schema.columns.items():
        if col.required and name not in shapes:  # an empty store still has its required columns
            dim = int(attrs.get("descriptor_dim") or 0) if name == "descriptors" else 0
            shapes[name] = (tuple(dim if c is None else c for c in col.shape),
                            np.dtype(col.dtype or attrs.get("descriptor_dtype") or "float32"))
    for part, _, _, infos, _ in validated:
        missing = set(shapes) - set(infos)
        if missing:
            raise CbirError(f"lacks columns {sorted(missing)} that other parts have: cannot merge", part)
    all_keys = [k for _, keys, _, _, _ in validated for k in keys]
    offsets = None
    if schema.ragged:
        offsets = np.zeros(n_items + 1, np.int64)
        i0, r0 = 0, 0
        for _, keys, part_offsets, _, _ in validated:
            assert part_offsets is not None  # ragged parts have offsets
            offsets[i0 + 1:i0 + len(keys) + 1] = part_offsets[1:] + r0
            i0, r0 = i0 + len(keys), r0 + int(part_offsets[-1])
    extents: dict[str, int | None] = {}  # where each column's data starts in the merged file
    with _create_file(out) as f:
        _set_attrs(f, schema, attrs)
        f.create_dataset(schema.key, data=_encode_keys(all_keys, schema), dtype=STR_DTYPE)
        if offsets is not None:
            f.create_dataset("offsets", data=offsets)
        _write_blob(f, all_keys)
        allocate_now = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        allocate_now.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # its offset known before any write
        allocate_now.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is copied
        for name, (row_shape, dtype) in shapes.items():
            length = n_rows if name in schema.ragged else n_items
            ds = f.create_dataset(name, shape=(length,) + row_shape, dtype=dtype, dcpl=allocate_now)
            extents[name] = ds.id.get_offset()
    jobs = _copy_jobs(validated, shapes, extents, out)
    return MergePlan(out, tuple(jobs), tuple(shapes), zlib.crc32(_keys_bytes(all_keys)),
                     zlib.crc32(offsets.data) if offsets is not None else None)


def copy_part(job: CopyJob) -> dict[str, int]:
    """Copy one part's columns into the merged file: by the kernel (``copy_file_range``:
    nothing passes through this process, a reflink where the file system has them) where
    the part records the column's CRC, else read here in blocks of :data:`_COPY_BLOCK_BYTES`
    and checksummed; returns each column's CRC-32. Copying again writes the same bytes."""
    crcs = {}
    fd = os.open(job.out, os.O_WRONLY)
    try:
        with open(job.part, "rb") as src:
            for name, src_offset, dst_offset, nbytes, recorded in job.columns:
                try:
                    if src_offset is None:  # not contiguous (another writer): through HDF5
                        crcs[name] = _copy_through_hdf5(job.part, name, fd, dst_offset)
                    elif recorded is None:
                        crc = _copy_bytes(src.fileno(), src_offset, fd, dst_offset, nbytes, 0)
                        assert crc is not None  # asked for (0: a CRC from the start)
                        crcs[name] = crc
                    else:
                        _copy_bytes(src.fileno(), src_offset, fd, dst_offset, nbytes, None)
                        crcs[name] = recorded
                except OSError as e:
                    if is_no_space(e):
                        raise  # said as such by the atomic output
                    raise CbirError(f"cannot copy column {name!r} into {job.out.name} ({e})", job.part) from None
    finally:
        os.close(fd)
    return crcs


def finish_merge(plan: MergePlan, crcs: Sequence[dict[str, int]]) -> None:
    """Record the merged file's checksums, each column's combined from its parts' CRCs in
    order (:func:`crc32_combine`: the bytes are not read again). A part whose recorded CRC
    is wrong thus leaves a merged store whose ``cbir check --deep`` says so, instead of a new
    checksum over the corrupt bytes."""
    combined = dict.fromkeys(plan.columns, 0)
    for job, part_crcs in zip(plan.jobs, crcs, strict=True):
        for name, _, _, nbytes, _ in job.columns:
            combined[name] = crc32_combine(combined[name], part_crcs[name], nbytes)
    if plan.offsets_crc is not None:
        combined["offsets"] = plan.offsets_crc
    with h5py.File(plan.out, "r+", libver=("earliest", "v110")) as f:
        f.attrs[CHECKSUMS] = _checksums_json(plan.keys_crc, combined)


def _checksums_json(keys_crc: int, columns: dict[str, int]) -> str:
    """The ``checksums`` attribute (formats/SPEC.md 5)."""
    return json.dumps({"algorithm": "crc32", "keys": f"{keys_crc:08x}",
                       "columns": {k: f"{v:08x}" for k, v in sorted(columns.items())}}, sort_keys=True)


def _recorded_crcs(store: Store) -> dict[str, int]:
    """The CRC-32 a store records of its columns (none where it records none, or not readably)."""
    try:
        recorded = json.loads(store.attrs[CHECKSUMS])
        if recorded.get("algorithm") != "crc32":
            return {}
        return {name: int(value, 16) for name, value in recorded["columns"].items() if name in store.columns}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def _copy_bytes(src: int, src_offset: int, dst: int, dst_offset: int, n: int, crc: int | None) -> int | None:
    """Copy ``n`` bytes between files at these offsets. With ``crc`` None by the kernel
    (``copy_file_range``, else ``pread``/``pwrite``); otherwise through this process in
    blocks, returning ``crc`` continued over them."""
    kernel_copy = getattr(os, "copy_file_range", None)
    done = 0
    if crc is None and kernel_copy is not None:
        try:
            while done < n:
                k = kernel_copy(src, dst, n - done, src_offset + done, dst_offset + done)
                if k == 0:
                    raise OSError(f"short copy ({done} of {n} bytes)")
                done += k
            return None
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # a file system that cannot copy between these files: through this process
    buffer = memoryview(bytearray(min(_COPY_BLOCK_BYTES, n)))  # one block, reused
    while done < n:
        got = os.preadv(src, [buffer[:min(len(buffer), n - done)]], src_offset + done)
        if not got:
            raise OSError(f"short read ({done} of {n} bytes)")
        if crc is not None:
            crc = zlib.crc32(buffer[:got], crc)
        _write_all(dst, buffer[:got], dst_offset + done)
        done += got
    return crc


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        k = os.pwrite(fd, data, offset)
        data, offset = data[k:], offset + k


def _copy_through_hdf5(part: Path, name: str, dst: int, dst_offset: int) -> int:
    """A column that is not stored contiguously, read through HDF5 in bounded blocks; its CRC."""
    crc = 0
    with h5py.File(part, "r") as f:
        ds = f[name]
        for span in _row_blocks(ds.shape[0], ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))):
            block = np.ascontiguousarray(ds[span])
            crc = zlib.crc32(block.data, crc)
            _write_all(dst, memoryview(block.reshape(-1).view(np.uint8)), dst_offset)  # type: ignore[arg-type]  # as above
            dst_offset += block.nbytes
    return crc


#: bytes copied (and checksummed) at a time when merging or verifying
_COPY_BLOCK_BYTES = 64 << 20


def _row_blocks(total: int, row_bytes: int) -> Iterator[slice]:
    """Consecutive row ranges of at most :data:`_COPY_BLOCK_BYTES` (one row at least)
    covering ``total`` rows."""
    step = max(1, _COPY_BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


_POLY = 0xEDB88320  # CRC-32 (zlib), reflected


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC-32 polynomial (reflected bit order)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc1`` of ``a``, ``crc2`` of ``b`` and ``len(b)``
    (zlib's ``crc32_combine``, which Python's zlib does not offer): ``crc1`` shifted by
    ``len2`` zero bytes, that is multiplied by x^(8 len2), plus ``crc2``."""
    p, n, k = 1 << 31, len2, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


#: attribute holding the CRC-32 of the keys and of every column (format 1.2, optional)
CHECKSUMS = "checksums"


def _keys_bytes(keys: Sequence[Key]) -> bytes:
    """The bytes the keys' checksum is computed over (unambiguous for any name)."""
    return json.dumps([list(k) if isinstance(k, tuple) else k for k in keys], ensure_ascii=False).encode("utf-8")
