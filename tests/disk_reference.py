"""Reference outputs of the official DISK code (cvlab-epfl/disk ``disk/model`` with the
jatentaki/unets, torch-dimcheck and torch-localize commits it pins as submodules), for the
exactness tests of cbir.models.disk; the file it writes is committed as
``tests/reference/disk/generated.npz``.

    python tests/disk_reference.py OFFICIAL_TREE SHARED OUT_FILE

``OFFICIAL_TREE`` holds the packages ``disk``, ``unets``, ``torch_dimcheck`` and
``torch_localize`` (``git archive`` of each at the pinned commit). The published
``depth-save.pth`` could not be fetched here, so the weights are generated
(:func:`official_state`: seeded NumPy draws by parameter name, in the official layout). The
official ``DISK(window=8, desc_dim=128).features(image, kind="nms", window_size=5,
cutoff=0., n=None)`` runs unchanged on the CPU, as ``detect.py`` calls it with its defaults,
on two crops of a photo of sceaux_castle (RGB / 255): one whose sides are multiples of 16,
and one that is not, zero-padded at the bottom and right as the official ``Image.resize_to``
pads, its keypoints in the padding dropped as ``detect.py`` drops those outside the image.
Saved per crop: keypoints, scores (the heatmap's log-probabilities) and descriptors, in the
official order (raster order).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch

#: rows and columns of the photo: sides multiples of 16, and not
CROPS = {"crop": (slice(100, 276), slice(200, 440)), "odd": (slice(3, 134), slice(11, 214))}


def official_state(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint in the official layout (``{"extractor": state}``): for each parameter of
    the official ``DISK`` (sorted by name, one seeded generator), conv weights ~ N(0, 2/fan_in),
    biases ~ N(0, 0.05), PReLU slopes ~ U(0, 0.5)."""
    from cbir.models.disk import DiskNet

    shapes = {k: tuple(v.shape) for k, v in DiskNet().state_dict().items()}
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("bias"):
            value = rng.normal(0, 0.05, shape)
        elif len(shape) == 1:  # a PReLU's slopes
            value = rng.uniform(0, 0.5, shape)
        else:
            value = rng.normal(0, (2 / int(np.prod(shape[1:]))) ** 0.5, shape)
        state[name] = torch.from_numpy(value.astype(np.float32))
    return {"extractor": state}


def photo(shared: Path, which: str) -> np.ndarray:
    import cv2

    path = shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data" / "100_7100.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb[CROPS[which]])


def main(official: Path, shared: Path, out: Path) -> None:
    sys.path.insert(0, str(official))
    board = types.ModuleType("torch.utils.tensorboard")  # imported by the official logger, unused here
    board.SummaryWriter = object  # type: ignore[attr-defined]
    sys.modules["torch.utils.tensorboard"] = board
    from disk import DISK  # the official module

    net = DISK(window=8, desc_dim=128)
    net.load_state_dict(official_state()["extractor"])
    net.eval()
    results = {}
    for which in CROPS:
        rgb = photo(shared, which)
        h, w = rgb.shape[:2]
        bitmap = torch.from_numpy(rgb).to(torch.float32).permute(2, 0, 1) / 255.0
        bitmap = torch.nn.functional.pad(bitmap, (0, -w % 16, 0, -h % 16))  # Image._pad
        with torch.no_grad():
            features = net.features(bitmap[None], kind="nms", window_size=5, cutoff=0.0, n=None)[0]
        xy = features.kp.numpy()
        inside = (xy[:, 0] < w) & (xy[:, 1] < h)  # detect.py's to_image_coord mask
        results[f"{which}_keypoints"] = xy[inside].astype(np.float32)
        results[f"{which}_scores"] = features.kp_logp.numpy()[inside].astype(np.float32)
        results[f"{which}_descriptors"] = features.desc.numpy()[inside].astype(np.float32)
        print(which, int(inside.sum()), "keypoints")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
