"""DISK (Tyszkiewicz, Fua and Trulls, "DISK: Learning local features with policy gradient",
NeurIPS 2020) as the official cvlab-epfl/disk code computes its features (``detect.py``,
``--mode nms``).

The image (RGB in [0, 1], full resolution) goes through a U-Net (jatentaki/unets at the
commit the official repository pins: 5 levels of 16, 32, 64, 64, 64 channels going down, 64,
64, 64, 129 coming up; 5 x 5 convolutions, each but the first preceded by instance
normalization and a PReLU; average pooling down, bilinear upsampling up). Its first 128
output channels are the dense descriptors, the last the detection heatmap (log-probabilities).
Keypoints are the heatmap's 5 x 5 local maxima (a pixel is kept when the max-pooling's argmax
over its window is itself, as the official ``nms`` decides) above 0, at integer pixels;
their score is the heatmap there and their descriptor the dense descriptor there,
L2-normalized. The official default keeps every keypoint; ``max_keypoints`` keeps those
strictly above the (n + 1)-th best score, as the official ``--n`` does.

Deliberate deviation: the official U-Net needs sides that are multiples of 16 and raises
otherwise. cbir pads the image with zeros at the bottom and right to the next multiple (as
the official ``Image.resize_to`` and kornia's ``pad_if_not_divisible`` do) and drops the
keypoints that fall in the padding (as ``detect.py`` drops those outside the original image).
Parameter names follow the official ``DISK`` module, so ``depth-save.pth`` and
``epipolar-save.pth`` (``{"extractor": state}`` or ``{"disk": state}``) load unchanged.
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
from ..validate import check_integer
from .base import ImageSkipped, LocalExtractor, WeightFile, WithWeights, find_weights, resolve_device, to_tensor
from .checkpoints import load_into, load_state_dict

PUBLISHED = "https://github.com/cvlab-epfl/disk"
LICENCE = "Apache-2.0"
WEIGHTS = WeightFile("depth-save.pth", f"{PUBLISHED} (depth-save.pth, trained with depth supervision)", LICENCE)
WEIGHT_FILES = (WEIGHTS, WeightFile("epipolar-save.pth", f"{PUBLISHED} (epipolar-save.pth)", LICENCE))

DOWN = (16, 32, 64, 64, 64)
UP = (64, 64, 64)
DESCRIPTOR_DIM = 128
KERNEL = 5
MULTIPLE = 2 ** (len(DOWN) - 1)  # four poolings by 2


class _Conv(nn.Sequential):
    """The unets ``Conv``: normalization, gate, dropout (none), convolution; the U-Net's
    first one has neither normalization nor gate (the pinned ``no_norm_at_start``)."""

    def __init__(self, cin: int, cout: int, first: bool = False):
        super().__init__(nn.Identity() if first else nn.InstanceNorm2d(cin),
                         nn.Identity() if first else nn.PReLU(cin),
                         nn.Identity(),
                         nn.Conv2d(cin, cout, KERNEL, padding=KERNEL // 2))


class _Up(nn.Module):
    """The unets ``ThinUnetUpBlock``: upsample the level below, concatenate the level beside."""

    def __init__(self, below: int, beside: int, out: int):
        super().__init__()
        self.conv = _Conv(below + beside, out)

    def forward(self, below: torch.Tensor, beside: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(below, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(torch.cat([up, beside], dim=1))


class DiskUnet(nn.Module):
    """The official ``Unet(in_features=3, size=5, down=[16, 32, 64, 64, 64],
    up=[64, 64, 64, 129])`` with DISK's setup, parameter for parameter."""

    def __init__(self, descriptor_dim: int = DESCRIPTOR_DIM):
        super().__init__()
        dims = (3, *DOWN)
        self.path_down = nn.ModuleList(
            nn.Sequential(nn.Identity() if i == 0 else nn.AvgPool2d(2), _Conv(dims[i], dims[i + 1], first=i == 0))
            for i in range(len(DOWN)))
        ups = (*UP, descriptor_dim + 1)
        belows = (DOWN[-1], *ups[:-1])
        besides = dims[-2:0:-1]  # the levels beside, 64 down to 16 (the input is not one)
        self.path_up = nn.ModuleList(_Up(b, s, o) for b, s, o in zip(belows, besides, ups, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = [x]
        for down in self.path_down:
            levels.append(down(levels[-1]))
        out = levels[-1]
        for up, beside in zip(self.path_up, levels[-2:0:-1], strict=True):  # the input is not concatenated
            out = up(out, beside)
        return out


class DiskNet(nn.Module):
    """The official ``DISK`` module's parameters (``unet.*``)."""

    def __init__(self, descriptor_dim: int = DESCRIPTOR_DIM):
        super().__init__()
        self.descriptor_dim = descriptor_dim
        self.unet = DiskUnet(descriptor_dim)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense descriptors (B x D x H x W) and heatmap (B x H x W) of images whose sides are
        multiples of 16."""
        out = self.unet(image)
        return out[:, :self.descriptor_dim], out[:, self.descriptor_dim]


def nms(heatmap: torch.Tensor, window: int, cutoff: float) -> torch.Tensor:
    """The official ``nms``: pixels (of H x W) that are the max-pooling's argmax over their own
    ``window`` x ``window`` neighbourhood, and above ``cutoff``."""
    h, w = heatmap.shape
    _, argmax = F.max_pool2d(heatmap[None, None], window, stride=1, padding=window // 2, return_indices=True)
    own = torch.arange(h * w, device=heatmap.device).reshape(h, w)
    return (argmax[0, 0] == own) & (heatmap > cutoff)


def load_disk(path: Path) -> DiskNet:
    """The network of an official DISK checkpoint (``{"extractor": state}`` as released, or
    ``{"disk": state}``; the descriptor dimension read from the last layer), loaded strictly."""
    saved = load_state_dict(path, "an official DISK checkpoint")
    state = saved.get("extractor", saved.get("disk"))
    if not isinstance(state, dict):
        raise CbirError("not an official DISK checkpoint (no 'extractor' or 'disk' entry)", path)
    last = state.get(f"unet.path_up.{len(UP)}.conv.3.bias")
    if not isinstance(last, torch.Tensor) or last.ndim != 1 or last.shape[0] < 2:
        raise CbirError("weights do not fit DISK: no output layer 'unet.path_up.3.conv.3'", path)
    net = DiskNet(int(last.shape[0]) - 1)
    load_into(net, state, "DISK", path)
    return net.eval()


class DISK(WithWeights, LocalExtractor):
    """DISK keypoints and descriptors from an official checkpoint, with the official defaults
    of ``detect.py``: full resolution, 5 x 5 non-maximum suppression, heatmap above 0, every
    keypoint kept (hloc keeps 5,000 of images resized to 1,600 pixels: ``max_keypoints=5000
    max_size=1600``)."""

    name = "disk"
    weight_files = WEIGHT_FILES
    default_conf = {
        "weights": WEIGHTS.name,
        "max_keypoints": None,  # None keeps all (official); n: those strictly above the (n + 1)-th best
        "nms_window": 5,
        "cutoff": 0.0,
        "max_size": None,  # longest edge before extraction: None keeps the full resolution (official)
        "device": "auto",
        "weights_dir": None,
    }
    loader_max_size_key = "max_size"  # RGB, float32 descriptors, no keypoint parameters: the defaults

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        if self.conf["max_keypoints"] is not None:
            check_integer("disk max_keypoints", self.conf["max_keypoints"], 1)
        check_integer("disk nms_window", self.conf["nms_window"], 1)
        if self.conf["nms_window"] % 2 != 1:
            raise CbirError(f"disk nms_window must be odd, got {self.conf['nms_window']}")
        if not isinstance(self.conf["cutoff"], (int, float)) or isinstance(self.conf["cutoff"], bool):
            raise CbirError(f"disk cutoff must be a number, got {self.conf['cutoff']!r}")
        self.device = resolve_device(self.conf["device"])
        self.weights_path = find_weights(self.conf["weights"], WEIGHTS.describe(), self.conf["weights_dir"])
        self.net = load_disk(self.weights_path).to(self.device)
        self.descriptor_dim = self.net.descriptor_dim

    def default_store_name(self) -> str:
        """``disk-depth`` for ``depth-save.pth`` (a file's stem alone would not say DISK)."""
        stem = Path(self.conf["weights"]).stem.removesuffix("-save")
        return stem if stem.startswith("disk") else f"disk-{stem}"

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        h, w = image.array.shape[:2]
        if max(h, w) <= MULTIPLE:  # the lowest level would be one pixel, which instance norm cannot normalize
            raise ImageSkipped(f"{w} x {h} pixels: DISK needs more than {MULTIPLE} on one side at least")
        x = to_tensor(image.array, self.device, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # RGB / 255
        x = F.pad(x, (0, -w % MULTIPLE, 0, -h % MULTIPLE))  # zeros at the bottom and right
        dense, heatmap = self.net(x)
        heatmap = heatmap[0]
        yx = nms(heatmap, self.conf["nms_window"], float(self.conf["cutoff"])).nonzero()
        yx = yx[(yx[:, 0] < h) & (yx[:, 1] < w)]  # not in the padding
        scores = heatmap[yx[:, 0], yx[:, 1]]
        n = self.conf["max_keypoints"]
        if n is not None and len(scores) > n:  # the official --n: strictly above the (n + 1)-th best
            threshold = torch.kthvalue(-scores, n + 1).values
            keep = scores > -threshold
            yx, scores = yx[keep], scores[keep]
        # stores hold keypoints best first (formats/SPEC.md 6); ties stay in raster order
        order = torch.sort(scores, descending=True, stable=True).indices
        yx, scores = yx[order], scores[order]
        descriptors = F.normalize(dense[0, :, yx[:, 0], yx[:, 1]].T, dim=-1)
        return {"keypoints": yx.flip(-1).float().cpu().numpy(),
                "descriptors": descriptors.float().cpu().numpy(),
                "scores": scores.float().cpu().numpy()}
