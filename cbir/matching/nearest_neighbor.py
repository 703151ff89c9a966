"""Mutual nearest-neighbour matching of L2-normalized descriptors, on torch.

The similarity of a pair is computed once, in blocks of rows of the first image, so a
20k x 20k pair never holds more than ``block_rows x K1`` similarities: each block
yields the row-wise best two (nearest neighbour and the ratio test's second) and
updates a running column-wise best (the reverse nearest neighbour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MatcherConf:
    """``ratio``: Lowe's ratio on L2 distances (None: off); ``max_distance``: L2 distance
    bound (None: off); ``mutual``: keep only mutual nearest neighbours."""

    mutual: bool = True
    ratio: float | None = None
    max_distance: float | None = None
    block_elements: int = 1 << 25  # similarities per block (128 MiB of float32)


def as_unit_tensor(desc: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 on ``device``, rows L2-normalized (stores may hold raw SIFT histograms)."""
    t = torch.as_tensor(np.asarray(desc) if not isinstance(desc, torch.Tensor) else desc)
    t = t.to(device=device, dtype=torch.float32)
    return torch.nn.functional.normalize(t, dim=1)


@torch.inference_mode()
def match_descriptors(d0: torch.Tensor, d1: torch.Tensor,
                      conf: MatcherConf = MatcherConf()) -> tuple[np.ndarray, np.ndarray]:
    """Match unit descriptors ``d0`` (K0 x D) to ``d1`` (K1 x D).

    Returns ``matches`` (M, 2) int32 (index in d0, index in d1), sorted by the index in
    d0, and ``scores`` (M,) float32 cosine similarities.
    """
    n0, n1 = d0.shape[0], d1.shape[0]
    if n0 == 0 or n1 == 0 or (conf.ratio is not None and n1 < 2):
        return np.zeros((0, 2), np.int32), np.zeros((0,), np.float32)
    if d0.shape[1] != d1.shape[1]:
        raise ValueError(f"descriptor dimensions differ: {d0.shape[1]} and {d1.shape[1]}")
    k = 2 if conf.ratio is not None else 1
    best = torch.empty((n0, k), dtype=torch.float32, device=d0.device)
    nn01 = torch.empty((n0,), dtype=torch.int64, device=d0.device)
    col_best = torch.full((n1,), -torch.inf, dtype=torch.float32, device=d0.device)
    nn10 = torch.zeros((n1,), dtype=torch.int64, device=d0.device)
    rows = max(1, conf.block_elements // n1)
    d1t = d1.t().contiguous()
    for r0 in range(0, n0, rows):
        r1 = min(n0, r0 + rows)
        sim = torch.mm(d0[r0:r1], d1t)
        if k == 1:
            vals, idx = sim.max(dim=1)
            best[r0:r1, 0] = vals
        else:
            vals, idxs = sim.topk(2, dim=1)
            best[r0:r1] = vals
            idx = idxs[:, 0]
        nn01[r0:r1] = idx
        if conf.mutual:
            cvals, cidx = sim.max(dim=0)
            better = cvals > col_best  # strict: the first row wins ties, as argmax does
            col_best = torch.where(better, cvals, col_best)
            nn10 = torch.where(better, cidx + r0, nn10)
    keep = torch.ones(n0, dtype=torch.bool, device=d0.device)
    if conf.mutual:
        keep &= nn10[nn01] == torch.arange(n0, device=d0.device)
    if conf.ratio is not None:
        # squared L2 distances of unit vectors: 2 - 2 cos
        keep &= (2 - 2 * best[:, 0]) < conf.ratio ** 2 * (2 - 2 * best[:, 1])
    if conf.max_distance is not None:
        keep &= (2 - 2 * best[:, 0]) <= conf.max_distance ** 2
    i0 = keep.nonzero()[:, 0]
    matches = torch.stack([i0, nn01[i0]], dim=1)
    return matches.to(torch.int32).cpu().numpy(), best[i0, 0].cpu().numpy()
