"""Late fusion of the similarities of several global descriptors.

The operators and their defaults are those of the paper and of kapture-localization
1.1.10 (``image_retrieval/fusion.py``), whose names are accepted as aliases, so that
the same options give the same fused scores. With ``n`` descriptors, weights ``w_i``
normalized to sum to 1 (default equal) and similarities ``s_i``:

=================  ===============================================================
gharm              ``1 / sum_i((1/n) / (gamma + w_i s_i)) - gamma``, gamma 0.5
harmonic_mean      ``1 / sum_i((1/n) / (w_i s_i))``
mean               ``sum_i w_i s_i``
power              ``prod_i s_i ** w_i``
mean_and_power     ``gamma * mean + (1 - gamma) * power``, gamma 0.5
mean_and_min       ``gamma * mean + (1 - gamma) * min``, gamma 0.5
min_and_max        ``alpha * min + (1 - alpha) * max``, alpha 0.5
villena_roman      ``(1 - alpha) * max + alpha * min**2 / (max + min)``, alpha 0.5
min, max           ``min_i s_i``, ``max_i s_i``
round_robin        not a score: each descriptor's ranking in turn (see ``search``)
=================  ===============================================================

villena_roman follows the peer's code, whose first term is the maximum (its description
text says minimum). Operators work in place on the similarity blocks where they can, so
fusing ``n`` blocks needs no more than one extra block of memory.

Every operator is a fixed sequence of correctly rounded float32 operations, so a fused
score has the same bits wherever it sits in a block, on every CPU: no ``add(..., alpha=)``
(torch computes its vector part with a fused multiply-add and its last few elements
without), and ``pow`` from :func:`cbir.exact.power`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import exact
from ..errors import CbirError
from .names import ALIASES, FUSIONS


@dataclass(frozen=True)
class FusionConf:
    method: str = "gharm"
    weights: tuple[float, ...] = field(default_factory=tuple)  # empty: equal weights
    gamma: float | None = None  # gharm, mean_and_power, mean_and_min (default 0.5)
    alpha: float | None = None  # min_and_max, villena_roman (default 0.5)

    def __post_init__(self) -> None:  # the rules of `cbir retrieve` and the pipeline alike
        canonical_method(self.method)
        if not isinstance(self.weights, (tuple, list)) or not all(_is_number(w) for w in self.weights):
            raise CbirError(f"fusion weights must be numbers, got {self.weights!r}")
        for key in ("gamma", "alpha"):
            value = getattr(self, key)
            if value is not None and not _is_number(value):
                raise CbirError(f"fusion parameter {key} must be a number, got {value!r}")

    @property
    def name(self) -> str:
        return canonical_method(self.method)

    def record(self) -> dict:
        """What the fused scores depend on (recorded with the pairs)."""
        return {"method": self.name, "weights": list(self.weights), "gamma": self.gamma, "alpha": self.alpha}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def canonical_method(method: str) -> str:
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise CbirError(f"unknown fusion {method!r} (known: {', '.join(sorted(METHODS))}; "
                        f"aliases: {', '.join(sorted(ALIASES))})")
    return name


def normalized_weights(weights: tuple[float, ...], n: int) -> list[float]:
    if not weights:
        return [1.0 / n] * n
    if len(weights) != n:
        raise CbirError(f"{len(weights)} fusion weights given for {n} descriptors")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CbirError("fusion weights must be non-negative with a positive sum")
    total = float(sum(weights))
    return [w / total for w in weights]


def _param(value: float | None, name: str, lo: float = 0.0, hi: float | None = 1.0) -> float:
    v = 0.5 if value is None else float(value)
    if v < lo or (hi is not None and v > hi):
        raise CbirError(f"fusion parameter {name}={v} is outside [{lo}, {hi if hi is not None else 'inf'}]")
    return v


def _mean(sims: list[torch.Tensor], conf: FusionConf) -> torch.Tensor:
    w = normalized_weights(conf.weights, len(sims))
    out = sims[0] * w[0]
    for s, wi in zip(sims[1:], w[1:], strict=True):
        out.add_(s * wi)
    return out


def _power(sims: list[torch.Tensor], conf: FusionConf) -> torch.Tensor:
    w = normalized_weights(conf.weights, len(sims))
    out = exact.power(sims[0], w[0])
    for s, wi in zip(sims[1:], w[1:], strict=True):
        out.mul_(exact.power(s, wi))
    return out


def _reduce(sims: list[torch.Tensor], op: Callable) -> torch.Tensor:
    out = sims[0].clone()
    for s in sims[1:]:
        op(out, s, out=out)
    return out


def _gharm(sims: list[torch.Tensor], conf: FusionConf, gamma: float | None = None) -> torch.Tensor:
    n = len(sims)
    w = normalized_weights(conf.weights, n)
    g = _param(conf.gamma, "gamma", 0.0, None) if gamma is None else gamma
    acc = torch.zeros_like(sims[0])
    for s, wi in zip(sims, w, strict=True):  # in place: the same operations in the same order, no temporaries
        acc.add_(s.mul_(wi).add_(g).reciprocal_().mul_(1.0 / n))
    return acc.reciprocal_().sub_(g)


def _mean_and_power(sims, conf):
    g = _param(conf.gamma, "gamma")
    return _mean(sims, conf).mul_(g).add_(_power(sims, conf).mul_(1 - g))


def _mean_and_min(sims, conf):
    g = _param(conf.gamma, "gamma")
    return _mean(sims, conf).mul_(g).add_(_reduce(sims, torch.minimum).mul_(1 - g))


def _min_and_max(sims, conf):
    a = _param(conf.alpha, "alpha")
    return _reduce(sims, torch.minimum).mul_(a).add_(_reduce(sims, torch.maximum).mul_(1 - a))


def _villena_roman(sims, conf):
    a = _param(conf.alpha, "alpha")
    lo, hi = _reduce(sims, torch.minimum), _reduce(sims, torch.maximum)
    return (lo * lo).div_(lo + hi).mul_(a).add_(hi.mul_(1 - a))


METHODS: dict[str, Callable[[list[torch.Tensor], FusionConf], torch.Tensor] | None] = {
    "gharm": _gharm,
    "harmonic_mean": lambda sims, conf: _gharm(sims, conf, gamma=0.0),
    "mean": _mean,
    "power": _power,
    "mean_and_power": _mean_and_power,
    "mean_and_min": _mean_and_min,
    "min_and_max": _min_and_max,
    "villena_roman": _villena_roman,
    "min": lambda sims, conf: _reduce(sims, torch.minimum),
    "max": lambda sims, conf: _reduce(sims, torch.maximum),
    "round_robin": None,  # rank-based: see search.py
}
assert tuple(METHODS) == FUSIONS, "cbir.retrieval.names.FUSIONS lists the operators of METHODS"


def fuse(sims: list[torch.Tensor], conf: FusionConf) -> torch.Tensor:
    """Fused scores of a block of similarities (one tensor per descriptor, same shape).
    The blocks are scratch: an operator may overwrite them."""
    fn = METHODS[conf.name]
    if fn is None:
        raise ValueError("round_robin fuses rankings, not scores")
    if len(sims) == 1 and conf.name != "villena_roman":  # every other operator is the identity on one
        return sims[0]
    return fn(sims, conf)


#: where a NaN fused score ranks: after every number, before the entries dropped with -inf
#: (an image never retrieving itself, padding). ``power`` of a negative similarity gives NaN;
#: ``torch.topk`` would rank NaN first, kapture-localization ranks it last, and so does cbir.
NAN_RANK = -3.0e38


def nan_last(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with NaN replaced (in place) by :data:`NAN_RANK`, ready for ``topk``."""
    return scores.nan_to_num_(nan=NAN_RANK, posinf=float("inf"), neginf=-float("inf"))


def restore_nan(values: np.ndarray) -> np.ndarray:
    """Selected scores with the NaN that :func:`nan_last` hid given back."""
    return np.where(values == np.float32(NAN_RANK), np.nan, values)

