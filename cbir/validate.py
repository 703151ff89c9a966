"""Checks of option values shared by the commands, the library and the pipeline's TOML, so
that every entry point applies the same rules and says the same thing."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import CbirError


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, optional: bool = False) -> None:
    """``value`` is a finite real number within [low, high] (``low_open``: above low);
    ``optional``: None is allowed too."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CbirError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise CbirError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise CbirError(f"{name} must be <= {high}, got {value!r}")


def check_integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """``value`` is an integer (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CbirError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]" if low is not None else f"<= {high}"
        raise CbirError(f"{name} must be {bounds}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise CbirError(f"{name} must be true or false, got {value!r}")


def merged_conf(what: str, defaults: dict[str, Any], conf: dict[str, Any] | None) -> dict[str, Any]:
    """``conf`` over ``defaults``; a key ``defaults`` lacks is a one-line error naming ``what``
    (a plugin: ``sift``, ``the nn matcher``) and the closest known key."""
    conf = dict(conf or {})
    unknown = set(conf) - set(defaults)
    if unknown:
        raise CbirError(f"unknown option(s) for {what}: {unknown_names(unknown, defaults)}")
    return {**defaults, **conf}


def unknown_names(unknown: Iterable[str], known: Iterable[str]) -> str:
    """``'max_keypoint' (did you mean 'max_keypoints'?)`` for each unknown name, or the known
    names when none is close: what a typo'd option or key is told."""
    import difflib

    known = sorted(map(str, known))
    parts, hinted = [], False
    for name in sorted(map(str, unknown)):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        hinted |= bool(close)
    return ", ".join(parts) + ("" if hinted else f" (known: {', '.join(known)})")

