"""DELG (Cao et al., ECCV 2020): global and local features from one ResNet-50, as
tensorflow/models ``research/delf`` computes them.

The network (``delf/python/training/model``: ``resnet50.py``, ``delf_model.py``,
``delg_model.py``), in the official order:

- backbone: the TF ResNet-50 (:mod:`.backbones`, style ``tf``); with ``block3_strides``
  the block-3 map is subsampled 2x (a 1x1 max-pool of stride 2) and block 4 keeps
  that resolution.
- global head: block 4 -> GeM (``mean(max(x, 1e-6) ** p) ** (1/p)``, fixed ``p`` = 3)
  -> the FC "embedding" (whitening) layer, 2048-d.
- local head, on block 3: autoencoder ``conv1`` (1x1, 1024 -> 128: the local
  descriptors) -> ``conv2`` (1x1, 128 -> 1024) + ReLU -> attention ``conv1`` (1x1, 512)
  -> batch norm -> ReLU -> ``conv2`` (1x1, 1) -> softplus: the attention score.

Extraction (``delf/python/examples/extractor.py`` and ``export_model_utils.py``):
the image is resized (PIL bilinear) to at most ``max_size``, normalized as
``(x - 128) / 128``, and each pyramid scale is ``tf.image.resize`` (bilinear, half-pixel
centres) to ``round(size * scale)``. Global: the raw descriptors of the scales
``global_scale_indices`` are each L2-normalized, summed, and L2-normalized. Local: the
block-3 positions whose attention is ``>= score_threshold`` at any scale, the
``max_keypoints`` best by attention (the official NMS at IoU 1.0 suppresses nothing),
located at the centre of their receptive field (291 px, stride 16 x 2, padding 145)
divided by the scale, then by the ``max_size`` resize factor; descriptors L2-normalized.
The scale of a keypoint is the official ``1 / scale``.

Weights: the official SavedModel/checkpoint converted once to a PyTorch file with
``cbir weights convert delg`` (TensorFlow is needed for that step only):
:func:`state_dict_from_official` maps the official variable names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..devices import to_device
from ..errors import CbirError
from ..io.atomic import atomic_output
from ..io.images import LoadedImage
from .backbones import RESNET_STYLES, ResNet, fold_batchnorm
from .base import (
    Extractor,
    GlobalExtractor,
    ImageSkipped,
    LocalExtractor,
    WeightFile,
    WithWeights,
    find_weights,
    resolve_device,
)

WEIGHTS = WeightFile("r50delg_gld_20200814.pt",
                     "https://storage.googleapis.com/delf/r50delg_gld_20200814.tar.gz (linked from tensorflow/models "
                     "research/delf/delf/python/delg/DELG_INSTRUCTIONS.md); convert it once with "
                     "`cbir weights convert delg SAVEDMODEL_DIR r50delg_gld_20200814.pt`", "Apache-2.0")
WEIGHTS_SOURCE = WEIGHTS.describe()
FILE_FORMAT = "cbir-delg"
FILE_VERSION = 1

# Receptive field of a block-3 position of the TF ResNet-50 (export_model_utils.py).
RF_SIZE, RF_STRIDE, RF_PADDING = 291.0, 16.0, 145.0
# Images smaller than this after the max_size resize get no features (extractor.py).
MIN_IMAGE_SIDE = 10
#: the stem (7x7/2 convolution, 3x3/2 max-pool) needs this many pixels at a pyramid scale
GLOBAL_MIN_SIDE = 5
#: the global descriptor of an image too small for every global scale: none (officially empty)
NO_GLOBAL = np.zeros(0, np.float32)
_BN_EPS = RESNET_STYLES["tf"][2]  # Keras' BatchNormalization default


class Attention(nn.Module):
    """``AttentionModel``: 1x1 conv (512) -> BN -> ReLU -> 1x1 conv (1) -> softplus."""

    def __init__(self, in_channels: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 512, 1)
        self.bn = nn.BatchNorm2d(512, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(512, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.conv2(F.relu(self.bn(self.conv1(x)))))


class Autoencoder(nn.Module):
    """``AutoencoderModel``: 1x1 conv to ``reduced_dim`` (no activation), 1x1 conv back + ReLU."""

    def __init__(self, channels: int = 1024, reduced_dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, reduced_dim, 1)
        self.conv2 = nn.Conv2d(reduced_dim, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reduced = self.conv1(x)
        return reduced, F.relu(self.conv2(reduced))


class DelgNet(nn.Module):
    """The DELG network. ``reduced_dim`` 0: no autoencoder (DELF-style 1024-d local
    descriptors, attention on block 3 itself)."""

    def __init__(self, gem_power: float = 3.0, embedding_dim: int = 2048, reduced_dim: int = 128,
                 block3_strides: bool = True):
        super().__init__()
        self.backbone = ResNet("resnet50", style="tf", layer4_stride=1 if block3_strides else 2)
        self.embedding = nn.Linear(2048, embedding_dim)
        self.autoencoder = Autoencoder(1024, reduced_dim) if reduced_dim else None
        self.attention = Attention(1024)
        self.gem_power = float(gem_power)
        self.block3_strides = block3_strides
        self.local_dim = reduced_dim or 1024
        self.global_dim = embedding_dim

    @property
    def stride(self) -> float:
        return RF_STRIDE * (2.0 if self.block3_strides else 1.0)

    def block3(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_to(x, "layer3")
        return f[:, :, ::2, ::2] if self.block3_strides else f

    def local_head(self, block3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention N x 1 x h x w, unnormalized descriptors N x C x h x w)."""
        if self.autoencoder is None:
            return self.attention(block3), block3
        reduced, expanded = self.autoencoder(block3)
        return self.attention(expanded), reduced

    def global_head(self, block3: torch.Tensor) -> torch.Tensor:
        """The raw (unnormalized) global descriptor, N x D."""
        x = self.backbone.layer4(block3)
        x = x.clamp(min=1e-6).pow(self.gem_power).mean(dim=(2, 3)).pow(1.0 / self.gem_power)
        return self.embedding(x)

    def fuse_batchnorm(self) -> DelgNet:
        """Fold the batch norms into the convs (inference only; see ResNet.fuse_batchnorm)."""
        self.backbone.fuse_batchnorm()
        if isinstance(self.attention.bn, nn.BatchNorm2d):
            fold_batchnorm(self.attention.conv1, self.attention.bn)
            self.attention.bn = nn.Identity()  # type: ignore[assignment]  # folded: an identity, by design
        return self


# ---------------------------------------------------------------------------------------
# Official variable names <-> this network's parameters

_BN_PARAMS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_BLOCK_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def official_name(key: str) -> str | None:
    """The official variable (``backbone/l3a/conv2a/kernel``...) of a :class:`DelgNet`
    parameter, or None for buffers the official model has no counterpart of."""
    module, _, param = key.rpartition(".")
    if param == "num_batches_tracked":
        return None
    m = re.fullmatch(r"backbone\.layer(\d)\.(\d+)\.(conv|bn)(\d)", module)
    if m:
        stage, block, kind, idx = int(m[1]) + 1, int(m[2]), m[3], m[4]
        layer = f"backbone/l{stage}{_BLOCK_LETTERS[block]}/{kind}2{'abc'[int(idx) - 1]}"
    elif (m := re.fullmatch(r"backbone\.layer(\d)\.(\d+)\.downsample\.([01])", module)):
        stage, block = int(m[1]) + 1, int(m[2])
        layer = f"backbone/l{stage}{_BLOCK_LETTERS[block]}/{'conv' if m[3] == '0' else 'bn'}_shortcut"
    else:
        named = {"backbone.conv1": "backbone/conv1", "backbone.bn1": "backbone/bn_conv1",
                 "embedding": "backbone/embedding_layer", "attention.conv1": "attention/conv1",
                 "attention.bn": "attention/bn_conv1", "attention.conv2": "attention/conv2",
                 "autoencoder.conv1": "autoencoder/conv1", "autoencoder.conv2": "autoencoder/conv2"}.get(module)
        if named is None:
            raise KeyError(key)
        layer = named
    is_bn = "/bn" in layer
    return f"{layer}/{_BN_PARAMS[param] if is_bn else {'weight': 'kernel', 'bias': 'bias'}[param]}"


_KERAS_VARIABLES = {"kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"}


def from_layer_names(name: str) -> str:
    """A variable named as a TensorFlow 1 graph names it, by the official Keras layer names
    (``backbone/<block scope>/res2a_branch2a/kernel``, ``attention/attn_conv1/bias``,
    ``autoencoder/autoenc_conv2/kernel``), renamed to its object path
    (``backbone/l2a/conv2a/kernel``...); any other name is returned as it is. The block
    models' own scope is dropped: the layer names are unique across blocks."""
    parts = name.split("/")
    roots = [i for i, p in enumerate(parts) if p in ("backbone", "attention", "autoencoder")]
    if len(parts) < 3 or not roots or parts[-1] not in _KERAS_VARIABLES:
        return name
    head, root, layer = parts[:roots[0]], parts[roots[0]], parts[-2]
    m = re.fullmatch(r"(res|bn)(\d)([a-z])_branch(1|2[abc])", layer)
    if m and root == "backbone":
        kind = "conv" if m[1] == "res" else "bn"
        layer = f"l{m[2]}{m[3]}/{kind}_shortcut" if m[4] == "1" else f"l{m[2]}{m[3]}/{kind}{m[4]}"
    elif (root, layer) in (("attention", "attn_conv1"), ("attention", "attn_conv2"),
                           ("autoencoder", "autoenc_conv1"), ("autoencoder", "autoenc_conv2")):
        layer = "conv" + layer[-1]
    else:  # conv1, bn_conv1, embedding_layer: the layer name is the attribute's
        return name
    return "/".join([*head, root, layer, parts[-1]])


def split_model_variables(variables: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The DELG variables of a checkpoint, by name relative to the model
    (``backbone/...``, ``attention/...``, ``autoencoder/...``): the prefix of the object
    that holds the model (``_model/`` in the exported SavedModel, ``model/`` in a
    training checkpoint) is dropped; classifier heads and optimizer slots are ignored.
    Names of a TensorFlow 1 graph (Keras layer names) are read too (:func:`from_layer_names`)."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, value in variables.items():
        name = from_layer_names(name)
        parts = name.split("/")
        roots = [i for i, p in enumerate(parts) if p in ("backbone", "attention", "autoencoder")]
        if not roots:
            continue
        i = roots[0]
        group, key = groups.setdefault("/".join(parts[:i]), {}), "/".join(parts[i:])
        if key in group:
            raise CbirError(f"two variables of the checkpoint are DELG's {key!r} (one named {name!r})")
        group[key] = value
    models = {prefix: g for prefix, g in groups.items() if "backbone/conv1/kernel" in g}
    if not models:
        raise CbirError("no DELG model in the checkpoint (no variable named .../backbone/conv1/kernel)")
    if len(models) > 1:
        raise CbirError(f"several DELG models in the checkpoint (under {', '.join(repr(p) for p in models)})")
    return next(iter(models.values()))


def config_from_official(variables: Mapping[str, np.ndarray], gem_power: float = 3.0,
                         block3_strides: bool = True) -> dict[str, Any]:
    """The :class:`DelgNet` configuration that the variables' shapes imply (GeM power and
    block-3 strides are not stored in the official files: the export defaults apply)."""
    try:
        embedding_dim = int(variables["backbone/embedding_layer/kernel"].shape[1])
    except KeyError:
        raise CbirError("the checkpoint has no global head (backbone/embedding_layer): a DELF, "
                        "not a DELG, model?") from None
    reduced = variables.get("autoencoder/conv1/kernel")
    return {"gem_power": float(gem_power), "embedding_dim": embedding_dim,
            "reduced_dim": int(reduced.shape[-1]) if reduced is not None else 0,
            "block3_strides": bool(block3_strides)}


def state_dict_from_official(variables: Mapping[str, np.ndarray], net: DelgNet) -> dict[str, torch.Tensor]:
    """``net``'s state dict from the official variables (relative names, TF layouts:
    conv kernels H x W x in x out, dense kernels in x out). Every parameter must be found
    with its shape; official variables left over are an error too."""
    state: dict[str, torch.Tensor] = {}
    missing, used = [], set()
    for key, ref in net.state_dict().items():
        name = official_name(key)
        if name is None:
            state[key] = ref.clone()
            continue
        if name not in variables:
            missing.append(name)
            continue
        used.add(name)
        value = np.asarray(variables[name], dtype=np.float32)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        if tuple(value.shape) != tuple(ref.shape):
            raise CbirError(f"variable {name} has shape {tuple(variables[name].shape)}, "
                            f"expected {tuple(ref.shape)} in the official layout")
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    if missing:
        raise CbirError(f"{len(missing)} DELG variable(s) missing from the checkpoint: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unused = sorted(set(variables) - used)
    if unused:
        raise CbirError(f"unexpected variable(s) in the checkpoint: {', '.join(unused[:5])}"
                        f"{' ...' if len(unused) > 5 else ''}")
    return state


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 source: str) -> Path:
    """Write a converted weight file atomically (a partial file, then a rename)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save({"format": FILE_FORMAT, "version": FILE_VERSION, "config": dict(config), "source": source,
                    "state_dict": dict(state)}, tmp)
    return path


def load_delg(path: str | os.PathLike) -> tuple[DelgNet, dict[str, Any]]:
    """A :class:`DelgNet` (eval mode) from a file written by :func:`save_weights`, and the
    file's header (``config``, ``source``)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not its own
        raise CbirError(f"cannot read the weight file ({type(e).__name__}): not a converted DELG file? "
                        f"Official weights are published at {WEIGHTS_SOURCE}", path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FILE_FORMAT:
        raise CbirError(f"not a converted DELG weight file (official weights: {WEIGHTS_SOURCE})", path)
    if ckpt.get("version", 0) > FILE_VERSION:
        raise CbirError(f"DELG weight file version {ckpt['version']} is newer than this cbir reads "
                        f"({FILE_VERSION})", path)
    try:
        net = DelgNet(**ckpt["config"])
        net.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, KeyError, RuntimeError) as e:
        raise CbirError(f"corrupt DELG weight file: {str(e).splitlines()[0]}", path) from None
    return net.eval(), {"config": ckpt["config"], "source": ckpt.get("source", "")}


# ---------------------------------------------------------------------------------------
# Official extraction

def official_resize(image: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """extractor.py ``ResizeImage``: PIL bilinear to a longest side of ``max_size`` (never
    when already smaller); returns the image and the (y, x) resize factors."""
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return image, np.ones(2)
    f = max_size / max(h, w)
    new_w, new_h = int(round(w * f)), int(round(h * f))
    resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))  # writable
    return resized, np.array([new_h / h, new_w / w])


def pyramid_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``round(size * scale)`` in float32 as the official graph computes it (round half to even)."""
    size = np.round(np.array([height, width], np.float32) * np.float32(scale))
    return int(size[0]), int(size[1])


@dataclass
class DelgOutput:
    local: dict[str, np.ndarray] | None = None
    global_: np.ndarray | None = None


class DelgEngine:
    """One DELG network and the official multi-scale loop. Serves a local and a global
    extractor from a single pass over the pyramid when both want the same image: block 3
    runs once per scale, block 4 only at the global scales."""

    def __init__(self, path: Path, device: torch.device, conf: Mapping[str, Any]):
        self.device = device
        net, header = load_delg(path)
        self.header = header
        self.local_dim, self.global_dim = net.local_dim, net.global_dim
        self.stride = net.stride
        self.net = net.fuse_batchnorm().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's stubs miss it
        self.max_size = conf["max_size"]
        self.scales = [float(s) for s in conf["scales"]]
        self._plan = (False, False)
        self._cache: tuple[LoadedImage, DelgOutput] | None = None
        self.local_conf: Mapping[str, Any] = {}
        self.global_conf: Mapping[str, Any] = {}

    def plan(self, local: bool, global_: bool) -> None:
        """What the next image is wanted for (both: one pass computes both)."""
        self._plan = (local, global_)
        self._cache = None

    def result(self, image: LoadedImage, kind: str) -> DelgOutput:
        """The features of ``image`` for ``kind``, computed with the other kind in the same
        pass when :meth:`plan` asked for both."""
        if self._cache is not None and self._cache[0] is image and \
                getattr(self._cache[1], "local" if kind == "local" else "global_") is not None:
            return self._cache[1]
        local, global_ = self._plan
        out = self.run(image.array, local or kind == "local", global_ or kind == "global")
        self._cache = (image, out)  # holds the image: identity cannot be reused by another
        self._plan = (False, False)
        return out

    @torch.inference_mode()
    def run(self, rgb: np.ndarray, want_local: bool, want_global: bool) -> DelgOutput:
        image, resize_factors = official_resize(rgb, self.max_size)
        h, w = image.shape[:2]
        if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:  # the official code: no local features, an empty global
            return DelgOutput({} if want_local else None, NO_GLOBAL if want_global else None)
        x = to_device(image, self.device).permute(2, 0, 1)[None].float()
        x = x.sub_(128.0).div_(128.0)
        global_idx = set(self.global_conf.get("global_scale_indices", ())) if want_global else set()
        boxes_c, feats, scores, scales, globals_ = [], [], [], [], []
        for i, scale in enumerate(self.scales):
            if not want_local and i not in global_idx:
                continue
            size = pyramid_size(h, w, scale)
            if min(size) < GLOBAL_MIN_SIDE:  # too small for the stem
                continue
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            block3 = self.net.block3(xs.contiguous(memory_format=torch.channels_last))
            if i in global_idx:
                globals_.append(self.net.global_head(block3)[0])
            if want_local:
                attention, features = self.net.local_head(block3)
                att = attention[0, 0]
                sel = torch.nonzero(att >= self.local_conf["score_threshold"])
                if len(sel):
                    boxes_c.append(self._centres(sel.float(), scale))
                    feats.append(features[0][:, sel[:, 0], sel[:, 1]].T)
                    scores.append(att[sel[:, 0], sel[:, 1]])
                    scales.append(torch.full((len(sel),), float(1.0 / np.float32(scale)), device=att.device))
        out = DelgOutput()
        if want_global:
            if globals_:
                g = F.normalize(torch.stack(globals_), p=2, dim=1, eps=1e-6).sum(0)
                out.global_ = F.normalize(g, p=2, dim=0, eps=1e-6).cpu().numpy().astype(np.float32)
            else:  # every global scale too small for the stem
                out.global_ = NO_GLOBAL
        if want_local:
            out.local = self._select(boxes_c, feats, scores, scales, resize_factors)
        return out

    def _centres(self, yx: torch.Tensor, scale: float) -> torch.Tensor:
        """Receptive-field box centres (y, x) of block-3 positions, in the resized image."""
        s = float(np.float32(scale))  # the float32 value (torch computes in the tensor's float32)
        lo = (self.stride * yx - RF_PADDING) / s
        hi = (self.stride * yx - RF_PADDING + RF_SIZE - 1) / s
        return (lo + hi) / 2

    def _select(self, centres: list, feats: list, scores: list, scales: list,
                resize_factors: np.ndarray) -> dict[str, np.ndarray]:
        if not centres:
            return {}  # the local extractor answers with its empty()
        score = torch.cat(scores)
        # the official NMS (IoU 1.0) keeps the best max_keypoints by score, ties by index
        order = torch.sort(score, descending=True, stable=True).indices[:self.local_conf["max_keypoints"]]
        yx = torch.cat(centres)[order].cpu().numpy().astype(np.float64) / resize_factors
        desc = torch.cat(feats)[order]
        desc = desc * torch.rsqrt(torch.clamp((desc * desc).sum(1, keepdim=True), min=1e-12))
        return {"keypoints": np.ascontiguousarray(yx[:, ::-1], dtype=np.float32),
                "descriptors": desc.cpu().numpy().astype(np.float32),
                "scores": score[order].cpu().numpy().astype(np.float32),
                "keypoint_params": torch.cat(scales)[order, None].cpu().numpy().astype(np.float32)}


# ---------------------------------------------------------------------------------------
# The extractors: `cbir extract --local delg --global delg` shares one engine (one pass)

_COMMON_CONF = {
    "weights": "r50delg_gld_20200814.pt",
    "weights_dir": None,
    "device": "auto",
    "max_size": 1024,  # official max_image_size (PIL bilinear); null: the image as it is
    "scales": [0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0],  # official image_scales
}


class _Delg(WithWeights, Extractor):
    kind: ClassVar[str]
    weight_files = (WEIGHTS,)

    def _setup(self) -> None:
        scales = self.conf["scales"]
        if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
            raise CbirError(f"{self.name}: scales must be positive numbers, got {scales!r}")
        self.weights_path = find_weights(self.conf["weights"], WEIGHTS_SOURCE, self.conf["weights_dir"])
        self.device = resolve_device(self.conf["device"])
        self._engine: DelgEngine | None = None

    @property
    def engine(self) -> DelgEngine:
        """The network, loaded on first use: an engine shared by :meth:`share_pass` is loaded once."""
        if self._engine is None:
            self._use(DelgEngine(self.weights_path, self.device, self.conf))
        return self._engine  # type: ignore[return-value]

    def _use(self, engine: DelgEngine) -> None:
        self._engine = engine
        setattr(engine, f"{self.kind}_conf", self.conf)

    @property
    def weights_note(self) -> str:
        """The converted file's ``source``, e.g. to say when weights are not the official ones."""
        return self.engine.header.get("source", "")

    def share_pass(self, other: Extractor) -> bool:
        """Let ``other`` (the DELG extractor of the other kind, same network and pyramid)
        use this one's engine, so that one pass over the pyramid serves both."""
        if not isinstance(other, _Delg) or other.kind == self.kind or \
                (other._engine is not None and other._engine is self._engine):
            return False
        if any(self.conf[k] != other.conf[k] for k in ("max_size", "scales")) or \
                self.weights_path.resolve() != other.weights_path.resolve() or self.device != other.device:
            return False
        other._use(self.engine)
        return True

    def begin_image(self, wanted: list[Extractor]) -> None:
        users = {e.kind for e in wanted if isinstance(e, _Delg) and e.engine is self.engine}
        self.engine.plan("local" in users, "global" in users)


class DelgLocal(_Delg, LocalExtractor):
    """DELG local features (attention-selected block-3 positions, 128-d)."""

    name = "delg"
    kind = "local"
    default_conf = {**_COMMON_CONF, "max_keypoints": 1000, "score_threshold": 175.0}
    keypoint_params = "scale"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self._setup()

    @property
    def descriptor_dim(self) -> int:  # type: ignore[override]
        return self.engine.local_dim

    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        return self.engine.result(image, "local").local or self.empty()


class DelgGlobal(_Delg, GlobalExtractor):
    """DELG global descriptor (GeM + FC whitening over three scales, 2048-d)."""

    name = "delg"
    kind = "global"
    default_conf = {**_COMMON_CONF, "global_scale_indices": [3, 4, 5]}

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        idx = self.conf["global_scale_indices"]
        if not idx or any(not isinstance(i, int) or not 0 <= i < len(self.conf["scales"]) for i in idx):
            raise CbirError(f"delg: global_scale_indices {idx!r} must index scales {self.conf['scales']!r}")
        self._setup()

    @property
    def descriptor_dim(self) -> int:  # type: ignore[override]
        return self.engine.global_dim

    def extract(self, image: LoadedImage) -> np.ndarray:
        """The global descriptor; an image too small for the pyramid has none (the official
        code returns an empty one): :class:`ImageSkipped`, reported by the extraction."""
        descriptor = self.engine.result(image, "global").global_
        if descriptor is None or not descriptor.size:
            w, h = image.size
            raise ImageSkipped(f"too small for DELG's global descriptor ({w}x{h} px: it needs {MIN_IMAGE_SIDE} px a "
                               f"side, and {GLOBAL_MIN_SIDE} px at one of its global scales)")
        return descriptor
