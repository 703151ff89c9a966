"""A run of a checked plan: the steps in order, each reused, resumed or redone by the
rules of :mod:`cbir.pipeline`, through the plan's executor."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import extract as extract_mod
from .. import localize as localize_mod
from .. import mapping
from .. import report as report_mod
from ..errors import CbirError
from ..evaluation.localization import pose_errors, summarize
from ..io.atomic import atomic_write_text
from ..io.dataset import Dataset, model_path
from ..io.pairs import Pair, exhaustive_pairs, read_pairs, read_pairs_record, write_pairs
from ..io.provenance import digest
from ..models.base import Extractor
from ..retrieval import pairs_record
from ..retrieval.descriptors import open_descriptor_sets
from ..steps import STEPS
from .changes import changes
from .plan import Plan

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
                    f"collect the parts of {dataset.root.name}", open_first=False) as (learning, update, merging):
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
    if p.hash_model is not None:  # the codes first: retrieval ranks by them
        from ..hashing.stores import write_code_store

        assert p.hash_path is not None
        for ds in (m, q):
            write_code_store(ds, p.global_names[0], p.hash_model, p.hash_path, p.retrieval_names[0],
                             overwrite=replace)
        step(f"hash {p.global_names[0]}: {p.retrieval_names[0]} ({p.hash_model.method}, {p.hash_model.bits} bits) "
             "of the map and the queries")
    with open_descriptor_sets(q, m, p.retrieval_names) as (qset, mset):
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
                    pairs = p.executor.retrieve(q if query_set is qset else m, m, query_set, mset, p.retrieval_names,
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
    with phases(progress, "match map pairs", "collect the parts of the map matches") as (update, merging):
        mm = p.executor.match(p.map, p.map, map_pairs, p.local_name, name=p.map_matches, verify=p.map_verify,
                              progress=update, merging=merging, **common)
    with phases(progress, "match query pairs", "collect the parts of the query matches") as (update, merging):
        qm = p.executor.match(p.query, p.map, query_pairs, p.local_name, name=p.query_matches,
                              verify=p.query_verify, progress=update, merging=merging, **common)
    by_poses = f", {mm.verified_with_poses} verified with their poses" if p.map_verify.method == "poses" else ""
    fallbacks = f", {len(mm.ransac_fallbacks)} by RANSAC ({'; '.join(sorted({r for _, r in mm.ransac_fallbacks}))})" \
        if mm.ransac_fallbacks else ""
    step(f"match + verify: map {mm.matched} new pairs ({mm.already_present} present{by_poses}{fallbacks}), "
         f"query {qm.matched} new pairs ({qm.already_present} present)")
