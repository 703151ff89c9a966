"""A configuration checked and built into the objects a run uses (:class:`Plan`), before any
step runs: datasets, every option's type and range, every name, the weights present."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import extract as extract_mod
from .. import localize as localize_mod
from .. import mapping
from .. import report as report_mod
from ..cores import MAX_WORKERS
from ..errors import CbirError
from ..evaluation.localization import check_thresholds
from ..executor import EXECUTORS, Executor, LocalExecutor, ShardSizes, make_executor
from ..hashing.model import HashModel
from ..hashing.stores import code_store_name
from ..io.dataset import Dataset
from ..matching import DEFAULT_MATCHER, Matcher, VerifyConf
from ..matching.base import load_matcher
from ..models.base import Extractor, resolve_device
from ..retrieval import FusionConf, RetrievalConf
from ..validate import check_bool, check_integer, check_number, unknown_names
from .config import DEFAULTS


@dataclass
class Plan:
    """A checked configuration: the step objects the run uses and the names of its outputs."""

    conf: dict[str, Any]
    map: Dataset
    query: Dataset
    query_gt: Dataset | None
    local: Extractor
    globals_: list[Extractor]  # the map's (DenseVLAD learns there)
    global_names: list[str]
    query_retrieval: RetrievalConf
    map_retrieval: RetrievalConf | None  # None: every map pair
    matcher: Matcher
    map_verify: VerifyConf
    query_verify: VerifyConf
    map_overrides: dict[str, Any]
    localize_config: str
    localize_overrides: dict[str, Any]
    post: localize_mod.PostprocessConf
    thresholds: tuple[tuple[float, float], ...]
    report: report_mod.ReportConf | None  # None: no report
    device: str
    num_workers: int
    #: where extraction, matching, retrieval and pose estimation run (``[executor]``)
    executor: Executor = field(default_factory=LocalExecutor)
    #: ``[retrieve] hash``: the model file and its model, retrieval by the codes of the global store
    hash_path: Path | None = None
    hash_model: HashModel | None = None

    @property
    def retrieval_names(self) -> list[str]:
        """The stores retrieval ranks by: the global stores, or their code store."""
        if self.hash_model is None:
            return self.global_names
        return [code_store_name(self.global_names[0], self.hash_model)]

    @property
    def local_name(self) -> str:
        return self.local.default_store_name()

    @property
    def tag(self) -> str:
        return "+".join(self.retrieval_names)

    @property
    def query_pairs_path(self) -> Path:
        return self.query.store_path("pairs", f"{self.tag}_top{self.query_retrieval.topk}")

    @property
    def map_pairs_path(self) -> Path:
        return self.map.store_path("pairs", f"{self.tag}_map")

    @property
    def map_matches(self) -> str:
        return f"{self.local_name}-map"

    @property
    def query_matches(self) -> str:
        return f"{self.local_name}-query"

    @property
    def localization_name(self) -> str:
        return f"{self.local_name}-{self.tag}-{self.localize_config}"

    @property
    def localization_dir(self) -> Path:
        return self.query.root / "cbir" / "localization" / self.localization_name


def plan(conf: dict[str, Any], source: str | Path | None = None) -> Plan:
    """Check the whole configuration before anything runs: datasets, every option's type and
    range, every name (extractors, fusion, paper config, pycolmap options), weights present.
    Errors name ``source`` (the configuration file) and the section."""

    def section(name: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except CbirError as e:
            where = f"[{name}] " if name else ""
            if e.path is not None:  # a file the option names (weights, a dataset)
                raise CbirError(f"{where}{e.message} (configuration {source or 'option'})", e.path) from None
            raise CbirError(f"{where}{e.message}", source) from None

    ds = conf["datasets"]
    m = section("datasets", lambda: Dataset(ds["map"]))
    q = section("datasets", lambda: Dataset(ds["query"]))
    gt = section("datasets", lambda: Dataset(ds["query_gt"])) if ds.get("query_gt") else None
    section("", lambda: check_integer("num_workers", conf["num_workers"], 0, MAX_WORKERS))
    if not isinstance(conf["device"], str):
        raise CbirError(f"device must be a string, got {conf['device']!r}", source)
    section("", lambda: resolve_device(conf["device"]))
    ex = conf["extract"]
    local, globals_ = section("extract", lambda: _extractors(ex, conf["device"]))
    rt = conf["retrieve"]
    fusion = section("retrieve", lambda: FusionConf(rt["fusion"]) if isinstance(rt["fusion"], str) else
                     _fail(f"fusion must be a name, got {rt['fusion']!r}"))
    query_retrieval = section("retrieve", lambda: RetrievalConf(topk=rt["topk"], fusion=fusion,
                                                               precision=rt["precision"]))
    section("retrieve", lambda: check_integer("map_pairs", rt["map_pairs"], 0))
    map_retrieval = RetrievalConf(topk=rt["map_pairs"], fusion=fusion, exclude_self=True,
                                  precision=rt["precision"]) if rt["map_pairs"] else None
    hash_path, hash_model = section("retrieve", lambda: _hash(rt["hash"], len(globals_)))
    mt = conf["match"]
    matcher = section("match", lambda: _matcher(mt))
    query_verify = section("match", lambda: VerifyConf(max_error=mt["max_error"], min_inliers=mt["min_inliers"]))
    map_verify = section("match", lambda: VerifyConf(method=mt["map_verify"], max_error=mt["max_error"],
                                                     min_inliers=mt["min_inliers"]))
    map_overrides = section("map", lambda: _table("conf", conf["map"]["conf"]))
    section("map", lambda: mapping.triangulation_options(map_overrides))
    lz = conf["localize"]
    if not isinstance(lz["config"], str):
        raise CbirError(f"[localize] config must be a name, got {lz['config']!r}", source)
    loc_overrides = section("localize", lambda: _table("conf", lz["conf"]))
    section("localize", lambda: localize_mod.localization_options(lz["config"], loc_overrides))
    post = section("localize", lambda: localize_mod.PostprocessConf(
        rig=lz["rig"], rig_max_gap=lz["rig_max_gap"], sequence=lz["sequence"], sequence_max_gap=lz["sequence_max_gap"]))
    thresholds = section("evaluate", lambda: check_thresholds(conf["evaluate"]["thresholds"]))
    rp = conf["report"]
    section("report", lambda: check_bool("write", rp["write"]))
    report = section("report", lambda: report_mod.ReportConf(
        max_points=rp["max_points"], thumb_size=rp["thumb_size"], topk=query_retrieval.topk, thresholds=thresholds))
    executor = section("executor", lambda: _executor(conf["executor"]))
    return Plan(conf, m, q, gt, local, globals_, [g.default_store_name() for g in globals_], query_retrieval,
                map_retrieval, matcher, map_verify, query_verify, map_overrides, lz["config"], loc_overrides, post,
                thresholds, report if rp["write"] else None, conf["device"], conf["num_workers"], executor,
                hash_path, hash_model)


def _hash(path: Any, globals_count: int) -> tuple[Path | None, HashModel | None]:
    if not isinstance(path, str):
        return _fail(f"hash must be the path of a hash model, got {path!r}")
    if not path:
        return None, None
    if globals_count != 1:
        return _fail(f"hash encodes one global store: [extract] global names {globals_count}")
    return Path(path), HashModel.load(path)


def _executor(ex: dict[str, Any]) -> Executor:
    """The executor of ``[executor]``, its shard sizes checked."""
    if ex["kind"] not in EXECUTORS:
        raise CbirError(f"unknown executor {ex['kind']!r} ({' or '.join(EXECUTORS)})")
    for key in ("images_per_task", "map_images_per_task", "pairs_per_task", "queries_per_task"):
        check_integer(key, ex[key], 1)
    if ex["kind"] != "local" and not isinstance(ex["address"], str):
        raise CbirError(f"address must be a string, got {ex['address']!r}")
    sizes = ShardSizes(images=ex["images_per_task"], pairs=ex["pairs_per_task"], queries=ex["queries_per_task"],
                       map_images=ex["map_images_per_task"])
    return make_executor(ex["kind"], ex["address"] or None, sizes, what="executor")


def _matcher(mt: dict[str, Any]) -> Matcher:
    """The matcher of ``[match]``: ``matcher`` with ``conf``; ``ratio`` and ``mutual`` are
    the nn matcher's (another matcher refuses them unless left at their defaults)."""
    if not isinstance(mt["matcher"], str):
        raise CbirError(f"matcher must be a name, got {mt['matcher']!r}")
    options = _table("conf", mt["conf"])
    check_number("ratio", mt["ratio"], 0.0, 1.0)
    shorthand = {"mutual": mt["mutual"], "ratio": float(mt["ratio"]) or None}
    defaults = {"mutual": DEFAULTS["match"]["mutual"], "ratio": float(DEFAULTS["match"]["ratio"]) or None}
    if mt["matcher"] == DEFAULT_MATCHER:
        options = {**shorthand, **options}
    elif shorthand != defaults:
        raise CbirError(f"ratio and mutual are options of the {DEFAULT_MATCHER} matcher, not of {mt['matcher']}: "
                        "give its options in conf")
    return load_matcher(mt["matcher"], options)


def _fail(message: str) -> Any:
    raise CbirError(message)


def _table(name: str, value: Any) -> dict[str, Any]:
    """An options table, nested tables flattened to dotted keys (``{a = {b = 1}}``: ``a.b``)."""
    if not isinstance(value, dict):
        raise CbirError(f"{name} must be a table, got {value!r}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _table(name, v).items()})
        else:
            out[k] = v
    return out


def _extractors(ex: dict[str, Any], device: str) -> tuple[Extractor, list[Extractor]]:
    """The local extractor and the map's global ones, built (weights found and loaded)."""
    if not isinstance(ex["local"], str):
        raise CbirError(f"local must be an extractor name, got {ex['local']!r}")
    names = ex["global"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CbirError(f"global must be a non-empty list of extractor names, got {names!r}")
    if len(set(names)) != len(names):
        raise CbirError(f"global names an extractor twice: {names}")
    if ex["weights"] is not None and not isinstance(ex["weights"], str):
        raise CbirError(f"weights must be a path, got {ex['weights']!r}")
    if ex["weights"] is not None and not Path(ex["weights"]).exists():
        raise CbirError("weights: no such file or directory", ex["weights"])
    local_conf, global_conf = _table("local_conf", ex["local_conf"]), _table("global_conf", ex["global_conf"])
    for key, kind, conf, which in (("local_conf", "local", local_conf, [ex["local"]]),
                                   ("global_conf", "global", global_conf, names)):
        known = set().union(*(extract_mod.extractor_class(n, kind).default_conf for n in which))
        unknown = set(conf) - known - set(LEARNED_KEYS)
        if unknown:
            raise CbirError(f"{key}: unknown option(s) {unknown_names(unknown, known)} for {', '.join(which)}")
        if set(LEARNED_KEYS) & set(conf):
            raise CbirError(f"{key}: the pipeline sets {' and '.join(LEARNED_KEYS)} itself (a model learned on "
                            "the map, DenseVLAD's)")
    local = _build("local", ex["local"], local_conf, ex["weights"], device)
    globals_ = [_build("global", g, {**global_conf, **({"learn": True} if _learns(g) else {})}, ex["weights"], device)
                for g in names]
    return local, globals_


#: the options of an extractor that learns a model on the map (:attr:`Extractor.learns_on_map`)
LEARNED_KEYS = ("model", "learn")


def _learns(name: str) -> bool:
    return extract_mod.extractor_class(name, "global").learns_on_map


def _build(kind: str, name: str, conf: dict, weights: str | None, device: str) -> Extractor:
    # extractor_conf keeps the options this extractor knows (global_conf serves several)
    return extract_mod.build_extractor(name, extract_mod.extractor_conf(kind, name, conf, weights, device), kind)
