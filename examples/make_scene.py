"""Render a small localization dataset with exact poses: a textured courtyard.

The walls and the floor are planes covered with the sample photographs that ship inside
scikit-image's wheel (so a fresh machine needs nothing else); each view is rendered
exactly by one homography per plane (painter's order, 2x supersampling). Writes three
kapture 1.1 datasets that cbir (and kapture) read as they are:

    OUT/mapping    12 views with their poses (the map)
    OUT/query      5 views without poses (to localize), timestamps in shooting order
    OUT/query_gt   the same 5 views with their exact poses

    python examples/make_scene.py examples/_out/scene
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
from cbir.io.sensors import ImageRecord, SensorData

WIDTH, HEIGHT, FOCAL = 640, 480, 420.0
SUPERSAMPLE = 2


def textures() -> dict[str, np.ndarray]:
    from skimage import data

    def rgb(im: np.ndarray) -> np.ndarray:
        return np.dstack([im] * 3) if im.ndim == 2 else im[:, :, :3]

    return {name: cv2.cvtColor(rgb(getattr(data, name)()), cv2.COLOR_RGB2BGR)
            for name in ("astronaut", "coffee", "chelsea", "rocket", "brick", "gravel", "grass", "camera")}


def planes() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(texture, top-left corner, right edge vector, down edge vector); world: x right, y down, z ahead."""
    out = []
    back = [("astronaut", -8), ("coffee", -4), ("rocket", 0), ("chelsea", 4)]  # back wall, z = 12
    out += [(t, np.array([x, -4.0, 12.0]), np.array([4.0, 0, 0]), np.array([0, 6.0, 0])) for t, x in back]
    left = [("camera", 0), ("brick", 4), ("coffee", 8)]  # left wall, x = -8, facing +x
    out += [(t, np.array([-8.0, -4.0, z + 4]), np.array([0, 0, -4.0]), np.array([0, 6.0, 0])) for t, z in left]
    right = [("chelsea", 0), ("astronaut", 4), ("brick", 8)]  # right wall, x = 8, facing -x
    out += [(t, np.array([8.0, -4.0, z]), np.array([0, 0, 4.0]), np.array([0, 6.0, 0])) for t, z in right]
    floor = [("gravel", -8, -6), ("grass", 0, -6), ("grass", -8, 0), ("gravel", 0, 0), ("gravel", -8, 6),
             ("grass", 0, 6)]  # floor, y = 2, from z = -6 to 12
    out += [(t, np.array([x, 2.0, z + 6]), np.array([8.0, 0, 0]), np.array([0, 0, -6.0])) for t, x, z in floor]
    return out


def look(yaw_deg: float, pitch_deg: float, center: tuple[float, float, float]) -> Pose:
    """World-to-camera pose of a camera at ``center`` turned by yaw (around y) then pitch."""
    a, b = np.radians(yaw_deg), np.radians(pitch_deg)
    Ry = np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])
    Rx = np.array([[1, 0, 0], [0, np.cos(b), np.sin(b)], [0, -np.sin(b), np.cos(b)]])
    R = Rx @ Ry
    return Pose.from_matrix(R, -R @ np.asarray(center, float))


def render(pose: Pose, tex: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    s = SUPERSAMPLE
    K = np.array([[FOCAL * s, 0, WIDTH * s / 2 - 0.5], [0, FOCAL * s, HEIGHT * s / 2 - 0.5], [0, 0, 1]])
    R, t = pose.rotation_matrix, np.asarray(pose.tvec)
    canvas = np.full((HEIGHT * s, WIDTH * s, 3), 90, np.uint8)  # the sky
    # painter's order: the floor first (walls stand on it), then the back wall, then the side walls
    for name, origin, right, down in sorted(planes(), key=lambda p: (p[1][1] != 2.0, p[1][2] != 12.0)):
        image = tex[name]
        h, w = image.shape[:2]
        corners = [origin, origin + right, origin + down, origin + right + down]
        if min((R @ c + t)[2] for c in corners) <= 0.1:
            continue  # behind the camera: never the case for the views below
        # texture pixel (u, v) -> world origin + (u + 0.5)/w right + (v + 0.5)/h down -> image
        A = np.column_stack([right / w, down / h, origin + 0.5 * right / w + 0.5 * down / h])
        H = K @ (R @ A + np.column_stack([np.zeros(3), np.zeros(3), t]))
        warped = cv2.warpPerspective(image, H, (WIDTH * s, HEIGHT * s), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT)
        mask = cv2.warpPerspective(np.full((h, w), 255, np.uint8), H, (WIDTH * s, HEIGHT * s),
                                   flags=cv2.INTER_NEAREST, borderValue=0)
        canvas[mask > 0] = warped[mask > 0]
    out = cv2.resize(canvas, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    noise = rng.normal(0, 2.0, out.shape)
    return np.clip(out + noise, 0, 255).astype(np.uint8)


MAP_VIEWS = [(x, z, yaw) for z in (-4.0, -1.0) for x, yaw in ((-5, 12), (-3, 6), (-1, 0), (1, -4), (3, -8), (5, -12))]
QUERY_VIEWS = [(-4.0, -2.5, 9), (-2.0, -2.2, -3), (0.0, -2.8, 5), (2.0, -2.4, -10), (4.0, -2.6, -2)]


def write_dataset(root: Path, views: list[tuple[float, float, float]], prefix: str, with_poses: bool,
                  tex: dict[str, np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    cam = Camera("SIMPLE_PINHOLE", WIDTH, HEIGHT, (FOCAL, WIDTH / 2, HEIGHT / 2))
    data = SensorData(sensors={"cam0": cam})
    images = root / "sensors" / "records_data"
    images.mkdir(parents=True, exist_ok=True)
    for ts, (x, z, yaw) in enumerate(views):
        pose = look(yaw, -6.0, (x, 0.0, z))
        name = f"{prefix}_{ts:03d}.jpg"
        if not cv2.imwrite(str(images / name), render(pose, tex, rng), [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise OSError(f"cannot write {images / name}")
        data.records.append(ImageRecord(ts, "cam0", name))
        if with_poses:
            data.trajectories[(ts, "cam0")] = pose
    write_sensor_data(root, data)


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tex = textures()
    write_dataset(out / "mapping", MAP_VIEWS, "map", True, tex, seed=0)
    write_dataset(out / "query", QUERY_VIEWS, "query", False, tex, seed=1)
    write_dataset(out / "query_gt", QUERY_VIEWS, "query", True, tex, seed=1)
    print(f"wrote {out}/mapping ({len(MAP_VIEWS)} views), query and query_gt ({len(QUERY_VIEWS)} views)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/_out/scene"))
