"""Query expansion and database-side augmentation (Radenovic et al., TPAMI 2018).

Both replace a descriptor by the normalized weighted sum of itself and its ``n`` nearest
neighbours, ``x' = normalize(x + sum_i w_i y_i)``: with ``alpha = 0`` every ``w_i`` is 1
(average query expansion, AQE / DBA), otherwise ``w_i = max(s_i, 0) ** alpha``, the
cosine similarity to the neighbour raised to ``alpha`` (alpha-QE / alpha-DBA). With several
descriptors, the neighbours are those of the fused ranking, and each descriptor is
expanded with its own similarities. Query expansion then searches again with the new
queries; database augmentation rebuilds the map descriptors in memory from a map x map
search (so its memory grows with the map).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch

from ..io.pairs import Pair
from .search import DescriptorSet, RetrievalConf, retrieve


def expand(target: DescriptorSet, database: DescriptorSet, pairs: list[Pair], n: int, alpha: float,
           device: torch.device = torch.device("cpu")) -> DescriptorSet:
    """``target``'s descriptors expanded with their first ``n`` neighbours in ``pairs``."""
    index = {name: i for i, name in enumerate(database.names)}
    neighbours: dict[str, list[int]] = {}
    for p in pairs:
        lst = neighbours.setdefault(p.query, [])
        if len(lst) < n:
            lst.append(index[p.map])
    all_rows = np.arange(len(target.names))
    own = [t.cpu().numpy() for t in target.take(all_rows, device)]
    width = max((len(v) for v in neighbours.values()), default=0)
    if width == 0:
        return target.with_arrays(own)
    nb = np.full((len(target.names), width), -1, np.int64)
    for i, name in enumerate(target.names):
        lst = neighbours.get(name, [])
        nb[i, :len(lst)] = lst
    unique = np.unique(nb[nb >= 0])
    pos = np.searchsorted(unique, np.where(nb >= 0, nb, unique[0]))
    db = [t.cpu().numpy() for t in database.take(unique, device)]
    out = []
    for x, y in zip(own, db):
        ys = y[pos]  # N x n x D
        w = np.einsum("nd,nkd->nk", x, ys)
        w = np.ones_like(w) if alpha == 0 else np.maximum(w, 0) ** alpha
        w[nb < 0] = 0
        e = x + np.einsum("nk,nkd->nd", w, ys)
        out.append((e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float32))
    return target.with_arrays(out)


#: a search: ``(query, database, conf, progress) -> pairs`` (local exact search, or on a cluster)
Search = Callable[[DescriptorSet, DescriptorSet, RetrievalConf, Optional[Callable[[int, int], None]]], list[Pair]]


def retrieve_with_expansion(query: DescriptorSet, database: DescriptorSet, conf: RetrievalConf, *,
                            qe: int = 0, qe_alpha: float = 0.0, dba: int = 0, dba_alpha: float = 0.0,
                            device: torch.device = torch.device("cpu"),
                            progress: Callable[[int, int], None] | None = None,
                            search: Search | None = None) -> list[Pair]:
    """Retrieval with optional database augmentation (``dba`` neighbours) and query
    expansion (``qe`` neighbours). Each search is ``search`` (default: exact search on
    ``device``); the expansions are made here, from the stores."""
    search = search or (lambda q, d, c, pr: retrieve(q, d, c, device=device, progress=pr))
    if dba:
        first = search(database, database, replace(conf, topk=dba, exclude_self=True), None)
        database = expand(database, database, first, dba, dba_alpha, device)
        if conf.exclude_self:  # map x map: the queries are the map, augmented too
            query = database
    if qe:
        first = search(query, database, replace(conf, topk=max(qe, conf.topk)), None)
        query = expand(query, database, first, qe, qe_alpha, device)
    return search(query, database, conf, progress)
