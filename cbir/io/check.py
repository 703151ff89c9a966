"""Validate a dataset against the format specification, and summarize it.

``check_dataset`` never stops at the first problem: it returns every problem it
finds (errors break the format; warnings are suspicious but legal), each naming
the file, and the line where there is one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import CbirError
from ..geometry.cameras import Camera
from .dataset import Dataset
from .images import read_image
from .index_file import build_files, index_bytes, read_index_attrs, read_index_record, verify_index_files
from .map_store import read_map
from .pairs import read_pairs
from .store import Store, check_matches_provenance, open_store, pair_keys
from .store.sharded import ShardedStore

Level = Literal["error", "warning"]
ImageCheck = Literal["decode", "exists", "skip"]


@dataclass(frozen=True)
class Problem:
    level: Level
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{self.level}: {where}: {self.message}"


class _Report:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if problem not in self.problems:  # a broken store is met again by the stores that use it
            self.problems.append(problem)

    def error(self, path: Any, message: str, line: int | None = None) -> None:
        self.add(Problem("error", str(path), message, line))

    def warning(self, path: Any, message: str, line: int | None = None) -> None:
        self.add(Problem("warning", str(path), message, line))

    def from_exception(self, e: CbirError) -> None:
        self.add(Problem("error", e.path or "", e.message, e.line))


def check_dataset(dataset: Dataset, *, images: ImageCheck = "decode", deep: bool = False,
                  progress: Callable[[str], None] | None = None) -> list[Problem]:
    """Every problem of ``dataset``. Stores are validated as every reader validates them on
    open, then their values are scanned (NaN, normalization, match indices); ``deep`` also
    verifies the checksums of every column."""
    report = _Report()
    names: set[str] | None
    try:
        data = dataset.sensors
    except CbirError as e:
        report.from_exception(e)
        # every sensor file on its own, so that one run names every broken one; the stores are
        # still checked, without the image names when records_camera.txt is unreadable
        names = _check_sensor_files(dataset.root, report)
    else:
        for path, line, message in data.warnings:
            report.warning(path, message, line)
        records_file = dataset.root / "sensors/records_camera.txt"
        if not data.cameras:
            report.warning(dataset.root / "sensors/sensors.txt", "no camera")
        if not data.records:
            report.warning(records_file, "no image records")
        if images != "skip":
            _check_images(dataset, images, report, progress)
        names = set(data.image_names())
    _check_stores(dataset, names, report, deep, progress)
    _check_kept_indexes(dataset, report, deep)
    for plan in sorted(p for p in (dataset.root / "cbir" / "shards").glob("*") if p.is_dir()):
        done = len(list(plan.glob("*/*/*.h5")))
        report.warning(plan, f"shards of an unfinished `cbir extract --executor ray` ({done} shard stores written): "
                             "run the same command again to finish and merge them, or delete the folder")
    return report.problems


def _check_stores(dataset: Dataset, names: set[str] | None, report: _Report, deep: bool,
                  progress: Callable[[str], None] | None) -> None:
    """The stores, pairs files and maps of ``dataset`` (``deep``: their checksums too)."""
    for kind, paths in dataset.list_stores().items():
        for path in paths:
            if progress:
                progress(f"checking {path.relative_to(dataset.root)}")
            try:
                if kind == "pairs":
                    _check_pairs(path, names, report)
                elif kind == "map":
                    _check_map(dataset, path, names, report)
                else:
                    with open_store(path) as store:
                        _check_store(dataset, store, names, report)
                        if isinstance(store, ShardedStore):  # what other HDF5 tools read must be the parts
                            for message in store.virtual_sources_problems():
                                report.error(path, message)
                        if deep:
                            for message in store.verify_checksums():
                                (report.warning if message.startswith("no checksums") else report.error)(path, message)
            except CbirError as e:
                report.from_exception(e)


def _check_kept_indexes(dataset: Dataset, report: _Report, deep: bool) -> None:
    """The kept faiss indexes of ``dataset``, and faiss files no record names."""
    index_dir = dataset.root / "cbir" / "index"
    named: set[Path] = set()
    for path in sorted(index_dir.rglob("*.h5")):  # shards of --executor ray too
        try:
            named.update(_check_index(dataset, path, report, deep))
        except CbirError as e:
            named.update(build_files(path))  # a broken record: its files are reported with it
            report.from_exception(e)
    for orphan in sorted(set(index_dir.rglob("*.faiss")) - named):
        report.warning(orphan, "a faiss file of no kept index (left by an interrupted cbir index build?): delete it")


def _check_sensor_files(root: Path, report: _Report) -> set[str] | None:
    """Each sensor file read on its own (references to other files not checked, since one of
    them is broken): its problems reported; the image names, when records_camera.txt reads."""
    from .kapture_text import (
        RECORDS_CAMERA_FILE,
        RIGS_FILE,
        SENSORS_FILE,
        TRAJECTORIES_FILE,
        read_records_camera,
        read_rigs,
        read_sensors,
        read_trajectories,
    )

    others: dict[str, Callable[[Path], object]] = {SENSORS_FILE: read_sensors, RIGS_FILE: read_rigs,
                                                    TRAJECTORIES_FILE: read_trajectories}
    names = None
    for file in (SENSORS_FILE, RIGS_FILE, RECORDS_CAMERA_FILE, TRAJECTORIES_FILE):
        if file != SENSORS_FILE and not (root / file).exists():
            continue
        try:
            if file == RECORDS_CAMERA_FILE:
                names = {r.name for r in read_records_camera(root / file)}
            else:
                others[file](root / file)
        except CbirError as e:
            report.from_exception(e)
    return names


def _check_index(dataset: Dataset, path: Path, report: _Report, deep: bool) -> list[Path]:
    """A kept faiss index must have been built from the global stores as they are now, and
    its faiss files must be there (``deep``: with the CRC-32s it recorded): the files it names."""
    attrs = read_index_attrs(path)  # read once (in a child process), for every check below
    record = read_index_record(path, attrs)
    count = len(record["stores"])
    files = [where.file for where in index_bytes(path, count, attrs)]
    if deep:
        for message in verify_index_files(path, count, attrs):
            (report.warning if message.startswith("no checksums") else report.error)(path, message)
    for name, fingerprint in zip(record["stores"], record["fingerprints"], strict=True):
        store_path = dataset.store_path("global", str(name))
        if not store_path.exists():
            report.warning(path, f"built from the global store {name!r}, which is gone: rebuild or delete it")
            continue
        with open_store(store_path, "global-features") as store:
            # an index of some parts of a sharded store names those parts (formats/SPEC.md 11a)
            if isinstance(fingerprint, list):
                changed = not set(fingerprint) <= set(store.part_fingerprints() or ())
            else:
                changed = fingerprint != store.fingerprint()
            if changed:
                report.warning(path, f"built from {name!r} as it was before it changed: cbir retrieve refuses it; "
                                     "rebuild it (cbir index build ... --overwrite)")
    return files


def _check_images(dataset: Dataset, mode: ImageCheck, report: _Report,
                  progress: Callable[[str], None] | None) -> None:
    data = dataset.sensors
    for i, r in enumerate(data.records):
        if progress and i % 100 == 0:
            progress(f"checking images {i}/{len(data.records)}")
        try:
            path = dataset.image_path(r.name)
        except CbirError as e:
            report.from_exception(e)
            continue
        if not path.is_file():
            report.error(path, "image file is missing")
            continue
        if mode != "decode":
            continue
        try:  # the loader of extraction: stored pixels, EXIF orientation ignored
            w, h = read_image(path, grayscale=True).original_size
        except CbirError as e:
            report.error(path, f"image cannot be read: {e.message}")
            continue
        cam = data.sensors.get(r.camera_id)
        if isinstance(cam, Camera) and cam.model != "UNKNOWN_CAMERA" and (w, h) != (cam.width, cam.height):
            hint = " (rotated: intrinsics describe the stored pixels, EXIF orientation is not applied)" \
                if (h, w) == (cam.width, cam.height) else ""
            report.warning(path, f"image is {w}x{h} but camera {r.camera_id!r} is {cam.width}x{cam.height}{hint}")


def _float_columns(store: Store) -> list[str]:
    return [c for c in store.columns if store.dataset(c).dtype.kind == "f"]


def _check_store(dataset: Dataset, store: Store, names: set[str] | None, report: _Report) -> None:
    path = store.path
    keys = store.keys  # structure (offsets, row counts, shapes, unique keys) was validated on open
    items = [k for key in keys for k in (key if isinstance(key, tuple) else (key,))]
    unknown = sorted(set(items) - names) if names is not None else []
    if unknown and store.kind != "matches":
        report.warning(path, f"{len(unknown)} images are not in records_camera.txt (e.g. {unknown[0]!r})")
    # values, streamed: NaN/inf, global normalization, match indices
    floats = _float_columns(store)
    bad: dict[str, Any] = {}
    hamming = store.config.get("metric_type") == "Hamming"
    bits = _code_bits(store, report) if hamming and store.kind in ("global-features", "local-features") else None
    local_counts = _local_counts(dataset, store) if store.kind == "matches" else None
    for batch_keys, cols, offsets in store.iter_batches(4096):
        for c in floats:
            values = cols[c]
            if c in ("F", "E", "H"):
                values = values[~np.all(np.isnan(values), axis=(1, 2))]
            if c not in bad and not np.all(np.isfinite(values)):
                row = int(np.argwhere(~np.isfinite(values).reshape(len(values), -1).all(1))[0][0])
                item = batch_keys[int(np.searchsorted(offsets, row, side="right") - 1)] \
                    if c in store.schema.ragged else batch_keys[row]
                bad[c] = item
        if store.kind in ("global-features", "local-features") and len(cols["descriptors"]):
            _check_descriptor_batch(batch_keys, cols["descriptors"], bits,
                                    store.kind == "global-features" and not hamming, bad)
        if local_counts is not None and len(cols["matches"]):
            m = cols["matches"]
            counts = np.array([[local_counts.get(a, -1), local_counts.get(b, -1)] for a, b in pair_keys(batch_keys)])
            per_row = np.repeat(counts, np.diff(offsets), axis=0)
            known = per_row >= 0
            wrong = np.flatnonzero(((m < 0) | (known & (m >= per_row))).any(1))
            if len(wrong) and "index" not in bad:
                bad["index"] = batch_keys[int(np.searchsorted(offsets, wrong[0], side="right") - 1)]
    for c, item in bad.items():
        if c == "norm":
            report.warning(path, f"global descriptor of {item[0]!r} is not L2-normalized (norm {item[1]:.4g})")
        elif c == "padding":
            report.error(path, f"code padding bits past code_bits are not zero (in the batch of {item!r})")
        elif c == "index":
            report.error(path, f"pair {item!r} has a match index beyond the keypoints of its images")
        else:
            report.error(path, f"'{c}' has NaN or infinite values (first in {item!r})")


def _code_bits(store: Store, report: _Report) -> int | None:
    """A code store's or Region-DH instance store's (``cbir hash encode``, formats/SPEC.md 7a)
    code length, or None when it is not one or its header is wrong (reported)."""
    from ..hashing.model import CODE_EXTRACTORS, code_bits

    if store.config.get("extractor") not in CODE_EXTRACTORS:
        return None  # binary descriptors of another origin (imported from kapture): no code_bits
    try:
        return code_bits(store)
    except CbirError as e:
        report.from_exception(e)
        return None


def _check_descriptor_batch(keys: list, descriptors: np.ndarray, bits: int | None, unit_norm: bool,
                            bad: dict[str, Any]) -> None:
    """The padding bits of codes (``bits``: a code or instance store's length), the L2 norms of
    float global descriptors (``unit_norm``): the first bad item of each kind."""
    if bits is not None and "padding" not in bad:
        from ..hashing.model import padding_is_zero

        if not padding_is_zero(descriptors, bits):
            bad["padding"] = keys[0]
    if unit_norm and "norm" not in bad:
        norms = np.linalg.norm(descriptors.astype(np.float64), axis=1)
        off = np.flatnonzero(np.abs(norms - 1) > 1e-3)
        if len(off):
            bad["norm"] = (keys[off[0]], norms[off[0]])


def _local_counts(dataset: Dataset, store: Store) -> dict[str, int] | None:
    """Keypoints per image of the local features a matches store names, after checking that
    the matches were made on them (a CbirError otherwise, reported against the matches)."""
    local = store.attrs.get("local_features")
    if not local:
        return None
    path = dataset.store_path("local", str(local))
    if not path.exists():
        return None
    with open_store(path, "local-features") as s:
        check_matches_provenance(store, str(local), s)
        return dict(zip(map(str, s.keys), np.diff(s.offsets).tolist(), strict=True))


def _check_pairs(path: Path, names: set[str] | None, report: _Report) -> None:
    pairs = read_pairs(path)
    unknown = sorted({n for p in pairs for n in (p.query, p.map)} - names) if names is not None else []
    if unknown:
        report.warning(path, f"{len(unknown)} images are not in this dataset's records (e.g. {unknown[0]!r}); "
                             "fine when they belong to the query or map dataset")


def _check_map(dataset: Dataset, path: Path, names: set[str] | None, report: _Report) -> None:
    m = read_map(path)
    unknown = sorted(set(m.images) - names) if names is not None else []
    if unknown:
        report.error(path, f"tracks reference {len(unknown)} images not in records (e.g. {unknown[0]!r})")
    if m.local_features:
        lpath = dataset.store_path("local", m.local_features)
        if not lpath.exists():
            report.warning(path, f"its local features cbir/local/{m.local_features}.h5 are missing")
            return
        with open_store(lpath, "local-features") as s:
            counts = np.array([s.count(n) if n in s else -1 for n in m.images])
        if len(m.track_images):
            limit = counts[m.track_images]
            if np.any(limit < 0):
                report.error(path, "tracks reference images that have no local features")
            elif np.any(m.track_keypoints >= limit):
                report.error(path, "a track references a keypoint index beyond its image's keypoints")


# ================================================================================ info

def dataset_info(dataset: Dataset) -> dict[str, Any]:
    data = dataset.sensors
    posed = data.image_poses()
    info: dict[str, Any] = {
        "root": str(dataset.root),
        "cameras": [{"id": k, "model": c.model, "width": c.width, "height": c.height,
                     "params": list(c.params), "images": sum(r.camera_id == k for r in data.records)}
                    for k, c in data.cameras.items()],
        "other_sensors": [{"id": k, "type": s.sensor_type} for k, s in data.sensors.items()
                          if not isinstance(s, Camera)],
        "rigs": [{"id": k, "sensors": list(v)} for k, v in data.rigs.items()],
        "images": len(data.records),
        "images_with_pose": len(posed),
        "trajectories": len(data.trajectories),
        "stores": [],
    }
    for kind, paths in dataset.list_stores().items():
        for path in paths:
            entry: dict[str, Any] = {"kind": kind, "name": path.stem, "path": str(path.relative_to(dataset.root)),
                                     "bytes": path.stat().st_size}
            try:
                entry.update(store_info(path, kind))
            except CbirError as e:
                entry["error"] = e.message
            info["stores"].append(entry)
    return info


def store_info(path: Path, kind: str) -> dict[str, Any]:
    if kind == "pairs":
        pairs = read_pairs(path)
        return {"items": len(pairs), "queries": len({p.query for p in pairs})}
    if kind == "map":
        m = read_map(path)
        lengths = m.track_lengths
        return {"items": len(m), "images": len(m.images), "local_features": m.local_features,
                "mean_track_length": float(lengths.mean()) if len(lengths) else 0.0}
    with open_store(path) as s:
        out: dict[str, Any] = {"items": len(s), "extractor": s.attrs.get("name"), "config": s.config}
        if "descriptors" in s.columns:
            d = s.dataset("descriptors")
            out.update(dim=int(d.shape[1]), dtype=str(d.dtype))
        if s.schema.ragged:
            out["rows"] = int(s.offsets[-1])
        if isinstance(s, ShardedStore):
            out["parts"] = len(s.parts)
            out["part_bytes"] = sum(p.stat().st_size for p in s.parts if p.exists())
        if s.kind == "matches":
            out["local_features"] = s.attrs.get("local_features", "")
            out["verified"] = "inliers" in s.columns
        return out


def problems_as_dicts(problems: list[Problem]) -> list[dict[str, Any]]:
    return [asdict(p) for p in problems]


__all__ = ["Problem", "check_dataset", "dataset_info", "store_info", "problems_as_dicts"]
