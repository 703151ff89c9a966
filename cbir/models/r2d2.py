"""R2D2 (Revaud et al., NeurIPS 2019) as the official naver/r2d2 code computes it.

The network is the L2-Net-style fully convolutional ``Quad_L2Net_ConfCFS`` of the
published checkpoints (and the later ``Fast_Quad_L2Net_ConfCFS``): dilated 3x3 convs
instead of strides, so the output keeps the input resolution; batch norm without
affine parameters; 128-D L2-normalized descriptors; reliability = softmax of a 1x1
conv of the squared descriptor features (2 classes), repeatability = softplus
``x / (1 + x)`` of another 1x1 conv (one channel). Parameter names follow the
official module (``ops.N``, ``clf``, ``sal``), so the ``.pt`` files load unchanged.

Extraction follows the official ``extract_multiscale``: a pyramid with scale factor
``2**0.25`` where each level is bilinearly resized *from the previous level*, levels
kept between ``min_size`` / ``max_size`` (longest edge) and ``min_scale`` /
``max_scale``; per level, local maxima of repeatability in a 3x3 window above both
thresholds; keypoint ``(x, y) * (W / w, H / h)`` in the original image, scale
``32 / s``, score reliability x repeatability; the top-k scores over all levels.
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CbirError
from ..io.images import LoadedImage
from .backbones import fold_batchnorm
from .base import LocalExtractor, WeightFile, WithWeights, find_weights, resolve_device, to_tensor

WEIGHTS = WeightFile("r2d2_WASF_N16.pt", "https://github.com/naver/r2d2 (models/*.pt)", "CC BY-NC-SA 3.0")
WEIGHTS_SOURCE = WEIGHTS.describe()


class QuadL2Net(nn.Module):
    """``Quad_L2Net_ConfCFS`` (``fast=False``) and ``Fast_Quad_L2Net_ConfCFS`` (``fast=True``)."""

    def __init__(self, dim: int = 128, mchan: int = 4, relu22: bool = False, fast: bool = False,
                 downsample_factor: int = 2):
        super().__init__()
        self.ops = nn.ModuleList()
        self._channels = 3
        self._dilation = 1
        self._add_conv(8 * mchan)
        self._add_conv(8 * mchan)
        if fast:  # the fast variant pools once here and upsamples back at the end
            self._add_conv(16 * mchan, pool=downsample_factor)
        else:
            self._add_conv(16 * mchan, stride=2)
        self._add_conv(16 * mchan)
        self._add_conv(32 * mchan, stride=2)
        self._add_conv(32 * mchan)
        # the final 8x8 conv of L2-Net as three 2x2 convs
        self._add_conv(32 * mchan, k=2, stride=2, relu=relu22)
        self._add_conv(32 * mchan, k=2, stride=2, relu=relu22)
        self._add_conv(dim, k=2, stride=2, bn=False, relu=False)
        if fast:
            self.ops.append(nn.Upsample(scale_factor=downsample_factor, mode="bilinear", align_corners=False))
        self.clf = nn.Conv2d(dim, 2, kernel_size=1)  # reliability
        self.sal = nn.Conv2d(dim, 1, kernel_size=1)  # repeatability
        self.out_dim = dim

    def _add_conv(self, out: int, k: int = 3, stride: int = 1, bn: bool = True, relu: bool = True,
                  pool: int = 1) -> None:
        # dilated instead of strided: a stride multiplies the dilation of the *following* layers
        d = self._dilation
        self._dilation *= stride
        self.ops.append(nn.Conv2d(self._channels, out, kernel_size=k, padding=((k - 1) * d) // 2, dilation=d))
        if bn:
            self.ops.append(nn.BatchNorm2d(out, affine=False))
        if relu:
            self.ops.append(nn.ReLU(inplace=True))
        if pool > 1:
            self.ops.append(nn.MaxPool2d(kernel_size=pool))
        self._channels = out

    def fuse_batchnorm(self) -> QuadL2Net:
        """Fold each eval-mode batch norm into the conv before it (inference only: the
        result no longer has the checkpoint's parameter layout). Saves a full pass over
        every feature map; outputs change by float rounding only."""
        fused: list[nn.Module] = []
        for op in self.ops:
            if isinstance(op, nn.BatchNorm2d) and fused and isinstance(fused[-1], nn.Conv2d):
                fold_batchnorm(fused[-1], op)
                continue
            fused.append(op)
        self.ops = nn.ModuleList(fused)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for op in self.ops:
            x = op(x)
        x2 = x ** 2
        ureliability = self.clf(x2)
        urepeatability = self.sal(x2)
        rep = F.softplus(urepeatability)
        return {
            "descriptors": F.normalize(x, p=2, dim=1),
            "repeatability": rep / (1 + rep),
            "reliability": F.softmax(ureliability, dim=1)[:, 1:2],
        }


_ARCHITECTURES = {"Quad_L2Net_ConfCFS": False, "Fast_Quad_L2Net_ConfCFS": True}


def parse_net_spec(spec: str, path: Path) -> dict[str, Any]:
    """Parse the checkpoint's ``net`` string (``Quad_L2Net_ConfCFS(mchan=6)``) without eval()."""
    m = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", spec)
    if not m or m.group(1) not in _ARCHITECTURES:
        raise CbirError(f"unsupported R2D2 architecture {spec!r} (known: {', '.join(_ARCHITECTURES)})", path)
    kwargs: dict[str, Any] = {"fast": _ARCHITECTURES[m.group(1)]}
    if m.group(2).strip():
        try:
            call = ast.parse(f"f({m.group(2)})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            assert all(kw.arg is not None for kw in call.keywords)  # no **mapping
            kwargs.update({str(kw.arg): ast.literal_eval(kw.value) for kw in call.keywords})
        except (SyntaxError, ValueError, AssertionError):
            raise CbirError(f"cannot parse the network arguments of {spec!r}", path) from None
    unknown = set(kwargs) - {"fast", "dim", "mchan", "relu22", "downsample_factor"}
    if unknown:
        raise CbirError(f"unsupported R2D2 network arguments {sorted(unknown)} in {spec!r}", path)
    return kwargs


def load_r2d2(path: str | Path) -> QuadL2Net:
    """Build the network named by an official checkpoint and load its weights (strict)."""
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"R2D2 weights not found; download them from {WEIGHTS_SOURCE}", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        spec = ckpt["net"]
    except (RuntimeError, KeyError, TypeError, EOFError, OSError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CbirError(f"not an official R2D2 checkpoint ({type(e).__name__}: {first})", path) from None
    net = QuadL2Net(**parse_net_spec(spec, path))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CbirError(f"weights do not fit {spec}: {str(e).splitlines()[0]}", path) from None
    return net.eval()


def pyramid_levels(width: int, height: int, conf: dict[str, Any]) -> list[tuple[float, int, int, bool]]:
    """``(scale, w, h, extract)`` of every level the official loop visits, in order."""
    levels = []
    s, w, h = 1.0, width, height
    longest = max(width, height)
    while s + 0.001 >= max(conf["min_scale"], conf["min_size"] / longest):
        levels.append((s, w, h, s - 0.001 <= min(conf["max_scale"], conf["max_size"] / longest)))
        s /= conf["scale_f"]
        w, h = round(width * s), round(height * s)
    return levels


class R2D2(WithWeights, LocalExtractor):
    """R2D2 keypoints and descriptors from an official checkpoint (``weights``)."""

    name = "r2d2"
    weight_files = (WEIGHTS,)
    default_conf = {
        "weights": "r2d2_WASF_N16.pt",
        "max_keypoints": 20000,  # the official --top-k (paper: 20k)
        "scale_f": 2 ** 0.25,
        "min_size": 256,
        "max_size": 1024,
        "min_scale": 0.0,
        "max_scale": 1.0,
        "reliability_thr": 0.7,
        "repeatability_thr": 0.7,
        "device": "auto",
        "weights_dir": None,
    }
    grayscale = False
    keypoint_params = "scale"
    descriptor_dtype = "float32"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self.device = resolve_device(self.conf["device"])
        # channels-last convs run ~1.5x faster on CPU (oneDNN) and are the norm on GPU
        self.weights_path = find_weights(self.conf["weights"], WEIGHTS_SOURCE, self.conf["weights_dir"])
        net = load_r2d2(self.weights_path).fuse_batchnorm()
        self.net = net.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's stubs miss it
        self.descriptor_dim = self.net.out_dim

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        img = to_tensor(image.array, self.device).contiguous(memory_format=torch.channels_last)
        _, _, H, W = img.shape
        xs, ys, ss, rel, rep, desc = [], [], [], [], [], []
        for s, w, h, keep in pyramid_levels(W, H, self.conf):
            if (h, w) != tuple(img.shape[2:]):
                img = F.interpolate(img, (h, w), mode="bilinear", align_corners=False)
            if not keep:
                continue
            out = self.net(img)
            y, x = self._local_maxima(out["reliability"], out["repeatability"])
            xs.append(x.float() * W / w)
            ys.append(y.float() * H / h)
            ss.append(torch.full((len(x),), 32 / s, dtype=torch.float32, device=x.device))
            rel.append(out["reliability"][0, 0, y, x])
            rep.append(out["repeatability"][0, 0, y, x])
            desc.append(out["descriptors"][0, :, y, x].t())
        if not xs:  # smaller than min_size: no level to extract
            return self.empty()
        scores = torch.cat(rel) * torch.cat(rep)
        k = min(self.conf["max_keypoints"] or len(scores), len(scores))
        order = torch.topk(scores, k, sorted=True).indices  # best first
        kp = torch.stack([torch.cat(xs), torch.cat(ys)], dim=-1)[order]
        return {
            "keypoints": kp.cpu().numpy(),
            "descriptors": torch.cat(desc)[order].cpu().numpy(),
            "scores": scores[order].cpu().numpy(),
            "keypoint_params": torch.cat(ss)[order, None].cpu().numpy(),
        }

    def _local_maxima(self, reliability: torch.Tensor, repeatability: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maxima = repeatability == F.max_pool2d(repeatability, 3, stride=1, padding=1)
        maxima &= repeatability >= self.conf["repeatability_thr"]
        maxima &= reliability >= self.conf["reliability_thr"]
        return tuple(maxima[0, 0].nonzero().t())
