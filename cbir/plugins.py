"""Plugins: local and global extractors, matchers, weight converters and hashing methods, found
by name.

Every one of them, the built-ins included, is a Python entry point of one of the groups
of :data:`GROUPS`, declared in its package's ``pyproject.toml``::

    [project.entry-points."cbir.extractors.local"]
    orb = "cbir_orb.orb:ORB"

Listing the names reads the installed packages' metadata only (``--help`` stays light);
a plugin's module is imported when it is used. A name may also be a ``module:attribute``
path, to try a class that is not installed as a package. An unknown name, a name that two
packages claim, and a plugin that fails to import are one-line errors (:class:`CbirError`)
naming the package; they never break the commands that do not use them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from .errors import CbirError

#: kind -> entry-point group
GROUPS: dict[str, str] = {
    "local": "cbir.extractors.local",
    "global": "cbir.extractors.global",
    "matcher": "cbir.matchers",
    "converter": "cbir.converters",
    "hasher": "cbir.hashers",
}

#: kind -> what a user calls it in messages
LABELS: dict[str, str] = {"local": "local extractor", "global": "global extractor", "matcher": "matcher",
                          "converter": "weight converter",
                          "hasher": "hashing method"}

#: the distribution whose entry points are the built-ins
BUILTIN_PACKAGE = "cbir"


@dataclass(frozen=True)
class Plugin:
    """One installed plugin: its ``kind`` (a key of :data:`GROUPS`), ``name``, ``target``
    (``module:attribute``) and the ``package`` (distribution) that declares it."""

    kind: str
    name: str
    target: str
    package: str

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE


@functools.cache
def _installed() -> dict[str, dict[str, tuple[Plugin, ...]]]:
    """kind -> name -> the plugins that claim it (several: a conflict, refused on use)."""
    found: dict[str, dict[str, list[Plugin]]] = {kind: {} for kind in GROUPS}
    for kind, group in GROUPS.items():
        for ep in importlib.metadata.entry_points(group=group):
            package = ep.dist.name if ep.dist is not None else "?"
            plugin = Plugin(kind, ep.name, ep.value, package)
            claims = found[kind].setdefault(ep.name, [])
            if plugin not in claims:  # a package seen twice on sys.path (an editable install) is one
                claims.append(plugin)
    if not any(p.builtin for claims in found["local"].values() for p in claims):
        raise CbirError("cbir's built-in extractors are not registered: cbir runs from a source tree that is not "
                        "installed; install it (pip install -e .) so that its entry points exist")
    return {kind: {name: tuple(sorted(claims, key=lambda p: p.package)) for name, claims in names.items()}
            for kind, names in found.items()}


def forget() -> None:
    """Read the installed plugins again on next use (after a package was installed)."""
    _installed.cache_clear()


def installed(kind: str) -> dict[str, Plugin]:
    """The plugins of ``kind`` by name, without importing them (of a contested name, the first)."""
    return {name: claims[0] for name, claims in sorted(_installed()[_group_kind(kind)].items())}


def names(kind: str) -> list[str]:
    """The names of the installed plugins of ``kind``, sorted, without importing them."""
    return sorted(_installed()[_group_kind(kind)])


def is_path(name: str) -> bool:
    """``module:attribute``, as opposed to an installed plugin's name."""
    return ":" in name


def find(kind: str, name: str) -> Plugin:
    """The installed plugin ``name`` of ``kind`` (not imported), or the error a user sees."""
    label = LABELS[_group_kind(kind)]
    if is_path(name):
        return Plugin(kind, name, name, "?")
    claims = _installed()[kind].get(name)
    if not claims:
        known = ", ".join(names(kind)) or "none"
        raise CbirError(f"unknown {label} {name!r} (known: {known}; or module:Class)")
    if len(claims) > 1:
        raise CbirError(f"the {label} {name!r} is installed by several packages "
                        f"({', '.join(p.package for p in claims)}): uninstall one, or name it as module:Class "
                        f"({', '.join(p.target for p in claims)})")
    return claims[0]


def load(kind: str, name: str) -> Any:
    """Import the plugin ``name`` (or ``module:attribute``) of ``kind`` and return the object
    it names; failing to import it is one line naming its package and the error."""
    plugin = find(kind, name)
    module_name, _, attribute = plugin.target.partition(":")
    label = LABELS[_group_kind(kind)]
    whose = f"package {plugin.package}" if plugin.package != "?" else "path"
    try:
        obj: Any = importlib.import_module(module_name.strip())
        for part in attribute.strip().split("."):
            obj = getattr(obj, part)
    except Exception as e:  # any error of someone else's module: it must not end in a traceback
        raise CbirError(f"the {label} {name!r} ({whose}, {plugin.target}) cannot be loaded: "
                        f"{type(e).__name__}: {e}") from None
    return obj


def _group_kind(kind: str) -> str:
    if kind not in GROUPS:
        raise ValueError(f"unknown plugin kind {kind!r} (one of {', '.join(GROUPS)})")
    return kind
