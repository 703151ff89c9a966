"""AP-GeM (Revaud et al., ICCV 2019) as naver/deep-image-retrieval computes it.

The published ``Resnet101-AP-GeM-LM18.pt`` is a dict with ``model_options`` (``arch``
``resnet101_rmac``, ``out_dim``, ``pooling`` ``gem``, ``gemp``, ...), a ``state_dict``
(``module.``-prefixed in some files: the prefix is dropped as the official loader
does), ``preprocess`` (mean, std) and ``pca`` (scikit-learn PCA whitenings by training
set, e.g. ``Landmarks_clean``), loaded without running pickled code
(:mod:`cbir.models.checkpoints`).

The forward pass, in the official order: ResNet trunk -> GeM pooling
``avgpool(clamp(x, 1e-6) ** p) ** (1/p)`` with the checkpoint's learned ``p`` ->
(L2 if ``norm_features``) -> the FC whitening layer -> L2. Several scales (the
official multi-transform option, each a PIL bilinear ``Scale`` as the official transform
does it) are pooled with the symmetric GeM of power ``gemp`` (3), then L2. Optional PCA
whitening (``whiten``: a key of the checkpoint's ``pca``):
``(x - mean_) @ components_[:v].T / (whitenm * explained_variance_[:v] ** whitenp)``,
then L2. The official default is the whole image, unresized, one scale, no PCA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..errors import CbirError
from ..io.images import LoadedImage
from .backbones import RESNET_LAYERS, ResNet
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GlobalExtractor,
    WeightFile,
    WithWeights,
    find_weights,
    resolve_device,
    to_tensor,
)
from .checkpoints import load_pickled_checkpoint

WEIGHTS = WeightFile("Resnet101-AP-GeM-LM18.pt",
                     "https://github.com/naver/deep-image-retrieval (linked from its README)",
                     "BSD-3-Clause, the repository's licence")
WEIGHTS_SOURCE = WEIGHTS.describe()


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)


class ResNetGeM(nn.Module):
    """``ResNet_RMAC`` of deep-image-retrieval: trunk, pooling (``adpool``), ``fc``, L2."""

    def __init__(self, arch: str = "resnet101", out_dim: int = 2048, pooling: str = "gem", gemp: float = 3.0,
                 norm_features: bool = False, without_fc: bool = False):
        super().__init__()
        self.trunk = ResNet(arch)
        if pooling == "gem":
            self.adpool: nn.Module = GeM(gemp)
        elif pooling == "max":
            self.adpool = nn.AdaptiveMaxPool2d(1)
        elif pooling == "avg":
            self.adpool = nn.AdaptiveAvgPool2d(1)
        else:
            raise ValueError(pooling)
        self.fc = nn.Linear(2048, out_dim)
        self.norm_features = norm_features
        self.without_fc = without_fc
        self.out_dim = 2048 if without_fc else out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adpool(self.trunk(x)).flatten(1)
        if self.norm_features:
            x = F.normalize(x, p=2, dim=1)
        if not self.without_fc:
            x = self.fc(x)
        return F.normalize(x, p=2, dim=-1)

    def load_official(self, state: dict[str, torch.Tensor]) -> None:
        # the official module has the trunk's parameters at its root: map them under trunk.
        own = {k if k.startswith(("adpool.", "fc.")) else f"trunk.{k}": v for k, v in state.items()}
        self.load_state_dict(own, strict=True)


_SUPPORTED_OPTIONS = {"arch", "out_dim", "pooling", "gemp", "norm_features", "without_fc", "dropout_p",
                      "center_bias", "scales"}


def build_from_checkpoint(path: Path) -> tuple[ResNetGeM, dict[str, Any]]:
    ckpt = load_pickled_checkpoint(path, WEIGHTS_SOURCE)
    try:
        options = dict(ckpt["model_options"])
        state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    except (KeyError, TypeError, AttributeError):
        raise CbirError("not a deep-image-retrieval checkpoint (no model_options / state_dict)", path) from None
    arch = str(options.get("arch", ""))
    base = arch.removesuffix("_rmac")
    if not arch.endswith("_rmac") or base not in RESNET_LAYERS:
        raise CbirError(f"unsupported architecture {arch!r} (supported: "
                        f"{', '.join(a + '_rmac' for a in RESNET_LAYERS)})", path)
    unknown = set(options) - _SUPPORTED_OPTIONS
    if unknown or options.get("center_bias", 0):
        raise CbirError(f"unsupported model options {sorted(unknown) or ['center_bias']}", path)
    pooling = str(options.get("pooling", "gem"))
    net = ResNetGeM(base, int(options.get("out_dim", 2048)), "gem" if pooling.startswith("gem") else pooling,
                    float(options.get("gemp", 3)), bool(options.get("norm_features", False)),
                    bool(options.get("without_fc", False)))
    try:
        net.load_official(state)
    except RuntimeError as e:
        raise CbirError(f"weights do not fit {arch}: {str(e).splitlines()[0]}", path) from None
    return net.eval(), ckpt


def whitening_from_pca(pca: Any, whitenp: float, whitenv: int | None, whitenm: float) -> dict[str, np.ndarray]:
    """The official ``common.transform`` of a (scikit-learn) PCA, as arrays."""
    try:
        mean = np.asarray(pca.mean_, np.float64) if getattr(pca, "mean_", None) is not None else None
        comp = np.asarray(pca.components_, np.float64)[:whitenv]
        scale = np.ones(len(comp))
        if getattr(pca, "whiten", False):
            scale = whitenm * np.power(np.asarray(pca.explained_variance_, np.float64)[:whitenv], whitenp)
    except AttributeError as e:
        raise CbirError(f"the checkpoint's PCA lacks {e.name!r}") from None
    return {"mean": mean if mean is not None else np.zeros(comp.shape[1]), "components": comp, "scale": scale}


def official_rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """deep-image-retrieval's ``Scale(factor)`` transform: PIL bilinear resize to
    ``int(0.5 + factor * w) x int(0.5 + factor * h)``."""
    h, w = image.shape[:2]
    size = (max(1, int(0.5 + factor * w)), max(1, int(0.5 + factor * h)))
    return np.array(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))  # a writable copy


def scale_pool(descs: list[torch.Tensor], pooling: str, gemp: float) -> torch.Tensor:
    """The official ``common.pool`` over scales (mean, or symmetric GeM)."""
    if len(descs) == 1:
        return descs[0]
    x = torch.stack(descs)
    if pooling == "mean":
        return x.mean(0)

    def sympow(v: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
        s = torch.sign(v)
        return (v * s).clamp(min=eps).pow(p) * s

    return sympow(sympow(x, gemp).mean(0), 1 / gemp)


class APGeM(WithWeights, GlobalExtractor):
    """AP-GeM from the official deep-image-retrieval checkpoint (``weights``)."""

    name = "apgem"
    weight_files = (WEIGHTS,)
    default_conf = {
        "weights": "Resnet101-AP-GeM-LM18.pt",
        "weights_dir": None,
        "device": "auto",
        "max_size": None,  # longest edge before extraction (None: the official whole image)
        "scales": [1.0],  # several: the official multi-scale option, pooled as below
        "scale_pooling": "gem",
        "gemp": 3,
        "whiten": None,  # e.g. "Landmarks_clean": a PCA stored in the checkpoint
        "whitenp": 0.5,
        "whitenv": None,
        "whitenm": 1.0,
    }
    loader_max_size_key = "max_size"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self.device = resolve_device(self.conf["device"])
        path = find_weights(self.conf["weights"], WEIGHTS_SOURCE, self.conf["weights_dir"])
        self.net, ckpt = build_from_checkpoint(path)
        self.net = self.net.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's stubs miss it
        pre = ckpt.get("preprocess") or {}
        self.mean = tuple(pre.get("mean", IMAGENET_MEAN))
        self.std = tuple(pre.get("std", IMAGENET_STD))
        self.whitening = None
        if self.conf["whiten"]:
            pcas = ckpt.get("pca") or {}
            if self.conf["whiten"] not in pcas:
                raise CbirError(f"the checkpoint has no PCA {self.conf['whiten']!r} "
                                f"(it has: {', '.join(map(str, pcas)) or 'none'})", path)
            self.whitening = whitening_from_pca(pcas[self.conf["whiten"]], self.conf["whitenp"],
                                                self.conf["whitenv"], self.conf["whitenm"])
        self.descriptor_dim = len(self.whitening["components"]) if self.whitening else self.net.out_dim

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> np.ndarray:
        descs = []
        for s in self.conf["scales"]:
            arr = image.array if s == 1.0 else official_rescale(image.array, s)
            x = to_tensor(arr, self.device, self.mean, self.std).contiguous(memory_format=torch.channels_last)
            descs.append(self.net(x))
        d = F.normalize(scale_pool(descs, self.conf["scale_pooling"], self.conf["gemp"]), p=2, dim=1)
        out = d[0].double().cpu().numpy()
        if self.whitening is not None:
            w = self.whitening
            out = (out - w["mean"]) @ w["components"].T / w["scale"]
            out /= np.linalg.norm(out)
        return out.astype(np.float32)
