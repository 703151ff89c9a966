"""Regenerate the golden sample files of formats/samples/ (deterministic).

    python formats/make_samples.py

The tests read the committed files and also check that this script, run again,
gives the same content: a change of the format shows up as a change of the samples.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from cbir.geometry.cameras import Camera
from cbir.geometry.poses import Pose
from cbir.io.kapture_text import write_sensor_data
from cbir.io.map_store import PointMap, write_map
from cbir.io.pairs import Pair, write_pairs
from cbir.io.sensors import ImageRecord, Sensor, SensorData
from cbir.io.store import StoreWriter

NAMES = ["left/000.png", "right/000.png", "left/001.png"]


def sample_sensor_data() -> SensorData:
    data = SensorData()
    data.sensors["left"] = Camera("SIMPLE_RADIAL", 64, 48, (60.0, 32.0, 24.0, -0.1), "left camera")
    data.sensors["right"] = Camera("OPENCV", 64, 48, (61.0, 60.5, 31.5, 24.5, 0.01, -0.02, 0.001, 0.0005), "")
    data.sensors["gps"] = Sensor("gnss", ("EPSG:4326",), "gps")
    data.rigs["rig"] = {"left": Pose((1.0, 0.0, 0.0, 0.0), (0.1, 0.0, 0.0)),
                        "right": Pose((1.0, 0.0, 0.0, 0.0), (-0.1, 0.0, 0.0))}
    data.records = [ImageRecord(0, "left", NAMES[0]), ImageRecord(0, "right", NAMES[1]),
                    ImageRecord(1, "left", NAMES[2])]
    data.trajectories[(0, "rig")] = Pose((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    data.trajectories[(1, "left")] = Pose((0.9950041652780258, 0.0, 0.09983341664682815, 0.0), (-0.5, 0.0, 0.1))
    return data


def make(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    data = sample_sensor_data()
    write_sensor_data(root, data)
    rng = np.random.default_rng(7)
    for i, name in enumerate(NAMES):
        path = root / "sensors/records_data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:48, 0:64]
        image = np.stack([(x * 4 + i * 40) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
        cv2.imwrite(str(path), image)
    counts = [5, 4, 0]  # the last image has no keypoints: empty items are legal
    local = {"name": "sample", "config": {"max_keypoints": 5}, "descriptor_dim": 8,
             "descriptor_dtype": "float16", "keypoint_params": "scale"}
    with StoreWriter(root / "cbir/local/sample.h5", "local-features", local, batch_size=2) as w:
        for name, k in zip(NAMES, counts, strict=True):
            kps = (rng.random((k, 2)) * [63, 47]).astype(np.float32).round(2)
            desc = rng.standard_normal((k, 8)).astype(np.float32)
            desc /= np.linalg.norm(desc, axis=1, keepdims=True) + 1e-12
            w.add(name, keypoints=kps, descriptors=desc.astype(np.float16),
                  scores=np.linspace(1, 0.5, k, dtype=np.float32), keypoint_params=np.full((k, 1), 2.0),
                  image_sizes=[64, 48])
    glob = {"name": "sample", "config": {"dim": 4}, "descriptor_dim": 4, "descriptor_dtype": "float32"}
    with StoreWriter(root / "cbir/global/sample.h5", "global-features", glob) as w:
        for i, name in enumerate(NAMES):
            v = np.roll(np.array([0.6, 0.8, 0.0, 0.0], np.float32), i)
            w.add(name, descriptors=v)
    nan33 = np.full((3, 3), np.nan)
    matches = {"name": "sample", "local_features": "sample", "config": {"mutual": True}}
    with StoreWriter(root / "cbir/matches/sample.h5", "matches", matches) as w:
        w.add((NAMES[0], NAMES[1]), matches=[[0, 1], [2, 0], [4, 3]], scores=[0.9, 0.8, 0.7],
              inliers=[True, True, False], geometry_config=2,
              F=nan33, E=np.eye(3), H=nan33)
        w.add((NAMES[0], NAMES[2]), matches=np.zeros((0, 2)), scores=np.zeros(0), inliers=np.zeros(0, bool),
              geometry_config=0, F=nan33, E=nan33, H=nan33)
    write_pairs(root / "cbir/pairs/sample.txt", [Pair(NAMES[0], NAMES[1], 0.96), Pair(NAMES[0], NAMES[2], 0.5)])
    write_map(root / "cbir/map/sample.h5", PointMap(
        images=[NAMES[0], NAMES[1]], points=np.array([[0.0, 0.0, 5.0], [1.0, -0.5, 6.0]]),
        colors=np.array([[255, 0, 0], [0, 128, 255]], np.uint8), errors=np.array([0.5, np.nan], np.float32),
        track_offsets=np.array([0, 2, 3]), track_images=np.array([0, 1, 0]), track_keypoints=np.array([0, 1, 2]),
        local_features="sample", config={"triangulation": "sample"}))
    for lock in root.rglob("*.lock"):
        lock.unlink()


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "samples" / "dataset")
