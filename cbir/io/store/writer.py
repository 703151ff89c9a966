"""Writing a store atomically and resumably (:class:`StoreWriter`): buffered items flushed as
batch files, merged with the previous store into the final file when the writer closes."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CbirError
from ..atomic import WriteLock, atomic_output, atomic_write_text
from ..paths import check_relative_name, refuse_links
from ..provenance import differences
from .layout import _write_arrays
from .merge import merge_stores
from .reader import Store, open_store
from .schema import SCHEMAS, Column, Key, _as_key
from .sharded import (
    ShardedStore,
    commit_parts,
    part_files,
    remove_parts,
)

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

    A sharded store (:mod:`.sharded`) gets the items added as a new part and a new record:
    nothing it held is copied. ``sharded=True`` makes the store sharded (a single file there
    becomes its first part, by a rename); the default keeps the store as it is.
    """

    def __init__(self, path: str | os.PathLike, kind: str, attrs: dict[str, Any], *,
                 overwrite: bool = False, batch_size: int = 256, batch_rows: int = 2_000_000,
                 flush_interval_s: float = FLUSH_INTERVAL_S, sharded: bool | None = None):
        self.path = Path(path)
        self._want_sharded = sharded
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
        self._base_parts: list[Path] | None = None  # the parts of a sharded base
        self._present: set[Key] = set()
        if self.path.exists() and not overwrite:
            with _open_existing(self.path, self.schema.kind, self.attrs) as old:
                self._present.update(old.keys)
                self._base_parts = list(old.parts) if isinstance(old, ShardedStore) else None
            self._base = self.path
        self.sharded = self._want_sharded if self._want_sharded is not None else \
            self._base_parts is not None or (overwrite and _is_record(self.path))
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
        """Flush, merge the previous store and all batches into the final file (a sharded
        store: the batches into a new part, then a new record), release the lock."""
        try:
            self.flush()
            if self.sharded:
                self._close_sharded()
            else:
                base = self._base_parts if self._base_parts is not None else \
                    [self._base] if self._base is not None else []
                parts = base + self._batches()
                if parts or not self.path.exists() or self._base_parts is not None:
                    replaced = part_files(self.path) if self._base is None else []
                    with atomic_output(self.path) as tmp:
                        merge_stores(parts, tmp, self.schema, self.attrs)
                    remove_parts(self.path, replaced if self._base is None else self._base_parts or [])
            shutil.rmtree(self.batch_dir, ignore_errors=True)
        finally:
            self._lock.release()
        return self.path

    def _close_sharded(self) -> None:
        """The batches merged into one store, committed as a new part (:func:`~.sharded.commit_parts`)."""
        batches = self._batches()
        new = []
        if batches:
            part = self.batch_dir / "part.h5"
            with atomic_output(part) as tmp:
                merge_stores(batches, tmp, self.schema, self.attrs)
            new.append(part)
        commit_parts(self.path, new, self.schema.kind, self.attrs, keep=self._base is not None)

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
    with _open_existing(path, kind, attrs) as old:
        return frozenset(old.keys)


def _open_existing(path: Path, kind: str, attrs: dict[str, Any]) -> Store:
    """The store at ``path``, open, if a writer of ``kind`` with ``attrs`` may resume it."""
    wanted = store_identity(kind, attrs)
    old = open_store(path)
    found = {"cbir_format": old.kind, "name": old.attrs.get("name"), "config": old.config}
    if found != wanted:
        old.close()
        raise CbirError(_mismatch(found, wanted), path)
    return old


def _is_record(path: Path) -> bool:
    """Whether the file at ``path`` is a sharded store's record."""
    if not path.exists():
        return False
    with open_store(path) as s:
        return isinstance(s, ShardedStore)


def _mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    diffs = differences(found, wanted)
    return ("exists with another configuration (" + "; ".join(diffs) +
            "): pass --overwrite to replace it, or write to another name (--name)")
