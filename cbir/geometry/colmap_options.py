"""The COLMAP settings of the paper (REFERENCE.md) and dotted-key overrides of pycolmap options.

Mapping always uses config1; localization uses config1, config2 or config3. Each name is
the COLMAP option of the paper's table; any other pycolmap option can be set by its dotted
path (``triangulation.min_angle=2``, ``mapper.filter_max_reproj_error=4``).
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any

from ..errors import CbirError

PAPER_CONFIGS: dict[str, dict[str, float | int | bool]] = {
    "config1": {"ba_refine_focal_length": False, "ba_refine_principal_point": False,
                "ba_refine_extra_params": False, "min_num_matches": 15, "init_min_num_inliers": 100,
                "abs_pose_min_num_inliers": 30, "abs_pose_min_inlier_ratio": 0.25,
                "ba_local_max_num_iterations": 25, "abs_pose_max_error": 12.0, "filter_max_reproj_error": 4.0},
    "config2": {"ba_refine_focal_length": False, "ba_refine_principal_point": False,
                "ba_refine_extra_params": False, "min_num_matches": 4, "init_min_num_inliers": 4,
                "abs_pose_min_num_inliers": 4, "abs_pose_min_inlier_ratio": 0.05,
                "ba_local_max_num_iterations": 50, "abs_pose_max_error": 20.0, "filter_max_reproj_error": 12.0},
    "config3": {"ba_refine_focal_length": True, "ba_refine_principal_point": False,
                "ba_refine_extra_params": True, "min_num_matches": 4, "init_min_num_inliers": 4,
                "abs_pose_min_num_inliers": 4, "abs_pose_min_inlier_ratio": 0.05,
                "ba_local_max_num_iterations": 50, "abs_pose_max_error": 20.0, "filter_max_reproj_error": 12.0},
}


def paper_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A paper config with overrides of its own keys (others are pycolmap dotted paths)."""
    if name not in PAPER_CONFIGS:
        raise CbirError(f"unknown config {name!r} (known: {', '.join(PAPER_CONFIGS)})")
    conf: dict[str, Any] = dict(PAPER_CONFIGS[name])
    for key, value in (overrides or {}).items():
        if key in conf:
            kind = type(conf[key])
            try:
                if kind is bool and not isinstance(value, bool) or isinstance(value, (dict, list)):
                    raise TypeError
                conf[key] = kind(value)
            except (TypeError, ValueError, OverflowError):
                raise CbirError(f"option {key}={value!r}: expected a {kind.__name__}") from None
            if kind is float and conf[key] != conf[key]:
                raise CbirError(f"option {key} is NaN")
    return conf


def set_dotted(obj: Any, overrides: dict[str, Any], known: AbstractSet[str] = frozenset()) -> None:
    """Set ``a.b.c=value`` on a pycolmap options object; keys in ``known`` are skipped."""
    for key, value in overrides.items():
        if key in known:
            continue
        *path, leaf = key.split(".")
        target = obj
        try:
            for part in path:
                target = getattr(target, part)
            if not hasattr(target, leaf):
                raise AttributeError(leaf)
            setattr(target, leaf, type(getattr(target, leaf))(value))
        except (AttributeError, TypeError, ValueError) as e:
            raise CbirError(f"cannot set option {key}={value!r} on {type(obj).__name__} ({e})") from None


@contextmanager
def quiet_colmap(verbose: bool = False) -> Iterator[None]:
    """COLMAP logs every step at INFO: keep warnings and errors only, unless verbose."""
    import pycolmap  # here: the paper's settings are read without it (cbir --help)

    old = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 0 if verbose else 1
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = old
