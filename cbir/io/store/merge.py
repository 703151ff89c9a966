"""Merging stores of one kind into one contiguous file: parts validated once, their columns' bytes
copied by the kernel where the part records their CRC, checksums recorded."""

from __future__ import annotations

import errno
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import CbirError
from ..atomic import is_no_space
from ..hdf5 import DatasetInfo
from .checksums import _COPY_BLOCK_BYTES, _checksums_json, _row_blocks, crc32_combine
from .layout import _create_file, _encode_keys, _set_attrs, _write_blob
from .reader import Store
from .schema import CHECKSUMS, STR_DTYPE, Key, Schema, _keys_bytes


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
