"""Where the steps run: the one seam between the steps and the machines.

Every step that cuts into shards (extraction by image, matching by pair, retrieval and index
building by map range, pose estimation by query) is defined once, in :mod:`cbir.steps`: how
it cuts its work, what a worker sets up once (networks, the map), how a shard runs and how
the shards' parts are reduced (stores made parts, reports summed, top-k's merged). It hands an
executor a :class:`Work`; the executor only runs shards. :class:`LocalExecutor` runs them in
this process, and its steps write their outputs in place as one shard (stores resume where
they stand); :class:`cbir.distributed.RayExecutor` runs them as Ray tasks and actors, each
shard writing its own part, and the step reduces the parts into what a local run writes
(tests/test_ray.py). The commands and the pipeline call the steps through
:class:`Executor`'s methods and never ask where they run; only :mod:`cbir.distributed`
imports Ray, and only when it is asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import CbirError

if TYPE_CHECKING:
    from .extract import ExtractReport, ImageOptions
    from .io.dataset import Dataset
    from .io.pairs import Pair
    from .matching.match import MatchReport
    from .models.base import Extractor
    from .retrieval.conf import RetrievalConf
    from .retrieval.descriptors import DescriptorSet
    from .retrieval.index import IndexConf
    from .steps.localize import Estimate

#: ``update(advance, total)`` of a phase's progress
Progress = Callable[[int, int], None]

#: the executors by name (``--executor``, ``[executor] kind``)
EXECUTORS = ("local", "ray")

#: an extractor to run: built, or as ``(kind, name or module:Class, configuration)`` to be
#: built where it runs (a driver without the GPU its workers have cannot build it)
ExtractorJob: TypeAlias = "Extractor | tuple[str, str, dict[str, Any]]"


@dataclass(frozen=True)
class ShardSizes:
    """Work a shard (a task) holds, per step, where shards run apart from the driver: images
    to extract, pairs to match, queries to localize, map images to search or index. The local
    executor runs each step as one shard."""

    images: int = 64
    pairs: int = 1000
    queries: int = 100
    map_images: int = 100_000


@dataclass
class Work:
    """A step's shards, for an executor to run: ``task(state, *shards[i], threads=, progress=)``
    for every shard ``i`` still to run (``task(*shards[i], ...)`` without a state).

    ``task`` and ``setup`` are module-level functions (a cluster pickles them by name).
    ``setup = (build, args)``: the state a worker builds once, ``build(*args)``, and keeps for
    every shard it runs (networks with their weights, the map); ``state``: that state already
    built in this process (the driver opened it to plan), which an executor running shards
    here uses instead. ``labels``: each shard's first item (errors name the shard by it);
    ``sizes``: its items, ``total`` the step's (``progress(sizes[i], total)`` as shard ``i``
    ends, where the shard cannot report as it goes). ``threads``: the threads a shard run
    here uses (None: its own default; a cluster's shard gets the CPUs it was given).
    ``on_gpu``: a shard wants a GPU; ``role``: what its workers are (``extraction``,
    ``localization``; a cluster names their processes by it), None where the state is cheap
    to build: a cluster then builds it in each shard's task rather than keeping workers.
    ``torch``: the shards compute with torch (a cluster's worker sets torch's threads to
    its CPUs; work without torch does not import it)."""

    task: Callable[..., Any]
    shards: dict[int, tuple]
    labels: list[str]
    sizes: list[int]
    total: int = 0
    setup: tuple[Callable[..., Any], tuple] | None = None
    state: Any = None
    threads: int | None = None
    progress: Progress | None = None
    on_gpu: bool = False
    role: str | None = "shard"
    torch: bool = True


@dataclass
class RetrievalRun:
    """A retrieval's pairs, the recall of an indexed search against exact search on a sample
    (None: not measured), and the faiss indexes built for this call only (not kept), with
    the advice on a sparse training set when one was."""

    pairs: list[Pair]
    recall: float | None = None
    indexes_built: int = 0
    notes: list[str] = field(default_factory=list)
    #: the map's indexes are files of a shard each (cut by ``map_images``), not one file
    indexes_per_shard: bool = False


class Executor(ABC):
    """What runs the steps' shards (see the module's documentation). The step methods are
    the steps of :mod:`cbir.steps`, run by this executor."""

    name: str
    sizes: ShardSizes
    #: the shards run in this process and write the final outputs (one shard a step)
    in_place: bool
    #: stores get what a run adds as a new part (formats/SPEC.md 5b); None: each as it is
    sharded: bool | None = None

    @abstractmethod
    def run(self, work: Work) -> Iterator[tuple[int, Any]]:
        """Run every shard of ``work``; yield ``(i, result)`` as shards finish. An error in
        a shard is raised (one line)."""

    def share(self, value: Any) -> Any:
        """``value`` as shards receive it: a large value many shards read is sent once."""
        return value

    def extract(self, extractors: Sequence[ExtractorJob], dataset: Dataset, *,
                store_names: Sequence[str | None] | None = None, images: list[str] | None = None,
                overwrite: bool = False, num_workers: int | None = None, image_options: ImageOptions | None = None,
                progress: Progress | None = None, learning: Progress | None = None,
                merging: Progress | None = None) -> list[ExtractReport]:
        """:func:`cbir.steps.extract.extract`."""
        from .steps.extract import extract

        return extract(self, extractors, dataset, store_names=store_names, images=images, overwrite=overwrite,
                       num_workers=num_workers, image_options=image_options, progress=progress, learning=learning,
                       merging=merging)

    def match(self, query: Dataset, map_: Dataset, pairs: list[Pair], local: str, *, name: str | None = None,
              matcher: Any = None, verify: Any = None, device: str = "auto", overwrite: bool = False,
              num_workers: int | None = None, progress: Progress | None = None, merging: Progress | None = None,
              pairs_file: str | None = None) -> MatchReport:
        """:func:`cbir.steps.match.match`."""
        from .steps.match import match

        return match(self, query, map_, pairs, local, name=name, matcher=matcher, verify=verify, device=device,
                     overwrite=overwrite, num_workers=num_workers, progress=progress, merging=merging,
                     pairs_file=pairs_file)

    def retrieve(self, query: Dataset, map_: Dataset, qset: DescriptorSet, mset: DescriptorSet,
                 store_names: list[str], conf: RetrievalConf, *, device: str = "auto", qe: int = 0,
                 qe_alpha: float = 0.0, dba: int = 0, dba_alpha: float = 0.0, index: IndexConf | None = None,
                 recall_sample: int = 0, progress: Progress | None = None) -> RetrievalRun:
        """:func:`cbir.steps.retrieve.retrieve`."""
        from .steps.retrieve import retrieve

        return retrieve(self, query, map_, qset, mset, store_names, conf, device=device, qe=qe, qe_alpha=qe_alpha,
                        dba=dba, dba_alpha=dba_alpha, index=index, recall_sample=recall_sample, progress=progress)

    def build_indexes(self, map_: Dataset, store_names: list[str], conf: IndexConf, *, overwrite: bool = False,
                      progress: Progress | None = None) -> list[tuple[Path, str]]:
        """:func:`cbir.steps.retrieve.build_indexes`."""
        from .steps.retrieve import build_indexes

        return build_indexes(self, map_, store_names, conf, overwrite=overwrite, progress=progress)

    def pose_estimator(self) -> Estimate:
        """The ``estimate`` of :func:`cbir.localize.main`: :func:`cbir.steps.localize.estimator`."""
        from .steps.localize import estimator

        return estimator(self)


class LocalExecutor(Executor):
    """Every step in this process, as one shard whose outputs are the final ones (stores
    resume in place); its threads are the steps' own (``num_workers``)."""

    name = "local"
    in_place = True

    def __init__(self, sizes: ShardSizes = ShardSizes(), sharded: bool | None = None) -> None:
        self.sizes, self.sharded = sizes, sharded

    def run(self, work: Work) -> Iterator[tuple[int, Any]]:
        state = work.state
        if state is None and work.setup is not None:
            build, args = work.setup
            state = build(*args)
        for i in sorted(work.shards):
            args = work.shards[i] if work.setup is None and work.state is None else (state, *work.shards[i])
            yield i, work.task(*args, threads=work.threads, progress=work.progress)


def require_exact_for_expansion(qe: int, dba: int) -> None:
    """Query expansion and database augmentation run on exact search."""
    if qe or dba:
        raise CbirError("query expansion (qe) and database augmentation (dba) run on exact search: drop the index")


def make_executor(kind: str = "local", address: str | None = None, sizes: ShardSizes = ShardSizes(),
                  what: str = "--executor", sharded: bool | None = None) -> Executor:
    """The executor ``kind`` (one of :data:`EXECUTORS`); ``address``: the Ray cluster
    (None: ``$RAY_ADDRESS``, else a local instance). ``what`` names the option in errors.
    ``sharded``: the local executor writes what a run adds as new parts (Ray always does)."""
    if kind == "local":
        return LocalExecutor(sizes, sharded)
    if kind == "ray":
        from .distributed import RayExecutor, require_ray

        require_ray(f"{what} ray")
        return RayExecutor(address, sizes)
    raise CbirError(f"unknown executor {kind!r} ({' or '.join(EXECUTORS)})")
