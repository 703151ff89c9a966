"""Global-descriptor retrieval: exact fused top-k, late fusion operators."""

from .fusion import ALIASES, METHODS, FusionConf, fuse
from .search import DescriptorSet, RetrievalConf, pairs_record, retrieve

__all__ = ["ALIASES", "METHODS", "FusionConf", "fuse", "DescriptorSet", "RetrievalConf", "pairs_record", "retrieve"]
