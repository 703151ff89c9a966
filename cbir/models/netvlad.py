"""NetVLAD (Arandjelovic et al., CVPR 2016) as published: VGG-16 cut at conv5_3 (no last
ReLU), per-location L2 normalization, the NetVLAD layer (64 clusters, soft assignment by a
1x1 conv, residuals to the centres, intra-normalization, L2), PCA whitening to 4096
dimensions (a learned affine layer), L2.

Two weight layouts load unchanged:

* the official MATLAB release (Relja/netvlad, ``vd16_pitts30k_conv5_3_vlad_preL2_intra_white``)
  as a struct ``.mat`` (the official object file re-saved with ``net_class2struct``, e.g.
  ``Pitts30K_struct.mat``): ``net.layers`` in MatConvNet order (conv weights S x S x IN x
  OUT), the VLAD layer at index 30 (assignment D x K, centres stored negated), the
  whitening at index 33 (1 x 1 x IN x OUT), and ``net.meta.normalization.averageImage``;
  input in [0, 255] minus that average, as MatConvNet feeds it;
* the common PyTorch conversion (Nanne/pytorch-NetVlad): a ``state_dict`` with
  ``encoder.N.*`` (torchvision's VGG-16 ``features`` up to conv5_3), ``pool.conv.weight``
  (K x D x 1 x 1, ``pool.conv.bias`` for its vladv2), ``pool.centroids`` (K x D) and,
  when trained with PCA, ``WPCA.0.weight`` / ``WPCA.0.bias``; input normalized with the
  ImageNet mean and std.
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
from .backbones import vgg16_features
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

WEIGHTS = WeightFile("Pitts30K_struct.mat", "https://github.com/Relja/netvlad (vd16_pitts30k_conv5_3_vlad_preL2_intra_"
                     "white.mat; its struct version Pitts30K_struct.mat as hloc distributes it), or a pytorch-NetVlad "
                     "checkpoint", "MIT")
WEIGHTS_SOURCE = WEIGHTS.describe()
MAT_VLAD_LAYER, MAT_WHITEN_LAYER = 30, 33


class NetVLADNet(nn.Module):
    def __init__(self, clusters: int = 64, dim: int = 512, whiten_dim: int | None = 4096, assign_bias: bool = False,
                 dim_major: bool = False):
        super().__init__()
        # the VLAD vector is flattened cluster-major (k * D + d) in the PyTorch layout and
        # dimension-major (d * K + k) in the MATLAB one: the whitening weights follow it
        self.dim_major = dim_major
        self.encoder = vgg16_features(until_conv5_3=True)
        self.assign = nn.Conv2d(dim, clusters, 1, bias=assign_bias)
        self.centroids = nn.Parameter(torch.zeros(clusters, dim))
        self.whiten = nn.Linear(clusters * dim, whiten_dim) if whiten_dim else None
        self.out_dim = whiten_dim or clusters * dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.encoder(x), p=2, dim=1)  # per-location L2 ("preL2")
        n, d = x.shape[:2]
        soft = F.softmax(self.assign(x).flatten(2), dim=1)  # N x K x L
        x = x.flatten(2)  # N x D x L
        # sum_l a_kl (x_l - c_k) = (A X^T)_k - (sum_l a_kl) c_k, without an N x K x D x L tensor
        vlad = torch.bmm(soft, x.transpose(1, 2)) - soft.sum(-1, keepdim=True) * self.centroids[None]
        vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalization
        vlad = (vlad.transpose(1, 2) if self.dim_major else vlad).flatten(1)
        vlad = F.normalize(vlad, p=2, dim=1)
        if self.whiten is not None:
            vlad = F.normalize(self.whiten(vlad), p=2, dim=1)
        return vlad


def _load_mat(path: Path) -> tuple[NetVLADNet, dict[str, Any]]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise CbirError("reading MATLAB .mat weights needs scipy: pip install scipy") from None
    try:
        mat = loadmat(path, struct_as_record=False, squeeze_me=True)
        layers = list(mat["net"].layers)
        # the mean image (H x W x 3, as in Pitts30K_struct.mat; or 1 x 1 x 3): its top-left pixel,
        # as hloc reads it (``averageImage[0, 0]``); a flat reshape would mix the channels
        average = np.asarray(mat["net"].meta.normalization.averageImage, np.float64).reshape(-1, 3)[0]
    except (ValueError, KeyError, AttributeError, TypeError, NotImplementedError, OSError) as e:
        raise CbirError(f"not a NetVLAD struct .mat ({type(e).__name__}: {e}); the official object file must be "
                        "converted with net_class2struct (hloc's Pitts30K_struct.mat is)", path) from None
    try:
        assign_w = np.asarray(layers[MAT_VLAD_LAYER].weights[0], np.float32)  # D x K
        centres = -np.asarray(layers[MAT_VLAD_LAYER].weights[1], np.float32)  # stored negated
        whiten_w = np.asarray(layers[MAT_WHITEN_LAYER].weights[0], np.float32).squeeze()  # IN x OUT
        whiten_b = np.asarray(layers[MAT_WHITEN_LAYER].weights[1], np.float32).reshape(-1)
    except (IndexError, AttributeError, TypeError) as e:
        raise CbirError(f"unexpected NetVLAD .mat layout ({e})", path) from None
    dim, k = assign_w.shape
    net = NetVLADNet(k, dim, whiten_w.shape[1], dim_major=True)
    convs = [m for m in net.encoder if isinstance(m, nn.Conv2d)]
    mat_convs = [layer for layer in layers[:MAT_VLAD_LAYER] if getattr(layer, "type", "") == "conv"]
    if len(mat_convs) != len(convs):
        raise CbirError(f"{len(mat_convs)} conv layers before the VLAD layer, expected {len(convs)} (VGG-16)", path)
    with torch.no_grad():
        for conv, layer in zip(convs, mat_convs, strict=True):
            w = torch.from_numpy(np.asarray(layer.weights[0], np.float32)).permute(3, 2, 0, 1)
            if w.shape != conv.weight.shape:
                raise CbirError(f"conv weights {tuple(w.shape)} do not fit VGG-16's {tuple(conv.weight.shape)}", path)
            conv.weight.copy_(w)
            assert conv.bias is not None  # VGG-16's convs have biases
            conv.bias.copy_(torch.from_numpy(np.asarray(layer.weights[1], np.float32).reshape(-1)))
        net.assign.weight.copy_(torch.from_numpy(assign_w.T.copy())[:, :, None, None])
        net.centroids.copy_(torch.from_numpy(centres.T.copy()))
        assert net.whiten is not None  # built with the whitening
        net.whiten.weight.copy_(torch.from_numpy(whiten_w.T.copy()))
        net.whiten.bias.copy_(torch.from_numpy(whiten_b))
    return net, {"mean": tuple(average), "std": (1.0, 1.0, 1.0), "scale": 255.0}


def _load_torch(path: Path) -> tuple[NetVLADNet, dict[str, Any]]:
    ckpt = load_pickled_checkpoint(path, WEIGHTS_SOURCE)
    state = ckpt.get("state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "pool.centroids" not in state or "pool.conv.weight" not in state:
        raise CbirError("not a pytorch-NetVlad checkpoint (no pool.centroids / pool.conv.weight)", path)
    k, dim = state["pool.centroids"].shape
    wpca = state.get("WPCA.0.weight")
    net = NetVLADNet(k, dim, int(wpca.shape[0]) if wpca is not None else None, "pool.conv.bias" in state)
    own = {}
    for key, v in state.items():
        if key.startswith("encoder."):
            own[key] = v
        elif key.startswith("pool.conv."):
            own["assign." + key.removeprefix("pool.conv.")] = v
        elif key == "pool.centroids":
            own["centroids"] = v
        elif key.startswith("WPCA.0."):
            own["whiten." + key.removeprefix("WPCA.0.")] = v.flatten(1) if v.ndim == 4 else v
    try:
        net.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise CbirError(f"weights do not fit VGG-16 NetVLAD: {str(e).splitlines()[0]}", path) from None
    return net, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": 1.0}


def load_netvlad(path: Path) -> tuple[NetVLADNet, dict[str, Any]]:
    """The network and its input normalization, from a ``.mat`` or a PyTorch checkpoint."""
    net, pre = _load_mat(path) if path.suffix.lower() == ".mat" else _load_torch(path)
    return net.eval(), pre


class NetVLAD(WithWeights, GlobalExtractor):
    """VGG-16 NetVLAD (Pitts30k, PCA-whitened to 4096) from its published weights."""

    name = "netvlad"
    weight_files = (WEIGHTS,)
    default_conf = {
        "weights": "Pitts30K_struct.mat",
        "weights_dir": None,
        "device": "auto",
        "max_size": 1024,  # longest edge fed to the network: hloc's netvlad resize_max (the MATLAB
        # release uses the full image; set max_size higher for that)
    }
    loader_max_size_key = "max_size"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self.device = resolve_device(self.conf["device"])
        path = find_weights(self.conf["weights"], WEIGHTS_SOURCE, self.conf["weights_dir"])
        net, self.pre = load_netvlad(path)
        self.net = net.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's stubs miss it
        self.descriptor_dim = self.net.out_dim



    def prepare_input(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 -> the network's input: (x * scale - mean) / std with x in [0, 1]."""
        s = self.pre["scale"]
        mean = tuple(m / s for m in self.pre["mean"])
        std = tuple(v / s for v in self.pre["std"])
        return to_tensor(image, self.device, mean, std)

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> np.ndarray:
        x = self.prepare_input(image.array).contiguous(memory_format=torch.channels_last)
        return self.net(x)[0].cpu().numpy().astype(np.float32)
