"""The whole chain in one call (``cbir pipeline``): extract -> retrieve (fusion) -> match ->
verify -> map -> localize -> post-process -> evaluate, from one TOML configuration.

Every step is the library's own step function, so the pipeline does exactly what the
separate commands do. Re-runs work as a build tool's:

- the whole configuration is checked (every option's type and range, every name, the
  weights present) before any step runs, with the rules of the commands;
- every output records the configuration it came from (stores and maps: ``config``;
  pairs files: their ``# cbir:`` line; localization: ``run.json``). A re-run compares them
  with the configuration first: unchanged steps are reused (stores resume where an
  interrupted run stopped; a map or a localization made from changed inputs is redone);
- a step whose configuration changed is refused, before anything runs, unless
  ``overwrite``: then it and every step after it are redone and **their outputs replaced**
  (the names stay; keep a result by copying it, or by pointing the configuration at copies
  of the datasets). ``from_step`` redoes a step and the ones after it in any case.

Configuration (every key optional except the datasets; ``--set a.b=value`` overrides)::

    [datasets]
    map = "path/to/map"          # kapture dataset with poses
    query = "path/to/query"
    query_gt = "path/to/query_gt" # optional: ground truth for the evaluation
    [extract]
    local = "sift"               # sift, rootsift, r2d2, delg
    global = ["densevlad"]       # apgem, netvlad, densevlad, delg; several: late fusion
                                 # (local and global delg with the same max_size and
                                 # scales run the network once for both; DenseVLAD learns
                                 # its vocabulary on the map, the queries use it)
    weights = "path/to/weights"  # directory or file, for the networks
    local_conf = {}              # extractor options
    global_conf = {}
    [retrieve]
    fusion = "gharm"
    topk = 20                    # query x map pairs
    map_pairs = 20               # map x map pairs by retrieval; 0: every pair
    precision = "fp32"           # "fp16": half-precision search, candidates rescored (same pairs)
    [match]
    matcher = "nn"               # an installed matcher (cbir weights list), or module:Class
    conf = {}                    # its options
    ratio = 0.0                  # nn: Lowe's ratio (0: off)
    mutual = true                # nn: mutual nearest neighbours only
    max_error = 4.0              # verification (px)
    min_inliers = 15
    map_verify = "poses"         # map x map pairs: "poses" (their known epipolar geometry;
                                 # RANSAC for a pair without) or "ransac"; queries: RANSAC
    [map]
    conf = {}                    # config1 overrides / pycolmap options
    [localize]
    config = "config2"
    conf = {}
    rig = false
    rig_max_gap = 0
    sequence = false
    sequence_max_gap = 1
    [evaluate]
    thresholds = [[0.25, 2.0], [0.5, 5.0], [5.0, 10.0]]
    [report]                     # QUERY/cbir/localization/<name>/report.html (cbir report)
    write = true
    max_points = 100000          # 3D points shown at most
    thumb_size = 160
    [executor]                   # where extraction, retrieval, matching and pose estimation run
    kind = "local"               # or "ray": tasks on a Ray cluster (cbir[ray]; datasets on a shared file system)
    address = ""                 # the cluster ("": $RAY_ADDRESS, else a local Ray instance)
    images_per_task = 64
    map_images_per_task = 100000 # retrieval: map images a task searches for every query
    pairs_per_task = 1000
    queries_per_task = 100
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import extract as extract_mod
from . import localize as localize_mod
from . import mapping
from . import report as report_mod
from .cores import MAX_WORKERS
from .errors import CbirError, FormatError
from .evaluation.localization import DEFAULT_THRESHOLDS, check_thresholds, pose_errors, summarize
from .executor import EXECUTORS, Executor, LocalExecutor, ShardSizes, make_executor
from .io.atomic import atomic_write_text
from .io.dataset import Dataset, model_path
from .io.pairs import Pair, exhaustive_pairs, read_pairs, read_pairs_record, write_pairs
from .io.provenance import UNKNOWN, differences, digest
from .io.store import open_store
from .io.textfile import MAX_JSON_DEPTH, json_depth, read_json_object, read_utf8
from .matching import DEFAULT_MATCHER, Matcher, VerifyConf
from .matching import match as match_mod
from .matching.base import load_matcher
from .models.base import Extractor, resolve_device
from .retrieval import FusionConf, RetrievalConf, pairs_record
from .retrieval.search import open_descriptor_sets
from .steps import STEPS
from .validate import check_bool, check_integer, check_number, unknown_names

DEFAULTS: dict[str, Any] = {
    "datasets": {"map": None, "query": None, "query_gt": None},
    "extract": {"local": "sift", "global": ["densevlad"], "weights": None, "local_conf": {}, "global_conf": {}},
    "retrieve": {"fusion": "gharm", "topk": 20, "map_pairs": 20, "precision": "fp32"},
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

#: ``progress(label)`` gives a context manager yielding ``update(advance, total)``
ProgressFactory = Callable[[str], contextlib.AbstractContextManager[Callable[[int, int], None]]]


@contextlib.contextmanager
def no_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    yield lambda advance, total: None


@contextlib.contextmanager
def phases(progress: ProgressFactory, *labels: str,
           open_first: bool = True) -> Iterator[tuple[Callable[[int, int], None], ...]]:
    """One ``update`` per phase of a step whose phases follow each other (a Ray step's work,
    then the merge of its shards): the first phase's progress opens at once (unless not
    ``open_first``: a phase that may not happen), each later one at its first update,
    closing the one before (a terminal shows one live display at a time)."""
    with contextlib.ExitStack() as stack:
        current: dict[str, Any] = {"phase": 0, "update": stack.enter_context(progress(labels[0]))} if open_first \
            else {"phase": None, "update": None}

        def updater(i: int) -> Callable[[int, int], None]:
            def update(advance: int, total: int) -> None:
                if current["phase"] != i:
                    stack.close()
                    current.update(phase=i, update=stack.enter_context(progress(labels[i])))
                current["update"](advance, total)
            return update

        yield tuple(updater(i) for i in range(len(labels)))


@dataclass
class PipelineResult:
    steps: list[str] = field(default_factory=list)  # what each step did, one line each
    seconds: dict[str, float] = field(default_factory=dict)  # wall-clock time of each step, in order
    localization: localize_mod.LocalizeReport | None = None
    evaluation: dict | None = None


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
        # inside a free-form table (local_conf, conf, ...) the rest of the key is one dotted key
        cut = next((i + 1 for i, part in enumerate(parts[:-1]) if part.endswith("conf")), len(parts) - 1)
        *parents, leaf = parts[:cut] + [".".join(parts[cut:])]
        target: Any = conf
        for depth, part in enumerate(parents):
            if not isinstance(target, dict) or part not in target:
                raise CbirError(f"--set {key}: " + unknown_key_message(part, target if isinstance(target, dict) else
                                                                       {}, ".".join(parents[:depth])))
            target = target[part]
        free = bool(parents) and parents[-1].endswith("conf")
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
    for k, v in data.items():
        if k not in into:
            raise CbirError(unknown_key_message(k, into, section), where)
        if isinstance(into[k], dict) and not k.endswith("conf"):
            if not isinstance(v, dict):
                raise CbirError(f"{k!r} must be a table", where)
            _merge(into[k], v, where, f"{section}.{k}" if section else k)
        else:
            into[k] = v


def unknown_key_message(key: str, known: dict, section: str) -> str:
    """``unknown key 'top_k' (did you mean 'topk'?) in [retrieve]``, or the keys there are."""
    return f"unknown key {unknown_names([key], known)} {f'in [{section}]' if section else 'at the top level'}"


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

    @property
    def local_name(self) -> str:
        return self.local.default_store_name()

    @property
    def tag(self) -> str:
        return "+".join(self.global_names)

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
                thresholds, report if rp["write"] else None, conf["device"], conf["num_workers"], executor)


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


# -------------------------------------------------------------------------------- re-runs
@dataclass
class Change:
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

    for ds in (p.map, p.query):
        for kind, e, name in [("local", p.local, p.local_name), *(("global", g, n) for g, n in
                                                                    zip(p.globals_, p.global_names, strict=True))]:
            path = ds.store_path(kind, name)
            if path.exists():
                with open_store(path) as s:
                    compare("extract", path, s.config, _expected_store_config(e))
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
        from .io.map_store import read_map

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


def _expected_store_config(e: Extractor) -> dict[str, Any]:
    config = e.store_config()
    if "model_digest" in config:  # learned on the map by the run
        config["model_digest"] = UNKNOWN
    return config


def _pairs_config(p: Plan, conf: RetrievalConf | None) -> dict[str, Any]:
    if conf is None:
        return {"exhaustive": True}
    return {**conf.record(), "stores": p.global_names}


def _match_config(p: Plan, verify: VerifyConf) -> dict[str, Any]:
    config = match_mod.match_config(p.local_name, {}, p.matcher, verify)
    config.pop("features_config")  # compared with the features stores (extract)
    return config


def run(p: Plan, *, overwrite: bool = False, from_step: str | None = None,
        log: Callable[[str], None] = lambda s: None, progress: ProgressFactory = no_progress) -> PipelineResult:
    """Run the steps of ``p``, reusing what is done (see the module's rules on re-runs)."""
    if from_step is not None and from_step not in STEPS:
        raise CbirError(f"unknown step {from_step!r} (steps: {', '.join(STEPS)})")
    start = STEPS.index(from_step) if from_step else len(STEPS)
    found = changes(p)
    if found:
        first = min(STEPS.index(c.step) for c in found)
        if first < start and not overwrite:
            more = f" (and {len(found) - 1} more output(s))" if len(found) > 1 else ""
            raise CbirError(f"the configuration changed since {found[0]}{more}: pass --overwrite to redo "
                            f"{STEPS[first]} and the steps after it, replacing their outputs, or --from STEP")
        start = min(start, first)
    redo = {s: STEPS.index(s) >= start for s in STEPS}
    result = PipelineResult()

    def step(msg: str) -> None:
        result.steps.append(msg)
        log(msg)

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        result.seconds[name] = round(time.perf_counter() - t0, 3)

    for c in found:
        if redo[c.step]:
            step(f"{c.step}: redone, replacing {c.path} ({'; '.join(c.differences)})")
    with timed("extract"):
        _extract(p, redo["extract"], step, progress)
    with timed("retrieve"):
        query_pairs, map_pairs = _retrieve(p, redo["retrieve"], step, progress)
    with timed("match"):
        _match(p, query_pairs, map_pairs, redo["match"], step, progress)
    with timed("map"):
        mr = mapping.main(p.map, p.local_name, p.map_matches, overrides=p.map_overrides, overwrite=redo["map"])
    step(f"map: {mr.points} points, mean track length {mr.mean_track_length:.2f}, "
         f"mean reprojection error {mr.mean_reprojection_error:.2f} px{_status(mr.status)}")
    with timed("localize"), progress("localize") as update:
        report = localize_mod.main(
            p.query, p.map, query_pairs, p.local_name, p.query_matches, config=p.localize_config,
            overrides=p.localize_overrides, name=p.localization_name, num_workers=max(1, p.num_workers), post=p.post,
            pairs_source=localize_mod.pairs_source(p.query_pairs_path, p.query), overwrite=redo["localize"],
            progress=update, estimate=p.executor.pose_estimator())
    result.localization = report
    step(f"localize ({p.localize_config}): {report.localized}/{len(report.results)} queries -> "
         f"{report.directory}{_status(report.status)}")
    for warning in report.warnings:
        step(f"localize: warning: {warning}")
    if p.query_gt is not None:
        gt = p.query_gt.sensors.image_poses()
        evaluated = {r.name: gt[r.name] for r in report.results if r.name in gt}
        if not evaluated:
            raise CbirError(f"none of the {len(report.results)} queries has a ground-truth pose: check "
                            "datasets.query_gt", p.query_gt.root)
        errors = pose_errors({r.name: r.pose for r in report.results if r.success and r.pose is not None}, evaluated)
        result.evaluation = {"all": summarize(errors, p.thresholds)}
        atomic_write_text(report.directory / "evaluation.json", json.dumps(result.evaluation, indent=1) + "\n")
    page = report.directory / "report.html"
    if p.report is not None and (redo["evaluate"] or report.status != "reused" or not page.exists()):
        with timed("report"), progress("report") as update:
            data = report_mod.collect(p.query, p.map, results=report.directory, pairs=query_pairs,
                                      ground_truth=p.query_gt, conf=p.report, progress=update)
            report_mod.write(data, page)
        step(f"report: {page}")
    step("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()) +
         f"; total {sum(result.seconds.values()):.1f} s")
    return result


def _status(status: str) -> str:
    return {"reused": " (reused: same configuration and inputs)", "redone": " (redone: its inputs changed)",
            "replaced": " (replaced)"}.get(status, "")


def _extract(p: Plan, replace: bool, step: Callable[[str], None], progress: ProgressFactory) -> None:
    """Local and global features of both datasets, one pass per dataset (one network for
    both: DELG); the queries' DenseVLAD with the map's vocabulary."""
    workers = p.num_workers

    def extract(extractors: list[Extractor], dataset: Dataset) -> list:
        learned = ", ".join(e.name for e in extractors if e.learns_on_map) or "nothing"  # shown only when one learns
        with phases(progress, f"learn {learned} on {dataset.root.name}", f"extract {dataset.root.name}",
                    f"merge the shards of {dataset.root.name}", open_first=False) as (learning, update, merging):
            return p.executor.extract(extractors, dataset, num_workers=workers, overwrite=replace, progress=update,
                                      learning=learning, merging=merging)

    rm = extract([p.local, *p.globals_], p.map)
    query_globals = []
    for g, r in zip(p.globals_, rm[1:], strict=True):
        if g.learns_on_map:  # the queries are described with the model learned on the map
            model = model_path(r.path)
            conf = {**{k: v for k, v in g.conf.items() if k != "learn"}, "model": str(model)}
            g = extract_mod.build_extractor(g.name, conf, "global")
        query_globals.append(g)
    rq = extract([p.local, *query_globals], p.query)
    for ds, r in ((p.map, rm[0]), (p.query, rq[0])):
        step(f"extract {p.local.name} {ds.root.name}: {r.extracted} new, {r.already_present} present, "
             f"{len(r.failed)} skipped")
    for g, r, r_q in zip(p.globals_, rm[1:], rq[1:], strict=True):
        step(f"extract {g.name}: map {r.extracted} new / {r.already_present} present, query {r_q.extracted} new")


def _retrieve(p: Plan, replace: bool, step: Callable[[str], None],
              progress: ProgressFactory) -> tuple[list[Pair], list[Pair]]:
    """Query x map and map x map pairs; a pairs file of the same configuration and inputs is
    reused."""
    m, q = p.map, p.query
    with open_descriptor_sets(q, m, p.global_names) as (qset, mset):
        out = []
        for path, conf, query_set in ((p.query_pairs_path, p.query_retrieval, qset),
                                      (p.map_pairs_path, p.map_retrieval, mset)):
            if conf is None:
                names = sorted(m.sensors.image_names())
                record = {"step": "pairs", "config": {"exhaustive": True}, "inputs": {"images": digest(names)}}
            else:
                record = pairs_record(conf, query_set, mset)
            if not replace and read_pairs_record(path) == record:
                out.append((read_pairs(path), "reused"))
                continue
            with progress(f"retrieve {path.stem}") as update:
                if conf is None:
                    pairs = exhaustive_pairs(names)
                else:
                    pairs = p.executor.retrieve(q if query_set is qset else m, m, query_set, mset, p.global_names,
                                                conf, device=p.device, progress=update).pairs
            path.parent.mkdir(parents=True, exist_ok=True)
            write_pairs(path, pairs, record)
            out.append((pairs, "new"))
    (query_pairs, qs), (map_pairs, ms) = out
    step(f"retrieve ({p.query_retrieval.fusion.name} of {p.tag}): {len(query_pairs)} query pairs"
         f"{' (reused)' if qs == 'reused' else ''}, {len(map_pairs)} map pairs{' (reused)' if ms == 'reused' else ''}")
    return query_pairs, map_pairs


def _match(p: Plan, query_pairs: list[Pair], map_pairs: list[Pair], replace: bool, step: Callable[[str], None],
           progress: ProgressFactory) -> None:
    common = {"matcher": p.matcher, "device": p.device, "overwrite": replace, "num_workers": p.num_workers}
    with phases(progress, "match map pairs", "merge the shards of the map matches") as (update, merging):
        mm = p.executor.match(p.map, p.map, map_pairs, p.local_name, name=p.map_matches, verify=p.map_verify,
                              progress=update, merging=merging, **common)
    with phases(progress, "match query pairs", "merge the shards of the query matches") as (update, merging):
        qm = p.executor.match(p.query, p.map, query_pairs, p.local_name, name=p.query_matches,
                              verify=p.query_verify, progress=update, merging=merging, **common)
    by_poses = f", {mm.verified_with_poses} verified with their poses" if p.map_verify.method == "poses" else ""
    fallbacks = f", {len(mm.ransac_fallbacks)} by RANSAC ({'; '.join(sorted({r for _, r in mm.ransac_fallbacks}))})" \
        if mm.ransac_fallbacks else ""
    step(f"match + verify: map {mm.matched} new pairs ({mm.already_present} present{by_poses}{fallbacks}), "
         f"query {qm.matched} new pairs ({qm.already_present} present)")
