"""Descriptor matching (mutual nearest neighbour) and geometric verification (pycolmap).

Names are imported on first use, so that ``cbir.matching.verify`` (say) never loads torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"MatcherConf": "nearest_neighbor", "PairBatch": "nearest_neighbor", "match_descriptors": "nearest_neighbor",
          "VerifyConf": "verify", "verify_pair": "verify"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
