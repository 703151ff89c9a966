"""COLMAP sparse models (cameras, images, points3D; text or binary) through pycolmap.

Conventions: COLMAP's ``cam_from_world`` is kapture's world-to-camera pose; COLMAP
places the centre of the top-left pixel at (0.5, 0.5), cbir at (0, 0), so
keypoints gain 0.5 on export and lose it on import. Camera models have the same
names and parameter order in both. Sensor ids are ``cam_<id:05d>`` as kapture's
own COLMAP importer names them; the COLMAP image id becomes the timestamp.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pycolmap

from ..errors import CbirError, FormatError
from ..geometry.cameras import CAMERA_MODELS, Camera
from ..geometry.poses import Pose
from .atomic import atomic_output
from .child import in_child
from .hdf5 import timeout_s
from .map_store import PointMap, read_map
from .paths import check_relative_name
from .sensors import ImageRecord, SensorData
from .store import StoreWriter, open_store
from .textfile import read_regular

COLMAP_PIXEL_OFFSET = 0.5
#: memory pycolmap may use reading a model, per byte of its files and beyond them (a
#: binary point2D is 24 bytes on disk and about as much in memory)
MODEL_MEMORY_PER_BYTE, MODEL_MEMORY_SLACK = 8, 256 << 20


def read_reconstruction(model_dir: str | os.PathLike) -> pycolmap.Reconstruction:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CbirError("COLMAP model directory not found", model_dir)
    names = {p.name for p in model_dir.iterdir()}
    if not ({"cameras.bin", "images.bin"} <= names or {"cameras.txt", "images.txt"} <= names):
        raise FormatError("not a COLMAP model: needs cameras and images (.txt or .bin)", model_dir)
    files = [read_regular(model_dir / name, "COLMAP model file") for name in sorted(names)
             if name.endswith((".bin", ".txt"))]
    # pycolmap allocates what a file's counts claim (an 86-byte images.bin can claim 2^28
    # points): a child reads the model first, within a memory budget from the files' sizes
    budget = MODEL_MEMORY_PER_BYTE * sum(f.stat().st_size for f in files) + MODEL_MEMORY_SLACK
    status, message = in_child(_load_reconstruction, (str(model_dir),), timeout_s(), memory=budget)
    if status == "memory":
        raise FormatError("cannot read COLMAP model: its files claim more points or names than they hold "
                          "(truncated or corrupt)", model_dir)
    if status == "timeout":
        raise FormatError("cannot read COLMAP model: reading it did not finish (corrupt?)", model_dir)
    if status != "ok":
        reason = str(message).split(": ", 1)[-1] if status == "error" else str(message)
        raise FormatError(f"cannot read COLMAP model: {reason}".splitlines()[0][:300], model_dir)
    return pycolmap.Reconstruction(str(model_dir))


def _load_reconstruction(model_dir: str) -> None:
    """Runs in the child of :func:`read_reconstruction`: pycolmap reads the model, or fails."""
    pycolmap.Reconstruction(model_dir)


def _pose_from_rigid(rigid: pycolmap.Rigid3d) -> Pose:
    x, y, z, w = (float(v) for v in rigid.rotation.quat)
    return Pose((w, x, y, z), tuple(float(v) for v in rigid.translation))  # type: ignore[arg-type]


def _rigid_from_pose(pose: Pose) -> pycolmap.Rigid3d:
    q = np.asarray(pose.qvec, np.float64)
    q = q / np.linalg.norm(q)
    return pycolmap.Rigid3d(pycolmap.Rotation3d(q[[1, 2, 3, 0]]), np.asarray(pose.tvec, np.float64))


def reconstruction_to_sensors(rec: pycolmap.Reconstruction, source: str | os.PathLike | None = None) -> SensorData:
    """Cameras, image records and poses of a COLMAP model; image names are checked as
    records_camera.txt paths (they become paths below records_data/)."""
    data = SensorData()
    for cam_id in sorted(rec.cameras):
        cam = rec.cameras[cam_id]
        model = cam.model.name
        if model not in CAMERA_MODELS:
            raise CbirError(f"COLMAP camera {cam_id} has model {model}, which kapture cannot represent")
        data.sensors[f"cam_{cam_id:05d}"] = Camera(model, int(cam.width), int(cam.height),
                                                   tuple(float(v) for v in cam.params))
    for image_id in sorted(rec.images):
        image = rec.images[image_id]
        problem = check_relative_name(image.name)
        if problem:
            raise FormatError(f"image {image_id}: {problem}", source)
        sensor = f"cam_{image.camera_id:05d}"
        data.records.append(ImageRecord(int(image_id), sensor, image.name))
        if image.has_pose:
            data.trajectories[(int(image_id), sensor)] = _pose_from_rigid(image.cam_from_world())
    return data


def reconstruction_to_map(rec: pycolmap.Reconstruction, local_features: str) -> PointMap:
    images = [rec.images[i].name for i in sorted(rec.images)]
    index = {i: k for k, i in enumerate(sorted(rec.images))}
    ids = sorted(rec.points3D)
    points = np.zeros((len(ids), 3))
    colors = np.zeros((len(ids), 3), np.uint8)
    errors = np.zeros(len(ids), np.float32)
    lengths = np.zeros(len(ids), np.int64)
    t_img: list[int] = []
    t_kp: list[int] = []
    for k, pid in enumerate(ids):
        p = rec.points3D[pid]
        points[k], colors[k], errors[k] = p.xyz, p.color, p.error
        elements = p.track.elements
        lengths[k] = len(elements)
        t_img.extend(index[e.image_id] for e in elements)
        t_kp.extend(e.point2D_idx for e in elements)
    return PointMap(images, points, colors, errors, np.concatenate([[0], np.cumsum(lengths)]),
                    np.array(t_img, np.int32), np.array(t_kp, np.int32), local_features,
                    {"source": "colmap"})


def write_keypoints_store(rec: pycolmap.Reconstruction, out: Path, name: str, *, overwrite: bool = False) -> int:
    """The 2D points of every image (keypoints without descriptors) as a local-feature store."""
    attrs = {"name": name, "config": {"source": "colmap"}, "descriptor_dim": 0,
             "descriptor_dtype": "uint8", "keypoint_params": ""}
    with StoreWriter(out, "local-features", attrs, overwrite=overwrite) as w:
        for image_id in sorted(rec.images):
            image = rec.images[image_id]
            xy = np.array([p.xy for p in image.points2D], np.float64).reshape(-1, 2) - COLMAP_PIXEL_OFFSET
            cam = rec.cameras[image.camera_id]
            if image.name not in w:
                w.add(image.name, keypoints=xy, descriptors=np.zeros((len(xy), 0), np.uint8),
                      image_sizes=np.array([cam.width, cam.height]))
    return len(rec.images)


def pycolmap_camera(cam: Camera, camera_id: int = 1) -> pycolmap.Camera:
    """The pycolmap camera of a kapture camera (same model names and parameter order)."""
    if cam.model not in CAMERA_MODELS:
        raise CbirError(f"camera {cam.name or camera_id!r} has model {cam.model}, which COLMAP cannot represent")
    camera = pycolmap.Camera(model=cam.model, width=cam.width, height=cam.height, params=list(cam.params),
                             camera_id=camera_id)
    camera.has_prior_focal_length = True  # kapture intrinsics are calibrations, not guesses
    return camera


def sensors_to_reconstruction(data: SensorData, *, point_map: PointMap | None = None,
                              keypoints: dict[str, np.ndarray] | None = None) -> pycolmap.Reconstruction:
    """A COLMAP model of the posed images (images without a pose are left out).

    With ``point_map`` (and the ``keypoints`` of its images), 3D points and tracks are added.
    """
    rec = pycolmap.Reconstruction()
    camera_ids: dict[str, int] = {}
    for sid, cam in data.cameras.items():
        if cam.model not in CAMERA_MODELS:
            raise CbirError(f"camera {sid!r} has model {cam.model}, which COLMAP cannot represent")
        camera_ids[sid] = len(camera_ids) + 1
        rec.add_camera_with_trivial_rig(pycolmap_camera(cam, camera_ids[sid]))
    poses = data.image_poses()
    image_ids: dict[str, int] = {}
    for r in sorted(data.records, key=lambda r: (r.timestamp, r.camera_id)):
        if r.name not in poses:
            continue
        image_ids[r.name] = len(image_ids) + 1
        kps = keypoints.get(r.name) if keypoints else None
        xy = (np.zeros((0, 2)) if kps is None else np.asarray(kps, np.float64)[:, :2] + COLMAP_PIXEL_OFFSET)
        image = pycolmap.Image(name=r.name, keypoints=xy, camera_id=camera_ids[r.camera_id],
                               image_id=image_ids[r.name])
        rec.add_image_with_trivial_frame(image, _rigid_from_pose(poses[r.name]))
    if point_map is not None:
        for p in range(len(point_map)):
            imgs, kps = point_map.track(p)
            track = pycolmap.Track()
            for i, k in zip(imgs, kps, strict=True):
                name = point_map.images[i]
                if name not in image_ids:
                    raise CbirError(f"map point {p} is observed in {name!r}, which has no pose")
                if keypoints is None or name not in keypoints or k >= len(keypoints[name]):
                    raise CbirError(f"map point {p} references keypoint {k} of {name!r}, which is not in "
                                    "the local features")
                track.add_element(image_ids[name], int(k))
            rec.add_point3D(point_map.points[p], track, point_map.colors[p])
    return rec


def export_colmap(data: SensorData, out_dir: str | os.PathLike, *, binary: bool = False,
                  map_path: Path | None = None, local_path: Path | None = None) -> pycolmap.Reconstruction:
    point_map = read_map(map_path) if map_path is not None else None
    keypoints = None
    if point_map is not None:
        if local_path is None:
            raise CbirError("exporting a map needs the local features its tracks refer to (--local)")
        with open_store(local_path, "local-features") as s:
            keypoints = {n: s.get(n, ["keypoints"])["keypoints"] for n in point_map.images if n in s}
    rec = sensors_to_reconstruction(data, point_map=point_map, keypoints=keypoints)
    with atomic_output(Path(out_dir)) as tmp:
        tmp.mkdir()
        (rec.write_binary if binary else rec.write_text)(str(tmp))
    return rec
