"""Hamming search: for each query code its ``k`` nearest map codes by Hamming distance,
ties ranked by map order (the map's row index), exactly: distances are integers, so the
ranking is the same on every CPU and thread count.

``exact`` is faiss's ``IndexBinaryFlat`` (XOR and popcount over every map code), four times
``k`` asked for so that the ties at the k-th distance are all seen (a range search where they
go on further); ``multihash`` (``IndexBinaryMultiHash``) and
``ivf`` (``IndexBinaryIVF``) are faiss's indexes for large maps, whose candidates are ranked
by the same rule (they may miss neighbours: an index trades recall for speed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CbirError

KINDS = ("exact", "multihash", "ivf")


def _padded(codes: np.ndarray) -> np.ndarray:
    """faiss's binary indexes take a whole number of bytes; the codes' padding bits are zero."""
    return np.ascontiguousarray(codes, dtype=np.uint8)


def build_index(map_codes: np.ndarray, kind: str = "exact", *, nhash: int = 4, nlist: int | None = None,
                nprobe: int = 16) -> Any:
    """A faiss binary index of ``map_codes`` (N x bytes uint8)."""
    import faiss

    codes = _padded(map_codes)
    d = codes.shape[1] * 8
    index: Any
    if kind == "exact":
        index = faiss.IndexBinaryFlat(d)
    elif kind == "multihash":
        # nhash tables of d / nhash bits each (at most 64: faiss's limit per table)
        b = max(1, min(64, d // nhash))
        index = faiss.IndexBinaryMultiHash(d, nhash, b)
    elif kind == "ivf":
        lists = nlist or max(1, int(4 * np.sqrt(len(codes))))
        quantizer = faiss.IndexBinaryFlat(d)
        index = faiss.IndexBinaryIVF(quantizer, d, lists)
        index.train(codes)
        index.nprobe = nprobe
    else:
        raise CbirError(f"unknown Hamming index {kind!r} (known: {', '.join(KINDS)})")
    index.add(codes)
    return index


def hamming_topk(query_codes: np.ndarray, map_codes: np.ndarray, k: int, kind: str = "exact",
                 index: Any = None, **index_options: Any) -> tuple[np.ndarray, np.ndarray]:
    """Distances (Q x k int32) and map rows (Q x k int64; -1 where fewer than k were found)
    of each query's ``k`` nearest codes, ties by map row."""
    q = _padded(query_codes)
    if q.shape[1] != map_codes.shape[1]:
        raise CbirError(f"query codes of {q.shape[1]} bytes, map codes of {map_codes.shape[1]}: different code lengths")
    k = min(k, len(map_codes))
    if index is None:
        index = build_index(map_codes, kind, **index_options)
    distances = np.full((len(q), k), -1, np.int32)
    rows = np.full((len(q), k), -1, np.int64)
    if not k or not len(q):
        return distances, rows
    if kind == "exact":
        # k' > k nearest: where the k'-th is farther than the k-th, every code at the k-th
        # distance is among them (any code left out is at least as far as the k'-th); elsewhere
        # the ties at the k-th distance go on past k': take them all by a range search
        deeper = min(len(map_codes), 4 * k)
        found_d, found_i = index.search(q, deeper)
        saturated = found_d[:, -1] <= found_d[:, k - 1] if deeper > k else np.zeros(len(q), bool)
        for qi in np.flatnonzero(~saturated):
            order = np.lexsort((found_i[qi], found_d[qi]))[:k]
            distances[qi], rows[qi] = found_d[qi][order], found_i[qi][order]
        radius = found_d[:, k - 1].astype(np.int64) + 1
        for r in np.unique(radius[saturated]):
            sel = np.flatnonzero(saturated & (radius == r))
            lims, dist, ids = index.range_search(q[sel], int(r))
            for j, qi in enumerate(sel):
                near, which = dist[lims[j]:lims[j + 1]], ids[lims[j]:lims[j + 1]]
                order = np.lexsort((which, near))[:k]
                distances[qi, :len(order)], rows[qi, :len(order)] = near[order], which[order]
        return distances, rows
    found_d, found_i = index.search(q, k)
    for row in range(len(q)):  # an index's candidates, ranked by the same rule
        valid = found_i[row] >= 0
        near, which = found_d[row][valid], found_i[row][valid]
        order = np.lexsort((which, near))
        distances[row, :len(order)], rows[row, :len(order)] = near[order], which[order]
    return distances, rows


def hamming_distances(query_codes: np.ndarray, map_codes: np.ndarray) -> np.ndarray:
    """Q x N Hamming distances (int32), every pair (for evaluation on small sets)."""
    q, m = _padded(query_codes), _padded(map_codes)
    out = np.empty((len(q), len(m)), np.int32)
    for start in range(0, len(q), 256):
        x = np.bitwise_xor(q[start:start + 256, None, :], m[None, :, :])
        out[start:start + 256] = np.bitwise_count(x).sum(-1, dtype=np.int32)
    return out
