"""Reference outputs of the official XFeat code (verlab/accelerated_features ``modules/``),
for the exactness tests of cbir.models.xfeat; the file it writes is committed as
``tests/reference/xfeat/generated.npz``.

    python tests/xfeat_reference.py OFFICIAL_REPO SHARED OUT_FILE

The published ``weights/xfeat.pt`` could not be fetched here, so the weights are generated
(:func:`official_state`: seeded NumPy draws by parameter name, in the official layout).
The official ``XFeat(weights=state, top_k=4096, detection_threshold=0.05)`` runs unchanged on
the CPU, ``detectAndCompute`` on a photo of sceaux_castle as its ``parse_input`` gives it
(RGB / 255; 1024 x 769, resized by the official code to 1024 x 768), and on a crop of
odd size. Saved per image: keypoints, scores, and the descriptors of every 8th keypoint
(to keep the file small).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

IMAGES = {"photo": (slice(None), slice(None)), "crop": (slice(3, 500), slice(11, 700))}
DESCRIPTOR_STRIDE = 8


def official_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for the parameters and buffers ``shapes`` (the official names), in sorted name
    order from one seeded generator: conv and linear weights ~ N(0, 2/fan_in), biases
    ~ N(0, 0.05), batch-norm running means ~ N(0, 0.1) and variances ~ U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
            continue
        if name.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean"):
            value = rng.normal(0, 0.1, shape)
        elif name.endswith("weight"):
            value = rng.normal(0, (2 / int(np.prod(shape[1:]))) ** 0.5, shape)
        else:
            value = rng.normal(0, 0.05, shape)
        state[name] = torch.from_numpy(value.astype(np.float32))
    return state


def photo(shared: Path, which: str) -> np.ndarray:
    import cv2

    path = shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data" / "100_7100.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb[IMAGES[which]])


def main(official: Path, shared: Path, out: Path) -> None:
    sys.path.insert(0, str(official))
    from modules.xfeat import XFeat  # the official module

    from cbir.models.xfeat import XFeatNet

    state = official_state({k: tuple(v.shape) for k, v in XFeatNet().state_dict().items()})
    net = XFeat(weights=state, top_k=4096, detection_threshold=0.05)
    results = {}
    for which in IMAGES:
        found = net.detectAndCompute(net.parse_input(photo(shared, which)))[0]
        for key in ("keypoints", "scores"):
            results[f"{which}_{key}"] = found[key].numpy().astype(np.float32)
        results[f"{which}_descriptors"] = found["descriptors"][::DESCRIPTOR_STRIDE].numpy().astype(np.float32)
        print(which, len(found["keypoints"]), "keypoints")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
