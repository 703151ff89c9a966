"""BoQ (Ali-bey, Chaib-draa and Giguère, "BoQ: A Place is Worth a Bag of Learnable
Queries", CVPR 2024) as the official amaralibey/Bag-of-Queries code computes it: the global
extractor ``boq``.

A backbone gives a feature map: a torchvision ResNet-50 cut after ``layer3`` (1,024 channels
at 1/16), or DINOv2 ViT-B/14's patch tokens before its final norm (768 channels at 1/14).
The aggregator projects it with a 3 x 3 conv, flattens it to tokens and layer-normalizes
them; each of its BoQ blocks refines the tokens with a transformer encoder layer (post-norm,
ReLU, 4x feed-forward) and reads them with a bag of learned queries (the queries' own
self-attention and layer norm, then cross-attention to the tokens and a layer norm); the
blocks' outputs are concatenated, projected by a linear layer along the queries, flattened
and L2-normalized (16,384-D for the published ResNet-50 model, 12,288-D for DINOv2). Images
are read as the official README's transform prepares them: ``ToTensor``, resized to 384 x 384
(ResNet-50) or 322 x 322 (DINOv2) bicubically with antialiasing (aspect not kept), ImageNet
``Normalize``. The published ``resnet50_16384.pth`` and ``dinov2_12288.pth`` load unchanged
(the backbone's ``Sequential`` indices mapped to layer names once; DINOv2's unused
``mask_token`` dropped); the architecture is read from the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import to_device
from ..errors import CbirError
from ..io.images import LoadedImage
from .backbones import ResNet
from .base import IMAGENET_MEAN, IMAGENET_STD, GlobalExtractor, WeightFile, WithWeights, find_weights, resolve_device
from .checkpoints import load_into, load_state_dict
from .eigenplaces import ARCH_BY_LAYER3
from .megaloc import DINOv2

PUBLISHED = "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/"
LICENCE = "MIT"
WEIGHT_FILES = (WeightFile("resnet50_16384.pth", PUBLISHED, LICENCE), WeightFile("dinov2_12288.pth", PUBLISHED,
                                                                                    LICENCE))
WEIGHTS = WEIGHT_FILES[0]
#: the official ResNet backbone's Sequential indices (``backbone.net.N``) -> the layer names
RESNET_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}
#: the official README's input size, by backbone
IMAGE_SIZE = {"resnet": (384, 384), "dinov2": (322, 322)}


class BoQBlock(nn.Module):
    """The official ``BoQBlock``, parameter for parameter (torch's own encoder layer and
    multi-head attention, called as the official code calls them)."""

    def __init__(self, dim: int, queries: int, heads: int):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=4 * dim,
                                                  batch_first=True, dropout=0.0)
        self.queries = nn.Parameter(torch.zeros(1, queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(x)
        q = self.queries.repeat(x.shape[0], 1, 1)
        q = self.norm_q(q + self.self_attn(q, q, q)[0])
        return x, self.norm_out(self.cross_attn(q, x, x)[0])


class BoQAggregator(nn.Module):
    """The official ``BoQ`` aggregator."""

    def __init__(self, channels: int, dim: int, queries: int, layers: int, row_dim: int):
        super().__init__()
        self.proj_c = nn.Conv2d(channels, dim, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(dim)
        self.boqs = nn.ModuleList([BoQBlock(dim, queries, dim // 64) for _ in range(layers)])
        self.fc = nn.Linear(layers * queries, row_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.norm_input(self.proj_c(features).flatten(2).permute(0, 2, 1))
        outs = []
        for block in self.boqs:
            x, out = block(x)
            outs.append(out)
        return F.normalize(self.fc(torch.cat(outs, dim=1).permute(0, 2, 1)).flatten(1), p=2, dim=-1)


class BoQNet(nn.Module):
    """Backbone and aggregator; ``backbone`` ``resnet50``/``resnet101`` (cut after layer3)
    or ``dinov2`` (ViT-B/14 of ``depth`` blocks: 12 as published)."""

    def __init__(self, backbone: str, dim: int, queries: int, layers: int, row_dim: int, depth: int = 12):
        super().__init__()
        self.kind = "dinov2" if backbone == "dinov2" else "resnet"
        if self.kind == "dinov2":
            self.backbone: nn.Module = DINOv2(depth=depth)
            channels = 768
        else:
            resnet = ResNet(backbone, style="torchvision")
            resnet.layer4 = nn.Identity()  # type: ignore[assignment]  # cut: the official crop_last_block
            self.backbone, channels = resnet, 1024
        self.aggregator = BoQAggregator(channels, dim, queries, layers, row_dim)
        self.out_dim = dim * row_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, DINOv2):
            features = self.backbone(images, final_norm=False)[0]
        else:
            features = self.backbone.forward_to(images, "layer3")  # type: ignore[operator]  # a ResNet
        return self.aggregator(features)


def official_to_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official names as :class:`BoQNet`'s: ``backbone.net.4.0.conv1`` ->
    ``backbone.layer1.0.conv1``, ``backbone.dino.X`` -> ``backbone.X`` (``mask_token``, used
    in DINOv2's training only, dropped)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] == ["backbone", "net"] and len(parts) > 3 and parts[2] in RESNET_NAMES:
            key = ".".join(["backbone", RESNET_NAMES[parts[2]], *parts[3:]])
        elif parts[:2] == ["backbone", "dino"]:
            if parts[2] == "mask_token":
                continue
            key = ".".join(["backbone", *parts[2:]])
        out[key] = value
    return out


def load_boq(path: Path) -> BoQNet:
    """The network of an official BoQ state dict (``VPRModel``'s), loaded strictly; the
    backbone and the aggregator's sizes read from the weights."""
    state = official_to_layers(load_state_dict(path, "an official BoQ checkpoint"))
    try:
        proj = state["aggregator.proj_c.weight"]
        queries = state["aggregator.boqs.0.queries"]
        fc = state["aggregator.fc.weight"]
    except KeyError:
        raise CbirError("not a BoQ state dict (no aggregator.proj_c, boqs.0.queries, fc)", path) from None
    if "backbone.pos_embed" in state:
        backbone = "dinov2"
    else:
        layer3 = {int(k.split(".")[2]) for k in state if k.startswith("backbone.layer3.")}
        backbone = ARCH_BY_LAYER3.get(len(layer3), "")
        if not backbone:
            raise CbirError("not a BoQ ResNet-50/101 or DINOv2 ViT-B/14 state dict (its backbone is not one of "
                            "those built here)", path)
    layers = len({k.split(".")[2] for k in state if k.startswith("aggregator.boqs.")})
    depth = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")}) or 12
    net = BoQNet(backbone, int(proj.shape[0]), int(queries.shape[1]), layers, int(fc.shape[0]), depth)
    load_into(net, state, "BoQ", path)
    return net.eval()


class BoQ(WithWeights, GlobalExtractor):
    """BoQ descriptors from an official checkpoint (``weights``; default the ResNet-50 model,
    ``dinov2_12288.pth`` the DINOv2 one), with the official input size of its backbone
    (``image_size``: ``[height, width]`` to choose another)."""

    name = "boq"
    weight_files = WEIGHT_FILES
    default_conf = {
        "weights": WEIGHTS.name,
        "image_size": None,  # None: 384 x 384 for ResNet-50, 322 x 322 for DINOv2 (the official README's)
        "weights_dir": None,
        "device": "auto",
    }

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self.device = resolve_device(self.conf["device"])
        path = find_weights(self.conf["weights"], WEIGHTS.describe(), self.conf["weights_dir"])
        self.net = load_boq(path).to(self.device)
        self.descriptor_dim = self.net.out_dim
        size = self.conf["image_size"]
        if size is None:
            size = IMAGE_SIZE[self.net.kind]
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 32 for v in size)):
            raise CbirError(f"boq image_size must be [height, width] of 32 pixels at least, got {size!r}")
        if self.net.kind == "dinov2" and (size[0] % 14 or size[1] % 14):
            raise CbirError(f"boq image_size {list(size)}: DINOv2 needs multiples of 14")
        self.size = (int(size[0]), int(size[1]))

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> np.ndarray:
        # the official transform, in its order: ToTensor, Resize (bicubic, antialiased), Normalize
        x = to_device(image.array, self.device).permute(2, 0, 1).float().div(255)[None]
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=self.device)[:, None, None]
        return self.net(x.sub_(mean).div_(std))[0].float().cpu().numpy()
