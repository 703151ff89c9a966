"""Descriptor matching (mutual nearest neighbour) and geometric verification (pycolmap)."""

from .nearest_neighbor import MatcherConf, PairBatch, match_descriptors
from .verify import VerifyConf, verify_pair

__all__ = ["MatcherConf", "PairBatch", "VerifyConf", "match_descriptors", "verify_pair"]
