"""Descriptor matching (matchers are plugins: :mod:`cbir.matching.base`; the built-in ``nn``
is mutual nearest neighbour) and geometric verification (pycolmap).

Names are imported on first use, so that ``cbir.matching.verify`` (say) never loads torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: how matches are verified (:mod:`cbir.matching.verify`): RANSAC over E, F and H (pycolmap's
#: two-view geometry), or the known epipolar geometry of two posed images (``known_poses``;
#: RANSAC for pairs without); named here so that the CLI lists them without pycolmap
VERIFY_METHODS = ("ransac", "poses")

#: the matcher of ``cbir match`` and the pipeline when none is named
DEFAULT_MATCHER = "nn"

_WHERE = {"Matcher": "base", "load_matcher": "base", "MutualNearestNeighbor": "nearest_neighbor",
          "MatcherConf": "nearest_neighbor", "PairBatch": "nearest_neighbor", "match_descriptors": "nearest_neighbor",
          "VerifyConf": "verify", "verify_pair": "verify"}

__all__ = sorted([*_WHERE, "DEFAULT_MATCHER", "VERIFY_METHODS"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
