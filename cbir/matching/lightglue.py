"""LightGlue (Lindenberger, Sarlin and Pollefeys, ICCV 2023) as the official cvg/LightGlue
module computes it: the matcher ``lightglue``.

Keypoints are normalized by the image size (centred, divided by half the longest side) and
encoded by a learned Fourier embedding applied as rotary encodings; descriptors (projected to
256-D when they are smaller) go through 9 layers of self-attention (with the rotary
encodings) and cross-attention (bidirectional, one similarity matrix); after each layer but
the last a confidence per point decides whether to stop (*adaptive depth*: when more than
``depth_confidence`` of the points are confident) and which points to drop (*adaptive
width*: confident points that cannot be matched, ``width_confidence``); the layer where it
stopped gives the assignment (a double softmax of the projected descriptors' similarities
plus each point's matchability), and mutual best matches above ``filter_threshold`` are kept,
scored by the assignment's probability. On the CPU the attention is computed as the official
module computes it there (scaled dot-product attention for self-attention, the explicit
softmax of one similarity matrix for cross-attention, float32); on a CUDA device as it does
there with ``flash`` (half-precision scaled dot-product attention), which prunes points only
from 1,536 keypoints on, as the official thresholds say.

SIFT's weights also encode each keypoint's scale (OpenCV's size) and orientation (radians),
read from the store's ``keypoint_params``; they were trained on LightGlue's SIFT, RootSIFT by
default, so a ``rootsift`` store is their match.

Weights: the released checkpoints (``aliked_lightglue.pth``, ``disk_lightglue.pth``,
``superpoint_lightglue.pth``, ``sift_lightglue.pth``; their layer names of the first release,
``self_attn.N``, renamed as the official loader renames them) and today's ``state_dict()``
load unchanged, looked up by name in ``$CBIR_WEIGHTS`` and ``~/.cache/cbir/weights``, or
given as ``--conf weights=PATH``. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CbirError
from ..models.base import WeightFile, find_weights
from ..models.checkpoints import load_state_dict
from ..validate import check_integer
from .base import Matcher, Upload

PUBLISHED = "https://github.com/cvg/LightGlue/releases (v0.1_arxiv: <features>_lightglue.pth)"
LICENCE = "Apache-2.0"
#: features LightGlue has weights for: their descriptors' dimension
FEATURES = {"aliked": 128, "disk": 128, "superpoint": 256, "sift": 128}
#: features whose keypoints LightGlue encodes with their scale and orientation
WITH_SCALE_ORI = frozenset({"sift"})
#: the extractors whose stores each weight file matches (the released SIFT weights were trained
#: on LightGlue's SIFT, whose default is RootSIFT: ``--local rootsift`` is their match)
EXTRACTOR_FEATURES = {"aliked": "aliked", "disk": "disk", "superpoint": "superpoint", "sift": "sift",
                      "rootsift": "sift"}
WEIGHT_FILES = tuple(WeightFile(f"{f}_lightglue.pth", PUBLISHED, LICENCE) for f in FEATURES)
#: keypoints from which the official module prunes points, by device (``cuda`` with flash)
PRUNING_MIN_KEYPOINTS = {"cpu": -1, "mps": -1, "cuda": 1536}  # the official flash thresholds


def normalize_keypoints(kpts: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Keypoints (B x N x 2) centred on the image (``size``: B x 2, width and height) and
    divided by half its longest side."""
    size = size.to(kpts)
    shift = size / 2
    scale = size.max(-1).values / 2
    return (kpts - shift[..., None, :]) / scale[..., None, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(start_dim=-2)


def apply_rotary(freqs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (t * freqs[0]) + (rotate_half(t) * freqs[1])


class FourierEncoding(nn.Module):
    """The official ``LearnableFourierPositionalEncoding``: cosines and sines of a learned
    projection, each repeated for the two halves of a rotation."""

    def __init__(self, inputs: int, dim: int) -> None:
        super().__init__()
        self.Wr = nn.Linear(inputs, dim // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.Wr(x)
        emb = torch.stack([torch.cos(projected), torch.sin(projected)], 0).unsqueeze(-3)
        return emb.repeat_interleave(2, dim=-1)


def _ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.LayerNorm(2 * dim, elementwise_affine=True), nn.GELU(),
                         nn.Linear(2 * dim, dim))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The official ``Attention``: half-precision on CUDA (its flash path), float32 scaled
    dot-product attention elsewhere. ``mask`` (B x 1 x 1 x keys, True: taking part) leaves
    out the padding of a batch of pairs."""
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q.half().contiguous(), k.half().contiguous(),
                                              v.half().contiguous(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask)


def _key_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """B x L points taking part -> the B x 1 x 1 x L mask of the keys of an attention."""
    return None if valid is None else valid[:, None, None, :]


class SelfBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.Wqkv = nn.Linear(dim, 3 * dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)
        self.ffn = _ffn(dim)

    def forward(self, x: torch.Tensor, encoding: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.Wqkv(x).unflatten(-1, (self.heads, -1, 3)).transpose(1, 2)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        context = _attention(apply_rotary(encoding, q), apply_rotary(encoding, k), v, _key_mask(valid))
        message = self.out_proj(context.transpose(1, 2).flatten(start_dim=-2))
        return x + self.ffn(torch.cat([x, message], -1))


class CrossBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qk = nn.Linear(dim, dim, bias=True)
        self.to_v = nn.Linear(dim, dim, bias=True)
        self.to_out = nn.Linear(dim, dim, bias=True)
        self.ffn = _ffn(dim)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, valid0: torch.Tensor | None = None,
                valid1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        qk0, qk1 = heads(self.to_qk(x0)), heads(self.to_qk(x1))
        v0, v1 = heads(self.to_v(x0)), heads(self.to_v(x1))
        if qk0.device.type == "cuda":  # the official flash path: one attention each way
            m0, m1 = _attention(qk0, qk1, v1, _key_mask(valid1)), _attention(qk1, qk0, v0, _key_mask(valid0))
        else:  # one similarity matrix, softmax along each side
            qk0, qk1 = qk0 * self.scale ** 0.5, qk1 * self.scale ** 0.5
            sim = torch.einsum("bhid, bhjd -> bhij", qk0, qk1)
            sim10 = sim.transpose(-2, -1).contiguous()
            if valid0 is not None and valid1 is not None:  # padding is no key (padded queries keep finite rows)
                sim = sim.masked_fill(~valid1[:, None, None, :], -float("inf"))
                sim10 = sim10.masked_fill(~valid0[:, None, None, :], -float("inf"))
            attn01 = F.softmax(sim, dim=-1)
            attn10 = F.softmax(sim10, dim=-1)
            m0 = torch.einsum("bhij, bhjd -> bhid", attn01, v1)
            m1 = torch.einsum("bhji, bhjd -> bhid", attn10.transpose(-2, -1), v0)
        m0 = self.to_out(m0.transpose(1, 2).flatten(start_dim=-2))
        m1 = self.to_out(m1.transpose(1, 2).flatten(start_dim=-2))
        return x0 + self.ffn(torch.cat([x0, m0], -1)), x1 + self.ffn(torch.cat([x1, m1], -1))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = SelfBlock(dim, heads)
        self.cross_attn = CrossBlock(dim, heads)

    def forward(self, desc0: torch.Tensor, desc1: torch.Tensor, enc0: torch.Tensor, enc1: torch.Tensor,
                valid0: torch.Tensor | None = None,
                valid1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn(self.self_attn(desc0, enc0, valid0), self.self_attn(desc1, enc1, valid1),
                               valid0, valid1)


class MatchAssignment(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.matchability = nn.Linear(dim, 1, bias=True)
        self.final_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, desc0: torch.Tensor, desc1: torch.Tensor) -> torch.Tensor:
        """The log assignment matrix (B x (M+1) x (N+1)), the last row and column the
        log-probabilities of staying unmatched."""
        mdesc0, mdesc1 = self.final_proj(desc0), self.final_proj(desc1)
        d = mdesc0.shape[-1]
        mdesc0, mdesc1 = mdesc0 / d ** 0.25, mdesc1 / d ** 0.25
        sim = torch.einsum("bmd,bnd->bmn", mdesc0, mdesc1)
        z0, z1 = self.matchability(desc0), self.matchability(desc1)
        b, m, n = sim.shape
        certainties = F.logsigmoid(z0) + F.logsigmoid(z1).transpose(1, 2)
        scores0 = F.log_softmax(sim, 2)
        scores1 = F.log_softmax(sim.transpose(-1, -2).contiguous(), 2).transpose(-1, -2)
        scores = sim.new_full((b, m + 1, n + 1), 0)
        scores[:, :m, :n] = scores0 + scores1 + certainties
        scores[:, :-1, -1] = F.logsigmoid(-z0.squeeze(-1))
        scores[:, -1, :-1] = F.logsigmoid(-z1.squeeze(-1))
        return scores

    def matchability_of(self, desc: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.matchability(desc)).squeeze(-1)


class TokenConfidence(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Sequential(nn.Linear(dim, 1), nn.Sigmoid())

    def forward(self, desc0: torch.Tensor, desc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token(desc0).squeeze(-1), self.token(desc1).squeeze(-1)


def filter_matches(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual best matches of a log assignment matrix whose probability exceeds
    ``threshold``: for each point of image 0, its match in image 1 (-1: none) and the
    probability (0: none)."""
    max0, max1 = scores[:, :-1, :-1].max(2), scores[:, :-1, :-1].max(1)
    m0, m1 = max0.indices, max1.indices
    indices0 = torch.arange(m0.shape[1], device=m0.device)[None]
    mutual0 = indices0 == m1.gather(1, m0)
    mscores0 = torch.where(mutual0, max0.values.exp(), max0.values.new_tensor(0))
    valid0 = mutual0 & (mscores0 > threshold)
    return torch.where(valid0, m0, -1), mscores0


class LightGlueNet(nn.Module):
    """The official ``LightGlue`` module's layers, parameter for parameter."""

    def __init__(self, input_dim: int, dim: int = 256, heads: int = 4, layers: int = 9, scale_ori: bool = False):
        super().__init__()
        self.dim, self.layers, self.scale_ori = dim, layers, scale_ori
        self.input_proj: nn.Module = nn.Linear(input_dim, dim, bias=True) if input_dim != dim else nn.Identity()
        self.posenc = FourierEncoding(2 + 2 * scale_ori, dim // heads)
        self.transformers = nn.ModuleList([TransformerLayer(dim, heads) for _ in range(layers)])
        self.log_assignment = nn.ModuleList([MatchAssignment(dim) for _ in range(layers)])
        self.token_confidence = nn.ModuleList([TokenConfidence(dim) for _ in range(layers - 1)])
        thresholds = [float(np.clip(0.8 + 0.1 * np.exp(-4.0 * i / layers), 0, 1)) for i in range(layers)]
        self.register_buffer("confidence_thresholds", torch.tensor(thresholds, dtype=torch.float32))

    def forward(self, kpts0: torch.Tensor, kpts1: torch.Tensor, desc0: torch.Tensor, desc1: torch.Tensor,
                size0: torch.Tensor, size1: torch.Tensor, depth_confidence: float, width_confidence: float,
                filter_threshold: float, scale_ori0: torch.Tensor | None = None,
                scale_ori1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One pair (batch of 1): for each keypoint of image 0 its match in image 1 (-1: none)
        and the match's probability, and the number of layers run. ``scale_ori``: each
        keypoint's scale and orientation (radians), for weights that encode them (SIFT's)."""
        m, n = kpts0.shape[1], kpts1.shape[1]
        device = kpts0.device
        desc0, desc1, enc0, enc1 = self._embed(kpts0, kpts1, desc0, desc1, size0, size1, scale_ori0, scale_ori1)
        thresholds: torch.Tensor = self.confidence_thresholds  # type: ignore[assignment]  # a buffer
        prune = width_confidence > 0
        min_points = PRUNING_MIN_KEYPOINTS.get(device.type, -1)
        ind0 = torch.arange(m, device=device)[None]
        ind1 = torch.arange(n, device=device)[None]
        layer = 0
        for layer in range(self.layers):
            if desc0.shape[1] == 0 or desc1.shape[1] == 0:
                break
            desc0, desc1 = self.transformers[layer](desc0, desc1, enc0, enc1)
            if layer == self.layers - 1:
                continue  # no early stop or pruning after the last layer
            token0 = token1 = None
            if depth_confidence > 0:
                token0, token1 = self.token_confidence[layer](desc0, desc1)
                confident = torch.cat([token0[..., :m], token1[..., :n]], -1)
                ratio = 1.0 - (confident < thresholds[layer]).float().sum() / (m + n)
                if ratio > depth_confidence:
                    break
            if prune and desc0.shape[-2] > min_points:
                keep0 = torch.where(self._kept(layer, desc0, token0, width_confidence))[1]
                ind0, desc0 = ind0.index_select(1, keep0), desc0.index_select(1, keep0)
                enc0 = enc0.index_select(-2, keep0)
            if prune and desc1.shape[-2] > min_points:
                keep1 = torch.where(self._kept(layer, desc1, token1, width_confidence))[1]
                ind1, desc1 = ind1.index_select(1, keep1), desc1.index_select(1, keep1)
                enc1 = enc1.index_select(-2, keep1)
        matches = torch.full((1, m), -1, dtype=torch.long, device=device)
        probability = torch.zeros((1, m), device=device)
        if desc0.shape[1] == 0 or desc1.shape[1] == 0:
            return matches, probability, layer + 1
        m0, mscores0 = filter_matches(self.log_assignment[layer](desc0, desc1), filter_threshold)
        matches[:, ind0[0]] = torch.where(m0 == -1, -1, ind1.gather(1, m0.clamp(min=0)))
        probability[:, ind0[0]] = mscores0
        return matches, probability, layer + 1

    def _embed(self, kpts0: torch.Tensor, kpts1: torch.Tensor, desc0: torch.Tensor, desc1: torch.Tensor,
               size0: torch.Tensor, size1: torch.Tensor, scale_ori0: torch.Tensor | None,
               scale_ori1: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The descriptors projected and the keypoints' rotary encodings, of both images."""
        kpts0, kpts1 = normalize_keypoints(kpts0, size0), normalize_keypoints(kpts1, size1)
        if self.scale_ori:
            if scale_ori0 is None or scale_ori1 is None:
                raise CbirError("these LightGlue weights encode keypoints with their scale and orientation: "
                                "features without them cannot be matched")
            kpts0, kpts1 = torch.cat([kpts0, scale_ori0], -1), torch.cat([kpts1, scale_ori1], -1)
        return self.input_proj(desc0), self.input_proj(desc1), self.posenc(kpts0), self.posenc(kpts1)

    def forward_padded(self, kpts0: torch.Tensor, kpts1: torch.Tensor, desc0: torch.Tensor, desc1: torch.Tensor,
                       size0: torch.Tensor, size1: torch.Tensor, len0: torch.Tensor, len1: torch.Tensor,
                       depth_confidence: float, filter_threshold: float, scale_ori0: torch.Tensor | None = None,
                       scale_ori1: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """B pairs together, each padded to the longest (``len0``, ``len1``: each pair's
        keypoints, at least one each), without pruning: per pair what :meth:`forward` gives
        it with ``width_confidence`` off. Each pair stops at its own layer (its confidence
        counted over its own points) and leaves the batch; the padding takes no part in any
        attention. Equal to one pair at a time up to float rounding (other kernel shapes)."""
        batch, m, n = kpts0.shape[0], kpts0.shape[1], kpts1.shape[1]
        device = kpts0.device
        valid0 = torch.arange(m, device=device)[None] < len0[:, None]
        valid1 = torch.arange(n, device=device)[None] < len1[:, None]
        desc0, desc1, enc0, enc1 = self._embed(kpts0, kpts1, desc0, desc1, size0, size1, scale_ori0, scale_ori1)
        thresholds: torch.Tensor = self.confidence_thresholds  # type: ignore[assignment]  # a buffer
        out: list[tuple[torch.Tensor, torch.Tensor, int] | None] = [None] * batch
        pairs = torch.arange(batch, device=device)  # the batch's pairs still running
        lengths = (len0 + len1).float()
        for layer in range(self.layers):
            desc0, desc1 = self.transformers[layer](desc0, desc1, enc0, enc1, valid0, valid1)
            if layer == self.layers - 1:
                stop = torch.ones(len(pairs), dtype=torch.bool, device=device)
            elif depth_confidence > 0:
                token0, token1 = self.token_confidence[layer](desc0, desc1)
                threshold = thresholds[layer]
                unconfident = ((token0 < threshold) & valid0).sum(1) + ((token1 < threshold) & valid1).sum(1)
                stop = (1.0 - unconfident.float() / lengths) > depth_confidence
            else:
                continue
            stopped = torch.where(stop)[0].tolist()
            for k in stopped:
                a, b = int(len0[k]), int(len1[k])
                m0, p0 = filter_matches(self.log_assignment[layer](desc0[k:k + 1, :a], desc1[k:k + 1, :b]),
                                        filter_threshold)
                out[int(pairs[k])] = (m0[0], p0[0], layer + 1)
            if len(stopped) == len(pairs):
                break
            if stopped:
                go = torch.where(~stop)[0]
                pairs, desc0, desc1, valid0, valid1 = (t.index_select(0, go) for t in (pairs, desc0, desc1, valid0,
                                                                                      valid1))
                len0, len1, lengths = len0.index_select(0, go), len1.index_select(0, go), lengths.index_select(0, go)
                enc0, enc1 = enc0.index_select(1, go), enc1.index_select(1, go)
        assert all(o is not None for o in out)  # every pair stops at the last layer at the latest
        return out  # type: ignore[return-value]  # no None left

    def _kept(self, layer: int, desc: torch.Tensor, token: torch.Tensor | None,
              width_confidence: float) -> torch.Tensor:
        """The official pruning mask: points that may still be matched, and the unconfident."""
        assignment: MatchAssignment = self.log_assignment[layer]  # type: ignore[assignment]  # a ModuleList item
        keep = assignment.matchability_of(desc) > (1 - width_confidence)
        if token is not None:
            keep |= token <= self.confidence_thresholds[layer]  # type: ignore[index]
        return keep


def load_lightglue(path: Path, features: str) -> LightGlueNet:
    """The network of a LightGlue checkpoint for ``features``: the released files (layer
    names of the first release renamed as the official loader renames them) or a
    ``state_dict()`` of today's module; every parameter must be there."""
    state = load_state_dict(path, "a LightGlue checkpoint")
    layers = 1 + max((int(k.split(".")[1]) for k in state if k.startswith(("transformers.", "self_attn."))),
                     default=-1)
    if not layers:
        raise CbirError("not a LightGlue checkpoint (no transformer layers)", path)
    for i in range(layers):  # the first release's names
        state = {k.replace(f"self_attn.{i}", f"transformers.{i}.self_attn")
                 .replace(f"cross_attn.{i}", f"transformers.{i}.cross_attn"): v for k, v in state.items()}
    proj = state.get("input_proj.weight")
    dim = int(state["log_assignment.0.final_proj.weight"].shape[0]) if "log_assignment.0.final_proj.weight" in state \
        else 256
    input_dim = int(proj.shape[1]) if proj is not None else dim
    if input_dim != FEATURES[features]:
        raise CbirError(f"its descriptors have {input_dim} dimensions: these weights are not those of "
                        f"{features} ({FEATURES[features]})", path)
    wr = state.get("posenc.Wr.weight")
    heads = dim // (2 * int(wr.shape[0])) if wr is not None else 4
    scale_ori = wr is not None and int(wr.shape[1]) == 4
    if scale_ori != (features in WITH_SCALE_ORI):
        raise CbirError(f"these weights encode keypoints {'with' if scale_ori else 'without'} scale and orientation: "
                        f"they are not those of {features}", path)
    net = LightGlueNet(input_dim, dim, heads, layers, scale_ori)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "confidence_thresholds"]  # a buffer the first release lacks
    if missing or unexpected:
        raise CbirError(f"weights do not fit LightGlue: missing {missing[:3]}, unexpected {unexpected[:3]}", path)
    return net.eval()


class LightGlue(Matcher):
    """The matcher ``lightglue``: the official defaults (adaptive depth 0.95 and width 0.99,
    ``-1`` turns either off; match threshold 0.1); the features' weights chosen by the
    extractor of the local-feature store (``features``: ``auto``), or named."""

    name = "lightglue"
    default_conf = {
        "features": "auto",
        "weights": None,  # default: <features>_lightglue.pth, looked up as extractors' weights are
        "depth_confidence": 0.95,
        "width_confidence": 0.99,
        "filter_threshold": 0.1,
        # pairs matched together where no point would be pruned (a GPU below 1,536 keypoints, or
        # width_confidence -1), padded to the longest; 1: one by one. Not the official module's
        # batching, which stops a batch only when all its pairs are confident: each pair stops
        # at its own layer here, as alone
        "batch_size": 16,
        "weights_dir": None,
    }
    columns: tuple[str, ...] = ("descriptors",)
    runtime_keys = ("weights_dir", "batch_size")
    weight_files: ClassVar[tuple[WeightFile, ...]] = WEIGHT_FILES

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        features = self.conf["features"]
        if features != "auto" and features not in FEATURES:
            raise CbirError(f"LightGlue has no weights for {features!r} features (known: {', '.join(FEATURES)})")
        check_integer("lightglue batch_size", self.conf["batch_size"], 1)
        for key in ("depth_confidence", "width_confidence", "filter_threshold"):
            if not isinstance(self.conf[key], (int, float)) or isinstance(self.conf[key], bool):
                raise CbirError(f"lightglue {key} must be a number, got {self.conf[key]!r}")
        self.net: LightGlueNet | None = None

    def check_features(self, store: Any) -> None:
        super().check_features(store)
        extractor = str(store.config.get("extractor", ""))
        if self.conf["features"] == "auto":
            if extractor not in EXTRACTOR_FEATURES:
                raise CbirError(f"LightGlue has no weights for features of {extractor or 'an unknown extractor'!r} "
                                f"(it has for {', '.join(EXTRACTOR_FEATURES)}); name them with --conf features=NAME "
                                "if these are such features", store.path)
            self.conf["features"] = EXTRACTOR_FEATURES[extractor]
        dim = store.attrs.get("descriptor_dim")
        if dim is not None and int(dim) != FEATURES[self.conf["features"]]:
            raise CbirError(f"descriptors of {dim} dimensions: LightGlue's {self.conf['features']} weights take "
                            f"{FEATURES[self.conf['features']]}", store.path)
        if self.conf["features"] in WITH_SCALE_ORI:
            params = str(store.attrs.get("keypoint_params", ""))
            if params != "scale,orientation":
                raise CbirError(f"LightGlue's {self.conf['features']} weights encode each keypoint's scale and "
                                f"orientation, which these features do not have (keypoint_params {params!r})",
                                store.path)
            self.columns = ("descriptors", "keypoint_params")

    def identity(self) -> dict[str, Any]:
        conf = super().identity()
        conf["weights"] = Path(self.conf["weights"]).name if self.conf["weights"] else \
            f"{self.conf['features']}_lightglue.pth"
        return conf

    def network(self, device: torch.device) -> LightGlueNet:
        """The network, loaded once, on ``device``."""
        if self.conf["features"] == "auto":
            raise CbirError("LightGlue: the features are not known yet (check_features first, or --conf features=)")
        if self.net is None:
            name = self.conf["weights"] or f"{self.conf['features']}_lightglue.pth"
            path = find_weights(name, WeightFile(Path(name).name, PUBLISHED, LICENCE).describe(),
                                self.conf["weights_dir"])
            self.net = load_lightglue(path, self.conf["features"])
        return self.net.to(device)

    def prepare(self, features: dict[str, np.ndarray], upload: Upload) -> Any:
        kpts = upload(np.ascontiguousarray(features["keypoints"], dtype=np.float32))
        desc = upload(np.ascontiguousarray(features["descriptors"], dtype=np.float32))
        size = features.get("image_sizes")
        if size is None or np.min(size) <= 0:  # unknown: the official default, the keypoints' extent
            k = features["keypoints"]
            size = (1 + k.max(0) - k.min(0)) if len(k) else np.ones(2)
        scale_ori = None
        if "keypoint_params" in features:  # SIFT's: OpenCV's size and angle in degrees, as LightGlue's SIFT has them
            params = np.asarray(features["keypoint_params"], dtype=np.float32)
            scale_ori = upload(np.ascontiguousarray(np.stack([params[:, 0], np.deg2rad(params[:, 1])], -1)))
        return kpts, desc, torch.as_tensor(np.asarray(size, dtype=np.float32), device=kpts.device), scale_ori

    def batch(self) -> _Batch:
        return _Batch(self)


class _Batch:
    """Pairs matched ``batch_size`` at a time where no point would be pruned (on a GPU below
    the official 1,536 keypoints, or with ``width_confidence`` off), sorted by size and padded
    to the longest of each batch (:meth:`LightGlueNet.forward_padded`); the others one by one,
    as the official module matches them. Emptied by :meth:`results`."""

    def __init__(self, matcher: LightGlue) -> None:
        self.matcher = matcher
        self._results: list[tuple[np.ndarray, np.ndarray] | None] = []
        self._queued: list[tuple[int, Any, Any]] = []

    def add(self, features0: Any, features1: Any) -> None:
        self._results.append(None)
        if self._batched(features0[0], features1[0]):
            self._queued.append((len(self._results) - 1, features0, features1))
        else:
            self._results[-1] = self._one(features0, features1)

    def _batched(self, kpts0: torch.Tensor, kpts1: torch.Tensor) -> bool:
        conf = self.matcher.conf
        if conf["batch_size"] <= 1 or not len(kpts0) or not len(kpts1):
            return False
        pruned_from = PRUNING_MIN_KEYPOINTS.get(kpts0.device.type, -1)
        return conf["width_confidence"] <= 0 or max(len(kpts0), len(kpts1)) <= pruned_from

    @torch.inference_mode()
    def _one(self, features0: Any, features1: Any) -> tuple[np.ndarray, np.ndarray]:
        (k0, d0, s0, o0), (k1, d1, s1, o1) = features0, features1
        net = self.matcher.network(k0.device)
        conf = self.matcher.conf
        m0, p0, _ = net(k0[None], k1[None], d0[None], d1[None], s0[None], s1[None], conf["depth_confidence"],
                        conf["width_confidence"], conf["filter_threshold"],
                        None if o0 is None else o0[None], None if o1 is None else o1[None])
        return _matches(m0[0], p0[0])

    @torch.inference_mode()
    def finish(self) -> None:
        queued = sorted(self._queued, key=lambda q: (len(q[1][0]), len(q[2][0])))
        self._queued = []
        size = int(self.matcher.conf["batch_size"])
        for start in range(0, len(queued), size):
            group = queued[start:start + size]
            net = self.matcher.network(group[0][1][0].device)
            first = [g[1] for g in group]
            second = [g[2] for g in group]

            def padded(items: list[Any], i: int) -> torch.Tensor | None:
                if items[0][i] is None:
                    return None
                return torch.nn.utils.rnn.pad_sequence([it[i] for it in items], batch_first=True)

            len0 = torch.tensor([len(f[0]) for f in first], device=group[0][1][0].device)
            len1 = torch.tensor([len(f[0]) for f in second], device=group[0][1][0].device)
            conf = self.matcher.conf
            out = net.forward_padded(padded(first, 0), padded(second, 0),  # type: ignore[arg-type]  # never None
                                     padded(first, 1), padded(second, 1),  # type: ignore[arg-type]
                                     torch.stack([f[2] for f in first]), torch.stack([f[2] for f in second]),
                                     len0, len1, conf["depth_confidence"], conf["filter_threshold"],
                                     padded(first, 3), padded(second, 3))
            for (index, _, _), (m0, p0, _) in zip(group, out, strict=True):
                self._results[index] = _matches(m0, p0)

    def results(self) -> list[tuple[np.ndarray, np.ndarray]]:
        self.finish()
        out, self._results = self._results, []
        assert all(r is not None for r in out)  # finish() matched every queued pair
        return out  # type: ignore[return-value]  # no None left


def _matches(m0: torch.Tensor, p0: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One pair's matches (M x 2 int32) and probabilities from the official ``matches0`` and
    ``matching_scores0`` of image 0."""
    valid = torch.where(m0 > -1)[0]
    return torch.stack([valid, m0[valid]], -1).to(torch.int32).cpu().numpy(), p0[valid].float().cpu().numpy()
