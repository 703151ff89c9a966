"""What every hashing method is: a name, a configuration merged over ``default_conf``
(unknown keys refused), and :meth:`Hasher.fit`, which learns a
:class:`~cbir.hashing.model.HashModel` from descriptors (and labels, for supervised ones)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import CbirError
from ..validate import merged_conf
from .model import HashModel, check_bits, fingerprint


class Hasher:
    name: ClassVar[str]
    default_conf: ClassVar[dict[str, Any]] = {}
    #: whether :meth:`fit` needs labels
    supervised: ClassVar[bool] = False

    def __init__(self, conf: dict[str, Any] | None = None):
        self.conf = merged_conf(self.name, self.default_conf, conf)

    #: whether a supervised method can learn from pairs alone (a similarity matrix, no labels)
    pairs_only: ClassVar[bool] = True

    def fit(self, x: np.ndarray, bits: int, labels: np.ndarray | None = None, seed: int = 0,
            similar: np.ndarray | None = None) -> HashModel:
        """A hash function of ``bits`` bits learned from descriptors ``x`` (N x D float) and,
        for supervised methods, ``labels`` (N x L booleans: two items are similar when they
        share a label) or ``similar`` (N x N booleans: which pairs are similar, from poses)."""
        check_bits(bits)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
            raise CbirError(f"training descriptors must be a finite N x D matrix with N >= 2, got shape {x.shape}")
        if self.supervised and similar is not None and labels is None:
            if not self.pairs_only:
                raise CbirError(f"{self.name} learns from labels (its classifier needs them), not from pairs alone")
            similar = np.asarray(similar, dtype=bool)
            if similar.shape != (len(x), len(x)):
                raise CbirError(f"a similarity matrix of shape {similar.shape} for {len(x)} descriptors")
            labels = similar  # row i: the items similar to i; pairwise methods read it as the pairs' matrix
        elif self.supervised:
            if labels is None:
                raise CbirError(f"{self.name} is supervised: it needs labels (--labels FILE) or poses (--poses)")
            labels = np.asarray(labels, dtype=bool)
            if labels.shape[0] != len(x):
                raise CbirError(f"{len(labels)} label rows for {len(x)} descriptors")
            if not labels.any(axis=1).all():
                raise CbirError("every training item needs at least one label")
            similar = None
        mean, projection, thresholds, extra = self._fit(x, bits, labels, seed, similar is not None)
        frequencies = extra.pop("frequencies", None)
        trained = fingerprint(x) if labels is None else fingerprint(np.hstack([x, labels.astype(np.float32)]))
        return HashModel(self.name, {**self.conf, "seed": seed}, np.asarray(mean, np.float64),
                         np.asarray(projection, np.float64), np.asarray(thresholds, np.float64), trained, extra,
                         None if frequencies is None else np.asarray(frequencies, np.float64))

    def _fit(self, x: np.ndarray, bits: int, labels: np.ndarray | None, seed: int,
             pairs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """``mean`` (D,), ``projection`` (D x B), ``thresholds`` (B,) and what else to record
        (``frequencies`` (B,) there makes the bits periodic: :class:`HashModel`); with
        ``pairs``, ``labels`` is the N x N matrix of similar pairs."""
        raise NotImplementedError


def similarity(labels: np.ndarray) -> np.ndarray:
    """N x N: 1 where two items share at least one label, else 0 (float32)."""
    y = np.asarray(labels, dtype=np.float32)
    return (y @ y.T > 0).astype(np.float32)
