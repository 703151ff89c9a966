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

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from .. import exact
from ..io.pairs import Pair
from .conf import RetrievalConf
from .descriptors import DescriptorSet
from .search import retrieve


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
    own = [t.cpu() for t in target.take(all_rows, device)]
    width = max((len(v) for v in neighbours.values()), default=0)
    if width == 0:
        return target.with_arrays([t.numpy() for t in own])
    nb = np.full((len(target.names), width), -1, np.int64)
    for i, name in enumerate(target.names):
        lst = neighbours.get(name, [])
        nb[i, :len(lst)] = lst
    unique = np.unique(nb[nb >= 0])
    pos = torch.from_numpy(np.searchsorted(unique, np.where(nb >= 0, nb, unique[0])))
    db = [t.cpu() for t in database.take(unique, device)]
    missing = torch.from_numpy(nb < 0)
    return target.with_arrays([_expanded(x, y[pos], missing, alpha).numpy() for x, y in zip(own, db, strict=True)])


def _expanded(x: torch.Tensor, ys: torch.Tensor, missing: torch.Tensor, alpha: float) -> torch.Tensor:
    """``normalize(x + sum_i w_i y_i)`` of unit rows ``x`` (N, D) and their neighbours ``ys``
    (N, n, D) (``missing``: no neighbour there), the same bits on every machine: the
    similarities are :func:`cbir.exact.dot_batched`'s, the sum is taken in float64 in
    neighbour order (each step one rounded operation), rounded once and normalized by
    :func:`cbir.exact.unit_rows`. A non-integer ``alpha`` goes through ``pow``, whose last
    bit may differ between CPUs (an integer one is a product)."""
    if alpha == 0:
        w = torch.ones(ys.shape[:2], dtype=torch.float64)
    else:
        s = exact.dot_batched(exact.slice_rows(x), exact.slice_rows(ys)).double().clamp_(min=0)
        w = exact.integer_power(s, int(alpha)) if float(alpha).is_integer() else s.pow(alpha)
    w.masked_fill_(missing, 0.0)
    acc = x.double()
    for i in range(ys.shape[1]):
        acc.add_(ys[:, i].double().mul_(w[:, i, None]))
    return exact.unit_rows(acc.float())


#: a search: ``(query, database, conf, progress) -> pairs`` (local exact search, or on a cluster)
Search = Callable[[DescriptorSet, DescriptorSet, RetrievalConf, Callable[[int, int], None] | None], list[Pair]]


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
