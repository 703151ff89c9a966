"""The pipeline's configuration as data: the defaults of every key, the tables whose keys are
free (an extractor's, a matcher's, COLMAP's options), and how a TOML file and ``--set``
overrides are read into it. What the keys mean is :mod:`cbir.pipeline`'s documentation."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CbirError, FormatError
from ..evaluation.localization import DEFAULT_THRESHOLDS
from ..io.textfile import MAX_JSON_DEPTH, json_depth, read_utf8
from ..matching import DEFAULT_MATCHER
from ..validate import unknown_names

DEFAULTS: dict[str, Any] = {
    "datasets": {"map": None, "query": None, "query_gt": None},
    "extract": {"local": "sift", "global": ["densevlad"], "weights": None, "local_conf": {}, "global_conf": {}},
    "retrieve": {"fusion": "gharm", "topk": 20, "map_pairs": 20, "precision": "fp32", "hash": ""},
    "match": {"matcher": DEFAULT_MATCHER, "conf": {}, "ratio": 0.0, "mutual": True, "max_error": 4.0,
              "min_inliers": 15, "map_verify": "poses"},
    "map": {"conf": {}},
    "localize": {"config": "config2", "conf": {}, "rig": False, "rig_max_gap": 0, "sequence": False,
                 "sequence_max_gap": 1},
    "evaluate": {"thresholds": [list(t) for t in DEFAULT_THRESHOLDS]},
    "report": {"write": True, "max_points": 100_000, "thumb_size": 160},
    "executor": {"kind": "local", "address": "", "images_per_task": 64, "map_images_per_task": 100_000,
                 "pairs_per_task": 1000, "queries_per_task": 100},
    "device": "auto",
    "num_workers": 2,
}

#: the tables whose keys are free (an extractor's, a matcher's, COLMAP's options, checked by
#: the step that reads them); every other table's keys are those of :data:`DEFAULTS`
FREE_TABLES = frozenset({"extract.local_conf", "extract.global_conf", "match.conf", "map.conf", "localize.conf"})


def _toml(text: str, source: str | Path) -> dict[str, Any]:
    """The TOML document ``text``; nesting deeper than any configuration has
    (:data:`~cbir.io.textfile.MAX_JSON_DEPTH`) is a :class:`FormatError` naming ``source``.
    Invalid TOML raises :class:`tomllib.TOMLDecodeError`: each caller says what it means."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise FormatError("nested too deep", source) from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise FormatError(f"nested deeper than {MAX_JSON_DEPTH} levels", source)
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The defaults, updated by the TOML file, updated by ``a.b=value`` overrides (TOML values)."""
    conf = copy.deepcopy(DEFAULTS)
    base = Path(".")
    if path is not None:
        path = Path(path)
        try:
            data = _toml(read_utf8(path, "configuration file"), path)
        except tomllib.TOMLDecodeError as e:
            raise FormatError(f"invalid TOML: {e}", path) from None
        _merge(conf, data, str(path))
        base = path.parent
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CbirError(f"override {item!r}: expected key=value")
        try:
            parsed = _toml(f"v = {value}", f"--set {key}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        parts = key.split(".")
        # inside a free table the rest of the key is one dotted key
        cut = next((i + 1 for i in range(len(parts) - 1) if ".".join(parts[:i + 1]) in FREE_TABLES), len(parts) - 1)
        *parents, leaf = parts[:cut] + [".".join(parts[cut:])]
        target: Any = conf
        for depth, part in enumerate(parents):
            if not isinstance(target, dict) or part not in target:
                raise CbirError(f"--set {key}: " + unknown_key_message(part, target if isinstance(target, dict) else
                                                                       {}, ".".join(parents[:depth])))
            target = target[part]
        free = ".".join(parents) in FREE_TABLES
        if not isinstance(target, dict) or (leaf not in target and not free):
            raise CbirError(f"--set {key}: " + unknown_key_message(leaf, target if isinstance(target, dict) else {},
                                                                   ".".join(parents)))
        target[leaf] = parsed
    for key in ("map", "query", "query_gt"):  # dataset paths are relative to the configuration file
        v = conf["datasets"].get(key)
        if v is not None and not isinstance(v, str):
            raise CbirError(f"datasets.{key} must be a path (a string), got {v!r}")
        if v is not None and not Path(v).is_absolute():
            conf["datasets"][key] = str(base / v)
    if not conf["datasets"]["map"] or not conf["datasets"]["query"]:
        raise CbirError("the configuration needs datasets.map and datasets.query")
    return conf


def _merge(into: dict, data: dict, where: str, section: str = "") -> None:
    """``data`` (a TOML document's tables) into the configuration ``into``: known keys only,
    tables as tables, a free table (:data:`FREE_TABLES`) taken whole."""
    for k, v in data.items():
        if k not in into:
            raise CbirError(unknown_key_message(k, into, section), where)
        path = f"{section}.{k}" if section else k
        if isinstance(into[k], dict) and path not in FREE_TABLES:
            if not isinstance(v, dict):
                raise CbirError(f"{k!r} must be a table", where)
            _merge(into[k], v, where, path)
        else:
            into[k] = v


def unknown_key_message(key: str, known: dict, section: str) -> str:
    """``unknown key 'top_k' (did you mean 'topk'?) in [retrieve]``, or the keys there are."""
    return f"unknown key {unknown_names([key], known)} {f'in [{section}]' if section else 'at the top level'}"
