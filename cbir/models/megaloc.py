"""MegaLoc (Berton and Masone, "MegaLoc: One Retrieval to Place Them All", 2025) as the
official gmberton/MegaLoc model computes it: the global extractor ``megaloc``.

A DINOv2 ViT-B/14 (patch embedding, class token, learned positions interpolated bicubically
to the image's patch grid with DINOv2's 0.1 offset, 12 pre-norm blocks with layer scale,
final layer norm) gives a feature per 14 x 14 patch and the class token; the aggregator
(SALAD: optimal-transport assignment of the patches to 64 clusters with a learned dustbin,
three Sinkhorn iterations in log space) sums each cluster's projected patch features, L2-
normalizes them, prepends the L2-normalized projected class token, normalizes the whole,
projects it linearly to 8,448 dimensions and L2-normalizes the result. An image whose sides
are not multiples of 14 is first resized to the nearest multiples (bilinear, antialiased, as
the official ``torchvision`` resize). The published ``model.safetensors`` (MIT; Hugging Face
``gberton/MegaLoc``) or a ``.pth`` of the same state dict loads unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CbirError
from ..io.images import LoadedImage
from .base import GlobalExtractor, ImageSkipped, WeightFile, WithWeights, find_weights, resolve_device, to_tensor
from .checkpoints import load_into, load_state_dict

WEIGHTS = WeightFile("model.safetensors", "https://huggingface.co/gberton/MegaLoc (model.safetensors)", "MIT")


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class _MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)


class Block(nn.Module):
    """A DINOv2 block: pre-norm attention and MLP, each scaled by a learned per-channel
    ``gamma`` (layer scale)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.attn.proj(attended.transpose(1, 2).reshape(b, n, c)) * self.ls1.gamma
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))) * self.ls2.gamma


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class DINOv2(nn.Module):
    """DINOv2 ViT-B/14 as the official model holds it (``patch_embed.proj``, ``cls_token``,
    ``pos_embed`` for a 518 x 518 image, ``blocks``, ``norm``)."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, patch: int = 14, image: int = 518):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The learned positions for a ``rows x cols`` patch grid: DINOv2's bicubic
        interpolation with scale factors ``(n + 0.1) / M``, no antialiasing."""
        grid = self.pos_embed.shape[1] - 1
        if rows * cols == grid and rows == cols:
            return self.pos_embed
        m = int(math.sqrt(grid))
        patches = self.pos_embed.float()[:, 1:].reshape(1, m, m, self.dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, scale_factor=((rows + 0.1) / m, (cols + 0.1) / m), mode="bicubic",
                                antialias=False)
        if patches.shape[-2:] != (rows, cols):
            raise CbirError(f"DINOv2's positions interpolate to {tuple(patches.shape[-2:])}, not {(rows, cols)}")
        patches = patches.permute(0, 2, 3, 1).reshape(1, -1, self.dim)
        return torch.cat((self.pos_embed[:, :1].float(), patches), dim=1).to(self.pos_embed.dtype)

    def forward(self, images: torch.Tensor, final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features (B x dim x H/14 x W/14) and the class token (B x dim), after the
        final layer norm or (``final_norm`` False, as BoQ reads them) before it."""
        b, _, h, w = images.shape
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.positions(h // self.patch, w // self.patch)
        for block in self.blocks:
            x = block(x)
        if final_norm:
            x = self.norm(x)
        patches = x[:, 1:].reshape(b, h // self.patch, w // self.patch, self.dim).permute(0, 3, 1, 2)
        return patches, x[:, 0]


def sinkhorn_log(scores: torch.Tensor, dustbin: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """The official ``get_matching_probs``: log assignment of ``n`` patches to ``m`` clusters
    and a dustbin row (``scores``: B x m x n), uniform marginals with the dustbin taking the
    ``n - m`` surplus, ``iterations`` Sinkhorn steps in log space: B x (m + 1) x n."""
    b, m, n = scores.shape
    augmented = torch.cat([scores, dustbin.to(scores).expand(b, 1, n)], dim=1)
    norm = -math.log(n + m)
    log_a = torch.full((b, m + 1), norm, dtype=scores.dtype, device=scores.device)
    log_a[:, -1] = norm + math.log(n - m)
    log_b = torch.full((b, n), norm, dtype=scores.dtype, device=scores.device)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(augmented + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(augmented + u.unsqueeze(2), dim=1)
    return augmented + u.unsqueeze(2) + v.unsqueeze(1) - norm


class FeatureAggregator(nn.Module):
    """SALAD, parameter for parameter (``token_features``, ``cluster_features``, ``score``,
    ``dust_bin``; dropout, which inference skips, keeps its index)."""

    def __init__(self, channels: int, clusters: int, cluster_dim: int, token_dim: int, mlp_dim: int):
        super().__init__()
        self.clusters = clusters
        self.token_features = nn.Sequential(nn.Linear(channels, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, token_dim))
        self.cluster_features = nn.Sequential(nn.Conv2d(channels, mlp_dim, 1), nn.Identity(), nn.ReLU(),
                                              nn.Conv2d(mlp_dim, cluster_dim, 1))
        self.score = nn.Sequential(nn.Conv2d(channels, mlp_dim, 1), nn.Identity(), nn.ReLU(),
                                   nn.Conv2d(mlp_dim, clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, patches: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        f = self.cluster_features(patches).flatten(2)  # B x cluster_dim x n
        p = sinkhorn_log(self.score(patches).flatten(2), self.dust_bin).exp()[:, :-1]  # B x clusters x n
        t = self.token_features(token)
        aggregated = torch.einsum("bcn,bkn->bck", f, p)  # each cluster's weighted sum of the patches
        out = torch.cat([F.normalize(t, p=2, dim=-1), F.normalize(aggregated, p=2, dim=1).flatten(1)], dim=-1)
        return F.normalize(out, p=2, dim=-1)


class _Aggregator(nn.Module):
    def __init__(self, agg: FeatureAggregator, linear: nn.Linear):
        super().__init__()
        self.agg, self.linear = agg, linear


class MegaLocNet(nn.Module):
    """The official ``MegaLoc``: ``backbone``, ``aggregator.agg`` and ``aggregator.linear``."""

    def __init__(self, feat_dim: int = 8448, clusters: int = 64, cluster_dim: int = 256, token_dim: int = 256,
                 mlp_dim: int = 512):
        super().__init__()
        self.backbone = DINOv2()
        self.aggregator = _Aggregator(FeatureAggregator(self.backbone.dim, clusters, cluster_dim, token_dim, mlp_dim),
                                      nn.Linear(clusters * cluster_dim + token_dim, feat_dim))
        self.out_dim, self.clusters = feat_dim, clusters

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, h, w = images.shape
        if h % 14 or w % 14:  # the official resize to the nearest multiples of 14
            h, w = round(h / 14) * 14, round(w / 14) * 14
            images = F.interpolate(images, size=[h, w], mode="bilinear", align_corners=False, antialias=True)
        patches, token = self.backbone(images)
        return F.normalize(self.aggregator.linear(self.aggregator.agg(patches, token)), p=2.0, dim=1)


def load_megaloc(path: Path) -> MegaLocNet:
    """The network of the official ``model.safetensors`` (or a ``.pth`` of its state dict);
    the aggregator's sizes are read from the weights."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CbirError("reading .safetensors needs the safetensors package (pip install safetensors)",
                            path) from None
        try:
            state = load_file(str(path))
        except Exception as e:  # the library's own errors for a file that is not safetensors
            raise CbirError(f"not a safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                            path) from None
    else:
        state = load_state_dict(path, "an official MegaLoc checkpoint")
    try:
        score = state["aggregator.agg.score.3.weight"]
        cluster = state["aggregator.agg.cluster_features.3.weight"]
        token = state["aggregator.agg.token_features.2.weight"]
        linear = state["aggregator.linear.weight"]
    except KeyError:
        raise CbirError("not a MegaLoc state dict (no aggregator.agg and aggregator.linear weights)", path) from None
    net = MegaLocNet(int(linear.shape[0]), int(score.shape[0]), int(cluster.shape[0]), int(token.shape[0]),
                     int(score.shape[1]))
    load_into(net, state, "MegaLoc", path)
    return net.eval()


class MegaLoc(WithWeights, GlobalExtractor):
    """MegaLoc descriptors (8,448-D) from the official weights, of the whole image with
    ImageNet normalization (``max_size`` resizes it first)."""

    name = "megaloc"
    weight_files = (WEIGHTS,)
    default_conf = {
        "weights": WEIGHTS.name,
        "weights_dir": None,
        "device": "auto",
        "max_size": None,  # longest edge before extraction (None: the whole image)
    }
    loader_max_size_key = "max_size"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self.device = resolve_device(self.conf["device"])
        path = find_weights(self.conf["weights"], WEIGHTS.describe(), self.conf["weights_dir"])
        self.net = load_megaloc(path).to(self.device)
        self.descriptor_dim = self.net.out_dim

    def default_store_name(self) -> str:
        return self.name if Path(self.conf["weights"]).name == WEIGHTS.name else super().default_store_name()

    @torch.inference_mode()
    def extract(self, image: LoadedImage) -> np.ndarray:
        h, w = image.array.shape[:2]
        if round(h / 14) * round(w / 14) <= self.net.clusters:
            raise ImageSkipped(f"{w} x {h} pixels: MegaLoc needs more 14 x 14 patches than its "
                               f"{self.net.clusters} clusters")
        return self.net(to_tensor(image.array, self.device))[0].float().cpu().numpy()
