"""Sharded stores: one store made of parts, never copied into one file (formats/SPEC.md 5b).

A sharded store is a small *record* at the store's usual path (``cbir/<kind>/<name>.h5``) and
its parts, each a complete store of its own written atomically by the worker that made it, in
``cbir/<kind>/<name>.parts/NNNNNN.h5``. The record holds what a single file's metadata holds
(the attributes, every key, the offsets of ragged columns, and the checksums a merge of the
parts would record, so that its fingerprint is the merged store's) and a table of the parts:
file, items, rows, size and where each column's bytes are in it. Its columns are HDF5 virtual
datasets over the parts, so that h5py and other HDF5 tools read each as one dataset.

cbir reads the record (in a child process, like any store's metadata: keys unique across
parts, one configuration, offsets) and then the parts' bytes at the offsets the record gives,
with ``preadv``: opening costs what opening one file costs, whatever the number of parts, and
a part is looked at only when one of its rows is read (its size must be the recorded one).
Appending is a new part and a new record; nothing already written is copied again.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import re
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import CbirError, FormatError
from ..atomic import atomic_output
from ..hdf5 import Metadata, read_metadata, refuse_unstored
from ..paths import refuse_links, trust_links
from .checksums import _checksums_json, crc32_combine
from .layout import _create_file, _encode_keys, _set_attrs, _write_blob
from .reader import Store
from .schema import CHECKSUMS, KEYS_BLOB, SCHEMAS, STR_DTYPE, Key, Schema, _keys_bytes

#: the format version of a record (1.3 added sharded stores; a 1.2 reader refuses a record
#: as a file holding data of other files, never reads it as something else)
RECORD_VERSION = "1.3"
PARTS_SUFFIX = ".parts"
PARTS_DIRECTORY = "parts_directory"
PART_COLUMNS = "part_columns"
#: the record's table of parts: file names, items, ragged rows, file sizes, column offsets
PART_TABLE = ("part_files", "part_items", "part_rows", "part_bytes", "part_layout")
#: optional (records of 1.3 before it lack it): each part's own ``checksums`` attribute, which
#: fixes each part's fingerprint (indexes kept per part are keyed by them)
PART_CHECKSUMS = "part_checksums"
#: the string datasets of a record its reader needs (the keys of either kind, the part table's)
RECORD_STRINGS = ("names", "pairs", "part_files", PART_CHECKSUMS)
PART_FILE = re.compile(r"[0-9]{6}\.h5")
#: parts a reader keeps open at most (a read of any other part opens and closes it); fewer
#: where the process may open few files (:func:`open_parts_budget`)
OPEN_PARTS = 4096


def open_parts_budget() -> int:
    """Parts a reader keeps open: :data:`OPEN_PARTS`, or a quarter of the files this process
    may open if that is less (the rest stay for the application, other stores, sockets)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OPEN_PARTS if soft == resource.RLIM_INFINITY else max(16, min(OPEN_PARTS, soft // 4))


def parts_directory(path: Path) -> Path:
    """Where the parts of the store at ``path`` are: ``<name>.parts/`` beside it."""
    return path.with_name(path.stem + PARTS_SUFFIX)


def part_path(path: Path, number: int) -> Path:
    """The file of part ``number`` of the store at ``path``."""
    return parts_directory(path) / f"{number:06d}.h5"


def next_part_number(path: Path) -> int:
    """The number of the next part of the store at ``path`` (after every file there)."""
    directory = parts_directory(path)
    numbers = [int(p.stem) for p in directory.glob("*.h5") if PART_FILE.fullmatch(p.name)] \
        if directory.is_dir() else []
    return max(numbers, default=-1) + 1


def is_sharded(meta: Metadata) -> bool:
    """Whether a file's metadata is a sharded store's record."""
    return PARTS_DIRECTORY in meta.attrs


@dataclass(frozen=True)
class _Part:
    """A part as its record describes it; ``items``/``rows``: where its items and ragged rows
    start in the whole store."""

    path: Path
    size: int
    items: tuple[int, int]
    rows: tuple[int, int]
    layout: dict[str, int]  # column -> byte offset of its data in the part


class ShardedStore(Store):
    """A sharded store, read as one (the API and the guarantees of :class:`Store`)."""

    def __init__(self, path: str | os.PathLike, expected_kind: str | None = None,
                 meta: Metadata | None = None) -> None:
        self.path = Path(path)
        self._views: dict[str, np.ndarray] = {}
        self._fd: int | None = None
        self._mmap = None
        self._file: h5py.File | None = None
        self._checked: set[int] = set()
        self._folder_checked = False
        self._fds: dict[int, int] = {}  # parts kept open
        self._keep_open = open_parts_budget()
        self._lock = threading.Lock()
        meta = meta if meta is not None else read_metadata(self.path, RECORD_STRINGS, virtual=all_columns())
        try:
            self._file = h5py.File(self.path, "r")
        except OSError:
            raise FormatError("not a readable HDF5 file (truncated or corrupt?)", self.path) from None
        try:
            self._init_record(meta, expected_kind)
        except BaseException:
            self.close()
            raise

    # -- validation on open: the record as a store's metadata (the checks of :class:`Store`), then its parts
    def _init_record(self, meta: Metadata, expected_kind: str | None) -> None:
        self._init_attributes(meta, expected_kind)
        if self.attrs.get(PARTS_DIRECTORY) != self.path.stem + PARTS_SUFFIX:
            raise FormatError(f"names its parts' folder {self.attrs.get(PARTS_DIRECTORY)!r}: a record's parts are "
                              f"in {self.path.stem + PARTS_SUFFIX!r} beside it", self.path)
        schema = self.schema
        infos = meta.datasets
        for key in (schema.key, "offsets", KEYS_BLOB, *schema.columns, *PART_TABLE, PART_CHECKSUMS):
            if key in meta.groups:
                raise FormatError(f"'{key}' is a group, expected a dataset", self.path)
        own = {n: infos[n] for n in (schema.key, "offsets", KEYS_BLOB, *PART_TABLE[1:]) if n in infos}
        refuse_unstored(self.path, own)
        self._init_keys(meta)
        columns = self._part_columns(meta)
        self._infos = {**{n: infos[n] for n in (schema.key, "offsets") if n in infos},
                       **{n: infos[n] for n in columns if n in infos}}
        # the record's own numbers, read through HDF5 (Store._read); the columns are the parts'
        self._datasets = {n: self._file[n] for n in ("offsets", *PART_TABLE[1:]) if n in infos}  # type: ignore[index]
        self._columns = [c for c in schema.columns if c in columns]
        self._check_offsets()
        if not schema.ragged:
            self._offsets = np.arange(self._n + 1, dtype=np.int64)  # a part's rows are its items
        self._check_column_shapes()
        self._parts = self._part_table(meta, columns)

    def _part_columns(self, meta: Metadata) -> list[str]:
        try:
            columns = json.loads(str(meta.attrs.get(PART_COLUMNS, "")))
        except json.JSONDecodeError:
            columns = None
        if not isinstance(columns, list) or not all(isinstance(c, str) and c in self.schema.columns
                                                    for c in columns) or len(set(columns)) != len(columns):
            raise FormatError(f"the '{PART_COLUMNS}' attribute must list columns of a {self.kind} store", self.path)
        for name, col in self.schema.columns.items():
            if col.required and name not in columns:
                raise FormatError(f"missing column '{name}'", self.path)
        for name in columns:
            if name not in meta.virtual:
                raise FormatError(f"'{name}' must be a virtual dataset over the parts", self.path)
        return columns

    def _part_table(self, meta: Metadata, columns: list[str]) -> list[_Part]:
        infos = meta.datasets
        info = infos.get("part_files")
        if info is None or not info.is_string or len(info.shape) != 1:
            raise FormatError("missing the parts' file names ('part_files')", self.path)
        files = meta.string_items("part_files")
        p = len(files)
        if len(set(files)) != p or not all(PART_FILE.fullmatch(f) for f in files):
            raise FormatError("'part_files' must name distinct files NNNNNN.h5", self.path)
        table = {}
        for name, shape in (("part_items", (p,)), ("part_rows", (p,)), ("part_bytes", (p,)),
                            ("part_layout", (p, len(columns)))):
            i = infos.get(name)
            if i is None or i.dtype is None or i.dtype.kind not in "iu" or i.shape != shape:
                raise FormatError(f"'{name}' must be integers of shape {shape}", self.path)
            table[name] = np.asarray(self._read(name), dtype=np.int64)
        if np.any(table["part_items"] < 0) or int(table["part_items"].sum()) != self._n:
            raise FormatError(f"the parts' items do not add up to the {self._n} keys", self.path)
        item_starts = np.concatenate([[0], np.cumsum(table["part_items"])])
        row_starts = self._offsets[item_starts]
        if not np.array_equal(np.diff(row_starts), table["part_rows"]):
            raise FormatError("the parts' rows disagree with 'offsets'", self.path)
        directory = parts_directory(self.path)
        parts = []
        for j, file in enumerate(files):
            layout = {c: int(table["part_layout"][j, k]) for k, c in enumerate(columns)}
            size = int(table["part_bytes"][j])
            part = _Part(directory / file, size, (int(item_starts[j]), int(item_starts[j + 1])),
                         (int(row_starts[j]), int(row_starts[j + 1])), layout)
            for c in columns:
                end = layout[c] + self._row_bytes(c) * self._span(part, c)
                if layout[c] < 0 or end > size:
                    raise FormatError(f"part {file}: column '{c}' lies outside its {size} bytes", self.path)
            parts.append(part)
        self._item_starts, self._row_starts = item_starts, row_starts
        #: per column, each part's byte offset of the column's first row, and the bytes of a row
        self._layouts = {c: table["part_layout"][:, k].copy() for k, c in enumerate(columns)}
        self._row_sizes = {c: self._row_bytes(c) for c in columns}
        #: where each part's items and ragged rows start, as Python ints (indexed by "is ragged")
        self._start_lists = (item_starts.tolist(), row_starts.tolist())
        self._part_checksums = self._checksums_of_parts(meta, p)
        return parts

    def _checksums_of_parts(self, meta: Metadata, p: int) -> list[str] | None:
        """The parts' own ``checksums`` attributes as the record lists them (None: not listed)."""
        info = meta.datasets.get(PART_CHECKSUMS)
        if info is None:
            return None
        items = meta.string_items(PART_CHECKSUMS) if info.is_string and info.shape == (p,) else []
        if len(items) != p:
            raise FormatError(f"'{PART_CHECKSUMS}' must be {p} strings, one a part", self.path)
        return items

    # -- layout
    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def parts(self) -> list[Path]:
        """The part files, in order."""
        return [p.path for p in self._parts]

    def dataset(self, name: str) -> Column:
        return Column(self, name)

    def part_starts(self) -> np.ndarray:
        """Where each part's items start, then the item count (P+1 integers)."""
        return self._item_starts

    def part_fingerprints(self) -> list[str] | None:
        """Each part's fingerprint (what the part opened as a store gives), from the record's
        ``part_checksums``; None for a record written without them."""
        if self._part_checksums is None:
            return None
        return [self._fingerprint_of(raw) for raw in self._part_checksums]

    def fingerprint_of_rows(self, rows: np.ndarray) -> str | list[str]:
        """The fingerprints of the parts holding the items at ``rows``, in order: what is built
        from them (a kept index) stays valid when other parts are added. The store's
        fingerprint where ``rows`` are all its items in order, or the record lists no part
        checksums."""
        parts = self.part_fingerprints()
        rows = np.asarray(rows, dtype=np.int64)
        if parts is None or (len(rows) == self._n and np.array_equal(rows, np.arange(self._n))):
            return self.fingerprint()
        held = np.unique(np.searchsorted(self._item_starts, rows, side="right") - 1)
        return [parts[j] for j in held.tolist()]

    def _row_bytes(self, column: str) -> int:
        info = self._infos[column]
        assert info.dtype is not None  # checked on open
        return int(np.prod(info.shape[1:], dtype=np.int64)) * info.dtype.itemsize

    def _span(self, part: _Part, column: str) -> int:
        lo, hi = part.rows if column in self.schema.ragged else part.items
        return hi - lo

    def _starts(self, column: str) -> np.ndarray:
        return self._row_starts if column in self.schema.ragged else self._item_starts

    @contextmanager
    def _part_fd(self, j: int) -> Iterator[int]:
        """A file descriptor of part ``j`` (:meth:`_acquire`), released after."""
        fd, kept = self._acquire(j)
        try:
            yield fd
        finally:
            if not kept:
                os.close(fd)

    def _acquire(self, j: int) -> tuple[int, bool]:
        """A file descriptor of part ``j``, after checking once that it is the recorded file,
        and whether it stays open: the first parts read (:func:`open_parts_budget`) stay open
        until the store closes (never closed under another thread's read); the caller closes
        any other."""
        fd = self._fds.get(j)
        if fd is not None:
            return fd, True
        fd = self._open_new(j)
        with self._lock:
            if j not in self._fds and len(self._fds) < self._keep_open:
                self._fds[j] = fd
                return fd, True
        return fd, False

    def _open_new(self, j: int) -> int:
        part = self._parts[j]
        first = j not in self._checked
        if not self._folder_checked:  # no link inside the dataset's cbir/ folder down to the parts' folder
            refuse_links(parts_directory(self.path))
            self._folder_checked = True
        try:  # and none at a part (O_NOFOLLOW: refused by the kernel, one system call)
            fd = os.open(part.path, os.O_RDONLY | (0 if trust_links() else os.O_NOFOLLOW))
        except FileNotFoundError:
            raise FormatError(f"part {part.path.name} is missing (listed by the record)", self.path) from None
        except OSError as e:
            why = "it is a symbolic link: cbir does not read through links inside a dataset's cbir/ folder" \
                if e.errno == errno.ELOOP else e.strerror
            raise FormatError(f"part {part.path.name} cannot be read ({why})", self.path) from None
        if first:
            size = os.fstat(fd).st_size
            if size != part.size:
                os.close(fd)
                raise FormatError(f"part {part.path.name} has {size} bytes, the record says {part.size}: it "
                                  "changed after the record was written", self.path)
            self._checked.add(j)
        return fd

    def _read_span(self, column: str, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows ``lo:hi`` of ``column`` (whole store) into ``out``, part by part."""
        starts = self._start_lists[column in self.schema.ragged]  # Python ints: a scalar search, no array
        row_bytes = self._row_sizes[column]
        layout = self._layouts[column]
        buffer = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs: no Buffer
        j = bisect.bisect_right(starts, lo) - 1
        at = 0
        while lo < hi:
            while starts[j + 1] <= lo:  # parts without rows
                j += 1
            stop = min(hi, starts[j + 1])
            nbytes = (stop - lo) * row_bytes
            fd, kept = self._acquire(j)
            try:
                _pread_all(fd, buffer[at:at + nbytes], int(layout[j]) + (lo - starts[j]) * row_bytes,
                           self._parts[j].path)
            finally:
                if not kept:
                    os.close(fd)
            at += nbytes
            lo = stop

    def _read(self, name: str, sel: Any = ()) -> np.ndarray:
        if name not in self._columns:  # offsets, the part table: the record's own
            return super()._read(name, sel)
        info = self._infos[name]
        total = info.shape[0]
        if isinstance(sel, (int, np.integer)):
            i = int(sel)
            if not 0 <= i < total:
                raise IndexError(f"row {i} beyond the {total} of '{name}'")
            out = np.empty((1,) + info.shape[1:], info.dtype)
            self._read_span(name, i, i + 1, out)
            return out[0]
        if sel == ():
            sel = slice(0, total)
        if not isinstance(sel, slice) or sel.step not in (None, 1):
            raise TypeError(f"a sharded store reads rows by index or range, not {sel!r}")
        lo, hi, _ = sel.indices(total)
        out = np.empty((max(0, hi - lo),) + info.shape[1:], info.dtype)
        self._read_span(name, lo, max(lo, hi), out)
        return out

    def read_rows(self, column: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a per-item column in the given order, each part's read in file order."""
        rows = np.asarray(rows, dtype=np.int64)
        info = self._infos[column]
        out = np.empty((len(rows),) + info.shape[1:], info.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= info.shape[0]:
            raise IndexError(f"rows beyond the {info.shape[0]} of '{column}'")
        if rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
            self._read_span(column, int(rows[0]), int(rows[-1]) + 1, out)
            return out
        starts = self._starts(column)
        row_bytes = self._row_bytes(column)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        owner = np.searchsorted(starts, sorted_rows, side="right") - 1
        # where each row is in its part's file, and where it goes in ``out``: one pass, part by part
        at_file = (self._layouts[column][owner] + (sorted_rows - starts[owner]) * row_bytes).tolist()
        at_out = (order * row_bytes).tolist()
        buffer = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs: no Buffer
        current, fd, kept = -1, -1, True
        try:
            for j, r, at in zip(owner.tolist(), at_file, at_out, strict=True):
                if j != current:
                    if not kept:
                        os.close(fd)
                    kept = True  # nothing to close should the next part be refused
                    fd, kept = self._acquire(j)
                    current = j
                target = buffer[at:at + row_bytes]
                if os.preadv(fd, [target], r) != row_bytes:  # a short read: finished, or refused there
                    _pread_all(fd, target, r, self._parts[j].path)
        finally:
            if not kept:
                os.close(fd)
        return out

    def verify_checksums(self) -> list[str]:
        """:meth:`Store.verify_checksums` over the parts' bytes, and each part's own checksums."""
        problems = []
        for j, part in enumerate(self._parts):
            try:
                with self._part_fd(j):
                    pass
                with Store(part.path, self.kind) as s:
                    problems += [f"part {part.path.name}: {p}" for p in s.verify_checksums()]
                    if self._part_checksums is not None and self._part_checksums[j] != s.content_checksums():
                        problems.append(f"part {part.path.name}: its checksums are not those the record lists")
            except CbirError as e:
                problems.append(e.message)
        if problems:
            return problems
        return super().verify_checksums()

    def virtual_sources_problems(self) -> list[str]:
        """Where the virtual datasets (what h5py and other HDF5 tools read) disagree with the
        parts this record lists."""
        problems = []
        for name in self._columns:
            wanted = [f"{self.path.stem}{PARTS_SUFFIX}/{p.path.name}" for p in self._parts if self._span(p, name)]
            found = [m.file_name for m in self._file[name].virtual_sources()]  # type: ignore[index]
            if list(dict.fromkeys(found)) != wanted:
                problems.append(f"the virtual dataset '{name}' reads other files than the parts listed")
        return problems

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        super().close()

    def __repr__(self) -> str:
        return f"ShardedStore({str(self.path)!r}, kind={self.kind}, items={len(self)}, parts={len(self._parts)})"


class Column:
    """A column of a sharded store as :meth:`Store.dataset` gives one: shape, dtype, rows."""

    def __init__(self, store: ShardedStore, name: str) -> None:
        self.store, self.name = store, name
        info = store._infos[name]
        self.shape: tuple[int, ...] = info.shape
        assert info.dtype is not None  # numeric: checked on open
        self.dtype: np.dtype = info.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, np.ndarray) or isinstance(sel, list):
            return self.store.read_rows(self.name, np.asarray(sel))
        return self.store._read(self.name, sel)


def _pread_all(fd: int, target: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got <= 0:
            raise FormatError(f"short read at byte {offset + done}: the part is truncated", path)
        done += got


def all_columns() -> tuple[str, ...]:
    """Every column name of every kind of store (those a record may hold as virtual datasets)."""
    return tuple(dict.fromkeys(c for s in SCHEMAS.values() for c in s.columns))


# ================================================================================ writing
def write_record(path: Path, parts: Sequence[Path], kind: str, attrs: dict[str, Any]) -> None:
    """The record of the sharded store at ``path`` made of ``parts`` (files in its parts'
    folder, in order), written atomically: each part validated (its kind, name and
    configuration those of ``attrs``; contiguous columns of one row shape across parts), keys
    unique across parts, and the checksums a merge would record combined from the parts'."""
    schema = SCHEMAS[kind]
    directory = parts_directory(path)
    described = [_describe(part, schema, attrs, directory) for part in parts]
    columns = _common_columns(described, schema, path)
    keys = [k for d in described for k in d.keys]
    if len(set(keys)) != len(keys):
        seen: dict[Key, str] = {}
        for d in described:
            for k in d.keys:
                if k in seen:
                    raise CbirError(f"item {k!r} is in two parts ({seen[k]} and {d.path.name})", path)
                seen[k] = d.path.name
    offsets = None
    if schema.ragged:
        offsets = np.zeros(len(keys) + 1, np.int64)
        np.cumsum([c for d in described for c in np.diff(d.offsets)], out=offsets[1:])
    crcs = dict.fromkeys(columns, 0)
    for d in described:
        for c in columns:
            if d.nbytes.get(c):
                crcs[c] = crc32_combine(crcs[c], d.crcs[c], d.nbytes[c])
    if offsets is not None:
        crcs["offsets"] = zlib.crc32(offsets.data)
    with atomic_output(path) as tmp, _create_file(tmp) as f:
        _set_attrs(f, schema, attrs)
        f.attrs["format_version"] = RECORD_VERSION
        f.attrs[PARTS_DIRECTORY] = directory.name
        f.attrs[PART_COLUMNS] = json.dumps(columns)
        f.attrs[CHECKSUMS] = _checksums_json(zlib.crc32(_keys_bytes(keys)), crcs)
        f.create_dataset(schema.key, data=_encode_keys(keys, schema), dtype=STR_DTYPE)
        _write_blob(f, keys)
        if offsets is not None:
            f.create_dataset("offsets", data=offsets)
        f.create_dataset("part_files", data=np.array([d.path.name for d in described], dtype=object),
                         dtype=STR_DTYPE)
        f.create_dataset("part_items", data=np.array([len(d.keys) for d in described], np.int64))
        f.create_dataset("part_rows", data=np.array([int(d.offsets[-1]) for d in described], np.int64))
        f.create_dataset("part_bytes", data=np.array([d.size for d in described], np.int64))
        f.create_dataset("part_layout", data=np.array([[d.layout.get(c, 0) for c in columns] for d in described],
                                                      np.int64).reshape(len(described), len(columns)))
        f.create_dataset(PART_CHECKSUMS, data=np.array([d.checksums for d in described], dtype=object),
                         dtype=STR_DTYPE)
        filled = [d for d in described if d.keys]
        for c in columns:
            row_shape, dtype, _ = filled[0].shapes[c] if filled else _empty_shape(schema, c, attrs)
            total = len(keys) if c not in schema.ragged else int(offsets[-1])  # type: ignore[index]
            layout = h5py.VirtualLayout(shape=(total,) + row_shape, dtype=dtype)
            at = 0
            for d in described:
                n = d.shapes[c][2] if c in d.shapes else 0
                if n:
                    layout[at:at + n] = h5py.VirtualSource(f"{directory.name}/{d.path.name}", c,
                                                           shape=(n,) + row_shape)
                at += n
            f.create_virtual_dataset(c, layout)


@dataclass
class _Described:
    path: Path
    size: int
    keys: list[Key]
    offsets: np.ndarray
    layout: dict[str, int]
    nbytes: dict[str, int]
    crcs: dict[str, int]
    shapes: dict[str, tuple[tuple[int, ...], np.dtype, int]]
    checksums: str  # the part's own (Store.content_checksums)


def _describe(part: Path, schema: Schema, attrs: dict[str, Any], directory: Path) -> _Described:
    from .merge import _recorded_crcs
    from .writer import store_identity

    if part.parent.resolve() != directory.resolve() or not PART_FILE.fullmatch(part.name):
        raise CbirError(f"a part must be a file NNNNNN.h5 in {directory}", part)
    with Store(part, schema.kind) as s:
        found = {"cbir_format": s.kind, "name": s.attrs.get("name"), "config": s.config}
        if found != store_identity(schema.kind, attrs):
            raise CbirError("written with another name or configuration than the store's other parts", part)
        crcs = _recorded_crcs(s)
        layout, nbytes, shapes = {}, {}, {}
        for c in s.columns:
            info = s._infos[c]
            if c not in s._views and info.nbytes:
                raise CbirError(f"column '{c}' is not stored contiguously: merge the part into one file first "
                                "(cbir store merge)", part)
            layout[c] = info.offset if info.offset is not None else 0
            nbytes[c] = info.nbytes
            assert info.dtype is not None  # numeric: validated
            shapes[c] = (tuple(info.shape[1:]), info.dtype, info.shape[0])
            if c not in crcs:  # a part written without checksums: computed here
                crcs[c] = s.column_crc(c)
        offsets = s.offsets if schema.ragged else np.arange(len(s) + 1, dtype=np.int64)
        return _Described(part, part.stat().st_size, list(s.keys), offsets, layout, nbytes, crcs, shapes,
                          s.content_checksums())


def _common_columns(described: list[_Described], schema: Schema, path: Path) -> list[str]:
    """The columns of the parts that hold items (an empty part has its required ones only)."""
    described = [d for d in described if d.keys]
    if not described:
        return [c for c, col in schema.columns.items() if col.required]
    columns = [c for c in schema.columns if c in described[0].shapes]
    for d in described:
        if [c for c in schema.columns if c in d.shapes] != columns:
            raise CbirError(f"has columns {sorted(d.shapes)}, the first part {columns}: parts of one store have the "
                            "same columns", d.path)
        for c in columns:
            if d.shapes[c][:2] != described[0].shapes[c][:2]:
                raise CbirError(f"column '{c}' has rows {d.shapes[c][0]} {d.shapes[c][1]}, the first part "
                                f"{described[0].shapes[c][0]} {described[0].shapes[c][1]}", d.path)
    return columns


def _empty_shape(schema: Schema, column: str, attrs: dict[str, Any]) -> tuple[tuple[int, ...], np.dtype, int]:
    col = schema.columns[column]
    dim = int(attrs.get("descriptor_dim") or 0) if column == "descriptors" else 0
    return (tuple(dim if c is None else c for c in col.shape),
            np.dtype(col.dtype or attrs.get("descriptor_dtype") or "float32"), 0)


#: attributes a writer sets itself (the rest are the store's own: name, config, descriptors)
FORMAT_ATTRS = frozenset({"cbir_format", "format_version", "cbir_version", CHECKSUMS, PARTS_DIRECTORY, PART_COLUMNS})


def own_attributes(store: Store) -> dict[str, Any]:
    """The attributes ``store`` was written with, as a writer takes them (``config`` a dict)."""
    return {**{k: v for k, v in store.attrs.items() if k not in FORMAT_ATTRS}, "config": store.config}


def merge_sharded(path: Path) -> int:
    """The sharded store at ``path`` made one file (atomically, in its place), its parts then
    removed; the number of parts merged (0: it was one file already). The merged store has
    the same keys, values and checksums (so the same fingerprint) as the record."""
    from ..atomic import WriteLock
    from .merge import merge_stores
    from .reader import open_store

    with WriteLock(path):
        with open_store(path) as store:
            if not isinstance(store, ShardedStore):
                return 0
            parts, schema, attrs, fingerprint = store.parts, store.schema, own_attributes(store), store.fingerprint()
        with atomic_output(path) as tmp:
            merge_stores(parts, tmp, schema, attrs)
            with Store(tmp, schema.kind) as merged:
                if merged.fingerprint() != fingerprint:  # a part changed between the record and the merge
                    raise CbirError("the merged parts differ from what the record says (a part changed?): run "
                                    "`cbir check --deep`; the store is left as it was", path)
        remove_parts(path, parts)
    return len(parts)


def commit_parts(path: Path, files: Sequence[Path], kind: str, attrs: dict[str, Any], keep: bool,
                 progress: Callable[[int], None] | None = None) -> None:
    """The sharded store at ``path`` made of what it holds and the stores ``files`` (renamed
    into its parts' folder, in order; ``progress(1)`` each), by a new record written
    atomically. ``keep``: after its parts, or after the single file it is (which becomes its
    first part, by a rename); with nothing new it stays as it is. Without ``keep`` the new
    parts replace it, and every other file of its parts' folder is removed once the record is
    written. The caller holds the store's write lock. If the record cannot be written,
    everything renamed is put back where it was (a re-run finds it)."""
    from .reader import open_store

    if keep and path.exists() and not files:
        return
    parts_directory(path).mkdir(parents=True, exist_ok=True)
    moved: list[tuple[Path, Path]] = []  # (from, to), to be undone on failure
    base: list[Path] = []
    try:
        if keep and path.exists():
            with open_store(path) as old:
                old_parts = list(old.parts) if isinstance(old, ShardedStore) else None
            if old_parts is None:  # a single file becomes the first part
                old_parts = [part_path(path, next_part_number(path))]
                os.replace(path, old_parts[0])
                moved.append((path, old_parts[0]))
            base = old_parts
        new = []
        for file in files:
            part = part_path(path, next_part_number(path))
            shutil.move(file, part)  # a rename on one file system
            moved.append((file, part))
            new.append(part)
            if progress:
                progress(1)
        replaced = [] if keep else [p for p in part_files(path) if p not in new]
        write_record(path, base + new, kind, attrs)
    except BaseException:
        for source, part in reversed(moved):
            shutil.move(part, source)
        raise
    remove_parts(path, replaced)


def part_files(path: Path) -> list[Path]:
    """The part files beside the store at ``path`` (listed by its record or not)."""
    directory = parts_directory(path)
    return sorted(p for p in directory.glob("*.h5") if PART_FILE.fullmatch(p.name)) if directory.is_dir() else []


def remove_parts(path: Path, parts: Sequence[Path]) -> None:
    """Parts no record lists any more (merged, or of a store replaced), and the parts'
    folder of the store at ``path`` once empty."""
    for part in parts:
        part.unlink(missing_ok=True)
    try:
        parts_directory(path).rmdir()
    except OSError:
        pass
