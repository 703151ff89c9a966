"""Exact top-k retrieval over one or several global descriptors, with late fusion.

Every score is :mod:`cbir.exact`'s similarity of the unit descriptors, fused: the same bits
on every CPU and GPU, whatever the thread count, the chunks, the shards or the precision
of the search, so the pairs of any two runs are equal, not merely close. A float32 (or
half-precision) matrix product finds each query's candidates, with a bound on its error
that makes the candidates provably hold the top-k, and only those are scored exactly
(:func:`_bounded_topk`); fusions that may decrease when a similarity grows are scored
exactly over the whole map (:func:`_canonical_topk`).

Queries are processed in blocks and the map in chunks: for each (block, chunk) the
similarity of every descriptor is one matrix product, the operator fuses them in place,
and a top-k of the chunk is merged into the block's running top-k. Memory is bounded by
one map chunk and ``n + 1`` similarity blocks, whatever the size of the map; nothing is
ever fully sorted. round_robin keeps a running top-k per descriptor instead and merges
the rankings at the end, as kapture-localization does. Equal scores rank by lower map
index (:func:`ranked`).

On a GPU the map stays resident in device memory when it fits (:class:`MapChunks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .. import exact
from ..devices import Uploader, exact_float32, memory_budget
from ..errors import CbirError
from ..io.pairs import Pair
from .conf import MONOTONE, RetrievalConf
from .descriptors import DescriptorSet, as_float32, mismatch_message, open_descriptor_sets
from .fusion import fuse, nan_last, normalized_weights
from .ranking import gc_paused, pairs_from_topk, pairs_record, ranked
from .runtime import StepClock, intra_op_threads, read_ahead

__all__ = ["COLLECT_LIMIT", "MapChunks", "bounded", "error_bound", "exact_scores", "retrieve", "search_topk",
           # lived here before retrieval was split along its concepts; still importable from here
           "MONOTONE", "RetrievalConf", "DescriptorSet", "as_float32", "mismatch_message", "open_descriptor_sets",
           "gc_paused", "pairs_from_topk", "pairs_record", "ranked", "StepClock", "intra_op_threads", "read_ahead"]


class MapChunks:
    """The map's descriptors chunk by chunk, for every query block.

    Kept whole where they fit: on a GPU resident in device memory when they fit
    ``conf.device_memory`` of its free memory (with their half-precision copies when
    searching in half precision), on the CPU in host memory below ``conf.cache_bytes``.
    Otherwise streamed: the next chunk is read (and normalized) by a thread while the
    device works on this one, and uploaded from pinned memory.
    """

    def __init__(self, database: DescriptorSet, device: torch.device, chunk: int, conf: RetrievalConf,
                 clock: StepClock):
        self.database, self.device, self.chunk, self.clock = database, device, chunk, clock
        self.n = len(database.names)
        self.half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(conf.precision)
        per_image = sum(database.dims) * (4 + (2 if self.half else 0))
        budget = memory_budget(device, conf.device_memory) if device.type == "cuda" else conf.cache_bytes
        self.resident = self.n * per_image <= budget
        self._full: list[torch.Tensor] | None = None  # resident: one (n x dim) tensor per descriptor
        self._full_half: list[torch.Tensor] | None = None
        self._upload = Uploader(device)

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor] | None]]:
        """``(start, float32 chunks, half-precision chunks or None)``."""
        if self.resident:
            if self._full is None:
                self._load()
            assert self._full is not None  # loaded
            for m0 in range(0, self.n, self.chunk):
                m1 = min(self.n, m0 + self.chunk)
                yield m0, [f[m0:m1] for f in self._full], \
                    [f[m0:m1] for f in self._full_half] if self._full_half is not None else None
            return
        starts = range(0, self.n, self.chunk)
        chunks = read_ahead(lambda m0: self.database.take_host(np.arange(m0, min(self.n, m0 + self.chunk))), starts)
        while True:
            with self.clock("read"):
                item = next(chunks, None)
                if item is None:
                    return
                m0, host = item
                chunk = [self._upload(h) for h in host]
            yield m0, chunk, [c.to(self.half) for c in chunk] if self.half else None

    def _load(self) -> None:
        with self.clock("read"):
            self._full = [torch.empty((self.n, d), dtype=torch.float32, device=self.device)
                          for d in self.database.dims]
            for m0 in range(0, self.n, self.chunk):
                m1 = min(self.n, m0 + self.chunk)
                for f, h in zip(self._full, self.database.take_host(np.arange(m0, m1)), strict=True):
                    f[m0:m1] = self._upload(h)
            if self.half:
                self._full_half = [f.to(self.half) for f in self._full]


def _merge_topk(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ranked(torch.cat([vals, new_vals], dim=1), torch.cat([idx, new_idx], dim=1), k)


def _chunk_topk(scores: torch.Tensor, k: int, m0: int,
                exact_ties: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` of a chunk of scores (columns: map images ``m0 + j``): ``(values,
    indices, boundary)``. ``topk`` picks any of the images tied at the k-th score, so
    ``boundary`` is that score where the chunk has such a tie (the k+1-th score equals the
    k-th), else ``-inf``: a query whose final k-th score is not above it is searched again
    with ``exact_ties`` (the chunk fully sorted, equal scores by lower index)."""
    width = scores.shape[1]
    if exact_ties:
        v, i = ranked(scores, torch.arange(m0, m0 + width, device=scores.device).expand(scores.shape[0], -1), k)
        return v, i, torch.full_like(v[:, 0], -torch.inf)
    top = torch.topk(scores, min(k + 1, width), dim=1, sorted=True)
    v, i = top.values[:, :k], top.indices[:, :k] + m0
    if width <= k:
        return v, i, torch.full_like(v[:, 0], -torch.inf)
    tied = top.values[:, k] == top.values[:, k - 1]
    return v, i, torch.where(tied, top.values[:, k - 1], -torch.inf)


def _unsettled_ties(values: torch.Tensor, boundary: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th score is not above a tie that a chunk's ``topk`` cut (see
    :func:`_chunk_topk`): their images of equal score may not be the lowest-indexed."""
    if values.shape[1] < k:
        return torch.zeros_like(boundary, dtype=torch.bool)
    return (boundary > -torch.inf) & (values[:, k - 1] <= boundary)


def retrieve(query: DescriptorSet, database: DescriptorSet, conf: RetrievalConf = RetrievalConf(),
             device: torch.device = torch.device("cpu"),
             progress: Callable[[int, int], None] | None = None,
             timings: dict[str, float] | None = None) -> list[Pair]:
    """The top-k database images of every query, best first, as pairs with their fused score
    (round_robin: the peer's rank score ``topk - position``). ``timings`` (optional) is
    filled with the seconds spent reading, in the matrix products, fusing + selecting,
    (half precision) rescoring the candidates, and making the pairs."""
    clock = StepClock(timings, device)
    pairs: list[Pair] = []
    for q0, q1, values, indices in search_topk(query, database, conf, device, clock):
        with clock("pairs"):
            pairs += pairs_from_topk(query.names[q0:q1], database.names, values, indices, conf)
        if progress:
            progress(q1 - q0, len(query.names))
    return pairs


def search_topk(query: DescriptorSet, database: DescriptorSet, conf: RetrievalConf, device: torch.device,
                clock: StepClock | None = None,
                width: int | None = None) -> Iterator[tuple[int, int, list[np.ndarray], list[np.ndarray]]]:
    """The top-k of each block of queries ``q0:q1``: ``(q0, q1, values, indices)``, one
    array (block x k, best first) per ranking (round_robin: one a descriptor; else the
    fused score, NaN ranked as :data:`~.fusion.NAN_RANK`, an excluded image ``-inf``),
    indices into ``database``. ``k`` is ``conf.topk``, less the excluded image where
    there is one, or ``width`` when given (a shard of the map: its excluded image, if any,
    comes last at ``-inf``)."""
    clock = clock or StepClock(None, device)
    if len(query.stores) != len(database.stores):
        raise ValueError("query and database need the same descriptors")
    nq, nm = len(query.names), len(database.names)
    if nm == 0:
        raise CbirError("the map has no image with every descriptor", database.stores[0].path)
    for qs, ms, dq, dm in zip(query.stores, database.stores, query.dims, database.dims, strict=True):
        if dq != dm:
            raise CbirError(f"descriptor dimension {dq} differs from the map's {dm} ({ms.path})", qs.path)
        if qs.config != ms.config:
            raise CbirError(mismatch_message(qs, ms), qs.path)
    k = min(conf.topk, nm - (1 if conf.excludes_names else 0)) if width is None else min(width, nm)
    if k <= 0:
        return
    map_index = {n: i for i, n in enumerate(database.names)} if conf.excludes_names else {}
    query_block, map_chunk = conf.blocks(device)
    chunks = MapChunks(database, device, map_chunk, conf, clock)
    with torch.inference_mode(), exact_float32():
        for q0 in range(0, nq, query_block):
            q1 = min(nq, q0 + query_block)
            with clock("read"):
                qd = query.read(q0, q1, device)
            self_idx = torch.tensor([map_index.get(n, -1) for n in query.names[q0:q1]], device=device)
            search = _bounded_topk if bounded(conf) else _canonical_topk
            vals, idxs = search(qd, self_idx, chunks, conf, k, clock)
            yield q0, q1, [v.cpu().numpy() for v in vals], [i.cpu().numpy() for i in idxs]


def _exclude(scores: torch.Tensor, self_idx: torch.Tensor, m0: int) -> None:
    """Drop (``-inf``, in place) each query's own image from a chunk starting at ``m0``."""
    # a scatter, not a boolean index: no host synchronisation on a GPU
    width = scores.shape[1]
    inside = ((self_idx >= m0) & (self_idx < m0 + width))[:, None]
    cols = (self_idx - m0).clamp(0, width - 1)[:, None]
    scores.scatter_(1, cols, torch.where(inside, -torch.inf, scores.gather(1, cols)))


def _canonical_topk(qd: list[torch.Tensor], self_idx: torch.Tensor, chunks: MapChunks, conf: RetrievalConf, k: int,
                    clock: StepClock, exact_ties: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The top-k of a query block over every map image scored with :mod:`cbir.exact`'s
    similarities: ``(values, indices)``, one list entry per descriptor (round_robin) or one
    for the fused score, best first, equal scores by lower map index (:func:`ranked`).
    Every fusion; four float64 products' worth a similarity, so monotone fusions go through
    :func:`_bounded_topk` instead, which comes here only for queries it cannot bound."""
    round_robin = conf.fusion.name == "round_robin"
    nq, dev = qd[0].shape[0], qd[0].device
    lists = len(qd) if round_robin else 1
    sliced = [exact.slice_rows(q) for q in qd]
    vals = [torch.full((nq, 0), -torch.inf, device=dev) for _ in range(lists)]
    idxs = [torch.zeros((nq, 0), dtype=torch.int64, device=dev) for _ in range(lists)]
    boundary = [torch.full((nq,), -torch.inf, device=dev) for _ in range(lists)]
    for m0, md, _ in chunks:
        with clock("similarity"):
            sims = [exact.dot_rows(a, b) for a, b in zip(sliced, md, strict=True)]
        with clock("fuse_topk"):
            scores = sims if round_robin else [nan_last(fuse(sims, conf.fusion))]
            for j, s in enumerate(scores):
                if conf.excludes_names:
                    _exclude(s, self_idx, m0)
                v, i, tie = _chunk_topk(s, k, m0, exact_ties)
                vals[j], idxs[j] = _merge_topk(vals[j], idxs[j], v, i, k)
                torch.maximum(boundary[j], tie, out=boundary[j])
        del sims, scores
    if not exact_ties:
        again = torch.zeros(nq, dtype=torch.bool, device=dev)
        for v, b in zip(vals, boundary, strict=True):
            again |= _unsettled_ties(v, b, k)
        again = again.nonzero()[:, 0]  # the one host synchronisation of the block (rare ties)
        if clock.timings is not None:
            clock.timings["tie_queries"] = clock.timings.get("tie_queries", 0) + len(again)
        if len(again):
            redo_v, redo_i = _canonical_topk([q[again] for q in qd], self_idx[again], chunks, conf, k, clock, True)
            for j in range(lists):
                vals[j][again], idxs[j][again] = redo_v[j], redo_i[j]
    return vals, idxs


def error_bound(precision: str, dim: int) -> float:
    """A bound on ``|s~ - s|``: ``s~`` the similarity of two unit vectors of ``dim``
    components computed in ``precision`` (inputs rounded, float32 accumulation, output
    rounded to ``precision``), ``s`` the same similarity from :func:`cbir.exact.dot`.

    Rounding a unit vector moves it by at most ``u + d`` (``u`` the unit roundoff: 2^-11
    for fp16, 2^-8 for bf16, 0 for float32 inputs; ``d = sqrt(dim) 2^-25`` for fp16's
    subnormals), so the product of two moves by at most ``2(u + d) + (u + d)^2``; a float32
    sum of ``dim`` terms in any order adds ``gamma = c dim 2^-24 / (1 - c dim 2^-24)`` of the
    norms' product (``c`` = 1 for float32 products, rounded to nearest on CPUs and on GPUs
    with TF32 off (:func:`~cbir.devices.exact_float32`) and torch's float32 matmul precision
    left at its default, "highest"; 4 for half-precision inputs, whose
    matrix units may truncate); the rounded output adds ``u`` of a value at most
    ``1 + 2(u + d)``. ``s`` is within ``sqrt(dim) 2^(2-2b)`` of the exact value (see
    :mod:`cbir.exact`), one float32 rounding and the norms' own rounding: ``2^-22`` covers
    these three below 2^16 dimensions, the slicing term is added above that.
    """
    u = {"fp32": 0.0, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[precision]
    d = (dim ** 0.5) * 2.0 ** -25 if precision == "fp16" else 0.0
    move = u + d
    accumulate = (1 if precision == "fp32" else 4) * dim * 2.0 ** -24
    gamma = accumulate / (1 - accumulate) if accumulate < 0.5 else 1.0
    canonical = 2.0 ** -22 + (dim ** 0.5) * 2.0 ** (2 - 2 * exact.slice_bits(dim)) * (dim > 1 << 16)
    return 2 * move + move ** 2 + gamma * (1 + move) ** 2 + u * (1 + 2 * move) + canonical


def _search_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Similarities of (float32 or half-precision) unit vectors, as float32: the candidates'
    search. On the CPU half-precision inputs are multiplied in float32 (what a GPU's matrix
    units compute, without their speed): the same bound holds, so the CPU tests check the
    GPU's logic."""
    if a.dtype == torch.float32:
        return torch.mm(a, b.t())
    if a.device.type == "cpu":
        return torch.mm(a.float(), b.float().t())
    return torch.mm(a, b.t()).float()


def bounded(conf: RetrievalConf) -> bool:
    """Whether a search with ``conf`` finds candidates by a fast product and its error
    bound (:func:`_bounded_topk`): fusions that never decrease when a similarity grows, and
    round_robin (each ranking one similarity). Others score every image exactly."""
    return conf.fusion.name in MONOTONE or conf.fusion.name == "round_robin"


def _bounded_topk(qd: list[torch.Tensor], self_idx: torch.Tensor, chunks: MapChunks, conf: RetrievalConf, k: int,
                  clock: StepClock) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The top-k of :func:`_canonical_topk`, found with float32 (or half-precision)
    products: the same values and indices, bit for bit.

    A fast similarity plus (minus) its :func:`error_bound` is an upper (lower) bound of the
    exact one (:func:`cbir.exact.dot`), so, the fusion being monotone, the fused bounds
    ``U`` and ``L`` of an image enclose its exact fused score. The k-th largest ``L`` seen
    so far is a floor that a query's k-th exact score reaches: an image whose ``U`` is below
    it can be neither in the top-k nor tied with it. In each chunk, the images whose ``U``
    reaches the floor are scored exactly from the chunk's rows and merged into the query's
    exact top-k: about k a query where scores are apart, every near-tie where they are not.
    A query with more than :data:`COLLECT_LIMIT` of them, or whose bounds do not hold (gharm
    outside its domain), is scored over the whole map (:func:`_canonical_topk`).
    round_robin does this for each descriptor's ranking.
    """
    nq, dev, n = qd[0].shape[0], qd[0].device, len(qd)
    round_robin = conf.fusion.name == "round_robin"
    lists = n if round_robin else 1
    bounds = [error_bound(conf.precision, q.shape[1]) for q in qd]
    qh = [q.to(chunks.half) for q in qd] if chunks.half else qd
    sliced = [exact.slice_rows(q) for q in qd]
    # gharm is monotone where every gamma + w_i s_i > 0: certain when gamma > max(w_i) (s >= -1),
    # else checked on the smallest similarities seen
    gamma, weights = 0.5 if conf.fusion.gamma is None else conf.fusion.gamma, normalized_weights(conf.fusion.weights, n)
    check_domain = conf.fusion.name == "gharm" and n > 1 and not gamma > max(weights)
    lowest = [torch.full((nq,), torch.inf, device=dev) for _ in range(n)] if check_domain else []
    lows = [torch.full((nq, 0), -torch.inf, device=dev) for _ in range(lists)]  # the k largest L so far
    values = [torch.full((nq, 0), -torch.inf, device=dev) for _ in range(lists)]  # the exact top-k so far
    indices = [torch.zeros((nq, 0), dtype=torch.int64, device=dev) for _ in range(lists)]
    counts = [torch.zeros(nq, dtype=torch.int64, device=dev) for _ in range(lists)]  # scored so far
    for m0, md, mh in chunks:
        with clock("similarity"):
            sims = [_search_product(a, b) for a, b in zip(qh, md if mh is None else mh, strict=True)]
        with clock("fuse_topk"):
            for j, (s, e) in enumerate(zip(sims, bounds, strict=True) if check_domain else ()):
                torch.minimum(lowest[j], s.amin(dim=1) - e, out=lowest[j])
            high = [s + e for s, e in zip(sims, bounds, strict=True)]
            low = [s.sub_(e) for s, e in zip(sims, bounds, strict=True)]
            uppers = high if round_robin else [nan_last(fuse(high, conf.fusion))]
            lowers = low if round_robin else [nan_last(fuse(low, conf.fusion))]
            reached = []
            for j, (upper, lower) in enumerate(zip(uppers, lowers, strict=True)):
                if conf.excludes_names:
                    _exclude(upper, self_idx, m0)
                    _exclude(lower, self_idx, m0)
                merged = torch.cat([lows[j], torch.topk(lower, min(k, lower.shape[1]), dim=1).values], dim=1)
                lows[j] = torch.topk(merged, min(k, merged.shape[1]), dim=1).values
                reach = upper >= _floor(lows[j], k)[:, None]
                reach &= (counts[j] <= COLLECT_LIMIT)[:, None]  # beyond: scored over the map instead
                rows, cols = reach.nonzero(as_tuple=True)
                reached.append((rows, cols, upper[rows, cols] == -torch.inf))
        del sims, high, low, uppers, lowers
        with clock("rescore"):
            for j, (rows, cols, excluded) in enumerate(reached):
                found = torch.bincount(rows, minlength=nq)
                counts[j] += found
                active, cand, out = _padded(rows, cols, excluded, found)  # out: padding, excluded images
                if not len(active):
                    continue
                scores = exact_scores(sliced, md, active, cand, conf, j if round_robin else None)
                v = torch.full((nq, cand.shape[1]), -torch.inf, device=dev)
                i = torch.full((nq, cand.shape[1]), _PAD, dtype=torch.int64, device=dev)
                v[active] = scores.masked_fill_(out, -torch.inf)
                i[active] = torch.where(cand < 0, _PAD, cand + m0)
                values[j], indices[j] = ranked(torch.cat([values[j], v], 1), torch.cat([indices[j], i], 1), k)
    complete = torch.ones(nq, dtype=torch.bool, device=dev)
    for low_sim, w in zip(lowest, weights, strict=False):  # lowest: none without the domain check
        complete &= gamma + w * low_sim > 0
    for c in counts:
        complete &= c <= COLLECT_LIMIT
    if clock.timings is not None:
        clock.timings["scored"] = clock.timings.get("scored", 0) + int(sum(int(c.sum()) for c in counts))
    everything = (~complete).nonzero()[:, 0]
    if len(everything):
        again_v, again_i = _canonical_topk([q[everything] for q in qd], self_idx[everything], chunks, conf, k, clock)
        for j in range(lists):
            values[j][everything], indices[j][everything] = again_v[j], again_i[j]
    if clock.timings is not None:
        clock.timings["full_queries"] = clock.timings.get("full_queries", 0) + len(everything)
    return values, [torch.where(i == _PAD, -1, i) for i in indices]


#: a query with more images than this whose bounds reach its k-th score is scored over the map
COLLECT_LIMIT = 1 << 16
#: the map index of padding: after every image of equal score (-inf), so never before one
_PAD = 1 << 62


def _floor(lows: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest lower bound of each query (``-inf`` before k images were seen)."""
    if lows.shape[1] < k:
        return torch.full((lows.shape[0],), -torch.inf, device=lows.device)
    return lows[:, k - 1]


def _padded(rows: torch.Tensor, cols: torch.Tensor, excluded: torch.Tensor,
            counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (query ``rows`` in ascending order, as ``nonzero`` gives them; chunk ``cols``;
    ``counts`` a query) as a row per query that has any: ``(those queries, their columns
    padded with -1, where no score counts: padding or an ``excluded`` image)``."""
    active = counts.nonzero()[:, 0]
    width = int(counts.max()) if len(rows) else 0
    slot = torch.cumsum(counts > 0, 0) - 1  # each active query's row
    place = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    cand = torch.full((len(active), width), -1, dtype=torch.int64, device=rows.device)
    out = torch.ones((len(active), width), dtype=torch.bool, device=rows.device)
    cand[slot[rows], place] = cols
    out[slot[rows], place] = excluded
    return active, cand, out


def exact_scores(sliced: list[exact.Sliced], rows: list[torch.Tensor], active: torch.Tensor, cand: torch.Tensor,
                 conf: RetrievalConf, descriptor: int | None) -> torch.Tensor:
    """The exact scores of the (sliced) queries ``active`` with their map descriptors
    ``rows[j][cand]`` (unit rows, one tensor per descriptor; ``cand`` ``-1``: none, scored as
    row 0): descriptor ``descriptor``'s similarity, or (``None``) the fused score, NaN ranked
    by :func:`~.fusion.nan_last`."""
    which = range(len(sliced)) if descriptor is None else [descriptor]
    width = cand.shape[1]
    # the gathered rows and their slices stay in the cache: 64 MB a step (1,000 queries x 25
    # candidates x 6,400 dims rescored in 0.66 s in steps of 10 queries, 1.2-1.3 s in steps of 41)
    step = max(1, (64 << 20) // (width * sum(sliced[j].high.shape[1] for j in which) * 40))
    out = torch.empty((len(active), width), dtype=torch.float32, device=cand.device)
    at = cand.clamp(min=0)
    for r0 in range(0, len(active), step):
        q, c = active[r0:r0 + step], at[r0:r0 + step]
        sims = [exact.dot_batched(sliced[j][q], exact.slice_rows(rows[j][c])) for j in which]
        out[r0:r0 + step] = sims[0] if descriptor is not None else nan_last(fuse(sims, conf.fusion))
    return out


