"""Networks and extractors.

Extractors are plugins (:mod:`cbir.plugins`): the built-ins here are registered, like any
other package's, as entry points of ``cbir.extractors.local`` and ``cbir.extractors.global``
(pyproject.toml). :data:`EXTRACTOR_NAMES` lists every installed extractor by kind without
importing any; :data:`LOCAL_EXTRACTORS` and :data:`GLOBAL_EXTRACTORS` (name -> class) import
them all.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"EXTRACTOR_NAMES", "LOCAL_EXTRACTORS", "GLOBAL_EXTRACTORS", "GlobalExtractor", "LocalExtractor",
         "resolve_device"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .. import plugins

    if name == "EXTRACTOR_NAMES":
        return {kind: tuple(plugins.names(kind)) for kind in ("local", "global")}
    if name in ("LOCAL_EXTRACTORS", "GLOBAL_EXTRACTORS"):
        kind = "local" if name == "LOCAL_EXTRACTORS" else "global"
        classes = [plugins.load(kind, n) for n in plugins.names(kind)]
        return {cls.name: cls for cls in classes}
    from . import base

    return getattr(base, name)
