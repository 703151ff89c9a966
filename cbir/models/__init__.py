"""Networks and extractors. Importing this package registers every extractor."""

from .base import LOCAL_EXTRACTORS, LocalExtractor, resolve_device
from . import r2d2, sift  # noqa: F401  (registers the extractors)

__all__ = ["LOCAL_EXTRACTORS", "LocalExtractor", "resolve_device"]
