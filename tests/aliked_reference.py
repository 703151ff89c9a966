"""Reference outputs of the official ALIKED code (Shiaoming/ALIKED ``nets/``), for the
exactness tests of cbir.models.aliked; the files it writes are committed in
``tests/reference/aliked/``.

    python tests/aliked_reference.py OFFICIAL_REPO WEIGHTS_DIR IMAGE OUT_DIR

``OFFICIAL_REPO`` is a checkout of github.com/Shiaoming/ALIKED (commit 683d7c6, the one of
../shared/weights/aliked). Its code runs unchanged: ``ALIKED(model_name, device="cpu",
top_k=-1, scores_th=0.2, n_limit=5000)`` and ``run(img_rgb)`` as ``demo_pair.py`` calls them,
on the image read by OpenCV and converted to RGB, with the published weights. What the
official code imports from outside itself is supplied here, because torchvision's CPU build
is not installable beside this project's torch: ``torchvision.ops.deform_conv2d`` as an
independent NumPy statement of torchvision's CPU kernel (``deform_conv2d_kernel.cpp``:
``bilinear_interpolate`` with its bounds and corner tests, float64), the two one-line conv
constructors of ``torchvision.models.resnet``, ``ToTensor``, and the official compiled
``custom_ops.get_patches`` (``get_patches.cpp``'s CPU forward: the map padded with zeros by
``floor((k-1)/2)`` and ``ceil((k-1)/2)``, the patch copied from the point on).
``torch.cuda.synchronize`` (called by the official ``forward`` for its timer) does nothing.

Saved per model: keypoints (N x 2, pixels), scores (N), and the descriptors of every 8th
keypoint (float32), to keep the files small.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODELS = ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32")
DESCRIPTOR_STRIDE = 8


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                  dilation: tuple[int, int] = (1, 1), mask: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ``deform_conv2d`` as its CPU kernel computes it, in float64."""
    assert mask is None and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
    x = input.detach().double().numpy()
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ph, pw = padding
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    off = offset.detach().double().numpy().reshape(n, kh * kw, 2, oh, ow)
    columns = np.zeros((n, c, kh * kw, oh, ow))
    for b in range(n):
        for k in range(kh * kw):
            i, j = divmod(k, kw)
            y = np.arange(oh)[:, None] - ph + i + off[b, k, 0]
            xx = np.arange(ow)[None, :] - pw + j + off[b, k, 1]
            columns[b, :, k] = _bilinear_interpolate(x[b], y, xx)
    out = np.einsum("ock,nckhw->nohw", weight.detach().double().numpy().reshape(o, c, kh * kw), columns)
    if bias is not None:
        out += bias.detach().double().numpy()[None, :, None, None]
    return torch.from_numpy(out).float()


def _bilinear_interpolate(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``bilinear_interpolate`` of torchvision's deform_conv2d_kernel.cpp, at every (y, x)."""
    c, h, w = image.shape
    inside = (y > -1) & (y < h) & (x > -1) & (x < w)
    y_low, x_low = np.floor(y), np.floor(x)
    y_high, x_high = y_low + 1, x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx

    def pixel(yy: np.ndarray, xx: np.ndarray, ok: np.ndarray) -> np.ndarray:
        ok = ok & inside
        values = image[:, np.clip(yy, 0, h - 1).astype(int), np.clip(xx, 0, w - 1).astype(int)]
        return np.where(ok[None], values, 0.0)

    v1 = pixel(y_low, x_low, (y_low >= 0) & (x_low >= 0))
    v2 = pixel(y_low, x_high, (y_low >= 0) & (x_high <= w - 1))
    v3 = pixel(y_high, x_low, (y_high <= h - 1) & (x_low >= 0))
    v4 = pixel(y_high, x_high, (y_high <= h - 1) & (x_high <= w - 1))
    return hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4


class _GetPatches(torch.autograd.Function):
    """``get_patches.cpp``'s CPU forward (the official compiled op)."""

    @staticmethod
    def forward(ctx: object, feature_map: torch.Tensor, points: torch.Tensor, kernel_size: int) -> torch.Tensor:
        before, after = math.floor((kernel_size - 1) / 2), math.ceil((kernel_size - 1) / 2)
        padded = torch.nn.functional.pad(feature_map[None], (before, after, before, after))[0]
        patches = torch.zeros(len(points), feature_map.shape[0], kernel_size, kernel_size)
        for i, (w0, h0) in enumerate(points.tolist()):
            patches[i] = padded[:, h0:h0 + kernel_size, w0:w0 + kernel_size]
        return patches


def _stubs() -> None:
    """The modules the official code imports from torchvision and its compiled ops."""
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.deform_conv2d = deform_conv2d  # type: ignore[attr-defined]
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.conv1x1 = lambda i, o, stride=1: nn.Conv2d(i, o, 1, stride=stride, bias=False)  # type: ignore[attr-defined]
    resnet.conv3x3 = lambda i, o, stride=1, groups=1, dilation=1: nn.Conv2d(  # type: ignore[attr-defined]
        i, o, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation)
    models.resnet = resnet  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor = lambda: (lambda a: torch.from_numpy(a.transpose(2, 0, 1)).contiguous().float().div(255))  # type: ignore[attr-defined]
    tv.ops, tv.models, tv.transforms = ops, models, transforms  # type: ignore[attr-defined]
    custom = types.ModuleType("custom_ops")
    custom.get_patches = _GetPatches  # type: ignore[attr-defined]
    for name, module in (("torchvision", tv), ("torchvision.ops", ops), ("torchvision.models", models),
                         ("torchvision.models.resnet", resnet), ("torchvision.transforms", transforms),
                         ("custom_ops", custom)):
        sys.modules[name] = module
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]


def main(official: Path, weights: Path, image: Path, out: Path) -> None:
    import cv2

    _stubs()
    sys.path.insert(0, str(official))
    from nets.aliked import ALIKED  # the official module

    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    out.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        net = ALIKED(model_name=model, device="cpu", top_k=-1, scores_th=0.2, n_limit=5000, load_pretrained=False)
        net.load_state_dict(torch.load(weights / f"{model}.pth", map_location="cpu", weights_only=True), strict=True)
        net.eval()
        pred = net.run(rgb)
        np.savez_compressed(out / f"{model}.npz", image=image.name, keypoints=pred["keypoints"].astype(np.float32),
                            scores=pred["scores"].astype(np.float32),
                            descriptors=pred["descriptors"][::DESCRIPTOR_STRIDE].astype(np.float32))
        print(model, len(pred["keypoints"]), "keypoints")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:5]))
