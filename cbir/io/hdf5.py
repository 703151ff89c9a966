"""Reading the metadata of untrusted HDF5 files without risking a hang.

libhdf5 can loop forever on some corrupt files (a zeroed global heap collection
makes it spin while decoding a variable-length string, holding the GIL, so that
neither Ctrl-C nor a Python watchdog can stop it). Everything of a file that goes
through its global heap (string attributes, variable-length string datasets) and
its object headers is therefore read in a forked child process with a time limit:
a child that does not answer in time is killed and the file reported corrupt.
What the parent reads afterwards is numeric data at known offsets (memory maps)
or datasets whose headers the child already parsed.

The limit is ``CBIR_HDF5_TIMEOUT`` seconds (default 30; a million names take about
a second to read).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CbirError, FormatError
from .child import in_child
from .paths import TRUST_LINKS_HINT, refuse_links, trust_links

DEFAULT_TIMEOUT_S = 30.0
TIMEOUT_ENV = "CBIR_HDF5_TIMEOUT"


@dataclass(frozen=True)
class DatasetInfo:
    """What an HDF5 dataset's header says: shape, dtype (None for strings), and the byte
    offset of its data when it is stored contiguously."""

    shape: tuple[int, ...]
    dtype: np.dtype | None
    offset: int | None
    is_string: bool
    #: bytes of the file allocated to the data (HDF5's storage size); less than the data's size
    #: when the header claims more than was written (a truncated or crafted file)
    stored: int = 0
    #: bytes the data takes in memory as HDF5 holds it (a string: its heap reference)
    claimed: int = 0
    #: stored through HDF5 filters (compressed): its size in memory is not bounded by the file's
    filtered: bool = False

    @property
    def unstored(self) -> bool:
        """The header claims more data than the file has room for: reading it would make up
        the rest (zeros) or allocate what no input holds."""
        return self.claimed > 0 and self.stored < self.claimed and not self.filtered

    @property
    def nbytes(self) -> int:
        return 0 if self.dtype is None else int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Metadata:
    """Root attributes, top-level datasets and the requested string datasets of one file."""

    attrs: dict[str, Any]
    datasets: dict[str, DatasetInfo]
    groups: tuple[str, ...]
    #: requested string datasets, items in row-major order (a pair's two names in turn): their
    #: UTF-8 bytes joined by b"\\n", or a list of str when a name holds a separator
    strings: dict[str, bytes | list]
    #: objects whose data lives in other files: external links, external storage, virtual
    #: datasets (refused by :func:`read_metadata` unless links are trusted)
    foreign: tuple[str, ...] = ()
    #: top-level virtual datasets the caller allowed (a sharded store's columns), by name:
    #: the files their data is in, as the file names them
    virtual: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def string_items(self, name: str) -> list[str]:
        """The items of a requested string dataset, row-major, decoded; a :class:`ValueError`
        when one is not UTF-8."""
        raw = self.strings.get(name)
        if isinstance(raw, bytes):
            info = self.datasets[name]
            return raw.decode("utf-8").split("\n") if info.shape and info.shape[0] else []
        return list(raw or [])


def attr_value(v: Any) -> Any:
    """An attribute as a plain Python value (str for strings, scalars unwrapped)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read(path: str, strings: Sequence[str], virtual: Sequence[str] = ()) -> Metadata:
    """Runs in the child: everything that may touch the global heap or object headers."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = {str(k): attr_value(f.attrs[k]) for k in f.attrs.keys()}
        found = _foreign_objects(f)
        allowed = {name: sources for name, what, sources in found if what == "virtual" and name in virtual}
        foreign = tuple(f"'{name}' ({what_of(what, sources)})" for name, what, sources in found if name not in allowed)
        if foreign and not trust_links():
            return Metadata(attrs, {}, (), {}, foreign)  # refused: open none of them
        datasets: dict[str, DatasetInfo] = {}
        groups = []
        for name in f.keys():
            obj = f[name]  # not f.get(): it answers None for an object whose header is corrupt
            if isinstance(obj, h5py.Dataset):
                is_string = h5py.check_string_dtype(obj.dtype) is not None or obj.dtype.kind in "OSU"
                dtype = None if is_string or obj.dtype.kind not in "biuf" else obj.dtype
                # an offset is one into *this* file only for data this file holds itself
                elsewhere = name in allowed or any(item.startswith(f"'{name}' ") for item in foreign)
                offset = None if elsewhere else obj.id.get_offset()
                shape = tuple(int(s) for s in obj.shape)
                claimed = int(np.prod(shape, dtype=object)) * obj.dtype.itemsize  # Python ints: no overflow
                filtered = obj.id.get_create_plist().get_nfilters() > 0
                datasets[name] = DatasetInfo(shape, dtype, offset, is_string, int(obj.id.get_storage_size()),
                                             claimed, filtered)
            elif isinstance(obj, h5py.Group):
                groups.append(name)
        values: dict[str, bytes | list] = {}
        for name in strings:
            info = datasets.get(name)
            if info is None or not info.is_string or not (len(info.shape) == 1 or info.shape[1:] == (2,)) \
                    or info.unstored:
                continue  # absent, mis-shaped or not stored: the caller reports it from ``datasets``
            items = f[name][()].ravel().tolist()  # row-major: a pair's two names follow each other
            if not all(type(x) is bytes for x in items):
                items = [_to_bytes(x) for x in items]
            joined = b"\n".join(items)
            if joined.count(b"\n") != max(len(items) - 1, 0) or b"\0" in joined:
                values[name] = [x.decode("utf-8") for x in items]  # a name holds a separator
            else:
                values[name] = joined
        return Metadata(attrs, datasets, tuple(groups), values, foreign, allowed)


def refuse_unstored(path: Path, datasets: dict[str, DatasetInfo]) -> None:
    """A :class:`FormatError` unless every dataset's data is in the file: a header that claims
    more rows than the file holds (a truncated file, or a crafted one claiming 2^40 rows) is
    refused before anything is allocated for it, so that memory follows the file's real size."""
    size = path.stat().st_size
    for name, info in datasets.items():
        if info.filtered and not info.is_string:
            raise FormatError(f"'{name}' is compressed (HDF5 filters): cbir's files are not (formats/SPEC.md), so "
                              "that what a column claims is bounded by the file; write it back uncompressed "
                              "(h5repack -f NONE)", path)
        if info.unstored or (info.offset is not None and info.offset + info.claimed > size):
            raise FormatError(f"'{name}' claims {info.claimed:,} bytes of data ({'x'.join(map(str, info.shape))}) "
                              f"that the file ({size:,} bytes) does not hold: it is truncated or corrupt", path)


def what_of(what: str, sources: tuple[str, ...]) -> str:
    """How :func:`_foreign_objects`' finding is described in an error."""
    if what == "link":
        return f"an external link to {sources[0]}"
    if what == "external":
        return f"external storage in {sources[0]!r}"
    return f"a virtual dataset of {', '.join(sources)}"


def _foreign_objects(f: Any) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every object of the open file ``f`` whose data lives in another file: its name, what it
    is (``link``, ``external`` storage, ``virtual`` dataset) and the files it names."""
    import h5py

    found: list[tuple[str, str, tuple[str, ...]]] = []
    unreadable: list[str] = []

    def visit(name: str, link: Any) -> bool | None:
        if isinstance(link, h5py.ExternalLink):
            found.append((name, "link", (f"{link.filename}:{link.path}",)))
            return None
        if not isinstance(link, h5py.HardLink):
            return None
        try:
            obj = f[name]
        except (KeyError, OSError, RuntimeError, ValueError) as e:  # a corrupt object header
            unreadable.append(f"cannot open '{name}' ({e})")
            return True  # stops the visit
        if isinstance(obj, h5py.Dataset):
            if obj.external:
                found.append((name, "external", (str(obj.external[0][0]),)))
            elif obj.is_virtual:  # the file names only (virtual_sources() also builds every mapping's selections)
                plist = obj.id.get_create_plist()
                files = (plist.get_virtual_filename(i) for i in range(plist.get_virtual_count()))
                found.append((name, "virtual", tuple(dict.fromkeys(files))))
        return None

    f.visititems_links(visit)
    if unreadable:
        raise RuntimeError(unreadable[0])
    return found


def _to_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    raise TypeError(f"not a string: {type(x).__name__}")


_warm = False


def _warm_up() -> None:
    """Read a small in-memory file once in this process. h5py and libhdf5 initialise
    themselves lazily (type conversions, drivers) on first use; doing it here, on trusted
    data, means every forked reader starts warm (7 ms a read instead of 40)."""
    global _warm
    if _warm:
        return
    import h5py

    with h5py.File("cbir-warm-up.h5", "w", driver="core", backing_store=False) as f:
        f.attrs["text"] = "x"
        f.attrs["number"] = 1
        strings = h5py.string_dtype()
        f.create_dataset("names", data=np.array(["a", "b"], dtype=object), dtype=strings)
        f.create_dataset("pairs", data=np.array([["a", "b"]], dtype=object), dtype=strings)
        f.create_dataset("numbers", data=np.zeros(2))
        f.create_group("group")
        _foreign_objects(f)
        for key in f.attrs:
            attr_value(f.attrs[key])
        for name in f:
            obj = f[name]
            if isinstance(obj, h5py.Dataset):
                h5py.check_string_dtype(obj.dtype)
                obj.id.get_offset()
                obj[()]
    _warm = True


def timeout_s() -> float:
    """``$CBIR_HDF5_TIMEOUT`` when it is a number, else :data:`DEFAULT_TIMEOUT_S`."""
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def read_metadata(path: str | os.PathLike, strings: Sequence[str] = (), virtual: Sequence[str] = ()) -> Metadata:
    """The metadata of an HDF5 file, read in a child process that is killed after
    :func:`timeout_s`. A missing file, a file HDF5 cannot open, undecodable strings, a read
    that does not finish in time, a symbolic link inside a dataset's ``cbir/`` folder and
    data held in other files (external links, external storage, virtual datasets other than
    the top-level ones named in ``virtual``) are one-line :class:`CbirError`\\ s naming the
    file."""
    path = refuse_links(path)
    if not path.exists():
        from .dataset import missing_file_message

        raise CbirError(missing_file_message(path), path)
    if not path.is_file():
        raise CbirError("not a file", path)
    limit = timeout_s()
    _warm_up()
    status, payload = in_child(_read, (str(path), tuple(strings), tuple(virtual)), limit)
    if status == "ok":
        if payload.foreign and not trust_links():
            raise FormatError(f"holds data of other files: {'; '.join(payload.foreign[:3])}; cbir reads only "
                              f"what a file holds itself ({TRUST_LINKS_HINT})", path)
        return payload
    if status == "timeout":
        raise FormatError(f"reading its metadata did not finish in {limit:.0f} s: the file is corrupt "
                          f"(libhdf5 loops on it; raise {TIMEOUT_ENV} if it is merely huge)", path)
    if status == "oserror":
        raise FormatError("not a readable HDF5 file (truncated or corrupt?)", path)
    raise FormatError(f"corrupt HDF5 metadata ({payload})", path)
