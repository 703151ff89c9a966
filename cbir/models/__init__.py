"""Networks and extractors.

:data:`EXTRACTOR_NAMES` lists the built-in extractors without importing them (the command
line's choices and ``--help`` stay light); the registries :data:`LOCAL_EXTRACTORS` and
:data:`GLOBAL_EXTRACTORS` (name -> class) import every extractor module on first use,
which registers its classes.
"""

from __future__ import annotations

import importlib
from typing import Any

#: the modules that define the built-in extractors
EXTRACTOR_MODULES = ("apgem", "delg", "densevlad", "netvlad", "r2d2", "sift")
#: the built-in extractors by kind (tests/test_extract_match.py holds it equal to the registries)
EXTRACTOR_NAMES = {"local": ("delg", "r2d2", "rootsift", "sift"), "global": ("apgem", "delg", "densevlad", "netvlad")}

_LAZY = {"LOCAL_EXTRACTORS", "GLOBAL_EXTRACTORS", "GlobalExtractor", "LocalExtractor", "resolve_device"}

__all__ = ["EXTRACTOR_MODULES", "EXTRACTOR_NAMES", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import base

    for module in EXTRACTOR_MODULES:  # registers the extractors
        importlib.import_module(f"{__name__}.{module}")
    return getattr(base, name)
