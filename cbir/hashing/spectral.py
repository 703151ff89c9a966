"""``spectral``: spectral hashing (Weiss, Torralba and Fergus, "Spectral Hashing", NeurIPS 2008).

The centred descriptors are projected on their leading ``min(B, D)`` principal directions;
along each direction ``d``, over the training range ``[a_d, a_d + R_d]``, the eigenfunctions of
the Laplacian of a uniform distribution are ``cos(k pi (u_d - a_d) / R_d)``, k = 1, 2, ...,
with eigenvalues growing as ``(k / R_d)^2``. The ``B`` bits are the ``B`` eigenfunctions of
smallest eigenvalue over all directions (the authors' ``trainSH.m``: the modes ``k`` up to
``ceil((B + 1) R_d / max R)`` per direction, ordered by ``sum (k pi / R_d)^2``, ties by
direction then ``k``), bit ``j`` being ``cos(k_j pi (u_{d_j} - a_{d_j}) / R_{d_j}) > 0``.

The model stores, per bit, its direction as a column of ``projection``, ``a`` as its
threshold, and ``k / R`` as its frequency (formats/SPEC.md 7a). The cosine's sign is taken
from ``t = (u - a) k / R`` by ``floor`` arithmetic (``t mod 2`` below 1/2 or above 3/2), not
by a ``cos`` call, whose last bits differ between maths libraries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Hasher


class SpectralHashing(Hasher):
    name = "spectral"

    def _fit(self, x: np.ndarray, bits: int, labels: np.ndarray | None, seed: int,
             pairs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        mean = x.mean(0, dtype=np.float64)
        centred = x.astype(np.float64) - mean
        values, vectors = np.linalg.eigh(centred.T @ centred)
        npca = min(bits, x.shape[1])
        pca = vectors[:, np.argsort(values, kind="stable")[::-1][:npca]]
        u = centred @ pca
        eps = np.finfo(np.float64).eps
        low, high = u.min(0) - eps, u.max(0) + eps
        spans = high - low
        max_mode = np.ceil((bits + 1) * spans / spans.max()).astype(int)
        # every (direction, k) with k from 1 to max_mode - 1, ordered by its eigenvalue
        candidates = [((k * math.pi / spans[d]) ** 2, d, k) for d in range(npca) for k in range(1, max_mode[d])]
        chosen = sorted(candidates)[:bits]
        if len(chosen) < bits:  # a direction of zero spread: no mode there
            from ..errors import CbirError

            raise CbirError(f"spectral: only {len(chosen)} modes for {bits} bits (the descriptors vary along too few "
                            "directions)")
        dims = np.array([d for _, d, _ in chosen])
        ks = np.array([k for _, _, k in chosen], np.float64)
        return mean, pca[:, dims], low[dims], {"frequencies": ks / spans[dims],
                                               "modes": [[int(d), int(k)] for _, d, k in chosen]}
