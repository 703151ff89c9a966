"""Ranked lists: the tie rule every search follows (:func:`ranked`), the pairs made of
top-k's (fused scores, or round robin's rank scores), and the record of a pairs file."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ..io.pairs import Pair
from .conf import RetrievalConf
from .descriptors import DescriptorSet
from .fusion import restore_nan


def ranked(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row, best first: by score, equal scores by lower map index.
    This tie rule makes a ranking independent of how the map was cut (chunks, shards,
    devices): images of equal descriptors, say, always come in the same order."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    v, i = torch.gather(values, 1, by_index), torch.gather(indices, 1, by_index)
    order = torch.argsort(v, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(v, 1, order), torch.gather(i, 1, order)


def pairs_from_topk(queries: list[str], map_names: list[str], values: list[np.ndarray], indices: list[np.ndarray],
                    conf: RetrievalConf) -> list[Pair]:
    """The pairs of :func:`search_topk`'s rankings: ``conf.topk`` a query at most, never an
    excluded image."""
    k = min([conf.topk, len(map_names) - (1 if conf.excludes_names else 0)] + [i.shape[1] for i in indices])
    with gc_paused():
        if conf.fusion.name == "round_robin":
            return _round_robin(queries, indices, map_names, k)
        return _pairs(queries, map_names, indices[0][:, :k], restore_nan(values[0][:, :k]))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while many objects are made: its collections
    walk every object of the process (measured on 4,096 queries x top 20 with a 200k map:
    the pairs took 0.06 s without collections, 0.2 to 0.27 s with)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pairs(queries: list[str], map_names: list[str], index: np.ndarray, scores: np.ndarray) -> list[Pair]:
    """Each query's row of map images and scores as pairs, built column-wise (at 4,096 queries
    x top 20 a loop per pair costs more than the search on a GPU; the map's names are looked
    up, not made an array: 0.08 s for a 1M map); an index -1 is no pair."""
    k = index.shape[1]
    query_names = np.repeat(np.array(queries, dtype=object), k)
    keep = (index >= 0).ravel()  # fewer than k candidates (an indexed search): no pair there
    return list(map(Pair, query_names[keep].tolist(), map(map_names.__getitem__, index.ravel()[keep].tolist()),
                    scores.ravel()[keep].tolist()))


def _round_robin(queries: list[str], rankings: list[np.ndarray], names: list[str], k: int) -> list[Pair]:
    """Rank i of each descriptor in turn, skipping images already taken, until k images."""
    out = []
    for r, q in enumerate(queries):
        taken: set[int] = set()
        for i in range(k):
            for ranking in rankings:
                if i >= ranking.shape[1]:
                    continue
                m = int(ranking[r, i])
                if m >= 0 and m not in taken:
                    taken.add(m)
                    out.append(Pair(q, names[m], float(k - len(taken) + 1)))
                    if len(taken) == k:
                        break
            if len(taken) == k:
                break
    return out


def pairs_record(conf: RetrievalConf, query: DescriptorSet, database: DescriptorSet,
                 **options: object) -> dict:
    """What made a pairs file: the retrieval options (``options``: expansion, index), the
    descriptor stores by name and configuration, and the digests of their contents."""
    return {"step": "retrieve",
            "config": {**conf.record(), **options, "stores": [s.attrs.get("name") for s in database.stores],
                       "descriptors": [s.config for s in database.stores]},
            "inputs": {"query": [s.fingerprint() for s in query.stores],
                       "map": [s.fingerprint() for s in database.stores]}}
