"""Global-descriptor retrieval: exact fused top-k, late fusion operators.

Names are imported on first use (torch loads with them); :mod:`cbir.retrieval.names` holds
the option names the command line offers, without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"ALIASES": "names", "METHODS": "fusion", "FusionConf": "fusion", "fuse": "fusion",
          "DescriptorSet": "descriptors", "RetrievalConf": "conf", "pairs_record": "ranking", "retrieve": "search"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
