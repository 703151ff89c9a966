"""Networks and extractors. Importing this package registers every extractor."""

from .base import GLOBAL_EXTRACTORS, LOCAL_EXTRACTORS, GlobalExtractor, LocalExtractor, resolve_device
from . import apgem, delg, densevlad, netvlad, r2d2, sift  # noqa: F401  (registers the extractors)

__all__ = ["GLOBAL_EXTRACTORS", "LOCAL_EXTRACTORS", "GlobalExtractor", "LocalExtractor", "resolve_device"]
