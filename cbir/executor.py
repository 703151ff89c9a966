"""Where the steps run: the one seam between the commands (and the pipeline) and the machines.

The steps that cut into shards, extraction (by image), matching (by pair), retrieval and
index building (by map range) and pose estimation (by query), are called through an
executor, with one signature each, so that the command line and the pipeline never ask
where they run. :class:`LocalExecutor` runs each step in this process, as one shard written
in place; :class:`cbir.distributed.RayExecutor` runs shards as Ray tasks and actors, on
the same step functions, and reduces their parts (stores merged, reports summed, top-k's
merged) into what a local run writes (tests/test_ray.py). :func:`make_executor` builds one
by name; only :mod:`cbir.distributed` imports Ray, and only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from .errors import CbirError

if TYPE_CHECKING:
    from .extract import ExtractReport, ImageOptions
    from .io.dataset import Dataset
    from .io.pairs import Pair
    from .matching.match import MatchReport
    from .models.base import Extractor
    from .retrieval.index import IndexConf
    from .retrieval.search import DescriptorSet, RetrievalConf

#: ``update(advance, total)`` of a phase's progress
Progress = Callable[[int, int], None]

#: the executors by name (``--executor``, ``[executor] kind``)
EXECUTORS = ("local", "ray")

#: an extractor to run: built, or as ``(kind, name or module:Class, configuration)`` to be
#: built where it runs (a driver without the GPU its workers have cannot build it)
ExtractorJob: TypeAlias = "Extractor | tuple[str, str, dict[str, Any]]"


@dataclass(frozen=True)
class ShardSizes:
    """Work a shard (a task) holds, per step: images to extract, pairs to match, queries to
    localize, map images to search or index. The local executor runs each step as one shard."""

    images: int = 64
    pairs: int = 1000
    queries: int = 100
    map_images: int = 100_000


@dataclass
class RetrievalRun:
    """A retrieval's pairs, the recall of an indexed search against exact search on a sample
    (None: not measured), and the faiss indexes built for this call only (not kept), with
    the advice on a sparse training set when one was."""

    pairs: list[Pair]
    recall: float | None = None
    indexes_built: int = 0
    notes: list[str] = field(default_factory=list)


class Executor(Protocol):
    """What runs the steps (see the module's documentation)."""

    name: str
    sizes: ShardSizes

    def extract(self, extractors: Sequence[ExtractorJob], dataset: Dataset, *,
                store_names: Sequence[str | None] | None = None, images: list[str] | None = None,
                overwrite: bool = False, num_workers: int | None = None, image_options: ImageOptions | None = None,
                progress: Progress | None = None, learning: Progress | None = None,
                merging: Progress | None = None) -> list[ExtractReport]:
        """:func:`cbir.extract.extract_all`: ``learning`` is the progress of a model learned on
        the map first, ``merging`` that of the shards' merge."""
        ...

    def match(self, query: Dataset, map_: Dataset, pairs: list[Pair], local: str, *, name: str | None = None,
              matcher: Any = None, verify: Any = None, device: str = "auto", overwrite: bool = False,
              num_workers: int | None = None, progress: Progress | None = None, merging: Progress | None = None,
              pairs_file: str | None = None) -> MatchReport:
        """:func:`cbir.matching.match.main`."""
        ...

    def retrieve(self, query: Dataset, map_: Dataset, qset: DescriptorSet, mset: DescriptorSet,
                 store_names: list[str], conf: RetrievalConf, *, device: str = "auto", qe: int = 0,
                 qe_alpha: float = 0.0, dba: int = 0, dba_alpha: float = 0.0, index: IndexConf | None = None,
                 recall_sample: int = 0, progress: Progress | None = None) -> RetrievalRun:
        """The top-k pairs of ``qset`` (the query dataset's open descriptors) against
        ``mset``: exact (with query expansion ``qe`` and database augmentation ``dba``), or
        through the faiss indexes of ``index`` (kept ones, else built for the call)."""
        ...

    def build_indexes(self, map_: Dataset, store_names: list[str], conf: IndexConf, *, overwrite: bool = False,
                      progress: Progress | None = None) -> list[tuple[Path, str]]:
        """``cbir index build``: the kept index files, ``(path, new | kept | rebuilt)`` each."""
        ...

    def pose_estimator(self) -> Callable[..., list] | None:
        """The ``estimate`` of :func:`cbir.localize.main` (None: in this process)."""
        ...


class LocalExecutor:
    """Every step in this process, as one shard whose outputs are the final ones (stores
    resume in place); its threads are the steps' own (``num_workers``)."""

    name = "local"

    def __init__(self, sizes: ShardSizes = ShardSizes()) -> None:
        self.sizes = sizes

    def extract(self, extractors: Sequence[ExtractorJob], dataset: Dataset, *,
                store_names: Sequence[str | None] | None = None, images: list[str] | None = None,
                overwrite: bool = False, num_workers: int | None = None, image_options: ImageOptions | None = None,
                progress: Progress | None = None, learning: Progress | None = None,
                merging: Progress | None = None) -> list[ExtractReport]:
        from . import extract as extract_mod

        built = [e if isinstance(e, extract_mod.Extractor) else extract_mod.build_extractor(e[1], e[2], e[0])
                 for e in extractors]
        return extract_mod.extract_all(built, dataset, store_names=store_names, images=images,
                                       overwrite=overwrite, num_workers=num_workers, progress=progress,
                                       image_options=image_options or extract_mod.ImageOptions(), learning=learning)

    def match(self, query: Dataset, map_: Dataset, pairs: list[Pair], local: str, *, name: str | None = None,
              matcher: Any = None, verify: Any = None, device: str = "auto", overwrite: bool = False,
              num_workers: int | None = None, progress: Progress | None = None, merging: Progress | None = None,
              pairs_file: str | None = None) -> MatchReport:
        from .matching import MatcherConf
        from .matching import match as match_mod

        return match_mod.main(query, map_, pairs, local, name=name, matcher=matcher or MatcherConf(), verify=verify,
                              device=device, overwrite=overwrite, num_workers=num_workers, progress=progress,
                              pairs_file=pairs_file)

    def retrieve(self, query: Dataset, map_: Dataset, qset: DescriptorSet, mset: DescriptorSet,
                 store_names: list[str], conf: RetrievalConf, *, device: str = "auto", qe: int = 0,
                 qe_alpha: float = 0.0, dba: int = 0, dba_alpha: float = 0.0, index: IndexConf | None = None,
                 recall_sample: int = 0, progress: Progress | None = None) -> RetrievalRun:
        from .io.index_file import index_path
        from .models.base import resolve_device
        from .retrieval.index import kept_or_built, recall_against_exact, retrieve_indexed, sparse_training
        from .retrieval.rerank import retrieve_with_expansion

        dev = resolve_device(device)
        if index is None:
            return RetrievalRun(retrieve_with_expansion(qset, mset, conf, qe=qe, qe_alpha=qe_alpha, dba=dba,
                                                        dba_alpha=dba_alpha, device=dev, progress=progress))
        require_exact_for_expansion(qe, dba)
        # built once by `cbir index build`; refused when the stores changed since
        indexes, built = kept_or_built(index_path(map_, store_names, index.kind), mset, index, dev)
        note = sparse_training(index.kind, len(mset.names), index) if built else None
        pairs = retrieve_indexed(qset, mset, conf, index, dev, indexes, progress=progress)
        recall = recall_against_exact(qset, mset, conf, index, recall_sample, dev, indexes) if recall_sample else None
        return RetrievalRun(pairs, recall, int(built), [note] if note else [])

    def build_indexes(self, map_: Dataset, store_names: list[str], conf: IndexConf, *, overwrite: bool = False,
                      progress: Progress | None = None) -> list[tuple[Path, str]]:
        from .io.index_file import index_path
        from .retrieval.index import keep_indexes
        from .retrieval.search import open_descriptor_sets

        path = index_path(map_, store_names, conf.kind)
        with open_descriptor_sets(map_, map_, store_names) as (_, mset):
            if not mset.names:
                raise CbirError("no map image has every descriptor", map_.root)
            status = keep_indexes(path, mset, conf, overwrite)
        if progress:
            progress(len(mset.names), len(mset.names))
        return [(path, status)]

    def pose_estimator(self) -> Callable[..., list] | None:
        return None


def require_exact_for_expansion(qe: int, dba: int) -> None:
    """Query expansion and database augmentation run on exact search."""
    if qe or dba:
        raise CbirError("query expansion (qe) and database augmentation (dba) run on exact search: drop the index")


def make_executor(kind: str = "local", address: str | None = None, sizes: ShardSizes = ShardSizes(),
                  what: str = "--executor") -> Executor:
    """The executor ``kind`` (one of :data:`EXECUTORS`); ``address``: the Ray cluster
    (None: ``$RAY_ADDRESS``, else a local instance). ``what`` names the option in errors."""
    if kind == "local":
        return LocalExecutor(sizes)
    if kind == "ray":
        from .distributed import RayExecutor, require_ray

        require_ray(f"{what} ray")
        return RayExecutor(address, sizes)
    raise CbirError(f"unknown executor {kind!r} ({' or '.join(EXECUTORS)})")
