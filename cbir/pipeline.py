"""The whole chain in one call (``cbir pipeline``): extract -> retrieve (fusion) -> match ->
verify -> map -> localize -> post-process -> evaluate, from one TOML configuration.

Every step is the library's own step function, so the pipeline does exactly what the
separate commands do; each step resumes (stores skip what they hold, a map of the same
configuration is kept), so a re-run after an interruption continues where it stopped.

Configuration (every key optional except the datasets; ``--set a.b=value`` overrides)::

    [datasets]
    map = "path/to/map"          # kapture dataset with poses
    query = "path/to/query"
    query_gt = "path/to/query_gt" # optional: ground truth for the evaluation
    [extract]
    local = "sift"               # sift, rootsift, r2d2, delg
    global = ["densevlad"]       # apgem, netvlad, densevlad, delg; several: late fusion
                                 # (local and global delg with the same max_size and
                                 # scales run the network once for both)
    weights = "path/to/weights"  # directory or file, for the networks
    local_conf = {}              # extractor options
    global_conf = {}
    [retrieve]
    fusion = "gharm"
    topk = 20                    # query x map pairs
    map_pairs = 20               # map x map pairs by retrieval; 0: every pair
    [match]
    ratio = 0.0                  # 0: off
    mutual = true
    [map]
    conf = {}                    # config1 overrides / pycolmap options
    [localize]
    config = "config2"
    conf = {}
    rig = false
    sequence = false
    sequence_max_gap = 1
    [evaluate]
    thresholds = [[0.25, 2.0], [0.5, 5.0], [5.0, 10.0]]
"""

from __future__ import annotations

import copy
import json
from contextlib import ExitStack
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import extract as extract_mod
from . import localize as localize_mod
from . import mapping
from .errors import CbirError
from .evaluation.localization import DEFAULT_THRESHOLDS, pose_errors, summarize
from .io.dataset import Dataset
from .io.pairs import exhaustive_pairs, write_pairs
from .io.store import open_store
from .matching import MatcherConf, VerifyConf
from .models.densevlad import MODEL_SUFFIX as DENSEVLAD_MODEL_SUFFIX
from .matching import match as match_mod
from .retrieval import DescriptorSet, FusionConf, RetrievalConf, retrieve
from .io.textfile import read_utf8

DEFAULTS: dict[str, Any] = {
    "datasets": {"map": None, "query": None, "query_gt": None},
    "extract": {"local": "sift", "global": ["densevlad"], "weights": None, "local_conf": {}, "global_conf": {}},
    "retrieve": {"fusion": "gharm", "topk": 20, "map_pairs": 20},
    "match": {"ratio": 0.0, "mutual": True, "max_error": 4.0, "min_inliers": 15},
    "map": {"conf": {}},
    "localize": {"config": "config2", "conf": {}, "rig": False, "rig_max_gap": 0, "sequence": False,
                 "sequence_max_gap": 1},
    "evaluate": {"thresholds": [list(t) for t in DEFAULT_THRESHOLDS]},
    "device": "auto",
    "num_workers": 2,
}


@dataclass
class PipelineResult:
    steps: list[str] = field(default_factory=list)  # what each step did, one line each
    localization: localize_mod.LocalizeReport | None = None
    evaluation: dict | None = None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The defaults, updated by the TOML file, updated by ``a.b=value`` overrides (TOML values)."""
    conf = copy.deepcopy(DEFAULTS)
    base = Path(".")
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(read_utf8(path, "configuration file"))
        except tomllib.TOMLDecodeError as e:
            raise CbirError(f"invalid TOML: {e}", path) from None
        _merge(conf, data, str(path))
        base = path.parent
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CbirError(f"override {item!r}: expected key=value")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        *parents, leaf = key.split(".")
        target = conf
        for p in parents:
            target = target.setdefault(p, {})
        if leaf not in target and parents and parents[0] in DEFAULTS and not parents[-1].endswith("conf"):
            raise CbirError(f"unknown option {key!r}")
        target[leaf] = parsed
    for key in ("map", "query", "query_gt"):  # dataset paths are relative to the configuration file
        v = conf["datasets"].get(key)
        if v is not None and not Path(v).is_absolute():
            conf["datasets"][key] = str(base / v)
    if not conf["datasets"]["map"] or not conf["datasets"]["query"]:
        raise CbirError("the configuration needs datasets.map and datasets.query")
    return conf


def _merge(into: dict, data: dict, where: str) -> None:
    for k, v in data.items():
        if k not in into:
            raise CbirError(f"unknown key {k!r}", where)
        if isinstance(into[k], dict) and isinstance(v, dict) and not k.endswith("conf"):
            _merge(into[k], v, where)
        else:
            into[k] = v


def run(conf: dict[str, Any], log: Callable[[str], None] = lambda s: None) -> PipelineResult:
    result = PipelineResult()

    def step(msg: str) -> None:
        result.steps.append(msg)
        log(msg)

    m, q = Dataset(conf["datasets"]["map"]), Dataset(conf["datasets"]["query"])
    ex, dev, workers = conf["extract"], conf["device"], int(conf["num_workers"])
    weights = ex["weights"]
    # -- extract: local and global in one pass per dataset (one network for both: DELG)
    lx = _build("local", ex["local"], dict(ex["local_conf"]), weights, dev)
    local = lx.default_store_name()
    gxs = [_build("global", g, dict(ex["global_conf"]), weights, dev) for g in ex["global"]]
    rm = extract_mod.extract_all([lx, *gxs], m, num_workers=workers)
    gqs = []
    for g, gx, r in zip(ex["global"], gxs, rm[1:]):
        if g == "densevlad":  # queries with the map's vocabulary and PCA
            model = r.path.with_name(r.path.stem + DENSEVLAD_MODEL_SUFFIX)
            gx = _build("global", g, {**ex["global_conf"], "model": str(model)}, weights, dev)
        gqs.append(gx)
    rq = extract_mod.extract_all([lx, *gqs], q, num_workers=workers)
    for ds, r in ((m, rm[0]), (q, rq[0])):
        step(f"extract {ex['local']} {ds.root.name}: {r.extracted} new, {r.already_present} present, "
             f"{len(r.failed)} skipped")
    global_names = [r.path.stem for r in rm[1:]]
    for g, r, r_q in zip(ex["global"], rm[1:], rq[1:]):
        step(f"extract {g}: map {r.extracted} new / {r.already_present} present, query {r_q.extracted} new")
    # -- retrieve
    rt = conf["retrieve"]
    fusion = FusionConf(rt["fusion"])
    with ExitStack() as stack:
        mset = DescriptorSet.align([stack.enter_context(open_store(m.store_path("global", n))) for n in global_names],
                                   m.sensors.image_names())
        qset = DescriptorSet.align([stack.enter_context(open_store(q.store_path("global", n))) for n in global_names],
                                   q.sensors.image_names())
        query_pairs = retrieve(qset, mset, RetrievalConf(topk=int(rt["topk"]), fusion=fusion))
        if int(rt["map_pairs"]) > 0:
            map_pairs = retrieve(mset, mset, RetrievalConf(topk=int(rt["map_pairs"]), fusion=fusion,
                                                           exclude_self=True))
        else:
            map_pairs = exhaustive_pairs(m.sensors.image_names())
    tag = "+".join(global_names)
    qp_path, mp_path = q.store_path("pairs", f"{tag}_top{rt['topk']}"), m.store_path("pairs", f"{tag}_map")
    for path, pairs in ((qp_path, query_pairs), (mp_path, map_pairs)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pairs(path, pairs)
    step(f"retrieve ({fusion.name} of {tag}): {len(query_pairs)} query pairs, {len(map_pairs)} map pairs")
    # -- match + verify
    mt = conf["match"]
    matcher = MatcherConf(mutual=bool(mt["mutual"]), ratio=float(mt["ratio"]) or None)
    verify = VerifyConf(max_error=float(mt["max_error"]), min_inliers=int(mt["min_inliers"]))
    mm = match_mod.main(m, m, map_pairs, local, name=f"{local}-map", matcher=matcher, verify=verify, device=dev,
                        num_workers=workers)
    qm = match_mod.main(q, m, query_pairs, local, name=f"{local}-query", matcher=matcher, verify=verify,
                        device=dev, num_workers=workers)
    step(f"match + verify: map {mm.matched} new pairs ({mm.already_present} present), "
         f"query {qm.matched} new pairs ({qm.already_present} present)")
    # -- map
    mr = mapping.main(m, local, f"{local}-map", overrides=conf["map"]["conf"])
    step(f"map: {mr.points} points, mean track length {mr.mean_track_length:.2f}, "
         f"mean reprojection error {mr.mean_reprojection_error:.2f} px")
    # -- localize + post-process
    lz = conf["localize"]
    report = localize_mod.main(q, m, query_pairs, local, f"{local}-query", config=lz["config"],
                               overrides=lz["conf"], name=f"{local}-{tag}-{lz['config']}", num_workers=workers)
    report = localize_mod.postprocess(report, q, rig=bool(lz["rig"]), rig_max_gap=int(lz["rig_max_gap"]),
                                      sequence=bool(lz["sequence"]), sequence_max_gap=int(lz["sequence_max_gap"]))
    results = report.results
    result.localization = report
    step(f"localize ({lz['config']}): {report.localized}/{len(results)} queries -> {report.directory}")
    # -- evaluate
    if conf["datasets"].get("query_gt"):
        gt = Dataset(conf["datasets"]["query_gt"]).sensors.image_poses()
        errors = pose_errors({r.name: r.pose for r in results if r.success}, gt)
        th = tuple(tuple(float(v) for v in t) for t in conf["evaluate"]["thresholds"])
        result.evaluation = {"all": summarize(errors, th)}
        (report.directory / "evaluation.json").write_text(json.dumps(result.evaluation, indent=1) + "\n")
    return result


def _build(kind: str, name: str, conf: dict, weights: str | None, device: str):
    return extract_mod.build_extractor(name, extract_mod.extractor_conf(kind, name, conf, weights, device), kind)
