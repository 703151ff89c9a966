"""Reference outputs of the official MegaLoc model (gmberton/MegaLoc ``megaloc_model.py``),
for the exactness tests of cbir.models.megaloc; the file it writes is committed as
``tests/reference/megaloc/generated.npz``.

    python tests/megaloc_reference.py OFFICIAL_REPO SHARED OUT_FILE

The published ``model.safetensors`` could not be fetched here, so the weights are generated
(:func:`official_state`: seeded NumPy draws by parameter name in the official layout: the
DINOv2 ViT-B/14 backbone as published, a smaller aggregator than the published one, 16
clusters of 32 dimensions, a 64-D token, MLPs of 128, projected to 512, to keep the test
fast). The official ``MegaLoc(feat_dim=512, num_clusters=16, cluster_dim=32, token_dim=64,
mlp_dim=128)`` runs unchanged on the CPU, on two images cut from a photo of sceaux_castle
(saved with the outputs): 322 x 242 (not a multiple of 14: the official resize, and the
positions interpolated to a non-square grid) and 266 x 266, each normalized with ImageNet's
mean and standard deviation. What the official code imports from torchvision is its tensor
``resize``, which is ``interpolate(bilinear, antialias)`` here.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CONFIG = {"feat_dim": 512, "num_clusters": 16, "cluster_dim": 32, "token_dim": 64, "mlp_dim": 128}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def official_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights by official name, in sorted order from one seeded generator: matrices and
    convs ~ N(0, 1/fan_in), layer-norm scales 1 + N(0, 0.02), layer scales ~ U(0.05, 0.2),
    positions and the class token N(0, 0.02), other vectors N(0, 0.02), the dustbin 1."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("dust_bin"):
            value = np.array(1.0)
        elif name.endswith("gamma"):
            value = rng.uniform(0.05, 0.2, shape)
        elif len(shape) >= 2 and name.endswith("weight"):
            value = rng.normal(0, int(np.prod(shape[1:])) ** -0.5, shape)
        elif "norm" in name and name.endswith("weight"):
            value = 1 + rng.normal(0, 0.02, shape)
        else:
            value = rng.normal(0, 0.02, shape)
        state[name] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state


def images(shared: Path) -> dict[str, np.ndarray]:
    import cv2

    path = shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data" / "100_7100.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return {"resized": np.ascontiguousarray(cv2.resize(rgb, (322, 242), interpolation=cv2.INTER_AREA)),
            "square": np.ascontiguousarray(rgb[200:466, 300:566])}


def normalized(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])[None]


def main(official: Path, shared: Path, out: Path) -> None:
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = lambda img, size, antialias=True: F.interpolate(  # type: ignore[attr-defined]
        img, size=list(size), mode="bilinear", align_corners=False, antialias=antialias)
    tv.transforms, transforms.functional = transforms, functional  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})
    sys.path.insert(0, str(official))
    from megaloc_model import MegaLoc  # the official model

    net = MegaLoc(**CONFIG).eval()
    net.load_state_dict(official_state({k: tuple(v.shape) for k, v in net.state_dict().items()}), strict=True)
    results = {}
    for label, rgb in images(shared).items():
        with torch.no_grad():
            results[f"{label}_image"] = rgb
            results[f"{label}_descriptor"] = net(normalized(rgb))[0].numpy()
        print(label, rgb.shape, results[f"{label}_descriptor"][:3])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
