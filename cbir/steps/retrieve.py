"""The retrieval step and index building: shards of the map.

A search cuts the map into ranges of images; each shard finds every query's top-k among its
range (exactly, or through its own faiss indexes, kept or built for the call, their
candidates rescored exactly) and the step keeps the best of the shards' top-k's, ties to the
lower map index: the exact top-k, whatever the cut (tests/test_ray.py). In place (the local
executor) the map is one shard, searched with the descriptor sets already open; elsewhere
each worker opens the stores once. Query expansion and database augmentation are made here,
between searches, and the expanded descriptors reach the shards with them. Index building
writes one index file per shard of the map (``index_path(..., rows=)``), which a search cut
the same way uses.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CbirError
from ..executor import RetrievalRun, Work, require_exact_for_expansion
from . import opened, ranges, wants_gpu

if TYPE_CHECKING:
    from ..executor import Executor, Progress
    from ..io.dataset import Dataset
    from ..io.pairs import Pair
    from ..retrieval.conf import RetrievalConf
    from ..retrieval.descriptors import DescriptorSet
    from ..retrieval.index import IndexConf


@dataclass
class OpenSets:
    """A worker's state: the query and map descriptor sets, open (``stack`` closes them)."""

    query: DescriptorSet
    map: DescriptorSet
    stack: ExitStack | None = None

    def close(self) -> None:
        """The stores closed, where this opened them."""
        if self.stack is not None:
            self.stack.close()


def open_sets(query_root: str, map_root: str, store_names: list[str]) -> OpenSets:
    """The descriptor sets of the stores ``store_names``, opened once by a worker."""
    from ..retrieval.descriptors import open_descriptor_sets

    stack = ExitStack()
    qset, mset = stack.enter_context(open_descriptor_sets(opened(query_root), opened(map_root), store_names))
    return OpenSets(qset, mset, stack)


def retrieve(executor: Executor, query: Dataset, map_: Dataset, qset: DescriptorSet, mset: DescriptorSet,
             store_names: list[str], conf: RetrievalConf, *, device: str = "auto", qe: int = 0,
             qe_alpha: float = 0.0, dba: int = 0, dba_alpha: float = 0.0, index: IndexConf | None = None,
             recall_sample: int = 0, progress: Progress | None = None) -> RetrievalRun:
    """The top-k pairs of ``qset`` (the query dataset's open descriptors) against ``mset``:
    exact (with query expansion ``qe`` and database augmentation ``dba``, made here between
    searches), or through the faiss indexes of ``index`` (kept ones, else built for the call),
    with the recall against exact search measured on ``recall_sample`` queries."""
    from ..models.base import resolve_device
    from ..retrieval.index import recall, recall_sample_rows, sparse_training
    from ..retrieval.rerank import retrieve_with_expansion

    if index is not None:
        require_exact_for_expansion(qe, dba)
    built: list[int] = []
    per_shard: list[bool] = []

    def search(q: DescriptorSet, d: DescriptorSet, c: RetrievalConf, pr: Progress | None = None,
               sample: list[str] | None = None, with_index: IndexConf | None = None) -> list[Pair]:
        # a map x map search (database augmentation) has the map's images for queries
        pairs, n_built, files_per_shard = search_shards(executor, map_ if q is d else query, map_, q, d, store_names,
                                                        c, device=device, index=with_index, queries=sample,
                                                        progress=pr)
        built.append(n_built)
        per_shard.append(files_per_shard)
        return pairs

    pairs = retrieve_with_expansion(qset, mset, conf, qe=qe, qe_alpha=qe_alpha, dba=dba, dba_alpha=dba_alpha,
                                    device=resolve_device(device), progress=progress,
                                    search=lambda q, d, c, pr: search(q, d, c, pr, with_index=index))
    measured = None
    if recall_sample and index is not None:  # the sample searched exactly, by the same shards
        sample = [qset.names[i] for i in recall_sample_rows(len(qset.names), recall_sample, index.seed)]
        chosen = set(sample)
        measured = recall(search(qset, mset, conf, sample=sample), [p for p in pairs if p.query in chosen])
    n_built = sum(built)
    note = sparse_training(index.kind, len(mset.names), index) if index is not None and n_built else None
    return RetrievalRun(pairs, measured, n_built, [note] if note else [], per_shard[0] if per_shard else False)


def search_shards(executor: Executor, query: Dataset, map_: Dataset, qset: DescriptorSet, mset: DescriptorSet,
                  store_names: list[str], conf: RetrievalConf, *, device: str = "auto", index: IndexConf | None = None,
                  queries: list[str] | None = None,
                  progress: Progress | None = None) -> tuple[list[Pair], int, bool]:
    """One search of ``qset`` (only the images ``queries``, in its order, where given) in
    ``mset``, by shards of the map: the pairs, the shards whose indexes were built for this
    call, and whether the shards' indexes are files of their own (:func:`map_cut`).
    Descriptors held in memory (expanded, augmented) reach the shards with them."""
    from ..io.index_file import index_path

    n = len(mset.names)
    cuts, per_shard = map_cut(executor, mset, indexed=index is not None)

    def index_file(m0: int, m1: int) -> str | None:
        if index is None:
            return None
        return str(index_path(map_, store_names, index.kind, rows=(m0, m1) if per_shard else None))

    if executor.in_place:
        shards = {i: (m0, m1, conf, device, index, index_file(m0, m1), queries, None, None)
                  for i, (m0, m1) in enumerate(cuts)}
        # one shard reports its queries as it goes; several report their map images as each ends
        work = Work(topk_shard, shards, [mset.names[m0] if n else "" for m0, _ in cuts],
                    [m1 - m0 for m0, m1 in cuts], n, state=OpenSets(qset, mset),
                    progress=progress if len(cuts) == 1 else None)
    else:
        qarrays = executor.share(qset.arrays) if qset.arrays is not None else None
        shards = {i: (m0, m1, conf, device, index, index_file(m0, m1), queries, qarrays,
                      executor.share([a[m0:m1] for a in mset.arrays]) if mset.arrays is not None else None)
                  for i, (m0, m1) in enumerate(cuts)}
        work = Work(topk_shard, shards, [mset.names[m0] for m0, _ in cuts], [m1 - m0 for m0, m1 in cuts], n,
                    setup=(open_sets, (str(query.root), str(map_.root), store_names)), progress=progress,
                    on_gpu=wants_gpu(device), role=None)
    found = {}
    for i, part in executor.run(work):
        found[i] = part
        if progress and executor.in_place and len(cuts) > 1:
            progress(work.sizes[i], n)
    return merge_topk([found[i] for i in sorted(found)], _only(qset, queries).names, mset.names, conf), \
        sum(part[2] for part in found.values()), per_shard


def map_cut(executor: Executor, mset: DescriptorSet, indexed: bool) -> tuple[list[tuple[int, int]], bool]:
    """The ranges of map images a search or an index build cuts the map into, and whether
    each range has index files of its own (else the map's one file). An indexed map held in
    several parts of a sharded store is cut at part boundaries, whole parts grouped up to
    the executor's ``map_images``: the indexes of a group stay valid when parts are added
    after it (only the last group is built again). Otherwise the executor's cut: the whole
    map in place, runs of ``map_images`` elsewhere."""
    n = len(mset.names)
    size = executor.sizes.map_images
    if indexed and mset.arrays is None:
        bounds = mset.part_bounds()
        if len(bounds) > 2:  # the map's images lie in more than one part of a store
            return _part_groups(bounds, size), True
    if executor.in_place:
        return [(0, n)], False
    return ranges(n, size), True


def _part_groups(bounds: list[int], size: int) -> list[tuple[int, int]]:
    """Consecutive runs between ``bounds`` (ascending, from 0 to the count) grouped greedily
    into ranges of at most ``size`` images (a longer run is a range of its own)."""
    groups, start = [], bounds[0]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b - start > size and a > start:
            groups.append((start, a))
            start = a
    groups.append((start, bounds[-1]))
    return groups


def merge_topk(parts: list[tuple[list[np.ndarray], list[np.ndarray], bool]], queries: list[str],
               map_names: list[str], conf: RetrievalConf) -> list[Pair]:
    """The pairs of the best of the shards' top-k's (``(values, indices, built)`` each, one
    array a ranking), ranked by the rule of one search: ties to the lower map index."""
    import torch

    from ..retrieval.ranking import pairs_from_topk, ranked

    lists = len(parts[0][0]) if parts else 0
    values, indices = [], []
    for j in range(lists):
        v = torch.from_numpy(np.concatenate([p[0][j] for p in parts], axis=1))
        ix = torch.from_numpy(np.concatenate([p[1][j] for p in parts], axis=1))
        top_v, top_i = ranked(v, ix, v.shape[1])
        values.append(top_v.numpy())
        indices.append(top_i.numpy())
    if not lists or values[0].shape[1] == 0:
        return []
    return pairs_from_topk(queries, map_names, values, indices, conf)


def _only(qset: DescriptorSet, queries: list[str] | None) -> DescriptorSet:
    """The images ``queries`` of a descriptor set (all of them for None), in its order."""
    if queries is None:
        return qset
    wanted = set(queries)
    return qset.subset([i for i, n in enumerate(qset.names) if n in wanted])


def topk_shard(sets: OpenSets, m0: int, m1: int, conf: RetrievalConf, device: str, index: IndexConf | None,
               index_file: str | None, queries: list[str] | None, query_arrays: list | None,
               shard_arrays: list | None, *, threads: int | None = None,
               progress: Progress | None = None) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """One shard of the map: every query's top-k among map images ``m0:m1`` (indices into
    the whole map; -1 where an indexed search has fewer candidates), and whether its indexes
    were built for this call. ``query_arrays`` / ``shard_arrays`` replace the descriptors of
    the queries / of this shard's map images."""
    from ..models.base import resolve_device
    from ..retrieval.index import indexed_topk, kept_or_built
    from ..retrieval.search import search_topk

    dev = resolve_device(device)
    built = False
    qset = _only(sets.query, queries)
    shard = sets.map if (m0, m1) == (0, len(sets.map.names)) else sets.map.subset(range(m0, m1))
    if query_arrays is not None:
        qset = qset.with_arrays(_aligned(query_arrays, len(qset.names)))
    if shard_arrays is not None:
        shard = shard.with_arrays(_aligned(shard_arrays, m1 - m0))
    if index is None or index_file is None:
        blocks = search_topk(qset, shard, conf, dev, width=conf.topk)
    else:
        indexes, built = kept_or_built(Path(index_file), shard, index, dev)
        blocks = indexed_topk(qset, shard, conf, index, dev, indexes, width=conf.topk)
    values: list[list[np.ndarray]] = []
    indices: list[list[np.ndarray]] = []
    for q0, q1, v, ix in blocks:
        values.append(v)
        indices.append([np.where(i >= 0, i + m0, -1) for i in ix])
        if progress:
            progress(q1 - q0, len(qset.names))
    if not values:  # nothing to rank here
        lists = len(sets.map.stores) if conf.fusion.name == "round_robin" else 1
        empty = np.zeros((len(qset.names), 0))
        return [empty.astype(np.float32)] * lists, [empty.astype(np.int64)] * lists, built
    return ([np.concatenate([b[j] for b in values]) for j in range(len(values[0]))],
            [np.concatenate([b[j] for b in indices]) for j in range(len(indices[0]))], built)


def _aligned(arrays: list, n: int) -> list:
    """Descriptors sent with a shard, checked against the images the worker aligned: a store
    that changed between the driver's read and the worker's would shift every row."""
    if any(len(a) != n for a in arrays):
        raise CbirError(f"the stores changed during retrieval ({len(arrays[0])} descriptors sent for {n} images): "
                        "run it again")
    return arrays


def build_indexes(executor: Executor, map_: Dataset, store_names: list[str], conf: IndexConf, *,
                  overwrite: bool = False, progress: Progress | None = None) -> list[tuple[Path, str]]:
    """``cbir index build``: the kept index files, ``(path, new | kept | rebuilt)`` each: one
    for the map in place, else one per shard of the map (for a search cut the same way). A
    file built from the same stores and options is kept."""
    from ..retrieval.descriptors import open_descriptor_sets

    with open_descriptor_sets(map_, map_, store_names) as (_, mset):
        n = len(mset.names)
        if not n:
            raise CbirError("no map image has every descriptor", map_.root)
        cuts, per_shard = map_cut(executor, mset, indexed=True)
        shards = {i: (str(map_.root), store_names, m0, m1, conf, overwrite, per_shard)
                  for i, (m0, m1) in enumerate(cuts)}
        state = OpenSets(mset, mset) if executor.in_place else None
        work = Work(index_shard, shards, [mset.names[m0] for m0, _ in cuts], [m1 - m0 for m0, m1 in cuts], n,
                    setup=(open_sets, (str(map_.root), str(map_.root), store_names)), state=state,
                    progress=progress, role=None)
        done = {i: (Path(path), status) for i, (path, status) in executor.run(work)}
    return [done[i] for i in range(len(cuts))]


def index_shard(sets: OpenSets, map_root: str, store_names: list[str], m0: int, m1: int, conf: IndexConf,
                overwrite: bool, per_shard: bool, *, threads: int | None = None,
                progress: Progress | None = None) -> tuple[str, str]:
    """One shard of the map's indexes, in its own file (``per_shard``) or the map's: built
    and written unless kept."""
    from ..io.index_file import index_path
    from ..retrieval.index import keep_indexes

    path = index_path(opened(map_root), store_names, conf.kind, rows=(m0, m1) if per_shard else None)
    shard = sets.map if (m0, m1) == (0, len(sets.map.names)) else sets.map.subset(range(m0, m1))
    status = keep_indexes(path, shard, conf, overwrite)
    if progress:
        progress(m1 - m0, len(sets.map.names))
    return str(path), status
