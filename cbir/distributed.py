"""The Ray executor (``--executor ray``): :class:`RayExecutor` runs the shards of the steps
of :mod:`cbir.steps` as Ray tasks, or on long-lived actors where a shard's worker sets
something up once (the networks of extraction, the map of pose estimation, the open stores
of retrieval): one per GPU, or per ``cpus`` CPUs. How a step cuts its work, runs a shard and
reduces the parts is the step's; the parts' stores go under ``DATASET/cbir/shards/``
(:mod:`cbir.steps.parts`), so the dataset must be on a file system every node sees at the
same path (NFS, a cluster file system).

A worker that dies (killed, out of memory, its node lost) has its task run again by Ray, or
its actor restarted and the shard run again (``max_retries``); the shard's stores resume from
the batches it had written, and a re-run after an interruption skips the shards already
written. Ray is imported here only: the local executor never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from .errors import CbirError
from .executor import Executor, ShardSizes, Work
from .io.dataset import Dataset
from .steps import parts as parts_mod
from .steps.extract import ExtractorSpec
from .validate import check_integer


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
    ``shard_size``: items a shard, for :func:`extract_on_ray` and :func:`match_on_ray`
    (:class:`RayExecutor` reads its :class:`~cbir.executor.ShardSizes`); ``num_gpus``: GPUs a
    task (None: 1 where the cluster has GPUs and the work runs on a GPU or ``auto``, else 0);
    ``cpus``: CPUs a task or actor (its threads; None: 1, and for GPU work the cluster's CPUs
    per GPU, to decode and verify); ``max_retries``: runs of a task after its worker died."""

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


class RayExecutor(Executor):
    """Shards as Ray tasks and actors on a cluster (``address``: None for ``$RAY_ADDRESS``,
    else a local instance), ``sizes`` of work a shard; ``conf``: what a shard asks of the
    cluster (its ``address`` and ``shard_size`` are not read: ``address`` and ``sizes`` are)."""

    name = "ray"
    in_place = False
    sharded = True  # each shard's store becomes a part

    def __init__(self, address: str | None = None, sizes: ShardSizes = ShardSizes(),
                 conf: RayConf = RayConf()) -> None:
        self.address, self.sizes = address, sizes
        self.ray_conf = replace(conf, address=address)

    def run(self, work: Work) -> Iterator[tuple[int, Any]]:
        call = _call_with_torch if work.torch else _call
        if work.setup is None:
            shards = run_shards(call, {i: (work.task, *args) for i, args in work.shards.items()}, work.labels,
                                self.ray_conf, work.on_gpu, name=work.task.__name__)
        elif work.role is None:  # a state cheap to build: each task builds its own, no worker is kept
            build, build_args = work.setup
            shards = run_shards(call, {i: (_with_state, work.task, build, build_args, *args)
                                       for i, args in work.shards.items()},
                                work.labels, self.ray_conf, work.on_gpu, name=work.task.__name__)
        else:
            shards = run_shards(partial(call, work.task), work.shards, work.labels, self.ray_conf, work.on_gpu,
                                setup=work.setup, actor=ACTORS.get(work.role or "", ShardActor))
        for i, result in shards:
            yield i, result
            if work.progress:
                work.progress(work.sizes[i], work.total)

    def share(self, value: Any) -> Any:
        import ray

        _connect(self.ray_conf)
        return ray.put(value)


def _call(task: Callable, *args: Any) -> Any:
    """A shard in a Ray worker: the CPUs Ray gave it are its threads."""
    return task(*args, threads=assigned_cpus(), progress=None)


def _call_with_torch(task: Callable, *args: Any) -> Any:
    """:func:`_call` of a shard that computes with torch: torch's threads are its CPUs too."""
    import torch

    torch.set_num_threads(assigned_cpus())
    return _call(task, *args)


def _with_state(task: Callable, build: Callable, build_args: tuple, *args: Any, **kwargs: Any) -> Any:
    """``task`` on a state built for it alone (closed after, where it can be)."""
    state = build(*build_args)
    try:
        return task(state, *args, **kwargs)
    finally:
        if hasattr(state, "close"):
            state.close()


def extract_on_ray(specs: list[ExtractorSpec], dataset: Dataset, *, store_names: list[str | None],
                   images: list[str] | None = None, overwrite: bool = False, image_options: Any = None,
                   conf: RayConf = RayConf(), progress: Callable[[int, int], None] | None = None,
                   merging: Callable[[int, int], None] | None = None) -> list:
    """:func:`cbir.steps.extract.extract` on a Ray cluster, ``conf.shard_size`` images a shard."""
    executor = RayExecutor(conf.address, ShardSizes(images=conf.shard_size), conf)
    return executor.extract(specs, dataset, store_names=store_names, images=images, overwrite=overwrite,
                            image_options=image_options, progress=progress, merging=merging)


def match_on_ray(query: Dataset, map_: Dataset, pairs: list, local: str, *, name: str | None = None,
                 matcher: Any = None, verify: Any = None, device: str = "auto", overwrite: bool = False,
                 conf: RayConf = RayConf(shard_size=1000), progress: Callable[[int, int], None] | None = None,
                 merging: Callable[[int, int], None] | None = None, pairs_file: str | None = None) -> Any:
    """:func:`cbir.steps.match.match` on a Ray cluster, ``conf.shard_size`` pairs a shard."""
    executor = RayExecutor(conf.address, ShardSizes(pairs=conf.shard_size), conf)
    return executor.match(query, map_, pairs, local, name=name, matcher=matcher, verify=verify, device=device,
                          overwrite=overwrite, progress=progress, merging=merging, pairs_file=pairs_file)


def merge_into(final: Path, parts: list[Path], kind: str, attrs: dict[str, Any], conf: RayConf = RayConf(),
               progress: Callable[[int], None] | None = None) -> None:
    """:func:`cbir.steps.parts.merge_into` with each part copied by a Ray task of its own."""
    parts_mod.merge_into(final, parts, kind, attrs, executor=RayExecutor(conf.address, conf=conf),
                         progress=progress)


def run_shards(task: Callable, arguments: dict[int, tuple], labels: list[str], conf: RayConf,
               on_gpu: bool, setup: tuple[Callable, tuple] | None = None,
               actor: type | None = None, name: str | None = None) -> Iterator[tuple[int, Any]]:
    """Run ``task(*arguments[i])`` for every shard ``i`` on the cluster; yield ``(i, result)``
    as they finish.

    Without ``setup``, each shard is a Ray task. With ``setup = (build, args)``, the shards
    run on long-lived actors, as many as the cluster has room for (a GPU each where it has
    GPUs and ``on_gpu``, else ``conf.cpus`` CPUs, default 1, each), of class ``actor`` (a
    :class:`ShardActor`): each calls ``build(*args)`` once (load a network's weights, say) and
    runs ``task(state, *arguments[i])`` for shard after shard. ``name``: the tasks' (Ray
    titles their processes ``ray::<name>``; default the task function's).
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
                                          retry_exceptions=False, name=name or task.__name__)
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


#: the actor class of each role of :class:`cbir.executor.Work` (Ray titles a process by it)
ACTORS: dict[str, type[ShardActor]] = {"extraction": ExtractionActor, "localization": LocalizationActor}


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


def assigned_cpus() -> int:
    """The CPUs Ray gave the task or actor this runs in: its threads for decoding, reading
    and verification."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


