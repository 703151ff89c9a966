"""Reading a store: validated on open, then slices, rows and batches (:class:`Store`)."""

from __future__ import annotations

import itertools
import json
import mmap
import operator
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import CbirError, FormatError
from ..hdf5 import DatasetInfo, Metadata, read_metadata, refuse_unstored, what_of
from ..paths import TRUST_LINKS_HINT, trust_links
from ..provenance import differences, digest
from .checksums import _row_blocks
from .schema import CHECKSUMS, KEYS_BLOB, SCHEMAS, Key, Schema, _as_key, _check_major, _keys_bytes, encode_keys_blob


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

    def __init__(self, path: str | os.PathLike, expected_kind: str | None = None, meta: Metadata | None = None):
        self.path = Path(path)
        self._views: dict[str, np.ndarray] = {}
        self._fd: int | None = None  # raw reads of scattered rows (_gather)
        self._mmap: mmap.mmap | None = None
        self._file: h5py.File | None = None
        if meta is None:
            meta = read_metadata(self.path, ("names", "pairs"))  # refuses links and data in other files
        if meta.virtual and not trust_links():  # allowed for a sharded store's record, which this is not
            found = "; ".join(f"'{name}' ({what_of('virtual', files)})" for name, files in meta.virtual.items())
            raise FormatError(f"holds data of other files: {found}; cbir reads only what a file holds itself "
                              f"({TRUST_LINKS_HINT})", self.path)
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
        self._init_attributes(meta, expected_kind)
        infos = meta.datasets
        for key in (self.schema.key, "offsets", KEYS_BLOB, *self.schema.columns):
            if key in meta.groups:
                raise FormatError(f"'{key}' is a group, expected a dataset", self.path)
        self._infos = {n: infos[n] for n in (self.schema.key, "offsets", *self.schema.columns) if n in infos}
        refuse_unstored(self.path, {n: infos[n] for n in (*self._infos, KEYS_BLOB) if n in infos})
        self._init_keys(meta)
        self._datasets: dict[str, h5py.Dataset] = {n: self._file[n] for n in self._infos}  # type: ignore[index]
        self._map_columns()
        self._check_columns()

    def _init_attributes(self, meta: Metadata, expected_kind: str | None) -> None:
        """Kind, version, attribute types and configuration (``schema``, ``kind``, ``attrs``, ``config``)."""
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

    def _init_keys(self, meta: Metadata) -> None:
        """The keys, checked: their shape and type, ``keys_blob``, uniqueness."""
        self._keys, names_blob = _decode_keys(meta, self.schema, self.path)
        self._n = len(self._keys)
        self._check_blob(meta.datasets.get(KEYS_BLOB), names_blob)
        self._index: dict[Key, int] | None = None
        self._check_unique()

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
        keys = self._keys
        if all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
            return  # strictly increasing (as cbir writes them): unique, for a third of a set's cost
        if len(set(keys)) != self._n:
            seen: set[Key] = set()
            dup = next(k for k in self._keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise FormatError(f"duplicate item {dup!r} in '{self.schema.key}'", self.path)

    def _check_columns(self) -> None:
        for name, col in self.schema.columns.items():
            if col.required and name not in self._infos:
                raise FormatError(f"missing dataset '{name}'", self.path)
        self._check_offsets()
        self._check_column_shapes()

    def _check_offsets(self) -> None:
        """``offsets`` of a ragged kind: N+1 integers from 0, never decreasing (``_offsets``)."""
        if not self.schema.ragged:
            return
        n = self._n
        info = self._infos.get("offsets")
        if info is None:
            raise FormatError("missing dataset 'offsets'", self.path)
        if info.dtype is None or info.dtype.kind not in "iu" or info.shape != (n + 1,):
            raise FormatError(f"'offsets' must be {n + 1} integers (one more than the items), "
                              f"got shape {info.shape} {info.dtype or 'strings'}", self.path)
        self._offsets = self._read("offsets").astype(np.int64)
        if self._offsets[0] != 0 or np.any(np.diff(self._offsets) < 0):
            raise FormatError("'offsets' must start at 0 and never decrease", self.path)

    def _check_column_shapes(self) -> None:
        """Every column of ``_infos``: numeric, of its schema's dtype and row shape, with one row
        per item (per-item columns) or ``offsets[N]`` rows (ragged ones); ``descriptor_dim``."""
        schema, n = self.schema, self._n
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
        return self._fingerprint_of(self.content_checksums())

    def content_checksums(self) -> str:
        """What the fingerprint digests of the store's content: its ``checksums`` attribute, or
        for a store written without, the CRC-32 of its keys and offsets."""
        raw = self.attrs.get(CHECKSUMS)
        if raw is not None:
            return str(raw)
        return f"{zlib.crc32(_keys_bytes(self._keys)):08x}:" + \
            (f"{zlib.crc32(np.ascontiguousarray(self._offsets).data):08x}" if self.schema.ragged else str(self._n))

    def _fingerprint_of(self, content: str) -> str:
        """The fingerprint of a store of this one's kind, name and configuration holding ``content``."""
        return digest({"kind": self.kind, "name": self.attrs.get("name"), "config": self.config, "content": content})

    def part_starts(self) -> np.ndarray:
        """Where each part's items start, then the item count: one file is one part."""
        return np.array([0, self._n], dtype=np.int64)

    def part_fingerprints(self) -> list[str] | None:
        """Each part's fingerprint: one file's is its own."""
        return [self.fingerprint()]

    def fingerprint_of_rows(self, rows: np.ndarray) -> str | list[str]:
        """What identifies the items at ``rows``: for one file, its fingerprint (a sharded store
        names the parts holding them, :meth:`ShardedStore.fingerprint_of_rows`)."""
        return self.fingerprint()

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
            if f"{self.column_crc(name):08x}" != columns[name]:
                problems.append(f"'{name}' changed since the store was written (checksum)")
        return problems

    def column_crc(self, name: str) -> int:
        """The CRC-32 of a column's bytes, read in bounded blocks."""
        crc = 0
        info = self._infos[name]
        for span in _row_blocks(info.shape[0], info.nbytes // max(1, info.shape[0])):
            crc = zlib.crc32(np.ascontiguousarray(self._read(name, span)).data, crc)
        return crc

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
                               "keypoint_params": str, "local_features": str, "checksums": str,
                               "parts_directory": str, "part_columns": str}


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
    """The store at ``path`` (of ``kind``, when given), validated: one file, or a sharded
    store's record and its parts (:class:`~.sharded.ShardedStore`), read the same way."""
    from .sharded import RECORD_STRINGS, ShardedStore, all_columns, is_sharded

    meta = read_metadata(path, RECORD_STRINGS, virtual=all_columns())
    if is_sharded(meta):
        return ShardedStore(path, kind, meta)
    return Store(path, kind, meta)


# ================================================================================ writing
