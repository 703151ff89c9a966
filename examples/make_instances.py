"""Render a multi-instance, multi-label image set with boxes: objects cut from the photographs
that ship inside scikit-image's wheel, pasted at random positions, scales and brightness over
crops of its texture photographs (brick, grass, gravel, the moon, the Hubble deep field, a
stained tissue). SYNTHETIC: the pixels are real photos, the compositions are not.

Each image holds 1 to 3 objects of 11 classes (a face, the space shuttle, a helmet, a cup, a
cat, a rocket, a cameraman, a motorcycle, a coin, the scikit-image logo and a horse; the last two
cut along their own masks, the others as boxes jittered by up to a tenth of their size), placed
so that no two overlap by more than an IoU of 0.1. Writes two kapture 1.1 datasets
(one camera per image size, no poses) with their boxes and labels files (formats/SPEC.md 7a):

    OUT/map     the database (and the training set)   OUT/map/boxes.txt, OUT/map/labels.txt
    OUT/query   the queries                           OUT/query/boxes.txt, OUT/query/labels.txt

    python examples/make_instances.py examples/_out/instances [--map 800] [--query 200] [--size 160]
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cbir.geometry.cameras import Camera
from cbir.io.kapture_text import write_sensor_data
from cbir.io.sensors import ImageRecord, SensorData

# class -> (scikit-image photo, box x0, y0, x1, y1 in its pixels), chosen by eye
OBJECTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "face": ("astronaut", (160, 10, 300, 190)),
    "shuttle": ("astronaut", (340, 0, 460, 290)),
    "helmet": ("astronaut", (270, 330, 500, 500)),
    "cup": ("coffee", (160, 10, 430, 310)),
    "cat": ("chelsea", (110, 20, 360, 290)),
    "rocket": ("rocket", (270, 100, 360, 410)),
    "cameraman": ("camera", (110, 50, 340, 280)),
    "motorcycle": ("stereo_motorcycle", (80, 110, 670, 460)),
    "coin": ("coins", (295, 5, 360, 70)),
    "logo": ("logo", (0, 0, 500, 500)),  # cut along its alpha channel
    "horse": ("horse", (0, 0, 400, 328)),  # cut along its silhouette, painted chestnut
}
BACKGROUNDS = ("brick", "grass", "gravel", "moon", "hubble_deep_field", "immunohistochemistry")


@dataclass
class Cutout:
    rgb: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray | None  # H x W bool, None: the whole box


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.dstack([image] * 3) if image.ndim == 2 else np.ascontiguousarray(image[:, :, :3])


def sources() -> tuple[dict[str, Cutout], list[np.ndarray]]:
    """The objects (the full source boxes) and the background photos, RGB."""
    from skimage import data

    photos: dict[str, np.ndarray] = {}
    objects = {}
    for label, (photo, (x0, y0, x1, y1)) in OBJECTS.items():
        if photo not in photos:
            raw = getattr(data, photo)()
            photos[photo] = raw[0] if isinstance(raw, tuple) else raw
        raw = photos[photo][y0:y1, x0:x1]
        if label == "horse":  # a silhouette: True is the background
            mask = ~raw.astype(bool)
            rgb = np.zeros(mask.shape + (3,), np.uint8)
            rgb[:] = (150, 80, 40)
            objects[label] = Cutout(rgb, mask)
        elif label == "logo":
            objects[label] = Cutout(_rgb(raw), raw[:, :, 3] > 127)
        else:
            objects[label] = Cutout(_rgb(raw), None)
    backgrounds = [_rgb(getattr(data, name)()) for name in BACKGROUNDS]
    return objects, backgrounds


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _background(backgrounds: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    photo = backgrounds[rng.integers(len(backgrounds))]
    side = int(rng.integers(size, min(photo.shape[:2]) + 1))
    y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
    crop = cv2.resize(photo[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
    tint = rng.uniform(0.6, 1.1, 3)  # grey textures get a colour, colour ones a shift
    return np.clip(crop * tint, 0, 255).astype(np.uint8)


def _instance(cut: Cutout, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A jittered, scaled, maybe mirrored copy of ``cut`` (pixels, mask)."""
    h, w = cut.rgb.shape[:2]
    rgb, mask = cut.rgb, cut.mask if cut.mask is not None else np.ones((h, w), bool)
    if cut.mask is None:  # a box: move each side by up to a tenth of the box
        dx0, dx1 = (int(rng.integers(0, w // 10 + 1)) for _ in range(2))
        dy0, dy1 = (int(rng.integers(0, h // 10 + 1)) for _ in range(2))
        rgb, mask = rgb[dy0:h - dy1, dx0:w - dx1], mask[dy0:h - dy1, dx0:w - dx1]
    if rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    longest = rng.uniform(0.25, 0.6) * size
    scale = longest / max(rgb.shape[:2])
    out_w, out_h = max(8, round(rgb.shape[1] * scale)), max(8, round(rgb.shape[0] * scale))
    rgb = cv2.resize(np.ascontiguousarray(rgb), (out_w, out_h), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST) > 0
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
    return np.clip(rgb * gain + offset, 0, 255).astype(np.uint8), mask


def compose(objects: dict[str, Cutout], backgrounds: list[np.ndarray], size: int,
            rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """One image (RGB) and its instances: (label, (x0, y0, x1, y1)), x1/y1 exclusive."""
    canvas = _background(backgrounds, size, rng)
    labels = sorted(objects)
    placed: list[tuple[str, tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(1, 4))):
        label = labels[rng.integers(len(labels))]
        rgb, mask = _instance(objects[label], rng, size)
        h, w = mask.shape
        for _try in range(50):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            ys, xs = np.nonzero(mask)
            box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
            if all(_iou(box, other) <= 0.1 for _, other in placed):
                region = canvas[y:y + h, x:x + w]
                region[mask] = rgb[mask]
                placed.append((label, box))
                break
    noise = rng.normal(0, 2.0, canvas.shape)
    return np.clip(canvas + noise, 0, 255).astype(np.uint8), placed


def write_dataset(root: Path, count: int, prefix: str, size: int, seed: int,
                  sources_: tuple[dict[str, Cutout], list[np.ndarray]]) -> None:
    rng = np.random.default_rng(seed)
    objects, backgrounds = sources_
    data = SensorData(sensors={"cam0": Camera("SIMPLE_PINHOLE", size, size, (size, size / 2, size / 2))})
    images = root / "sensors" / "records_data"
    images.mkdir(parents=True, exist_ok=True)
    boxes = ["# image_name, label, x_min, y_min, x_max, y_max (pixels; synthetic, examples/make_instances.py)"]
    labels = ["# image_name, label[, label ...] (synthetic, examples/make_instances.py)"]
    for ts in range(count):
        image, placed = compose(objects, backgrounds, size, rng)
        name = f"{prefix}_{ts:04d}.png"
        if not cv2.imwrite(str(images / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {images / name}")
        data.records.append(ImageRecord(ts, "cam0", name))
        boxes += [f"{name}, {label}, {x0}, {y0}, {x1}, {y1}" for label, (x0, y0, x1, y1) in placed]
        labels.append(", ".join([name, *sorted({label for label, _ in placed})]))
    write_sensor_data(root, data)
    (root / "boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "labels.txt").write_text("\n".join(labels) + "\n")


def main(out: Path, map_count: int = 800, query_count: int = 200, size: int = 160) -> None:
    if out.exists():
        shutil.rmtree(out)
    src = sources()
    write_dataset(out / "map", map_count, "map", size, seed=0, sources_=src)
    write_dataset(out / "query", query_count, "query", size, seed=1, sources_=src)
    print(f"wrote {out}/map ({map_count} images) and {out}/query ({query_count}), {size}x{size}, "
          f"{len(OBJECTS)} classes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("examples/_out/instances"))
    parser.add_argument("--map", type=int, default=800)
    parser.add_argument("--query", type=int, default=200)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    main(args.out, args.map, args.query, args.size)
