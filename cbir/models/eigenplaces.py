"""EigenPlaces (Berton, Trivigno, Caputo and Masone, ICCV 2023) as the official
gmberton/EigenPlaces code computes it: the global extractor ``eigenplaces``.

The official ``GeoLocalizationNet_``: a torchvision ResNet without its average pool and fc
(``backbone``: ``conv1, bn1, relu, maxpool, layer1..4`` as a ``Sequential``), then
``aggregation``: L2 normalization of each pixel's channels, GeM pooling (learned ``p``,
``eps`` 1e-6), a fully connected layer to the descriptor dimension and L2 normalization.
Images are read whole (the official test set's ``ToTensor`` and ImageNet ``Normalize``, no
resize; ``max_size`` resizes first where wanted). The published weights
(``<backbone>_<dim>_eigenplaces.pth``) load unchanged, their ``Sequential`` indices mapped
to the layer names once; the backbone (ResNet-50 or -101) and dimension are read from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CbirError
from ..io.images import LoadedImage
from .backbones import ResNet
from .base import GlobalExtractor, WeightFile, WithWeights, find_weights, resolve_device, to_tensor
from .checkpoints import load_into, load_state_dict

PUBLISHED = "https://github.com/gmberton/EigenPlaces/releases/download/v1.0/"
LICENCE = "MIT"
#: the published ResNet-50 and -101 models, by descriptor dimension (ResNet-18 and VGG-16 ones
#: exist too; their backbones are not built here)
WEIGHT_FILES = tuple(WeightFile(f"{backbone}_{dim}_eigenplaces.pth", PUBLISHED, LICENCE)
                     for backbone in ("ResNet50", "ResNet101") for dim in (2048, 1024, 512, 256, 128))
WEIGHTS = WEIGHT_FILES[0]
#: the official backbone's Sequential indices -> the ResNet's layer names
BACKBONE_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
#: ResNets by the number of blocks of layer3
ARCH_BY_LAYER3 = {6: "resnet50", 23: "resnet101"}


class EigenPlacesNet(nn.Module):
    """The official network: ResNet trunk, per-pixel L2 normalization, GeM, fc, L2."""

    def __init__(self, arch: str, dim: int, gem_eps: float = 1e-6):
        super().__init__()
        self.backbone = ResNet(arch, style="torchvision")
        self.gem_p = nn.Parameter(torch.ones(1) * 3)
        self.gem_eps = gem_eps
        self.fc = nn.Linear(self.backbone.out_channels, dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.backbone(x), p=2.0, dim=1)
        p = self.gem_p
        x = F.avg_pool2d(x.clamp(min=self.gem_eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)
        return F.normalize(self.fc(x[:, :, 0, 0]), p=2.0, dim=1)


def official_to_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official state dict's names as :class:`EigenPlacesNet`'s (``backbone.4.0.conv1``
    -> ``backbone.layer1.0.conv1``, ``aggregation.1.p`` -> ``gem_p``, ``aggregation.3`` -> ``fc``)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "backbone" and len(parts) > 2 and parts[1] in BACKBONE_NAMES:
            key = ".".join(["backbone", BACKBONE_NAMES[parts[1]], *parts[2:]])
        elif key == "aggregation.1.p":
            key = "gem_p"
        elif parts[:2] == ["aggregation", "3"]:
            key = ".".join(["fc", *parts[2:]])
        out[key] = value
    return out


def load_eigenplaces(path: Path) -> EigenPlacesNet:
    """The network of an official EigenPlaces state dict, loaded strictly."""
    state = load_state_dict(path, "an official EigenPlaces checkpoint")
    layer3 = {int(k.split(".")[2]) for k in state if k.startswith("backbone.6.")}
    fc = state.get("aggregation.3.weight")
    arch = ARCH_BY_LAYER3.get(len(layer3))
    if fc is None or arch is None or "aggregation.1.p" not in state:
        raise CbirError("not an EigenPlaces ResNet-50/101 state dict (backbone.0..7, aggregation.1.p, aggregation.3; "
                        "ResNet-18 and VGG-16 backbones are not built here)", path)
    net = EigenPlacesNet(arch, int(fc.shape[0]))
    load_into(net, official_to_layers(state), f"EigenPlaces ({arch})", path)
    return net.eval()


class EigenPlaces(WithWeights, GlobalExtractor):
    """EigenPlaces descriptors from an official checkpoint (``weights``; default the 2048-D
    ResNet-50 model)."""

    name = "eigenplaces"
    weight_files = WEIGHT_FILES
    default_conf = {
        "weights": WEIGHTS.name,
        "weights_dir": None,
        "device": "auto",
        "max_size": None,  # longest edge before extraction (None: the whole image, as the official test)
    }
    loader_max_size_key = "max_size"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self.device = resolve_device(self.conf["device"])
        path = find_weights(self.conf["weights"], WEIGHTS.describe(), self.conf["weights_dir"])
        self.net = load_eigenplaces(path).to(self.device)
        self.descriptor_dim = self.net.out_dim

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> np.ndarray:
        x = to_tensor(image.array, self.device)  # ToTensor + ImageNet Normalize
        return self.net(x)[0].float().cpu().numpy()
