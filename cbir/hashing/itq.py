"""``itq``: PCA followed by iterative quantization (Gong and Lazebnik, "Iterative Quantization:
A Procrustean Approach to Learning Binary Codes", CVPR 2011; TPAMI 2013).

The centred descriptors are projected on their ``B`` leading principal directions (``V``);
a rotation ``R`` (random orthogonal at first, seeded) then alternates ``B = sign(V R)`` and
the orthogonal Procrustes solution ``R = S' S^T`` of the SVD ``B^T V = S Omega S'^T`` for
``iterations`` rounds (50, the paper's), which lowers the quantization loss ``||B - V R||^2``
at every step. The code is ``sign(V R)``: ``projection = P R``. faiss's ``ITQTransform`` is
the same method (tests/test_hashing.py compares the two).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CbirError
from ..validate import check_integer
from .base import Hasher


class ITQ(Hasher):
    name = "itq"
    default_conf = {"iterations": 50}

    def _fit(self, x: np.ndarray, bits: int, labels: np.ndarray | None, seed: int,
             pairs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        check_integer("itq iterations", self.conf["iterations"], 0)
        if bits > x.shape[1]:
            raise CbirError(f"itq: {bits} bits from {x.shape[1]}-D descriptors (PCA keeps at most as many bits as "
                            "dimensions)")
        mean = x.mean(0, dtype=np.float64)
        centred = x.astype(np.float64) - mean
        # principal directions: eigenvectors of the covariance, largest eigenvalues first
        values, vectors = np.linalg.eigh(centred.T @ centred)
        pca = vectors[:, np.argsort(values)[::-1][:bits]]
        v = centred @ pca
        rng = np.random.default_rng(seed)
        r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
        losses = []
        for _ in range(int(self.conf["iterations"])):
            b = np.where(v @ r >= 0, 1.0, -1.0)
            losses.append(float(((b - v @ r) ** 2).sum()))
            s, _, s2t = np.linalg.svd(b.T @ v)
            r = (s @ s2t).T
        b = np.where(v @ r >= 0, 1.0, -1.0)
        final = float(((b - v @ r) ** 2).sum())
        return mean, pca @ r, np.zeros(bits), {"quantization_loss": final,
                                               "first_loss": losses[0] if losses else final}
