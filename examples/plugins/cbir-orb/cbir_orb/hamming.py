"""Mutual nearest neighbours of packed binary descriptors by Hamming distance.

Each descriptor's bits become a vector of +-1, so that one matrix product gives every
pair's agreement ``a = bits - 2 * hamming``: the products of +-1 are integers far below
2^24, exact in float32 whatever the CPU, GPU or BLAS, so ties and thresholds are exact
too. Rows go by tiles of ``block_rows`` (memory bounded for any number of keypoints).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cbir.errors import CbirError
from cbir.matching.base import Matcher, Upload

_EMPTY = (np.zeros((0, 2), np.int32), np.zeros((0,), np.float32))


class HammingMatcher(Matcher):
    """``mutual``: keep mutual nearest neighbours; ``max_distance``: largest Hamming distance
    in bits (None: any); ``ratio``: Lowe's ratio on Hamming distances (None: off)."""

    name = "hamming"
    default_conf = {"mutual": True, "max_distance": None, "ratio": None, "block_rows": 2048}
    runtime_keys = ("block_rows",)
    metric = "Hamming"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        c = self.conf
        if not isinstance(c["mutual"], bool):
            raise CbirError(f"hamming mutual must be true or false, got {c['mutual']!r}")
        if c["max_distance"] is not None and not (isinstance(c["max_distance"], int) and c["max_distance"] >= 0):
            raise CbirError(f"hamming max_distance must be a number of bits >= 0, got {c['max_distance']!r}")
        if c["ratio"] is not None and not (isinstance(c["ratio"], (int, float)) and 0 < c["ratio"] <= 1):
            raise CbirError(f"hamming ratio must be in (0, 1], got {c['ratio']!r}")

    def prepare(self, features: dict[str, np.ndarray], upload: Upload) -> torch.Tensor:
        packed = np.ascontiguousarray(features["descriptors"], dtype=np.uint8)
        signs = np.unpackbits(packed, axis=1).astype(np.float32) * 2 - 1
        return upload(signs)

    def batch(self) -> HammingBatch:
        return HammingBatch(self.conf)


class HammingBatch:
    """Pairs matched as they are added (the interface of :class:`cbir.matching.base.PairBatch`)."""

    def __init__(self, conf: dict[str, Any]):
        self.conf = conf
        self._results: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, signs0: torch.Tensor, signs1: torch.Tensor) -> None:
        self._results.append(match_hamming(signs0, signs1, self.conf))

    def finish(self) -> None:
        return None

    def results(self) -> list[tuple[np.ndarray, np.ndarray]]:
        out, self._results = self._results, []
        return out


@torch.inference_mode()
def match_hamming(signs0: torch.Tensor, signs1: torch.Tensor, conf: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(matches, scores)`` of two images' +-1 bit vectors: matches (M x 2 int32, sorted by
    the first index), scores ``1 - hamming / bits`` (float32). Of equal distances the lowest
    index wins, in both directions."""
    n0, n1 = signs0.shape[0], signs1.shape[0]
    if n0 == 0 or n1 == 0 or (conf["ratio"] is not None and n1 < 2):
        return _EMPTY
    if signs0.shape[1] != signs1.shape[1]:
        raise ValueError(f"descriptor lengths differ: {signs0.shape[1]} and {signs1.shape[1]} bits")
    bits = signs0.shape[1]
    dev = signs0.device
    # agreements (bits - 2 * hamming): the nearest neighbour is the largest
    best = torch.empty(n0, dtype=torch.float32, device=dev)
    second = torch.empty(n0, dtype=torch.float32, device=dev)
    nn01 = torch.empty(n0, dtype=torch.int64, device=dev)
    col_best = torch.full((n1,), -float(bits) - 1, dtype=torch.float32, device=dev)
    col_arg = torch.zeros(n1, dtype=torch.int64, device=dev)
    for r0 in range(0, n0, conf["block_rows"]):
        r1 = min(n0, r0 + conf["block_rows"])
        agree = signs0[r0:r1] @ signs1.T  # integers: exact in float32
        best[r0:r1], nn01[r0:r1] = agree.max(dim=1)  # the first index of equal maxima
        if conf["ratio"] is not None:
            second[r0:r1] = torch.topk(agree, 2, dim=1, sorted=True).values[:, 1]
        if conf["mutual"]:
            cb, cj = agree.max(dim=0)
            better = cb > col_best  # strict: an earlier tile's row keeps a tie
            col_best = torch.where(better, cb, col_best)
            col_arg = torch.where(better, cj + r0, col_arg)
    hamming = (bits - best.double()) / 2  # exact: integers
    keep = torch.ones(n0, dtype=torch.bool, device=dev)
    if conf["mutual"]:
        keep &= col_arg[nn01] == torch.arange(n0, device=dev)
    if conf["max_distance"] is not None:
        keep &= hamming <= conf["max_distance"]
    if conf["ratio"] is not None:
        keep &= hamming < conf["ratio"] * (bits - second.double()) / 2
    i0 = torch.nonzero(keep)[:, 0]
    matches = torch.stack([i0, nn01[i0]], dim=1).to(torch.int32).cpu().numpy()
    scores = (1 - hamming[i0] / bits).to(torch.float32).cpu().numpy()
    return matches, scores
