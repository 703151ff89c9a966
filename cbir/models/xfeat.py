"""XFeat (Potje, Cadar, Araujo, Martins and Nascimento, "XFeat: Accelerated Features for
Lightweight Image Matching", CVPR 2024) as the official verlab/accelerated_features code
computes its sparse features (``XFeat.detectAndCompute``).

The image (RGB in [0, 1], resized bilinearly down to a multiple of 32 on each side) is
averaged to one channel and instance-normalized; a small CNN (conv, batch norm without
affine parameters, ReLU) gives 64-D features at 1/8 resolution (blocks at 1/8, 1/16 and
1/32 summed after bilinear upsampling, then fused), a reliability heatmap at 1/8, and keypoint
logits from the 8 x 8 pixel cells of the normalized image (65 classes, the last "no
keypoint"), whose softmax is unfolded into a full-resolution heatmap. Keypoints are its 5 x 5
local maxima above ``detection_threshold`` (0.05), scored by the heatmap there (nearest)
times the reliability (bilinear), the best ``top_k`` (4,096) kept; descriptors are the
feature map sampled bicubically at each keypoint and L2-normalized; keypoints are scaled back
to the image by the resize factors. The samplers normalize positions by ``W - 1`` and
``H - 1`` and then sample with corners not aligned, as the official ``InterpolateSparse2d``
does. Parameter names follow the official ``XFeatModel`` (its fine-matching MLP included), so
``xfeat.pt`` loads unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.images import LoadedImage
from ..validate import check_integer
from .base import ImageSkipped, LocalExtractor, WeightFile, WithWeights, find_weights, resolve_device, to_tensor
from .checkpoints import load_into, load_state_dict

WEIGHTS = WeightFile("xfeat.pt", "https://github.com/verlab/accelerated_features (weights/xfeat.pt)", "Apache-2.0")


class BasicLayer(nn.Module):
    """The official ``BasicLayer``: conv without bias, batch norm without affine, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3, padding: int = 1):
        super().__init__()
        self.layer = nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, stride=stride, bias=False),
                                   nn.BatchNorm2d(cout, affine=False), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


_basic = BasicLayer


class XFeatNet(nn.Module):
    """The official ``XFeatModel``, parameter for parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.skip1 = nn.Sequential(nn.AvgPool2d(4, stride=4), nn.Conv2d(1, 24, 1))
        self.block1 = nn.Sequential(_basic(1, 4), _basic(4, 8, 2), _basic(8, 8), _basic(8, 24, 2))
        self.block2 = nn.Sequential(_basic(24, 24), _basic(24, 24))
        self.block3 = nn.Sequential(_basic(24, 64, 2), _basic(64, 64), _basic(64, 64, kernel=1, padding=0))
        self.block4 = nn.Sequential(_basic(64, 64, 2), _basic(64, 64), _basic(64, 64))
        self.block5 = nn.Sequential(_basic(64, 128, 2), _basic(128, 128), _basic(128, 128),
                                    _basic(128, 64, kernel=1, padding=0))
        self.block_fusion = nn.Sequential(_basic(64, 64), _basic(64, 64), nn.Conv2d(64, 64, 1))
        self.heatmap_head = nn.Sequential(_basic(64, 64, kernel=1, padding=0), _basic(64, 64, kernel=1, padding=0),
                                          nn.Conv2d(64, 1, 1), nn.Sigmoid())
        self.keypoint_head = nn.Sequential(*(_basic(64, 64, kernel=1, padding=0) for _ in range(3)),
                                           nn.Conv2d(64, 65, 1))
        mlp: list[nn.Module] = []
        for cin in (128, 512, 512, 512):  # the fine matcher (XFeat*): not run here, loaded for strictness
            mlp += [nn.Linear(cin, 512), nn.BatchNorm1d(512, affine=False), nn.ReLU(inplace=True)]
        self.fine_matcher = nn.Sequential(*mlp, nn.Linear(512, 64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (B x 64 x H/8 x W/8), keypoint logits (B x 65 x H/8 x W/8), reliability
        (B x 1 x H/8 x W/8) of images ``x`` (B x C x H x W, sides multiples of 32)."""
        x = F.instance_norm(x.mean(dim=1, keepdim=True), eps=1e-5)  # InstanceNorm2d(1): no affine, no statistics
        x1 = self.block1(x)
        x2 = self.block2(x1 + self.skip1(x))
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        x5 = self.block5(x4)
        size = (x3.shape[-2], x3.shape[-1])
        x4 = F.interpolate(x4, size, mode="bilinear")
        x5 = F.interpolate(x5, size, mode="bilinear")
        feats = self.block_fusion(x3 + x4 + x5)
        heatmap = self.heatmap_head(feats)
        b, c, h, w = x.shape  # the 8 x 8 cells of the normalized image as 64 channels, row-major in a cell
        cells = x.unfold(2, 8, 8).unfold(3, 8, 8).reshape(b, c, h // 8, w // 8, 64)
        cells = cells.permute(0, 1, 4, 2, 3).reshape(b, -1, h // 8, w // 8)
        return feats, self.keypoint_head(cells), heatmap


def _sample(x: torch.Tensor, pos: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """The official ``InterpolateSparse2d``: ``x`` (B x C x h x w) at ``pos`` (B x N x 2,
    pixels of a ``height x width`` image) normalized by ``(W - 1, H - 1)``, then sampled with
    corners not aligned: B x N x C."""
    grid = 2.0 * (pos / torch.tensor([width - 1, height - 1], device=pos.device, dtype=pos.dtype)) - 1.0
    out = F.grid_sample(x, grid.unsqueeze(-2).to(x.dtype), mode=mode, align_corners=False)
    return out.permute(0, 2, 3, 1).squeeze(-2)


def load_xfeat(path: Path) -> XFeatNet:
    """The network of the official ``xfeat.pt`` (a state dict), loaded strictly."""
    state = load_state_dict(path, "an official XFeat checkpoint")
    net = XFeatNet()
    load_into(net, state, "XFeat", path)
    return net.eval()


class XFeat(WithWeights, LocalExtractor):
    """XFeat sparse keypoints and 64-D descriptors from the official ``xfeat.pt``, with the
    official defaults (``top_k`` 4,096, ``detection_threshold`` 0.05)."""

    name = "xfeat"
    weight_files = (WEIGHTS,)
    default_conf = {
        "weights": WEIGHTS.name,
        "top_k": 4096,
        "detection_threshold": 0.05,
        "max_size": None,  # longest edge before extraction: None keeps the image as it is (official)
        "device": "auto",
        "weights_dir": None,
    }
    loader_max_size_key = "max_size"  # RGB, float32 descriptors, no keypoint parameters: the defaults
    descriptor_dim = 64

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        check_integer("xfeat top_k", self.conf["top_k"], 1)
        self.device = resolve_device(self.conf["device"])
        self.weights_path = find_weights(self.conf["weights"], WEIGHTS.describe(), self.conf["weights_dir"])
        self.net = load_xfeat(self.weights_path).to(self.device)

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        h0, w0 = image.array.shape[:2]
        h, w = (h0 // 32) * 32, (w0 // 32) * 32
        if not h or not w:
            raise ImageSkipped(f"{w0} x {h0} pixels: XFeat needs 32 at least on each side")
        x = to_tensor(image.array, self.device, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # RGB / 255
        x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False)
        feats, logits, reliability = self.net(x)
        feats = F.normalize(feats, dim=1)
        heat = F.softmax(logits, 1)[:, :64]  # the 64 pixels of each cell; the 65th is "none"
        heat = heat.permute(0, 2, 3, 1).reshape(1, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(1, 1, h, w)
        peaks = (heat == F.max_pool2d(heat, 5, stride=1, padding=2)) & (heat > self.conf["detection_threshold"])
        pos = peaks[0, 0].nonzero().flip(-1)[None]  # (x, y), raster order
        scores = (_sample(heat, pos.float(), h, w, "nearest") * _sample(reliability, pos.float(), h, w,
                                                                          "bilinear")).squeeze(-1)
        scores[torch.all(pos == 0, dim=-1)] = -1  # the official padding value of a batch: never kept
        order = torch.argsort(-scores, stable=True)[:, :self.conf["top_k"]]
        pos, scores = pos[0, order[0]][None], scores[0, order[0]]
        descriptors = F.normalize(_sample(feats, pos.float(), h, w, "bicubic"), dim=-1)[0]
        keypoints = pos[0].float() * torch.tensor([w0 / w, h0 / h], device=pos.device)
        valid = scores > 0
        return {"keypoints": keypoints[valid].cpu().numpy().astype(np.float32),
                "descriptors": descriptors[valid].float().cpu().numpy(),
                "scores": scores[valid].float().cpu().numpy()}
