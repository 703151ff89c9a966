"""ALIKED (Zhao et al., "ALIKED: A Lighter Keypoint and Descriptor Extraction Network via
Deformable Transformation", IEEE TIM 2023) as the official Shiaoming/ALIKED code computes it.

The network: four blocks (two 3x3 conv blocks, then two residual blocks whose 3x3 convs are
*deformable*: a plain conv predicts a 2-D offset per kernel tap, clamped to a quarter of the
feature map's longest side), average pooling between them (1, 1/2, 1/8, 1/32 of the image),
each level projected to ``dim/4`` channels, SELU, bilinearly upsampled (corners aligned) and
concatenated; a small score head (sigmoid) and the L2-normalized feature map. The image is
padded to a multiple of 32 by edge replication first, the maps cropped back after.

Detection (the official ``DKD``): non-maximum suppression in 5x5 windows (the official
two-pass ``simple_nms``), the 2-pixel border removed, scores above ``scores_th`` (0.2; if none
is, above the map's mean), at most ``n_limit`` (5,000) of them, the highest first when there
are more (else in raster order); each refined by a soft-argmax over its 5x5 window
(temperature 0.1) and scored by the bilinear score map at the refined position.

Description (the official ``SDDH``): the 3x3 feature patch around each keypoint predicts ``M``
(16 or 32) sampling offsets; the features bilinearly sampled there go through a 1x1 conv and
SELU and are aggregated by the learned ``M x dim x dim`` weights, then L2-normalized.

The deformable convolution is torchvision's ``deform_conv2d`` (the official code's), written
here in plain torch: each tap's value is the bilinear interpolation of the four pixels around
its position, pixels outside the map counting zero, summed in torchvision's order; then one
matrix product with the conv's weights. Parameter names follow the official modules, so the
published ``.pth`` state dicts load unchanged (strictly); the architecture (t16, n16/n16rot,
n32) is read from the weights' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
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

PUBLISHED = "https://github.com/Shiaoming/ALIKED (models/)"
LICENCE = "BSD-3-Clause"
WEIGHTS = WeightFile("aliked-n16.pth", PUBLISHED, LICENCE)
#: the official checkpoints, by name (``--conf weights=NAME``)
WEIGHT_FILES = tuple(WeightFile(f"{name}.pth", PUBLISHED, LICENCE)
                     for name in ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32"))


@dataclass(frozen=True)
class Architecture:
    """The widths of an ALIKED network: channels of the four blocks, descriptor dimension,
    the descriptor head's patch size ``K`` and its number of sampling positions ``M``."""

    c1: int
    c2: int
    c3: int
    c4: int
    dim: int
    K: int
    M: int

    @classmethod
    def of(cls, state: dict[str, torch.Tensor], path: Path) -> Architecture:
        """The architecture whose parameters have the shapes of ``state`` (t16, n16, n16rot
        and n32 differ in widths and ``M`` only)."""
        try:
            c1 = state["block1.conv1.weight"].shape[0]
            c2 = state["block2.conv1.weight"].shape[0]
            c3 = state["block3.conv1.regular_conv.weight"].shape[0]
            c4 = state["block4.conv1.regular_conv.weight"].shape[0]
            m, dim, _ = state["desc_head.agg_weights"].shape
            k = state["desc_head.offset_conv.0.weight"].shape[-1]
        except (KeyError, ValueError, AttributeError):
            raise CbirError("not an ALIKED state dict (no block1..4 and desc_head parameters)", path) from None
        return cls(int(c1), int(c2), int(c3), int(c4), int(dim), int(k), int(m))


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """torchvision's ``deform_conv2d`` (stride 1, dilation 1, one offset group, no mask, no
    bias): output pixel ``(i, j)`` sums, over the kernel taps ``(a, b)`` (``k = a * kw + b``),
    ``weight[:, :, a, b]`` times the input bilinearly sampled at ``(i - padding + a +
    offset[2k], j - padding + b + offset[2k + 1])``, pixels outside the input counting zero."""
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    taps = kh * kw
    off = offset.view(n, taps, 2, h, w)
    a = torch.arange(kh, device=x.device, dtype=x.dtype).repeat_interleave(kw).view(1, taps, 1, 1)
    b = torch.arange(kw, device=x.device, dtype=x.dtype).repeat(kh).view(1, taps, 1, 1)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    y = (rows - padding + a + off[:, :, 0]).reshape(n, -1)  # n x (taps * h * w)
    xx = (cols - padding + b + off[:, :, 1]).reshape(n, -1)
    columns = bilinear_zeros(x, y, xx)  # n x c x (taps * h * w)
    columns = columns.view(n, c * taps, h * w)  # rows ordered (channel, tap) as the weights
    return torch.matmul(weight.reshape(out_channels, c * taps), columns).view(n, out_channels, h, w)


def bilinear_zeros(x: torch.Tensor, y: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``x`` (n x c x h x w) bilinearly interpolated at rows ``y`` and columns ``xx`` (n x p,
    pixel units) as torchvision's ``bilinear_interpolate``: the four surrounding pixels weighted
    ``(1-ly)(1-lx)``, ``(1-ly)lx``, ``ly(1-lx)``, ``ly lx`` and summed in that order, a pixel
    outside the map counting zero: n x c x p."""
    n, c, h, w = x.shape
    y0, x0 = torch.floor(y), torch.floor(xx)
    ly, lx = y - y0, xx - x0
    hy, hx = 1 - ly, 1 - lx
    flat = x.reshape(n, c, h * w)
    out = None
    for dy, wy in ((0, hy), (1, ly)):
        for dx, wx in ((0, hx), (1, lx)):
            yy, xc = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy <= h - 1) & (xc >= 0) & (xc <= w - 1)
            index = (yy.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()
            value = flat.gather(2, index[:, None, :].expand(n, c, index.shape[1]))
            term = (wy * wx * inside)[:, None, :] * value
            out = term if out is None else out + term
    assert out is not None
    return out


class DeformableConv2d(nn.Module):
    """The official ``DeformableConv2d`` (no mask): ``offset_conv`` predicts the taps' offsets."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.offset_conv = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size, kernel_size, padding=padding,
                                     bias=True)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        max_offset = max(h, w) / 4.0
        offset = self.offset_conv(x).clamp(-max_offset, max_offset)
        return deform_conv2d(x, offset, self.regular_conv.weight, self.padding)


def _conv(in_channels: int, out_channels: int, deformable: bool) -> nn.Module:
    if deformable:
        return DeformableConv2d(in_channels, out_channels)
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Two 3x3 convs, each with batch norm and SELU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv(out_channels, out_channels, False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.selu(self.bn1(self.conv1(x)))
        return F.selu(self.bn2(self.conv2(x)))


class ResBlock(nn.Module):
    """torchvision's ``BasicBlock`` with SELU, a 1x1 conv (with bias) on the shortcut, and
    deformable 3x3 convs where ``deformable``."""

    def __init__(self, in_channels: int, out_channels: int, deformable: bool):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, deformable)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv(out_channels, out_channels, deformable)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.selu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.selu(out + self.downsample(x))


class SDDH(nn.Module):
    """The sparse deformable descriptor head: ``M`` positions around each keypoint, predicted
    from its ``K x K`` feature patch, sampled and aggregated into one descriptor."""

    def __init__(self, dim: int, kernel_size: int, positions: int):
        super().__init__()
        self.kernel_size, self.positions = kernel_size, positions
        channels = 2 * positions
        self.offset_conv = nn.Sequential(nn.Conv2d(dim, channels, kernel_size, bias=True), nn.SELU(),
                                         nn.Conv2d(channels, channels, 1, bias=True))
        self.sf_conv = nn.Conv2d(dim, dim, 1, bias=False)
        self.agg_weights = nn.Parameter(torch.zeros(positions, dim, dim))

    def forward(self, features: FeatureLevels, keypoints: torch.Tensor, placement: str = "centered") -> torch.Tensor:
        """Descriptors (N x dim) of ``keypoints`` (N x 2, normalized to [-1, 1]) in the image's
        L2-normalized feature map ``features``, patches placed as ``placement`` says
        (:func:`_patches`), the positions sampled as ``grid_sample`` samples them (bilinear,
        corners aligned, zero outside)."""
        h, w = features.height, features.width
        wh = torch.tensor([[w - 1, h - 1]], device=keypoints.device)  # integers, as the official code has them
        max_offset = max(h, w) / 4.0
        at = (keypoints / 2 + 0.5) * wh  # pixel positions
        n = len(at)
        patches = _patches(features, at.long(), self.kernel_size, placement)  # N x C x K x K
        offset = self.offset_conv(patches).clamp(-max_offset, max_offset)  # N x 2M x 1 x 1
        offset = offset[:, :, 0, 0].view(n, 2, self.positions).permute(0, 2, 1)  # N x M x (dx, dy)
        grid = (2.0 * (at.unsqueeze(1) + offset) / wh[None] - 1).reshape(-1, 2)
        # grid_sample's unnormalization (align_corners) and its four corners
        gx, gy = (grid[:, 0] + 1) / 2 * (w - 1), (grid[:, 1] + 1) / 2 * (h - 1)
        x0, y0 = torch.floor(gx), torch.floor(gy)
        x1, y1 = x0 + 1, y0 + 1
        corners = ((y0, x0, (x1 - gx) * (y1 - gy)), (y0, x1, (gx - x0) * (y1 - gy)),
                   (y1, x0, (x1 - gx) * (gy - y0)), (y1, x1, (gx - x0) * (gy - y0)))
        sampled = None
        for yy, xx, weight in corners:
            term = weight[:, None] * features.at(yy.long(), xx.long())
            sampled = term if sampled is None else sampled + term
        assert sampled is not None
        sampled = sampled.view(n, self.positions, -1).permute(0, 2, 1)[..., None]  # N x C x M x 1
        sampled = F.selu(self.sf_conv(sampled)).squeeze(-1)  # N x C x M
        descriptors = torch.einsum("ncp,pcd->nd", sampled, self.agg_weights)
        return F.normalize(descriptors, p=2.0, dim=1)


def _patches(features: FeatureLevels, points: torch.Tensor, size: int, placement: str) -> torch.Tensor:
    """The ``size x size`` patches of the feature map at integer pixels ``points`` (N x 2, x
    then y): N x C x size x size. ``centered`` (the official compiled ``get_patches`` op): rows
    ``p - floor((size-1)/2)`` on, pixels outside the map zero. ``lightglue`` (the official
    code's fallback without the compiled op, from LightGlue's port, which hloc runs): from
    ``trunc(p - size/2 + 1)``, clamped into ``[0, W-1-size] x [0, H-1-size]``; the two differ
    only for keypoints next to the border."""
    h, w = features.height, features.width
    steps = torch.arange(size, device=points.device)
    if placement == "centered":
        x0, y0 = points[:, 0] - (size - 1) // 2, points[:, 1] - (size - 1) // 2
    else:
        corner = (points - size / 2 + 1).long()
        x0 = corner[:, 0].clamp(min=0, max=w - 1 - size)
        y0 = corner[:, 1].clamp(min=0, max=h - 1 - size)
    ys = (y0[:, None, None] + steps[None, :, None]).expand(-1, size, size)  # N x size x size
    xs = (x0[:, None, None] + steps[None, None, :]).expand(-1, size, size)
    values = features.at(ys.reshape(-1), xs.reshape(-1))  # N*size*size x C
    return values.view(len(points), size, size, -1).permute(0, 3, 1, 2)


#: where the descriptor head's patches are taken (:func:`_patches`)
PATCH_PLACEMENTS = ("centered", "lightglue")


class AlikedNet(nn.Module):
    """The ALIKED network of the official ``nets/aliked.py``, parameter for parameter."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.block1 = ConvBlock(3, arch.c1)
        self.block2 = ResBlock(arch.c1, arch.c2, deformable=False)
        self.block3 = ResBlock(arch.c2, arch.c3, deformable=True)
        self.block4 = ResBlock(arch.c3, arch.c4, deformable=True)
        self.conv1 = nn.Conv2d(arch.c1, arch.dim // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(arch.c2, arch.dim // 4, 1, bias=False)
        self.conv3 = nn.Conv2d(arch.c3, arch.dim // 4, 1, bias=False)
        self.conv4 = nn.Conv2d(arch.dim, arch.dim // 4, 1, bias=False)
        self.score_head: nn.Sequential = nn.Sequential(
            nn.Conv2d(arch.dim, 8, 1, bias=False), nn.SELU(), nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.SELU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.SELU(), nn.Conv2d(4, 1, 3, padding=1, bias=False))
        self.desc_head = SDDH(arch.dim, arch.K, arch.M)

    def dense(self, image: torch.Tensor) -> tuple[FeatureLevels, torch.Tensor]:
        """The L2-normalized feature map (read where needed, :class:`FeatureLevels`) and the
        score map (1 x 1 x H x W) of ``image`` (1 x 3 x H x W in [0, 1])."""
        h, w = image.shape[-2:]
        pad_h, pad_w = (-h) % 32, (-w) % 32
        top, left = pad_h // 2, pad_w // 2
        x = F.pad(image, [left, pad_w - left, top, pad_h - top], mode="replicate")
        x1 = self.block1(x)
        x2 = self.block2(F.avg_pool2d(x1, 2))
        x3 = self.block3(F.avg_pool2d(x2, 4))
        x4 = self.block4(F.avg_pool2d(x3, 4))
        levels = [F.selu(conv(t)) for conv, t in ((self.conv1, x1), (self.conv2, x2), (self.conv3, x3),
                                                     (self.conv4, x4))]
        # the score head's first (1 x 1, linear) conv of the upsampled, concatenated levels is the
        # sum of each level's share, upsampled: 8 channels at full resolution instead of dim
        first = self.score_head[0].weight
        assert isinstance(first, torch.Tensor)
        q = self.arch.dim // 4
        s = F.conv2d(levels[0], first[:, :q])
        for k, (level, factor) in enumerate(zip(levels[1:], (2, 8, 32), strict=True), 1):
            s = s + F.interpolate(F.conv2d(level, first[:, k * q:(k + 1) * q]), scale_factor=factor, mode="bilinear",
                                  align_corners=True)
        scores = torch.sigmoid(self.score_head[1:](s))
        return FeatureLevels(levels, top, left, h, w), scores[..., top:top + h, left:left + w]


class FeatureLevels:
    """The official full-resolution feature map (the four levels upsampled with corners
    aligned, concatenated and L2-normalized per pixel) read at the pixels asked for, never
    built: it holds ``dim`` floats a pixel (0.4 GB for a 1024 x 800 image, 3.2 GB for 3072 x
    2048), of which the descriptor head reads a few per keypoint."""

    def __init__(self, levels: list[torch.Tensor], top: int, left: int, height: int, width: int):
        #: each level (1 x dim/4 x h_l x w_l, in the padded frame, full resolution first) as a
        #: table of pixels (h_l * w_l x dim/4): a pixel's channels are one contiguous row
        self.tables = [level[0].permute(1, 2, 0).reshape(-1, level.shape[1]).contiguous() for level in levels]
        self.shapes = [tuple(level.shape[-2:]) for level in levels]
        self.top, self.left, self.height, self.width = top, left, height, width

    def at(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The features (P x dim) at the integer pixels ``(y, x)`` of the image; zero outside it."""
        inside = (y >= 0) & (y < self.height) & (x >= 0) & (x < self.width)
        py = y.clamp(0, self.height - 1) + self.top
        px = x.clamp(0, self.width - 1) + self.left
        height, width = self.shapes[0]
        parts = [self.tables[0][py * width + px]]
        for table, (h, w) in zip(self.tables[1:], self.shapes[1:], strict=True):
            parts.append(_upsampled_at(table, h, w, py, px, height, width))
        values = F.normalize(torch.cat(parts, dim=1), p=2, dim=1)
        return values * inside[:, None]


def _upsampled_at(table: torch.Tensor, h: int, w: int, y: torch.Tensor, x: torch.Tensor, height: int,
                  width: int) -> torch.Tensor:
    """A level (``table``: its h x w pixels' rows) upsampled to ``height x width`` as
    ``F.interpolate`` does it (bilinear, corners aligned), at the integer pixels ``(y, x)``:
    P x C."""
    def source(index: torch.Tensor, size: int, out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = (size - 1) / (out - 1) if out > 1 else 0.0
        real = index.to(table.dtype) * torch.tensor(scale, dtype=table.dtype)
        low = torch.floor(real).long().clamp(max=size - 1)
        weight = (real - low).clamp(0, 1)
        return low, (low + 1).clamp(max=size - 1), weight[:, None]

    y0, y1, ly = source(y, h, height)
    x0, x1, lx = source(x, w, width)
    top = (1 - lx) * table[y0 * w + x0] + lx * table[y0 * w + x1]
    bottom = (1 - lx) * table[y1 * w + x0] + lx * table[y1 * w + x1]
    return (1 - ly) * top + ly * bottom


def simple_nms(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """The official non-maximum suppression: maxima of ``(2 radius + 1)^2`` windows, then two
    passes restoring maxima that only suppressed neighbours hid; the rest set to zero."""
    def max_pool(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, kernel_size=2 * radius + 1, stride=1, padding=radius)

    zeros = torch.zeros_like(scores)
    maxima = scores == max_pool(scores)
    for _ in range(2):
        suppressed = max_pool(maxima.float()) > 0
        rest = torch.where(suppressed, zeros, scores)
        maxima = maxima | ((rest == max_pool(rest)) & ~suppressed)
    return torch.where(maxima, scores, zeros)


def detect(scores: torch.Tensor, radius: int, scores_th: float, n_limit: int,
           temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``DKD`` in threshold mode, sub-pixel: keypoints (N x 2, normalized to
    [-1, 1]) and their scores, from the score map ``scores`` (1 x 1 x H x W)."""
    _, _, h, w = scores.shape
    nms = simple_nms(scores, radius)
    nms[:, :, :radius, :] = 0
    nms[:, :, :, :radius] = 0
    nms[:, :, h - radius:, :] = 0
    nms[:, :, :, w - radius:] = 0
    flat = scores.reshape(-1)
    mask = nms > scores_th if scores_th > 0 else nms > flat.mean()
    if scores_th > 0 and not mask.any():
        mask = nms > flat.mean()
    indices = mask.reshape(-1).nonzero()[:, 0]
    if len(indices) > n_limit:
        indices = indices[flat[indices].sort(descending=True)[1][:n_limit]]
    # the 5x5 windows of the official unfold (zero padding), at the keypoints only
    size = 2 * radius + 1
    padded = F.pad(scores[0, 0], [radius] * 4)
    iy, ix = torch.div(indices, w, rounding_mode="trunc"), indices % w
    dy = torch.arange(size, device=scores.device).repeat_interleave(size)
    dx = torch.arange(size, device=scores.device).repeat(size)
    window = padded[iy[:, None] + dy[None], ix[:, None] + dx[None]]  # N x size^2, row-major
    grid = torch.stack([dx, dy], dim=1).to(scores.dtype) - radius  # the official hw_grid: (x, y) offsets
    weights = ((window - window.max(dim=1).values[:, None]) / temperature).exp()
    residual = weights @ grid / weights.sum(dim=1)[:, None]
    wh = torch.tensor([w - 1, h - 1], device=scores.device)
    keypoints = (torch.stack([ix, iy], dim=1) + residual) / wh * 2 - 1
    kept = F.grid_sample(scores, keypoints.view(1, 1, -1, 2), mode="bilinear", align_corners=True)[0, 0, 0, :]
    return keypoints, kept


def load_aliked(path: str | Path) -> AlikedNet:
    """The network of an official ALIKED checkpoint (a state dict), weights loaded strictly."""
    path = Path(path)
    state = load_state_dict(path, "an official ALIKED checkpoint")
    net = AlikedNet(Architecture.of(state, path))
    load_into(net, state, "ALIKED", path)
    return net.eval()


class ALIKED(WithWeights, LocalExtractor):
    """ALIKED keypoints and descriptors from an official checkpoint (``weights``), with the
    official defaults of ``demo_pair.py``: the image at full resolution, scores above 0.2, at
    most 5,000 keypoints."""

    name = "aliked"
    weight_files = WEIGHT_FILES
    default_conf = {
        "weights": WEIGHTS.name,
        "scores_th": 0.2,
        "n_limit": 5000,
        "nms_radius": 2,
        "max_size": None,  # longest edge before extraction: None keeps the full resolution (official; hloc: 1024)
        "patches": "centered",  # the official compiled op; "lightglue": its fallback, LightGlue's (hloc's) port
        "device": "auto",
        "weights_dir": None,
    }
    loader_max_size_key = "max_size"  # RGB, float32 descriptors, no keypoint parameters: the defaults

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        check_integer("aliked n_limit", self.conf["n_limit"], 1)
        check_integer("aliked nms_radius", self.conf["nms_radius"], 1)
        self.device = resolve_device(self.conf["device"])
        if self.conf["patches"] not in PATCH_PLACEMENTS:
            raise CbirError(f"ALIKED patches {self.conf['patches']!r} unknown (known: {', '.join(PATCH_PLACEMENTS)})")
        self.weights_path = find_weights(self.conf["weights"], WEIGHTS.describe(), self.conf["weights_dir"])
        self.net = load_aliked(self.weights_path).to(self.device)
        self.descriptor_dim = self.net.arch.dim

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        h, w = image.array.shape[:2]
        if min(h, w) < self.net.arch.K + 1:
            raise ImageSkipped(f"{w} x {h} pixels: ALIKED's {self.net.arch.K} x {self.net.arch.K} descriptor "
                               "patches need more")
        img = to_tensor(image.array, self.device, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # ToTensor
        features, scores = self.net.dense(img)
        keypoints, kept = detect(scores, self.conf["nms_radius"], self.conf["scores_th"], self.conf["n_limit"])
        if not len(keypoints):
            return self.empty()
        descriptors = self.net.desc_head(features, keypoints, self.conf["patches"])
        wh = torch.tensor([w - 1, h - 1], device=keypoints.device)
        # the official order is the score map's raster order (the best first past n_limit);
        # stores hold keypoints best first (formats/SPEC.md 6): the same set, sorted, ties in that order
        order = torch.sort(kept, descending=True, stable=True).indices
        return {
            "keypoints": (wh * (keypoints[order] + 1) / 2).float().cpu().numpy(),  # the official run()'s pixels
            "descriptors": descriptors[order].float().cpu().numpy(),
            "scores": kept[order].float().cpu().numpy(),
        }
