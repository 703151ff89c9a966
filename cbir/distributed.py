"""Extraction, matching, retrieval and localization on a Ray cluster (``--executor ray``):
:class:`RayExecutor`, the executor of :mod:`cbir.executor` that runs shards as Ray tasks.

The images (pairs) still to do are cut into deterministic shards (runs of ``shard_size``
in the order a local run takes them). Extraction runs its shards on long-lived actors
(one per GPU, or per ``cpus`` CPUs, each loading the networks once); matching, retrieval
and pose estimation run each shard as a Ray task. A shard runs the local code on its
images (pairs) and writes its own stores, atomically, under
``DATASET/cbir/shards/<plan>/<shard>/``; a shard whose stores exist is done. When every
shard is done the driver merges them, in order, after what the final stores already held,
into the final stores (atomically), and removes the shards. The result is the store a
local run writes, key for key and value for value in every column.

A worker that dies (killed, out of memory, its node lost) has its task run again by Ray, or
its actor restarted and the shard run again (``max_retries``); the shard's stores resume from
the batches it had written. A re-run
after an interruption skips the shards already written. The dataset must be on a file
system every node sees at the same path (NFS, a cluster file system). Ray is imported here
only: the local executor never needs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import CbirError
from .executor import Progress, RetrievalRun, ShardSizes, require_exact_for_expansion
from .io.atomic import WriteLock, atomic_output
from .io.dataset import Dataset, model_path
from .io.provenance import digest
from .io.store import SCHEMAS, copy_part, finish_merge, open_store, plan_merge, present_keys
from .validate import check_integer

#: (kind, registered name, configuration) of one extractor, as workers rebuild it
ExtractorSpec = tuple[str, str, dict[str, Any]]


def require_ray(what: str) -> None:
    """Ray importable, else the one-line error that says how to install it (``what``: the
    option that asked for it)."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise CbirError(f"{what} needs Ray: pip install 'cbir[ray]' ({e})") from None


@dataclass(frozen=True)
class RayConf:
    """``address``: the cluster (None: ``$RAY_ADDRESS``, else a local instance);
    ``shard_size``: images a task; ``num_gpus``: GPUs a task (None: 1 where the cluster has
    GPUs and the extractors run on a GPU or ``auto``, else 0); ``cpus``: CPUs a task or actor
    (its threads; None: 1, and for GPU work the cluster's CPUs per GPU, to decode and verify);
    ``max_retries``: runs of a task after its worker died."""

    address: str | None = None
    shard_size: int = 64
    num_gpus: float | None = None
    cpus: int | None = None
    max_retries: int = 3

    def __post_init__(self) -> None:
        check_integer("shard_size", self.shard_size, 1)
        if self.cpus is not None:
            check_integer("cpus", self.cpus, 1)
        check_integer("max_retries", self.max_retries, 0)


class RayExecutor:
    """The steps as shards on a Ray cluster (``address``: None for ``$RAY_ADDRESS``, else a
    local instance), ``sizes`` of work a shard; each step's parts reduced here into what
    :class:`cbir.executor.LocalExecutor` writes."""

    name = "ray"

    def __init__(self, address: str | None = None, sizes: ShardSizes = ShardSizes()) -> None:
        self.address, self.sizes = address, sizes

    def conf(self, shard_size: int) -> RayConf:
        return RayConf(address=self.address, shard_size=shard_size)

    def extract(self, extractors: Any, dataset: Dataset, *, store_names: Any = None, images: list[str] | None = None,
                overwrite: bool = False, num_workers: int | None = None, image_options: Any = None,
                progress: Progress | None = None, learning: Progress | None = None,
                merging: Progress | None = None) -> list:
        from .extract import store_kind

        # the workers rebuild each extractor from its class's path: plugins that are not installed by name work too
        specs = [e if isinstance(e, tuple) else
                 (store_kind(e), f"{type(e).__module__}:{type(e).__qualname__}", dict(e.conf)) for e in extractors]
        names = list(store_names) if store_names is not None else [None] * len(specs)
        return extract_on_ray(specs, dataset, store_names=names, images=images, overwrite=overwrite,
                              image_options=image_options, conf=self.conf(self.sizes.images), progress=progress,
                              merging=merging)

    def match(self, query: Dataset, map_: Dataset, pairs: list, local: str, *, name: str | None = None,
              matcher: Any = None, verify: Any = None, device: str = "auto", overwrite: bool = False,
              num_workers: int | None = None, progress: Progress | None = None, merging: Progress | None = None,
              pairs_file: str | None = None) -> Any:
        return match_on_ray(query, map_, pairs, local, name=name, matcher=matcher, verify=verify, device=device,
                            overwrite=overwrite, conf=self.conf(self.sizes.pairs), progress=progress,
                            merging=merging, pairs_file=pairs_file)

    def retrieve(self, query: Dataset, map_: Dataset, qset: Any, mset: Any, store_names: list[str], conf: Any, *,
                 device: str = "auto", qe: int = 0, qe_alpha: float = 0.0, dba: int = 0, dba_alpha: float = 0.0,
                 index: Any = None, recall_sample: int = 0, progress: Progress | None = None) -> RetrievalRun:
        from .models.base import resolve_device
        from .retrieval.index import recall, recall_sample_rows
        from .retrieval.rerank import retrieve_with_expansion

        ray_conf = self.conf(self.sizes.map_images)
        stats: dict[str, int] = {}
        if index is not None:
            require_exact_for_expansion(qe, dba)
        if qe or dba:  # every search on the cluster, the expansions here
            pairs = retrieve_with_expansion(qset, mset, conf, qe=qe, qe_alpha=qe_alpha, dba=dba, dba_alpha=dba_alpha,
                                            device=resolve_device(device), progress=progress,
                                            search=ray_search(query, map_, store_names, device=device,
                                                              ray_conf=ray_conf))
        else:
            pairs = retrieve_on_ray(query, map_, store_names, conf, device=device, progress=progress, index=index,
                                    stats=stats, ray_conf=ray_conf)
        measured = None
        if recall_sample and index is not None:  # the sample searched exactly, on the cluster too
            sample = [qset.names[i] for i in recall_sample_rows(len(qset.names), recall_sample, index.seed)]
            chosen = set(sample)
            measured = recall(retrieve_on_ray(query, map_, store_names, conf, device=device, queries=sample,
                                              ray_conf=ray_conf), [p for p in pairs if p.query in chosen])
        return RetrievalRun(pairs, measured, stats.get("indexes_built", 0))

    def build_indexes(self, map_: Dataset, store_names: list[str], conf: Any, *, overwrite: bool = False,
                      progress: Progress | None = None) -> list[tuple[Path, str]]:
        return build_index_on_ray(map_, store_names, conf, overwrite=overwrite, progress=progress,
                                  ray_conf=self.conf(self.sizes.map_images))

    def pose_estimator(self) -> Callable[..., list] | None:
        return ray_estimator(self.conf(self.sizes.queries))


def extract_on_ray(specs: list[ExtractorSpec], dataset: Dataset, *, store_names: list[str | None],
                   images: list[str] | None = None, overwrite: bool = False, image_options: Any = None,
                   conf: RayConf = RayConf(), progress: Callable[[int, int], None] | None = None,
                   merging: Callable[[int, int], None] | None = None) -> list:
    """What :func:`cbir.extract.extract_all` does, on a Ray cluster; one report a store.
    ``progress(images, total)`` as shards finish, then ``merging(parts, total)`` as their
    stores are copied into the final ones."""
    from . import extract as extract_mod

    image_options = image_options or extract_mod.ImageOptions()
    # built here too (on the CPU): every option, weight file and name is checked before the cluster works
    local = [extract_mod.build_extractor(name, {**c, "device": "cpu"} if "device" in c else c, kind)
             for kind, name, c in specs]
    names = [n or e.default_store_name() for e, n in zip(local, store_names, strict=True)]
    finals = [dataset.store_path(extract_mod.store_kind(e), n) for e, n in zip(local, names, strict=True)]
    wanted = images if images is not None else sorted(dataset.sensors.image_names())
    specs = list(specs)
    for j, (e, final) in enumerate(zip(local, finals, strict=True)):
        if isinstance(e, extract_mod.GlobalExtractor):  # a model learned on the map (DenseVLAD's): here, once
            final.parent.mkdir(parents=True, exist_ok=True)
            e.prepare(final, wanted, extract_mod.image_loader(dataset, e, image_options), overwrite=overwrite)
            if e.learns_on_map and e.conf.get("learn"):  # the tasks read the model learned here
                kind, name, c = specs[j]
                specs[j] = (kind, name, {**c, "learn": False, "model": str(model_path(final))})
    attrs = [extract_mod.store_attributes(e, n, image_options) for e, n in zip(local, names, strict=True)]
    present = [present_keys(final, f"{extract_mod.store_kind(e)}-features", a, overwrite)
               for e, final, a in zip(local, finals, attrs, strict=True)]
    todo = [n for n in wanted if any(n not in p for p in present)]
    shards = _cut(todo, conf.shard_size)
    plan = dataset.root / "cbir" / "shards" / digest({"stores": [str(f) for f in finals], "config": attrs,
                                                      "images": todo})
    shard_dirs = [plan / f"{i:06d}" for i in range(len(shards))]
    outputs = [[d / extract_mod.store_kind(e) / f"{n}.h5" for e, n in zip(local, names, strict=True)]
               for d in shard_dirs]
    reports = [extract_mod.ExtractReport(final, already_present=len([n for n in wanted if n in p]))
               for final, p in zip(finals, present, strict=True)]
    total = len(wanted)
    if progress:
        progress(total - len(todo), total)
    run = [i for i, outs in enumerate(outputs) if not all(o.exists() for o in outs)]
    on_gpu = any(_wants_gpu(c.get("device", "cpu")) for _, _, c in specs)
    for i, shard_reports in run_shards(_extract_shard, {i: (str(dataset.root), names, shards[i], str(shard_dirs[i]),
                                                             image_options, conf.cpus) for i in run},
                                       [s[0] for s in shards], conf, on_gpu,
                                       setup=(_build_extractors, (specs, conf.cpus)), actor=ExtractionActor):
        for report, r in zip(reports, shard_reports, strict=True):
            _add(report, r)
        if progress:
            progress(len(shards[i]), total)
    parts = [merge_parts(final, [o[j] for o in outputs], keep=not overwrite)
             for j, final in enumerate(finals)]
    merged = _merge_counter(merging, sum(map(len, parts)))
    for j, (final, a) in enumerate(zip(finals, attrs, strict=True)):
        merge_into(final, parts[j], f"{extract_mod.store_kind(local[j])}-features", a, conf=conf, progress=merged)
    for j, report in enumerate(reports):  # images of shards written by an earlier run count as extracted now
        report.extracted = _count(finals[j]) - report.already_present
    shutil.rmtree(plan, ignore_errors=True)
    _remove_if_empty(plan.parent)
    return reports


def _wants_gpu(device: Any) -> bool:
    """Whether work on ``device`` (``cpu``, ``cuda[:N]``, ``auto``) should get a GPU of the cluster."""
    return str(device) == "auto" or str(device).startswith("cuda")


def run_shards(task: Callable, arguments: dict[int, tuple], labels: list[str], conf: RayConf,
               on_gpu: bool, setup: tuple[Callable, tuple] | None = None,
               actor: type | None = None) -> Iterator[tuple[int, Any]]:
    """Run ``task(*arguments[i])`` for every shard ``i`` on the cluster; yield ``(i, result)``
    as they finish.

    Without ``setup``, each shard is a Ray task. With ``setup = (build, args)``, the shards
    run on long-lived actors, as many as the cluster has room for (a GPU each where it has
    GPUs and ``on_gpu``, else ``conf.cpus`` CPUs, default 1, each), of class ``actor`` (a
    :class:`ShardActor`): each calls ``build(*args)`` once (load a network's weights, say) and
    runs ``task(state, *arguments[i])`` for shard after shard.
    An error of cbir's in a shard is raised as it is (one line); a shard whose worker died
    more than ``max_retries`` times (Ray restarts the actor, or runs the task again) is an
    error that says how to resume."""
    import ray

    if not arguments:
        return
    _connect(conf)
    gpus = conf.num_gpus
    resources = ray.cluster_resources()
    if gpus is None:
        gpus = 1 if on_gpu and resources.get("GPU", 0) > 0 else 0
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if conf.cpus:
        cpus = conf.cpus
    else:  # a GPU's share of its node's CPUs (decoding, verification), else one
        shares = [int(n.get("CPU", 0) * gpus // n["GPU"]) for n in nodes if gpus and n.get("GPU")]
        cpus = max(1, min(shares)) if shares else 1
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        # Ray would wait for such a node for ever
        raise CbirError(f"no node of the Ray cluster has {cpus} CPUs{f' and {gpus} GPUs' if gpus else ''} for a "
                        "shard: lower cpus or num_gpus")
    if setup is None:
        remote = ray.remote(task).options(num_cpus=cpus, num_gpus=gpus, max_retries=conf.max_retries,
                                          retry_exceptions=False)
        futures = {remote.remote(*args): i for i, args in arguments.items()}
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = futures[done[0]]
            yield i, _result(ray, done[0], i, labels, conf)
        return
    room = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // cpus)
    remote_actor: Any = ray.remote(actor or ShardActor).options(num_cpus=cpus, num_gpus=gpus,
                                                           max_restarts=conf.max_retries,
                                                           max_task_retries=conf.max_retries)
    actors = [remote_actor.remote(*setup) for _ in range(max(1, min(room, len(arguments))))]
    queue, idle = list(arguments.items()), list(actors)
    running: dict[Any, tuple[int, Any]] = {}
    try:
        while queue or running:
            while idle and queue:  # one shard per actor at a time: a slow one holds back no other
                worker = idle.pop()
                i, args = queue.pop(0)
                running[worker.run.remote(task, *args)] = (i, worker)
            ready, _ = ray.wait(list(running), num_returns=1)
            i, worker = running.pop(ready[0])
            idle.append(worker)
            yield i, _result(ray, ready[0], i, labels, conf)
    finally:
        for worker in actors:  # their CPUs and GPUs go back to the cluster for the next step
            ray.kill(worker)


def _connect(conf: RayConf) -> None:
    """Join the cluster at ``conf.address`` (default ``$RAY_ADDRESS``, else a local instance)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=conf.address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False)
    _ray_notices_to_stderr()


def _ray_notices_to_stderr() -> None:
    """Ray's driver prints the raylet's notices ("A worker died or was killed ...", about a
    worker it then replaces) to stdout, whatever ``log_to_driver`` says; stdout is cbir's
    results (``--json``, pairs in a pipe), so they go to stderr. Ray has no option for it: its
    printing function is wrapped, where it exists."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "cbir_to_stderr", False):
        return

    def to_stderr(data: dict, *args: Any, **kwargs: Any) -> Any:
        return printer({**data, "is_err": True}, *args, **kwargs)

    to_stderr.cbir_to_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


class ShardActor:
    """A Ray actor that builds its state once (``build(*args)``) and runs shard after shard
    on it. Ray names its process ``ray::<class>.run`` while it runs a shard."""

    def __init__(self, build: Callable, args: tuple) -> None:
        self.state = build(*args)

    def run(self, task: Callable, *args: Any) -> Any:
        return task(self.state, *args)


class ExtractionActor(ShardActor):
    """Extraction: its networks, weights loaded once."""


class LocalizationActor(ShardActor):
    """Pose estimation: the map read once, the query stores open."""


def _result(ray: Any, future: Any, i: int, labels: list[str], conf: RayConf) -> Any:
    """A shard's result, or its error as one line."""
    try:
        return ray.get(future)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        if isinstance(cause, CbirError):
            raise cause from None
        raise CbirError(f"shard {i} (from {labels[i]}) failed: {type(cause).__name__}: {cause}") from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayActorError) as e:
        raise CbirError(f"shard {i} (from {labels[i]}) failed: its worker died {conf.max_retries + 1} times "
                        f"({type(e).__name__}); run the command again to resume") from None


def _merge_counter(merging: Callable[[int, int], None] | None, total: int) -> Callable[[int], None] | None:
    """``merging(advance, total)`` as a per-part callback of :func:`merge_into`."""
    return (lambda advance: merging(advance, total)) if merging else None


def merge_parts(final: Path, shards: list[Path], keep: bool) -> list[Path]:
    """What :func:`merge_into` merges: the final store (``keep``), then the shards written;
    none where there is nothing new."""
    written = [s for s in shards if s.exists()]
    if keep and final.exists() and not written:
        return []  # nothing new: the store stays as it is
    return ([final] if keep and final.exists() else []) + written


def merge_into(final: Path, parts: list[Path], kind: str, attrs: dict[str, Any],
               conf: RayConf | None = None, progress: Callable[[int], None] | None = None) -> None:
    """The final store made of ``parts`` in order (:func:`merge_parts`; none: it stays as it
    is), written atomically. With ``conf``, each part's bytes are copied into the final file
    by a Ray task of its own (on a shared file system the copies add up the nodes' bandwidth
    instead of one process's); the keys, offsets and checksums are written here.
    ``progress(1)`` as each part is copied."""
    if not parts:
        return
    with WriteLock(final), atomic_output(final) as tmp:
        plan = plan_merge(parts, tmp, SCHEMAS[kind], attrs)
        crcs: dict[int, dict[str, int]] = {}
        if conf is None or len(plan.jobs) < 2:
            copies: Iterator[tuple[int, dict[str, int]]] = ((i, copy_part(job)) for i, job in enumerate(plan.jobs))
        else:
            copies = run_shards(copy_part, {i: (job,) for i, job in enumerate(plan.jobs)},
                                [job.part.name for job in plan.jobs], replace(conf, cpus=1, num_gpus=0), on_gpu=False)
        for i, part_crcs in copies:
            crcs[i] = part_crcs
            if progress:
                progress(1)
        if progress and len(parts) > len(plan.jobs):
            progress(len(parts) - len(plan.jobs))  # parts without items: nothing to copy
        finish_merge(plan, [crcs[i] for i in range(len(plan.jobs))])


def _count(path: Path) -> int:
    with open_store(path) as store:
        return len(store)


def _add(report: Any, shard: Any) -> None:
    report.weights_note = report.weights_note or shard.weights_note
    report.keypoints += shard.keypoints
    report.failed += shard.failed
    report.empty += shard.empty
    for key, value in shard.seconds.items():
        report.seconds[key] = report.seconds.get(key, 0.0) + value


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def match_on_ray(query: Dataset, map_: Dataset, pairs: list, local: str, *, name: str | None = None,
                 matcher: Any = None, verify: Any = None, device: str = "auto", overwrite: bool = False,
                 conf: RayConf = RayConf(shard_size=1000), progress: Callable[[int, int], None] | None = None,
                 merging: Callable[[int, int], None] | None = None, pairs_file: str | None = None) -> Any:
    """What :func:`cbir.matching.match.main` does, on a Ray cluster: shards of ``shard_size``
    pairs (in the order a local run writes them) matched and verified by Ray tasks;
    ``progress(pairs, total)`` as shards finish, then ``merging(parts, total)`` as their
    stores are copied into the final one."""
    from .matching import match as match_mod
    from .matching.nearest_neighbor import MatcherConf

    matcher = matcher or MatcherConf()
    name = name or local
    same = query.root.resolve() == map_.root.resolve()
    planned, duplicates, self_pairs = match_mod.plan_pairs(pairs, same)
    final = query.store_path("matches", name)
    with open_store(query.store_path("local", local), "local-features") as qstore, \
            open_store(map_.store_path("local", local), "local-features") as mstore:
        match_mod.check_compatible(qstore, mstore)
        skipped = match_mod.unmatchable_pairs(planned, query, map_, qstore, mstore)
        match_mod.require_matchable(planned, skipped, self_pairs, pairs_file)
        attrs = match_mod.store_attributes(name, local, qstore.config, matcher, verify)
    present = present_keys(final, "matches", attrs, overwrite)
    todo = [p for p in planned if p not in present and p not in skipped]
    shards = _cut(todo, conf.shard_size)
    plan = query.root / "cbir" / "shards" / digest({"store": str(final), "config": attrs, "map": str(map_.root),
                                                    "pairs": todo})
    outputs = [plan / f"{i:06d}" / "matches" / f"{name}.h5" for i in range(len(shards))]
    report = match_mod.MatchReport(final, already_present=len(planned) - len(todo) - len(skipped),
                                   duplicates=duplicates, pairs=len(planned) + len(self_pairs))
    report.missing_features += [(f"{a} {b}", "an image paired with itself") for a, b in self_pairs]
    report.missing_features += [(f"{a} {b}", why) for (a, b), why in skipped.items()]
    if progress:
        progress(report.already_present + len(skipped), len(planned))
    run = [i for i, out in enumerate(outputs) if not out.exists()]
    arguments = {i: (str(query.root), str(map_.root), shards[i], local, name, matcher, verify, device, str(outputs[i]),
                     conf.cpus) for i in run}
    for i, shard in run_shards(_match_shard, arguments, [f"{a} {b}" for a, b in (s[0] for s in shards)], conf,
                               _wants_gpu(device)):
        for key in ("matched", "matches", "inliers", "verified_with_poses"):
            setattr(report, key, getattr(report, key) + getattr(shard, key))
        report.missing_features += shard.missing_features
        report.ransac_fallbacks += shard.ransac_fallbacks
        for key, value in shard.seconds.items():
            report.seconds[key] += value
        report.device = shard.device
        if progress:
            progress(len(shards[i]), len(planned))
    parts = merge_parts(final, outputs, keep=not overwrite)
    merge_into(final, parts, "matches", attrs, conf=conf, progress=_merge_counter(merging, len(parts)))
    report.matched = _count(final) - report.already_present  # shards of an earlier run count as matched now
    shutil.rmtree(plan, ignore_errors=True)
    _remove_if_empty(plan.parent)
    return report


def retrieve_on_ray(query: Dataset, map_: Dataset, store_names: list[str], conf: Any, *, device: str = "auto",
                    ray_conf: RayConf = RayConf(shard_size=100_000), index: Any = None, stats: dict | None = None,
                    queries: list[str] | None = None, progress: Callable[[int, int], None] | None = None,
                    query_arrays: list | None = None, map_arrays: list | None = None) -> list:
    """What :func:`cbir.retrieval.retrieve` does, on a Ray cluster: the map cut into shards of
    ``shard_size`` images, each searched for every query by a task (its own top-k), the
    top-k of the shards' top-k's merged here: the exact top-k. With ``index`` (an
    :class:`~cbir.retrieval.index.IndexConf`) each shard is searched through its own faiss
    indexes, kept by :func:`build_index_on_ray` or built by the task for this call
    (``stats["indexes_built"]`` counts those), its candidates rescored exactly. ``queries``:
    only these query images (a sample), in the query set's order. ``query_arrays`` and
    ``map_arrays``: descriptors that replace the stored ones (expanded queries, an augmented
    map: :func:`ray_search`), one array per store in the order of the aligned images; they
    reach the shards through Ray's object store, each shard only its own map rows."""
    import numpy as np
    import ray
    import torch

    from .retrieval.search import open_descriptor_sets, pairs_from_topk, ranked

    if queries is not None and query_arrays is not None:
        raise ValueError("a query sample is searched with its stored descriptors")
    with open_descriptor_sets(query, map_, store_names) as (qset, mset):
        qset = _only(qset, queries)
        n = len(mset.names)
        shards = _map_shards(n, ray_conf.shard_size)
        _connect(ray_conf)
        query_ref = ray.put(query_arrays) if query_arrays is not None else None
        arguments = {i: (str(query.root), str(map_.root), store_names, m0, m1, conf, device, ray_conf.cpus, index,
                         queries, query_ref,
                         ray.put([a[m0:m1] for a in map_arrays]) if map_arrays is not None else None)
                     for i, (m0, m1) in enumerate(shards)}
        found: dict[int, tuple[list, list]] = {}
        built = 0
        labels = [mset.names[m0] for m0, _ in shards]
        for i, (values, indices, built_now) in run_shards(_retrieve_shard, arguments, labels,
                                                          ray_conf, _wants_gpu(device)):
            found[i] = values, indices
            built += built_now
            if progress:
                progress(shards[i][1] - shards[i][0], n)
        if stats is not None:
            stats["indexes_built"] = built
        lists = len(found[0][0]) if found else 0
        values, indices = [], []
        for j in range(lists):  # the exact top-k of every query: the best of the shards' own top-k's
            v = torch.from_numpy(np.concatenate([found[i][0][j] for i in sorted(found)], axis=1))
            ix = torch.from_numpy(np.concatenate([found[i][1][j] for i in sorted(found)], axis=1))
            top_v, top_i = ranked(v, ix, v.shape[1])  # the rule of a local search: ties by map index
            values.append(top_v.numpy())
            indices.append(top_i.numpy())
        if not lists or values[0].shape[1] == 0:
            return []
        return pairs_from_topk(qset.names, mset.names, values, indices, conf)


def build_index_on_ray(map_: Dataset, store_names: list[str], conf: Any, *, overwrite: bool = False,
                       ray_conf: RayConf = RayConf(shard_size=100_000),
                       progress: Callable[[int, int], None] | None = None) -> list[tuple[Path, str]]:
    """What ``cbir index build`` does, per map shard of ``shard_size`` images, on Ray tasks:
    each shard's indexes written atomically to their own file (``index_path(..., rows=)``),
    which ``cbir retrieve --index --executor ray`` with the same shard size uses. A shard whose
    file was built from the same stores and options is kept. ``(path, status)`` per shard."""
    from .retrieval.search import open_descriptor_sets

    with open_descriptor_sets(map_, map_, store_names) as (_, mset):
        n = len(mset.names)
        if not n:
            raise CbirError("no map image has every descriptor", map_.root)
        shards = _map_shards(n, ray_conf.shard_size)
        arguments = {i: (str(map_.root), store_names, m0, m1, conf, overwrite) for i, (m0, m1) in enumerate(shards)}
        done: dict[int, tuple[Path, str]] = {}
        for i, result in run_shards(_index_shard, arguments, [mset.names[m0] for m0, _ in shards], ray_conf, False):
            done[i] = Path(result[0]), result[1]
            if progress:
                progress(shards[i][1] - shards[i][0], n)
        return [done[i] for i in range(len(shards))]


def _map_shards(n: int, size: int) -> list[tuple[int, int]]:
    """``(m0, m1)`` of each shard of ``size`` of ``n`` map images."""
    return [(m0, min(n, m0 + size)) for m0 in range(0, n, size)]


def _cut(items: list, size: int) -> list[list]:
    """``items`` in runs of ``size`` (the deterministic shards: a re-run cuts them the same)."""
    return [items[m0:m1] for m0, m1 in _map_shards(len(items), size)]


def _index_shard(map_root: str, store_names: list[str], m0: int, m1: int, conf: Any,
                 overwrite: bool) -> tuple[str, str]:
    """One map shard's indexes, in a Ray worker: built and written unless kept."""
    from .io.index_file import index_path
    from .retrieval.index import keep_indexes
    from .retrieval.search import open_descriptor_sets

    dataset = Dataset(Path(map_root))
    path = index_path(dataset, store_names, conf.kind, rows=(m0, m1))
    with open_descriptor_sets(dataset, dataset, store_names) as (_, mset):
        return str(path), keep_indexes(path, mset.subset(range(m0, m1)), conf, overwrite)


def _only(qset: Any, queries: list[str] | None) -> Any:
    """The images ``queries`` of a descriptor set (all of them for None), in its order."""
    if queries is None:
        return qset
    wanted = set(queries)
    return qset.subset([i for i, n in enumerate(qset.names) if n in wanted])


def _retrieve_shard(query_root: str, map_root: str, store_names: list[str], m0: int, m1: int, conf: Any, device: str,
                    threads: int | None, index: Any = None, queries: list[str] | None = None,
                    query_arrays: list | None = None, shard_arrays: list | None = None) -> tuple[list, list, bool]:
    """One map shard, in a Ray worker: every query's top-k among map images ``m0:m1``
    (indices into the whole map; -1 where an indexed search has fewer candidates), and
    whether its indexes were built for this call. ``query_arrays`` / ``shard_arrays``
    replace the stored descriptors of the queries / of this shard's map images."""
    import numpy as np
    import torch

    from .io.index_file import index_path
    from .models.base import resolve_device
    from .retrieval.index import indexed_topk, kept_or_built
    from .retrieval.search import open_descriptor_sets, search_topk

    torch.set_num_threads(threads or assigned_cpus())
    dev = resolve_device(device)
    built = False
    map_dataset = Dataset(Path(map_root))
    with open_descriptor_sets(Dataset(Path(query_root)), map_dataset, store_names) as (qset, mset):
        qset = _only(qset, queries)
        shard = mset.subset(range(m0, m1))
        if query_arrays is not None:
            qset = qset.with_arrays(_aligned(query_arrays, len(qset.names)))
        if shard_arrays is not None:
            shard = shard.with_arrays(_aligned(shard_arrays, m1 - m0))
        if index is None:
            blocks = list(search_topk(qset, shard, conf, dev, width=conf.topk))
        else:
            indexes, built = kept_or_built(index_path(map_dataset, store_names, index.kind, rows=(m0, m1)), shard,
                                           index, dev)
            blocks = list(indexed_topk(qset, shard, conf, index, dev, indexes, width=conf.topk))
    if not blocks:  # nothing to rank here
        lists = len(store_names) if conf.fusion.name == "round_robin" else 1
        empty = np.zeros((len(qset.names), 0))
        return [empty.astype(np.float32)] * lists, [empty.astype(np.int64)] * lists, built
    lists = len(blocks[0][2])
    indices = [np.concatenate([b[3][j] for b in blocks]) for j in range(lists)]
    return ([np.concatenate([b[2][j] for b in blocks]) for j in range(lists)],
            [np.where(ix >= 0, ix + m0, -1) for ix in indices], built)


def _aligned(arrays: list, n: int) -> list:
    """Descriptors sent with a shard, checked against the images the worker aligned: a store
    that changed between the driver's read and the worker's would shift every row."""
    if any(len(a) != n for a in arrays):
        raise CbirError(f"the stores changed during retrieval ({len(arrays[0])} descriptors sent for {n} images): "
                        "run it again")
    return arrays


def ray_search(query: Dataset, map_: Dataset, store_names: list[str], *, device: str = "auto",
               ray_conf: RayConf = RayConf(shard_size=100_000)) -> Callable[..., list]:
    """A search for :func:`cbir.retrieval.rerank.retrieve_with_expansion` on the cluster:
    each search is :func:`retrieve_on_ray`, with the expanded queries and the augmented map
    (made on the driver from the first searches' pairs) sent to the shards."""
    def search(qset: Any, dset: Any, conf: Any, progress: Callable[[int, int], None] | None = None) -> list:
        # a map x map search (database augmentation) has the map's images for queries
        return retrieve_on_ray(map_ if qset is dset else query, map_, store_names, conf, device=device,
                               ray_conf=ray_conf, progress=progress, query_arrays=qset.arrays,
                               map_arrays=dset.arrays)
    return search


def ray_estimator(conf: RayConf = RayConf(shard_size=100)) -> Callable[..., list]:
    """A pose estimator for :func:`cbir.localize.main`: shards of ``shard_size`` queries on
    Ray actors that read the map once each, make the queries' 2D-3D correspondences and
    estimate their poses (CPU); the results in order."""

    def estimate(source: Any, queries: list[str], by_query: dict[str, list[str]],
                 progress: Callable[[int, int], None] | None) -> list:
        shards = _cut(queries, conf.shard_size)
        arguments = {i: (names, {q: by_query[q] for q in names if q in by_query}) for i, names in enumerate(shards)}
        results: dict[int, list] = {}
        for i, shard in run_shards(_localize_shard, arguments, [s[0] for s in shards], conf, False,
                                   setup=(_open_tasks, (source,)), actor=LocalizationActor):
            results[i] = shard
            if progress:
                progress(len(shard), len(queries))
        return [r for i in range(len(shards)) for r in results[i]]
    return estimate


def _open_tasks(source: Any) -> Any:
    """A localization actor's state: the map and the query stores, open once."""
    from .localize import TaskMaker

    return TaskMaker(source)


def _localize_shard(maker: Any, queries: list[str], by_query: dict[str, list[str]]) -> list:
    """One shard of queries, on a localization actor: their tasks, then their poses, in order."""
    from .localize import estimate_one

    return [estimate_one(t) for t in maker.tasks(queries, by_query)]


def _match_shard(query_root: str, map_root: str, pairs: list[tuple[str, str]], local: str, name: str, matcher: Any,
                 verify: Any, device: str, out: str, threads: int | None) -> Any:
    """One shard of pairs, in a Ray worker: the local matching, into the shard's own store."""
    import torch

    from .io.pairs import Pair
    from .matching import match as match_mod

    threads = threads or assigned_cpus()
    torch.set_num_threads(threads)
    return match_mod.main(Dataset(Path(query_root)), Dataset(Path(map_root)), [Pair(a, b) for a, b in pairs], local,
                          name=name, matcher=matcher, verify=verify, device=device, num_workers=threads,
                          store_path=Path(out))


def assigned_cpus() -> int:
    """The CPUs Ray gave the task or actor this runs in: its threads for decoding, reading
    and verification."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _build_extractors(specs: list[ExtractorSpec], threads: int | None) -> list:
    """An extraction actor's state: its extractors, weights loaded once for all its shards."""
    import torch

    from . import extract as extract_mod

    torch.set_num_threads(threads or assigned_cpus())
    return [extract_mod.build_extractor(name, conf, kind) for kind, name, conf in specs]


def _extract_shard(extractors: list, root: str, store_names: list[str], images: list[str], shard_dir: str,
                   image_options: Any, threads: int | None) -> list:
    """One shard, on an extraction actor: the local extraction, into the shard's own stores."""
    from . import extract as extract_mod

    return extract_mod.extract_all(extractors, Dataset(Path(root)), store_names=store_names, images=images,
                                   num_workers=threads or assigned_cpus(), image_options=image_options,
                                   store_dir=Path(shard_dir))
