"""cbir: content-based image retrieval and retrieval-based visual localization."""

__version__ = "0.1.0"
