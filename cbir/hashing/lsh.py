"""``lsh``: sign random projections (Charikar, 2002), centred on the training mean: each bit
is the side of a random hyperplane through the mean, the projections drawn from a seeded
normal distribution. Unsupervised; the data only gives the centre."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Hasher


class LSH(Hasher):
    name = "lsh"

    def _fit(self, x: np.ndarray, bits: int, labels: np.ndarray | None, seed: int,
             pairs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng(seed)
        return x.mean(0, dtype=np.float64), rng.standard_normal((x.shape[1], bits)), np.zeros(bits), {}
