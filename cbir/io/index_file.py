"""Kept faiss indexes (``MAP/cbir/index/<stores>.<kind>.h5``, ``cbir index build``): the
record of what they were built from, and the indexes, one per global store, each in a faiss
file of its own beside it (``<stores>.<kind>.<build>.<j>.faiss``) that faiss maps into memory
instead of reading. Files of format 1.0 held the serialized indexes in the record file
(``index_<j>``); they are still read. The layout only; faiss reads and writes in
``cbir.retrieval.index``."""

from __future__ import annotations

import json
import re
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CbirError, FormatError
from .atomic import atomic_output, fsync_file
from .dataset import MAX_STORE_NAME, Dataset
from .hdf5 import read_metadata
from .paths import check_type_name, refuse_links
from .textfile import parse_json

#: ``cbir_format`` of a kept index file, and its version
INDEX_FORMAT, INDEX_FORMAT_VERSION = "faiss-index", "2.0"


@dataclass(frozen=True)
class IndexBytes:
    """Where a kept index's faiss serialization lies: ``size`` bytes at ``offset`` of ``file``
    (a file of its own from format 2.0: offset 0, the whole file)."""
    file: Path
    offset: int
    size: int


def index_path(dataset: Dataset, stores: list[str], kind: str, rows: tuple[int, int] | None = None) -> Path:
    """Where the kept indexes of ``stores`` (fused in this order) of ``dataset`` live; with
    ``rows``, those of the map images ``rows[0]:rows[1]`` (a shard, ``--executor ray``)."""
    for name in stores:
        dataset.store_path("global", name)  # checks the name
    if len("+".join(stores)) > MAX_STORE_NAME:
        raise CbirError(f"the names of the stores {', '.join(stores)} together are longer than {MAX_STORE_NAME} "
                        "characters: their index file name would be too long for the file system")
    base = dataset.root / "cbir" / "index" / f"{'+'.join(stores)}.{kind}"
    return base.with_name(base.name + ".h5") if rows is None else \
        base.with_name(base.name + ".shards") / f"{rows[0]:09d}-{rows[1]:09d}.h5"


def write_index_file(path: Path, writers: list[Callable[[Path], None]], record: dict[str, Any]) -> None:
    """Index ``j`` written by ``writers[j](file)`` to a faiss file of its own, named after a
    new build, then the record naming them at ``path``, each atomically: a reader sees the
    previous record and files or the new ones, never a mix. The files of earlier builds
    are removed once the record no longer names them."""
    build = uuid.uuid4().hex[:12]
    files = []
    for j, write in enumerate(writers):
        target = path.with_name(f"{_stem(path)}.{build}.{j}.faiss")
        with atomic_output(target) as tmp:
            write(tmp)
            crc = file_crc32(tmp)
            fsync_file(tmp)  # the record names it only once it is on the disk
        files.append({"file": target.name, "size": target.stat().st_size, "crc32": f"{crc:08x}"})
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["cbir_format"] = INDEX_FORMAT
        f.attrs["format_version"] = INDEX_FORMAT_VERSION
        f.attrs["record"] = json.dumps(record, sort_keys=True)
        f.attrs["files"] = json.dumps(files)
    kept = {f["file"] for f in files}
    for old in build_files(path):
        if old.name not in kept:
            old.unlink(missing_ok=True)


def file_crc32(path: Path, piece: int = 1 << 24) -> int:
    """The CRC-32 of a file, read in pieces (``cbir check --deep`` compares it to the record's)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_index_files(path: Path, count: int, attrs: dict[str, Any] | None = None) -> list[str]:
    """What disagrees between the index files of the record ``path`` and the CRC-32s it
    recorded (``cbir check --deep``; a retrieve checks their presence and sizes only)."""
    attrs = read_index_attrs(path) if attrs is None else attrs
    if attrs.get("files") is None:
        return ["no checksums recorded (an index file of format 1.0: rebuild it to have them)"]
    located = index_bytes(path, count, attrs)  # the files exist with their sizes
    recorded = {f["file"]: f.get("crc32") for f in json.loads(attrs["files"])}
    problems = []
    for where in located:
        found = f"{file_crc32(where.file):08x}"
        if found != recorded[where.file.name]:
            problems.append(f"{where.file.name}: CRC-32 {found}, the record says {recorded[where.file.name]} (the file "
                            "is corrupt: rebuild it with cbir index build ... --overwrite)")
    return problems


def build_files(path: Path) -> list[Path]:
    """The faiss files beside the record ``path``, of any build (never another index's:
    the build and the position are matched exactly)."""
    own = re.compile(re.escape(_stem(path)) + r"\.[0-9a-f]{12}\.[0-9]+\.faiss")
    return sorted(p for p in path.parent.glob("*.faiss") if own.fullmatch(p.name))


def _stem(path: Path) -> str:
    return path.name[:-len(".h5")] if path.name.endswith(".h5") else path.name


def read_index_attrs(path: Path) -> dict[str, Any]:
    """The attributes of a kept index's record file, read in a time-limited child (a corrupt
    file cannot hang); refused unless it is one."""
    attrs = read_metadata(path).attrs
    if attrs.get("cbir_format") != INDEX_FORMAT:
        raise FormatError("not a cbir index file", path)
    return attrs


def read_index_record(path: Path, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a kept index file: ``config`` (index options), ``stores``,
    ``fingerprints`` (each store's, or the list of those of the parts it was built from),
    ``images``, ``names`` (the image names in index order: formats/SPEC.md 11a)."""
    attrs = read_index_attrs(path) if attrs is None else attrs
    try:
        record = parse_json(attrs["record"], path, "the index file's record")
        if not isinstance(record, dict) or not isinstance(record.get("stores"), list) or \
                not isinstance(record.get("fingerprints"), list) or \
                not all(isinstance(x, str) for x in record["stores"]) or \
                not all(isinstance(x, str) or (isinstance(x, list) and all(isinstance(y, str) for y in x))
                        for x in record["fingerprints"]):
            raise TypeError
    except (KeyError, TypeError, CbirError):
        raise FormatError("the index file has no valid record", path) from None
    return record


def index_bytes(path: Path, count: int, attrs: dict[str, Any] | None = None) -> list[IndexBytes]:
    """Where each of the ``count`` indexes of the record ``path`` lies: its own faiss file
    (format 2.0), which must exist with the size recorded, or a contiguous byte array inside
    ``path`` (format 1.0). Anything else is a one-line error naming the file."""
    attrs = read_index_attrs(path) if attrs is None else attrs
    if attrs.get("files") is None:
        return [IndexBytes(path, offset, size) for offset, size in _embedded_extents(path, count)]
    try:
        files = parse_json(attrs["files"], path, "'files'")
        if not isinstance(files, list) or len(files) != count or not all(
                isinstance(f, dict) and isinstance(f.get("file"), str) and type(f.get("size")) is int
                and check_type_name(f["file"]) is None for f in files):
            raise ValueError
        located = [IndexBytes(path.with_name(f["file"]), 0, f["size"]) for f in files]
    except (TypeError, ValueError, KeyError, CbirError):
        raise FormatError(f"its 'files' attribute does not name {count} index files beside it", path) from None
    for where in located:
        refuse_links(where.file)
        if not where.file.is_file():
            raise FormatError(f"the index file {where.file.name} it names is missing: rebuild it with "
                              "cbir index build ... --overwrite", path)
        if where.file.stat().st_size != where.size:
            raise FormatError(f"{where.file.stat().st_size} bytes, the record says {where.size}: the file is "
                              "truncated or was replaced; rebuild it with cbir index build ... --overwrite", where.file)
    return located


def kept_files(path: Path, count: int) -> list[Path]:
    """The files of a kept index: its record ``path``, then the faiss files it names."""
    return [path, *dict.fromkeys(where.file for where in index_bytes(path, count) if where.file != path)]


def _embedded_extents(path: Path, count: int) -> list[tuple[int, int]]:
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
