"""ResNet-18/34/50/101/152 and VGG-16 with torchvision's parameter names (torchvision has no CPU
build here), so that published checkpoints built on them load with ``strict=True``.

ResNet comes in two styles with the same parameter names:

- ``torchvision``: v1.5 (the stride of a bottleneck on its 3x3 conv), convs without
  bias, batch-norm eps 1e-5, symmetric stem padding: naver/deep-image-retrieval's.
- ``tf``: the TF/Keras ResNet50 of tensorflow/models ``delf`` (DELF, DELG): v1 (the
  stride on the first 1x1 conv), convs with bias, Keras' batch-norm eps 1e-3, the stem's
  7x7/2 conv padded ``SAME`` as TensorFlow does (asymmetric, by input parity) and its
  3x3/2 max-pool unpadded (``VALID``).

VGG-16 is ``features`` (13 convs with ReLU, 5 max-pools) with torchvision's indices.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

RESNET_STYLES = {
    # style: (stride on the first 1x1 conv, conv bias, batch-norm eps)
    "torchvision": (False, False, 1e-5),
    "tf": (True, True, 1e-3),
}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 style: str = "torchvision"):
        super().__init__()
        stride_in_1x1, bias, eps = RESNET_STYLES[style]
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(planes * 4, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """The two-3x3-conv block of ResNet-18/34 (torchvision's ``BasicBlock``; torchvision style only)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 style: str = "torchvision"):
        super().__init__()
        if style != "torchvision":
            raise ValueError("ResNet-18/34 exist in the torchvision style only")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
                 "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
RESNET_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "resnet18": BasicBlock, "resnet34": BasicBlock, "resnet50": Bottleneck, "resnet101": Bottleneck,
    "resnet152": Bottleneck}


def tf_same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad ``x`` (N, C, H, W) as TensorFlow's ``padding='SAME'`` does for a strided
    conv: ``ceil(size / stride)`` outputs, the odd pixel of padding at the bottom/right."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: (left, right, top, bottom)
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class ResNet(nn.Module):
    """The convolutional trunk of a ResNet (no average pool, no fc), in ``style``
    ``torchvision`` or ``tf`` (module docstring). ``layer4_stride=1`` keeps layer4 at the
    resolution of its input (DELG subsamples block3 itself, before layer4)."""

    def __init__(self, arch: str = "resnet101", style: str = "torchvision", layer4_stride: int = 2):
        super().__init__()
        if style not in RESNET_STYLES:
            raise ValueError(f"unknown ResNet style {style!r}")
        layers = RESNET_LAYERS[arch]
        self.block = RESNET_BLOCKS[arch]
        self.style = style
        _, bias, eps = RESNET_STYLES[style]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=0 if style == "tf" else 3, bias=bias)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=0 if style == "tf" else 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=layer4_stride)
        self.out_channels = 512 * self.block.expansion

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        _, bias, eps = RESNET_STYLES[self.style]
        block, width = self.block, planes * self.block.expansion
        downsample = None
        if stride != 1 or self.inplanes != width:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, width, 1, stride=stride, bias=bias),
                                       nn.BatchNorm2d(width, eps=eps))
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample, self.style)]
        self.inplanes = width
        layers += [block(self.inplanes, planes, style=self.style) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def fuse_batchnorm(self) -> ResNet:
        """Fold every eval-mode batch norm into the conv before it (inference only: the
        parameter layout is no longer the checkpoint's). Saves a pass over each feature
        map; outputs change by float rounding only."""
        if isinstance(self.bn1, nn.BatchNorm2d):
            fold_batchnorm(self.conv1, self.bn1)
            self.bn1 = nn.Identity()  # type: ignore[assignment]  # the folded norm: an identity, by design
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                for i in (1, 2, 3) if isinstance(block, Bottleneck) else (1, 2):
                    bn = getattr(block, f"bn{i}")
                    if isinstance(bn, nn.BatchNorm2d):
                        fold_batchnorm(getattr(block, f"conv{i}"), bn)
                        setattr(block, f"bn{i}", nn.Identity())
                downsample = block.downsample
                if isinstance(downsample, nn.Sequential) and isinstance(downsample[1], nn.BatchNorm2d):
                    conv = downsample[0]
                    assert isinstance(conv, nn.Conv2d)
                    fold_batchnorm(conv, downsample[1])
                    downsample[1] = nn.Identity()
        return self

    def forward_to(self, x: torch.Tensor, last: str = "layer4") -> torch.Tensor:
        """The feature map after ``last`` (``layer3`` or ``layer4``)."""
        if self.style == "tf":
            x = tf_same_padding(x, 7, 2)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name == last:
                return x
        raise ValueError(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_to(x, "layer4")


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold the eval-mode ``bn`` (affine or not) that follows ``conv`` into ``conv``, which
    gains a bias if it had none."""
    assert bn.running_var is not None and bn.running_mean is not None  # eval-mode statistics
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        bias = (bias - bn.running_mean) * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        conv.weight.mul_(scale[:, None, None, None])
        conv.bias = nn.Parameter(bias)
    return conv


VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features(until_conv5_3: bool = False) -> nn.Sequential:
    """torchvision's ``vgg16().features`` (indices 0-30); ``until_conv5_3`` drops the last
    ReLU and max-pool (indices 29-30), as NetVLAD does."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*(layers[:-2] if until_conv5_3 else layers))
