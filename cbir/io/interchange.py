"""Whole-dataset import and export: kapture, COLMAP, hloc, visuallocalization.net.

Each function reads one foreign layout and writes cbir files (or the reverse) and
returns the paths it wrote, so the command line can report them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import CbirError
from ..geometry.cameras import UNKNOWN_CAMERA, Camera
from ..geometry.poses import Pose
from . import colmap as colmap_io
from . import hloc as hloc_io
from . import kapture_binary as kb
from .atomic import atomic_output
from .dataset import STORE_DIRS, Dataset, check_store_name
from .images import read_header
from .kapture_text import RECORDS_DATA_DIR, read_sensor_data, write_sensor_data
from .map_store import read_map, write_map
from .paths import check_relative_name, confined
from .sensors import ImageRecord, Sensor, SensorData
from .store import open_store
from .vlnet import read_vlnet, write_vlnet

ImageMode = Literal["copy", "link", "skip"]


def _same_dir(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def transfer_images(src_dir: Path, dst_root: Path, names: list[str], mode: ImageMode) -> None:
    """Copy the named images, or link the whole source directory (one symlink), into records_data/."""
    dst_dir = dst_root / RECORDS_DATA_DIR
    if mode == "skip" or not src_dir.is_dir():
        return
    if mode == "link":
        if dst_dir.is_symlink() or not dst_dir.exists():
            if dst_dir.is_symlink():
                dst_dir.unlink()
            dst_dir.parent.mkdir(parents=True, exist_ok=True)
            dst_dir.symlink_to(src_dir.resolve(), target_is_directory=True)
            return
        raise CbirError("exists and is not a link: cannot link images here", dst_dir)
    for name in names:
        src = confined(src_dir, name)
        if not src.is_file():
            continue  # reported by `cbir check`
        dst = confined(dst_dir, name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            with atomic_output(dst) as tmp:
                shutil.copyfile(src, tmp)


# ================================================================================ an image folder

@dataclass
class ImageImport:
    """What :func:`import_images` made: the sensor files written, the images found, the
    cameras (``exif``: images with a focal length in EXIF, grouped by make, model, focal
    length and size; ``unknown``: one UNKNOWN_CAMERA each), and the files skipped, with why."""

    written: list[Path]
    images: int = 0
    exif_cameras: int = 0
    exif_images: int = 0
    unknown_images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def import_images(src: str | os.PathLike, dst: str | os.PathLike, *, images: ImageMode = "copy",
                  overwrite: bool = False) -> ImageImport:
    """Make a dataset of a plain folder of images, as kapture's image-folder import does (one
    record per image, timestamps in name order) with the cameras its EXIF tags give: images
    with a focal length (FocalLengthIn35mmFilm) share a SIMPLE_RADIAL camera per make, model,
    focal length and size (principal point at the centre, no distortion); the others get an
    UNKNOWN_CAMERA of their size each, whose focal length the localization estimates.
    Files that are not images, symbolic links and names a dataset cannot hold are skipped
    and reported; a folder with no image is an error."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CbirError("image folder not found", src)
    if (dst / "sensors" / "sensors.txt").exists() and not overwrite:
        raise CbirError("already a dataset: use --overwrite to replace its sensors", dst)
    if _same_dir(src, dst) or (dst.exists() and src.resolve() in dst.resolve().parents):
        raise CbirError("the dataset must not be inside the image folder it imports", dst)
    report = ImageImport([])
    sensors: dict[str, Camera | Sensor] = {}
    records: list[ImageRecord] = []
    groups: dict[tuple, str] = {}
    for path in sorted(p for p in src.rglob("*") if not p.is_dir() or p.is_symlink()):
        name = path.relative_to(src).as_posix()
        if any(part.startswith(".") for part in path.relative_to(src).parts):
            continue  # hidden files and folders (.DS_Store, .git)
        problem = check_relative_name(name) or (", " in name and "a name with ', ' cannot be written in kapture text")
        if problem:
            report.skipped.append((name, problem))
            continue
        if path.is_symlink():
            report.skipped.append((name, "a symbolic link (import the folder it points to)"))
            continue
        try:
            header = read_header(path)
        except CbirError as e:
            report.skipped.append((name, e.message))
            continue
        if header.focal_px is not None:
            key = (header.make, header.model, header.focal_35mm, header.width, header.height)
            if key not in groups:
                groups[key] = f"cam{len(sensors)}"
                f = header.focal_px
                sensors[groups[key]] = Camera("SIMPLE_RADIAL", header.width, header.height,
                                              (f, header.width / 2, header.height / 2, 0.0),
                                              " ".join(t for t in (header.make, header.model) if t))
            camera_id = groups[key]
            report.exif_images += 1
        else:
            camera_id = f"cam{len(sensors)}"
            sensors[camera_id] = Camera(UNKNOWN_CAMERA, header.width, header.height, ())
            report.unknown_images += 1
        records.append(ImageRecord(len(records), camera_id, name))
    if not records:
        raise CbirError(f"no image to import ({len(report.skipped)} files skipped"
                        + (f", first: {report.skipped[0][0]}: {report.skipped[0][1]})" if report.skipped else ")"),
                        src)
    report.images, report.exif_cameras = len(records), len(groups)
    report.written = write_sensor_data(dst, SensorData(sensors=sensors, records=records))
    transfer_images(src, dst, [r.name for r in records], images)
    return report


# ================================================================================ kapture

def import_kapture(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                   images: ImageMode = "copy", overwrite: bool = False, follow_symlinks: bool = False) -> list[Path]:
    """Make a cbir dataset of a kapture dataset: sensors as they are, reconstruction/ into stores.

    With ``dst`` None (or equal to ``src``) the stores are written into ``src/cbir/``. A
    symbolic link in ``sensors/`` (but ``records_data/``) or ``reconstruction/`` that leads
    out of ``src`` is refused unless ``follow_symlinks``, as images are.
    """
    src = Path(src)
    if not follow_symlinks:
        refuse_links_out(src, ["sensors", kb.RECONSTRUCTION], skip={src / RECORDS_DATA_DIR})
    data = read_sensor_data(src)  # validates the sensor files and the points first: nothing half-written
    found = kb.list_reconstruction(src)
    maps = kb.read_points(src) if found["points3d"] else {}
    dst = src if dst is None else Path(dst)
    written: list[Path] = []
    if not _same_dir(src, dst):
        for f in sorted((src / "sensors").glob("*.txt")):
            target = dst / "sensors" / f.name
            if target.exists() and not overwrite:
                raise CbirError("exists: use --overwrite to replace it", target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            written.append(target)
        transfer_images(src / RECORDS_DATA_DIR, dst, data.image_names(), images)
    ds = Dataset(dst, follow_symlinks=True)
    sizes = {r.name: (cam.width, cam.height) for r in data.records
             if (cam := data.cameras.get(r.camera_id)) is not None}
    for dtype in found["descriptors"]:
        out = ds.store_path("local", dtype)
        kb.import_local_features(src, dtype, out, image_sizes=sizes, overwrite=overwrite)
        written.append(out)
    for gtype in found["global_features"]:
        out = ds.store_path("global", gtype)
        kb.import_global_features(src, gtype, out, overwrite=overwrite)
        written.append(out)
    for ktype in found["matches"]:
        out = ds.store_path("matches", ktype)
        kb.import_matches(src, ktype, out, overwrite=overwrite)
        written.append(out)
    written += kb.write_points(maps, dst / "cbir" / "map", overwrite=overwrite)
    return written


def export_kapture(dataset: Dataset, dst: str | os.PathLike, *, local: Collection[str] = (),
                   global_: Collection[str] = (), matches: Collection[str] = (), maps: Collection[str] = (),
                   images: ImageMode = "copy", inliers_only: bool = False) -> list[Path]:
    """Write a kapture dataset: the sensors (if ``dst`` is another directory) and the named stores
    under reconstruction/. Existing reconstruction files of the same types are replaced."""
    dst = Path(dst)
    if len(maps) > 1:
        raise CbirError("kapture holds one set of 3D points: export one map at a time")
    for kind, names in (("local", local), ("global", global_), ("matches", matches)):
        for name in names:  # a missing or refused store is said before anything is written
            open_store(dataset.store_path(kind, name), STORE_DIRS[kind]).close()
    for name in maps:
        read_map(dataset.store_path("map", name))
    written: list[Path] = []
    if not _same_dir(dataset.root, dst):
        written += write_sensor_data(dst, dataset.sensors)
        for f in sorted((dataset.root / "sensors").glob("records_*.txt")):  # gnss, wifi, ... verbatim
            if f.name != "records_camera.txt":
                shutil.copyfile(f, dst / "sensors" / f.name)
                written.append(dst / "sensors" / f.name)
        transfer_images(dataset.records_dir, dst, dataset.sensors.image_names(), images)
    for name in local:
        kb.export_local_features(dataset.store_path("local", name), dst)
        written.append(dst / kb.RECONSTRUCTION / "descriptors" / name)
    for name in global_:
        kb.export_global_features(dataset.store_path("global", name), dst)
        written.append(dst / kb.RECONSTRUCTION / "global_features" / name)
    for name in matches:
        kb.export_matches(dataset.store_path("matches", name), dst, inliers_only=inliers_only)
        written.append(dst / kb.RECONSTRUCTION / "matches")
    for name in maps:
        kb.export_points(dataset.store_path("map", name), dst)
        written.append(dst / kb.RECONSTRUCTION / "points3d.txt")
    return written


def refuse_links_out(root: Path, folders: list[str], skip: Collection[Path] = ()) -> None:
    """A :class:`CbirError` naming the first symbolic link below ``root/<folder>`` (but below
    ``skip``) that leads out of ``root``: what it points at is not the dataset's to import."""
    real_root = root.resolve()
    for folder in folders:
        for directory, dirs, files in os.walk(root / folder):
            here = Path(directory)
            dirs[:] = sorted(d for d in dirs if here / d not in skip)
            for name in sorted(dirs + files):
                path = here / name
                if path.is_symlink():
                    real = path.resolve()
                    if real != real_root and real_root not in real.parents:
                        raise CbirError(f"is a symbolic link out of {root} (to {real}): pass --follow-symlinks "
                                        "to import what it points at", path)


# ================================================================================ COLMAP

def import_colmap(model_dir: str | os.PathLike, dst: str | os.PathLike, *, images_dir: str | None = None,
                  images: ImageMode = "copy", name: str = "colmap", overwrite: bool = False) -> list[Path]:
    """COLMAP model -> sensors + trajectories, and its points as a map with a keypoint store ``name``."""
    check_store_name(name)
    rec = colmap_io.read_reconstruction(model_dir)
    data = colmap_io.reconstruction_to_sensors(rec, model_dir)
    dst = Path(dst)
    if (dst / "sensors" / "sensors.txt").exists() and not overwrite:
        raise CbirError("already a dataset: use --overwrite to replace its sensors", dst)
    written = write_sensor_data(dst, data)
    if images_dir is not None:
        transfer_images(Path(images_dir), dst, data.image_names(), images)
    ds = Dataset(dst, follow_symlinks=True)
    if rec.num_points3D() > 0:
        local = ds.store_path("local", name)
        colmap_io.write_keypoints_store(rec, local, name, overwrite=overwrite)
        out = ds.store_path("map", name)
        if out.exists() and not overwrite:
            raise CbirError("exists: use --overwrite to replace it", out)
        write_map(out, colmap_io.reconstruction_to_map(rec, name))
        written += [local, out]
    return written


def export_colmap(dataset: Dataset, out_dir: str | os.PathLike, *, binary: bool = False,
                  map_name: str | None = None, local: str | None = None) -> list[Path]:
    map_path = dataset.store_path("map", map_name) if map_name else None
    local_path = dataset.store_path("local", local) if local else None
    colmap_io.export_colmap(dataset.sensors, out_dir, binary=binary, map_path=map_path, local_path=local_path)
    return [Path(out_dir)]


# ================================================================================ hloc

def import_hloc(dataset: Dataset, *, features: str | None = None, matches: str | None = None,
                name: str = "hloc", overwrite: bool = False) -> list[Path]:
    written = []
    local = dataset.store_path("local", name)
    if features is not None:
        hloc_io.import_features(features, local, name, overwrite=overwrite)
        written.append(local)
    if matches is not None:
        if not local.exists():
            raise CbirError(f"importing hloc matches needs the features first (cbir/local/{name}.h5)")
        with open_store(local, "local-features") as s:
            names = [str(k) for k in s.keys]
        out = dataset.store_path("matches", name)
        hloc_io.import_matches(matches, out, name, names, local_features=name, overwrite=overwrite)
        written.append(out)
    return written


def export_hloc(dataset: Dataset, local: str, *, features_out: str | None = None,
                matches: str | None = None, matches_out: str | None = None) -> list[Path]:
    written = []
    local_path = dataset.store_path("local", local)
    if features_out:
        hloc_io.export_features(local_path, features_out)
        written.append(Path(features_out))
    if matches and matches_out:
        hloc_io.export_matches(dataset.store_path("matches", matches), local_path, matches_out)
        written.append(Path(matches_out))
    return written


# ================================================================================ visuallocalization.net

def _names_for_submission(dataset: Dataset, basename: bool) -> dict[str, str]:
    names = dataset.sensors.image_names()
    if not basename:
        return {n: n for n in names}
    short = {n: n.rsplit("/", 1)[-1] for n in names}
    if len(set(short.values())) != len(short):
        raise CbirError("image base names are not unique: export with full names")
    return short


def import_vlnet(path: str | os.PathLike, dataset: Dataset) -> list[Path]:
    """Set the dataset's trajectories from a submission file (by image name or base name)."""
    poses = read_vlnet(path)
    data = dataset.sensors
    by_name = data.record_by_name()
    by_base: dict[str, list] = {}
    for r in data.records:
        by_base.setdefault(r.name.rsplit("/", 1)[-1], []).append(r)
    for name, pose in poses.items():
        rec = by_name.get(name)
        if rec is None:
            candidates = by_base.get(name, [])
            if len(candidates) != 1:
                raise CbirError(f"image {name!r} is {'ambiguous' if candidates else 'not'} in the dataset", path)
            rec = candidates[0]
        data.trajectories[(rec.timestamp, rec.camera_id)] = pose
    return write_sensor_data(dataset.root, data)


def export_vlnet(dataset: Dataset, out: str | os.PathLike, *, basename: bool = False,
                 results: str | None = None) -> list[Path]:
    """The dataset's image poses (``trajectories.txt``), or those of its localization result
    ``results``, as a visuallocalization.net submission; no pose to export is an error."""
    names = _names_for_submission(dataset, basename)
    poses: dict[str, Pose]
    if results is not None:
        from ..localize import read_results

        directory = dataset.localization_result(results)
        poses = {r.name: r.pose for r in read_results(directory)
                 if r.success and r.pose is not None and r.name in names}
        source = f"the localization result {directory.name}"
    else:
        poses = dataset.sensors.image_poses()
        source = "sensors/trajectories.txt"
    if not poses:  # an empty submission would look like a run that localized nothing
        found = dataset.localization_results() if results is None else []
        hint = f": export a localization result with --results ({', '.join(found)})" if found else ""
        raise CbirError(f"no pose to export in {source}{hint}", dataset.root)
    write_vlnet(out, {names[n]: p for n, p in poses.items()})
    return [Path(out)]
