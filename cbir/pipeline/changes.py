"""Re-runs: the outputs on disk made with another configuration than a plan asks for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import localize as localize_mod
from .. import mapping
from ..errors import CbirError
from ..io.pairs import read_pairs_record
from ..io.provenance import UNKNOWN, differences
from ..io.store import open_store
from ..io.textfile import read_json_object
from ..matching import VerifyConf
from ..matching import match as match_mod
from ..models.base import Extractor
from ..retrieval import RetrievalConf
from .plan import Plan


@dataclass
class Change:
    """An output of ``step`` at ``path`` made with another configuration (``differences``)."""

    step: str
    path: Path
    differences: list[str]

    def __str__(self) -> str:
        return f"{self.step}: {self.path} ({'; '.join(self.differences)})"


def changes(p: Plan) -> list[Change]:
    """The outputs on disk made with another configuration than ``p`` asks for, by step;
    values only a run determines (a vocabulary to learn) are not compared."""
    out: list[Change] = []

    def compare(step: str, path: Path, found: Any, wanted: dict[str, Any]) -> None:
        if not isinstance(found, dict):  # none, or not one cbir writes
            out.append(Change(step, path, ["no record of the configuration it was made with"]))
            return
        diffs = differences({k: found.get(k) for k in wanted}, wanted)
        if diffs:
            out.append(Change(step, path, diffs))

    for step, path, wanted in _stores(p):
        if path.exists():
            with open_store(path) as s:
                compare(step, path, s.config, wanted)
    for path, wanted in ((p.query_pairs_path, _pairs_config(p, p.query_retrieval)),
                         (p.map_pairs_path, _pairs_config(p, p.map_retrieval))):
        if path.exists():
            record = read_pairs_record(path)
            compare("retrieve", path, record.get("config") if record else None, wanted)
    for ds, name, verify in ((p.map, p.map_matches, p.map_verify), (p.query, p.query_matches, p.query_verify)):
        path = ds.store_path("matches", name)
        if path.exists():
            with open_store(path) as s:
                compare("match", path, s.config, _match_config(p, verify))
    map_path = p.map.store_path("map", p.local_name)
    if map_path.exists():
        from ..io.map_store import read_map

        compare("map", map_path, read_map(map_path).config,
                {"local_features": p.local_name, "matches": p.map_matches, "overrides": p.map_overrides,
                 "config": mapping.MAPPING_CONFIG})
    run_json = p.localization_dir / localize_mod.RECORD_FILE
    if run_json.exists() or (p.localization_dir / "report.json").exists():
        try:
            found = read_json_object(run_json, localize_mod.RECORD_FILE).get("config")
        except CbirError:
            found = None
        wanted = localize_mod.localization_config(p.local_name, p.query_matches, p.local_name, p.localize_config,
                                                  p.localize_overrides, False, True, p.post, {})
        wanted.pop("pairs")  # the retrieval is compared with the pairs file
        compare("localize", p.localization_dir, found, wanted)
    return out


def _stores(p: Plan) -> list[tuple[str, Path, dict[str, Any]]]:
    """The stores a run writes before matching, the step writing each and the configuration
    it must have: the features (extract), and the code store of ``[retrieve] hash``
    (retrieve, by the model's identity)."""
    out = []
    for ds in (p.map, p.query):
        for kind, e, name in [("local", p.local, p.local_name), *(("global", g, n) for g, n in
                                                                    zip(p.globals_, p.global_names, strict=True))]:
            out.append(("extract", ds.store_path(kind, name), _expected_store_config(e)))
        if p.hash_model is not None:
            out.append(("retrieve", ds.store_path("global", p.retrieval_names[0]), {"hash": p.hash_model.identity()}))
    return out


def _expected_store_config(e: Extractor) -> dict[str, Any]:
    config = e.store_config()
    if "model_digest" in config:  # learned on the map by the run
        config["model_digest"] = UNKNOWN
    return config


def _pairs_config(p: Plan, conf: RetrievalConf | None) -> dict[str, Any]:
    if conf is None:
        return {"exhaustive": True}
    return {**conf.record(), "stores": p.retrieval_names}


def _match_config(p: Plan, verify: VerifyConf) -> dict[str, Any]:
    config = match_mod.match_config(p.local_name, {}, p.matcher, verify)
    config.pop("features_config")  # compared with the features stores (extract)
    return config
