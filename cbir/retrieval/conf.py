"""The options of a retrieval: how many pairs, which fusion, which images never pair, and
the speed-only knobs (blocks, chunks, caches, the precision of the candidate products)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CbirError
from ..validate import check_integer, check_number
from .fusion import FusionConf
from .names import PRECISIONS

#: fusions that never decrease when one similarity grows (on their domain): an upper bound of
#: every similarity then bounds the fused score, which half precision's exactness rests on
MONOTONE = frozenset({"gharm", "mean", "min", "max", "mean_and_min", "min_and_max"})


@dataclass(frozen=True)
class RetrievalConf:
    topk: int = 20
    fusion: FusionConf = field(default_factory=FusionConf)
    exclude_self: bool = False  # map x map: an image never retrieves itself
    #: query x map of two datasets: drop a map image named as the query, as kapture-localization
    #: does (off by default: in separate datasets a shared name is a different image)
    exclude_same_name: bool = False

    # speed only, not the result (not recorded with the pairs):
    query_block: int | None = None  # queries per block (None: 1024 on the CPU, 4096 on a GPU)
    map_chunk: int | None = None  # map images per chunk (None: 16384 on the CPU, 32768 on a GPU)
    cache_bytes: int = 512 << 20  # CPU: keep the map in memory across query blocks below this size
    device_memory: float = 0.5  # GPU: keep the map resident when it fits this share of the free memory
    #: the products that find the candidates: "fp32", or "fp16" / "bf16" (half the memory
    #: traffic of a GPU's map); the candidates are scored exactly either way, so the pairs
    #: are the same bits (see :func:`error_bound`); a looser bound only makes more of them
    precision: str = "fp32"

    @property
    def excludes_names(self) -> bool:
        return self.exclude_self or self.exclude_same_name

    def __post_init__(self) -> None:  # the rules of `cbir retrieve` and the pipeline alike
        check_integer("topk", self.topk, 1)
        if not isinstance(self.fusion, FusionConf):
            raise TypeError("fusion must be a FusionConf")
        for key in ("query_block", "map_chunk"):
            if getattr(self, key) is not None:
                check_integer(key, getattr(self, key), 1)
        check_number("device_memory", self.device_memory, 0.0, 1.0)
        if self.precision not in PRECISIONS:
            raise CbirError(f"unknown precision {self.precision!r} (known: {', '.join(PRECISIONS)})")
        if self.precision != "fp32" and self.fusion.name not in MONOTONE:
            raise CbirError(f"precision {self.precision} needs a fusion that never decreases when a similarity "
                            f"grows ({', '.join(sorted(MONOTONE))}), not {self.fusion.name}: use --precision fp32")

    def blocks(self, device: torch.device) -> tuple[int, int]:
        """``(query_block, map_chunk)`` for ``device``: large blocks feed a GPU, cache-sized ones a CPU."""
        gpu = device.type == "cuda"
        return self.query_block or (4096 if gpu else 1024), self.map_chunk or (32768 if gpu else 16384)

    def record(self) -> dict:
        """The options the pairs depend on (recorded with them)."""
        return {"topk": self.topk, "fusion": self.fusion.record(), "exclude_self": self.exclude_self,
                "exclude_same_name": self.exclude_same_name}
