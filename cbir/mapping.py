"""Triangulate a map from known poses (``cbir map``): COLMAP's point triangulator.

The map images keep their poses (they are known: no SfM). A pycolmap reconstruction is
built from the dataset's cameras and poses with the images' keypoints; the verified
map x map matches go into a temporary COLMAP database as two-view geometries; COLMAP's
point triangulation (track creation, merging, completion, filtering, bundle adjustment of
the points only) makes the 3D points. The result is stored as a cbir map (points,
colours, errors, tracks) and optionally written as a COLMAP model.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from .errors import CbirError
from .geometry.colmap_options import paper_config, quiet_colmap, set_dotted
from .io.colmap import COLMAP_PIXEL_OFFSET, export_colmap, reconstruction_to_map, sensors_to_reconstruction
from .io.dataset import Dataset
from .io.map_store import PointMap, read_map, write_map
from .io.provenance import differences
from .io.sensors import SensorData
from .io.store import check_match_indices, check_matches_provenance, open_store, pair_keys

MAPPING_CONFIG = "config1"  # the paper maps with config1 always


@dataclass
class MapReport:
    path: Path
    points: int = 0
    mean_track_length: float = 0.0
    mean_reprojection_error: float = 0.0
    images: int = 0
    images_with_points: int = 0
    pairs_used: int = 0
    skipped: list[str] = field(default_factory=list)  # images or pairs left out, with the reason
    colmap_dir: Path | None = None
    status: str = "new"  # new, reused (same configuration and inputs), redone (inputs changed), replaced
    seconds: dict[str, float] = field(default_factory=dict)  # COLMAP database, triangulation


def triangulation_options(overrides: dict[str, Any]) -> pycolmap.IncrementalPipelineOptions:
    conf = paper_config(MAPPING_CONFIG, overrides)
    opts = pycolmap.IncrementalPipelineOptions()
    opts.min_num_matches = int(conf["min_num_matches"])
    opts.mapper.filter_max_reproj_error = float(conf["filter_max_reproj_error"])
    opts.ba_refine_focal_length = bool(conf["ba_refine_focal_length"])
    opts.ba_refine_principal_point = bool(conf["ba_refine_principal_point"])
    opts.ba_refine_extra_params = bool(conf["ba_refine_extra_params"])
    set_dotted(opts, overrides, known=set(conf))
    return opts


def _write_database(path: Path, rec: pycolmap.Reconstruction, keypoints: dict[str, np.ndarray],
                    matches_path: Path, report: MapReport) -> None:
    ids = {img.name: img.image_id for img in rec.images.values()}
    db = pycolmap.Database.open(path)
    try:
        for rig in rec.rigs.values():
            db.write_rig(rig, use_rig_id=True)
        for cam in rec.cameras.values():
            db.write_camera(cam, use_camera_id=True)
        for frame in rec.frames.values():
            db.write_frame(frame, use_frame_id=True)
        for img in rec.images.values():
            db.write_image(img, use_image_id=True)
            db.write_keypoints(img.image_id, np.asarray(keypoints[img.name], np.float64)[:, :2] + COLMAP_PIXEL_OFFSET)
        with open_store(matches_path, "matches") as store:
            if "inliers" not in store.columns:
                raise CbirError("the map needs verified matches: run cbir match --verify", matches_path)
            for a, b in pair_keys(store.keys):
                if a not in ids or b not in ids:
                    report.skipped.append(f"pair {a} {b}: an image without pose or features")
                    continue
                item = store.get((a, b), ["matches", "inliers", "geometry_config"])
                check_match_indices(item["matches"], (len(keypoints[a]), len(keypoints[b])), matches_path, (a, b))
                inl = item["matches"][item["inliers"]].astype(np.uint32)
                if len(inl) == 0:
                    continue
                geometry = pycolmap.TwoViewGeometry()
                geometry.config = pycolmap.TwoViewGeometryConfiguration(int(item.get("geometry_config", 2)))
                geometry.inlier_matches = inl
                db.write_matches(ids[a], ids[b], item["matches"].astype(np.uint32))
                db.write_two_view_geometry(ids[a], ids[b], geometry)
                report.pairs_used += 1
    finally:
        db.close()


def map_config(local: str, matches: str, matches_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The configuration a map records: its features, its matches (by name and by the
    configuration they record, which holds the features'), the paper's settings."""
    return {"local_features": local, "matches": matches, "matches_config": matches_config,
            "config": MAPPING_CONFIG, "overrides": overrides}


def main(dataset: Dataset, local: str, matches: str, *, name: str | None = None,
         overrides: dict[str, Any] | None = None, overwrite: bool = False, colmap_dir: Path | None = None,
         verbose: bool = False) -> MapReport:
    """Triangulate ``dataset`` (its posed images) from ``local`` features and ``matches``."""
    overrides = dict(overrides or {})
    name = name or local
    out = dataset.store_path("map", name)
    report = MapReport(out)
    matches_path = dataset.store_path("matches", matches)
    with open_store(dataset.store_path("local", local), "local-features") as feats, \
            open_store(matches_path, "matches") as mstore:  # inputs first: a typo is "not found"
        check_matches_provenance(mstore, local, feats)
        config = map_config(local, matches, mstore.config, overrides)
        inputs = {"local": feats.fingerprint(), "matches": mstore.fingerprint()}
    if out.exists():
        existing = read_map(out)
        found = dict(existing.config)
        found_inputs = found.pop("inputs", None)
        diffs = differences(found, config)
        if diffs and not overwrite:
            raise CbirError(f"exists with another configuration ({'; '.join(diffs)}): pass --overwrite to replace "
                            "it, or --name to keep both", out)
        if not diffs and found_inputs == inputs and not overwrite:  # already done: reuse
            report.status = "reused"
            return _export(dataset, report, existing, local, colmap_dir)
        # the same configuration made from features or matches that changed since: stale
        report.status = "replaced" if diffs or overwrite else "redone"
    poses = dataset.sensors.image_poses()
    if not poses:
        raise CbirError("the map dataset has no pose (trajectories.txt): cbir map triangulates from known poses",
                        dataset.root)
    keypoints: dict[str, np.ndarray] = {}
    with open_store(dataset.store_path("local", local), "local-features") as feats:
        for image in sorted(poses):
            if image in feats:
                keypoints[image] = feats.get(image, ["keypoints"])["keypoints"]
            else:
                report.skipped.append(f"image {image}: no local features")
    if not keypoints:
        raise CbirError(f"no posed image has {local} features", dataset.root)
    rec = sensors_to_reconstruction(_only(dataset.sensors, set(keypoints)), keypoints=keypoints)
    opts = triangulation_options(overrides)
    with tempfile.TemporaryDirectory(prefix="cbir-map-") as tmp, quiet_colmap(verbose):
        db_path = Path(tmp) / "database.db"
        t0 = time.perf_counter()
        _write_database(db_path, rec, keypoints, dataset.store_path("matches", matches), report)
        t1 = time.perf_counter()
        result = pycolmap.triangulate_points(rec, db_path, dataset.records_dir, Path(tmp) / "model",
                                             clear_points=True, options=opts, refine_intrinsics=False)
        report.seconds = {"database": t1 - t0, "triangulation": time.perf_counter() - t1}
    _check_poses_kept(rec, result)
    point_map = reconstruction_to_map(result, local)
    point_map.config = {**config, "inputs": inputs}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_map(out, point_map)
    return _export(dataset, report, point_map, local, colmap_dir)


def _export(dataset: Dataset, report: MapReport, point_map: PointMap, local: str,
            colmap_dir: Path | None) -> MapReport:
    if colmap_dir is not None:  # a COLMAP model of the posed images and the points (binary)
        export_colmap(_only(dataset.sensors, set(point_map.images)), colmap_dir, binary=True,
                      map_path=report.path, local_path=dataset.store_path("local", local))
        report.colmap_dir = colmap_dir
    return _summarize(report, point_map)


def _only(data: SensorData, names: set[str]) -> SensorData:
    return replace(data, records=[r for r in data.records if r.name in names])


def _check_poses_kept(before: pycolmap.Reconstruction, after: pycolmap.Reconstruction) -> None:
    for image_id, img in before.images.items():
        a = img.cam_from_world().matrix()
        b = after.images[image_id].cam_from_world().matrix()
        if not np.allclose(a, b, atol=1e-9):
            raise RuntimeError(f"COLMAP moved the known pose of {img.name}")


def _summarize(report: MapReport, m: PointMap) -> MapReport:
    report.points = len(m)
    report.mean_track_length = float(m.track_lengths.mean()) if len(m) else 0.0
    report.mean_reprojection_error = float(np.nanmean(m.errors)) if len(m) else float("nan")
    report.images = len(m.images)
    report.images_with_points = int(len(np.unique(m.track_images)))
    return report
