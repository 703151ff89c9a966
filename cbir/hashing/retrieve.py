"""Retrieval over code stores: each query's ``topk`` nearest map images by the Hamming
distance of their codes, ties by map order; the query's own image left out when the query
and the map are one dataset. What ``cbir retrieve`` runs for code stores and ``cbir hash
search`` runs always.

The search is a step on the executor seam (:mod:`cbir.executor`): the map is cut into ranges
of ``map_images`` (one range on the local executor), each shard finds the nearest codes of
its range by (distance, map row), and the shards' lists are merged by the same key: integers,
so the pairs are the same whatever the cut, the executor and the machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CbirError
from ..executor import Executor, LocalExecutor, Work
from ..io.dataset import Dataset
from ..io.pairs import Pair
from ..io.store import Store, open_store
from .model import check_same_model, checked_codes, is_code_store, store_code_bits
from .search import hamming_topk


def _aligned(store: Store, images: list[str]) -> tuple[list[str], np.ndarray]:
    """The store's images that the dataset records, in stored order, and their rows."""
    known = set(images)
    rows = np.array([i for i, n in enumerate(store.names) if n in known], dtype=np.int64)
    return [str(store.names[i]) for i in rows.tolist()], rows


def hamming_shard(map_store: str, rows: np.ndarray, start: int, query_codes: np.ndarray, depth: int,
                  kind: str, *, threads: int | None = None, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """One range of the map (its store ``rows``, the first at position ``start`` of the
    aligned map): each query's ``depth`` nearest codes there, as distances and positions."""
    if threads:
        import faiss

        faiss.omp_set_num_threads(threads)
    with open_store(map_store, "global-features") as store:  # checked by the driver (hamming_pairs)
        codes = np.asarray(store.read_rows("descriptors", rows), dtype=np.uint8) if len(rows) else \
            np.zeros((0, store.dataset("descriptors").shape[1]), np.uint8)
    distances, found = hamming_topk(query_codes, codes, depth, kind)
    return distances, np.where(found >= 0, found + start, -1)


def _merged(parts: list[tuple[np.ndarray, np.ndarray]], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The shards' lists as one: each query's ``depth`` smallest (distance, position)."""
    distances = np.concatenate([p[0] for p in parts], axis=1)
    positions = np.concatenate([p[1] for p in parts], axis=1)
    big = np.iinfo(np.int64).max
    key_d = np.where(positions >= 0, distances.astype(np.int64), big)
    order = np.lexsort((positions, key_d), axis=1)[:, :depth]
    return np.take_along_axis(distances, order, 1), np.take_along_axis(positions, order, 1)


def search_codes(executor: Executor, map_store: Path, rows: np.ndarray, query_codes: np.ndarray, depth: int,
                 kind: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``depth`` nearest map codes (distances, positions in ``rows``), by shards
    of ``executor.sizes.map_images`` map images (one on an executor running here)."""
    n = len(rows)
    size = n if executor.in_place else max(1, executor.sizes.map_images)
    cuts = [(m0, min(n, m0 + size)) for m0 in range(0, n, size)] or [(0, 0)]
    shared = executor.share(query_codes)
    shards = {i: (str(map_store), rows[m0:m1], m0, shared, depth, kind) for i, (m0, m1) in enumerate(cuts)}
    work = Work(hamming_shard, shards, [str(m0) for m0, _ in cuts], [m1 - m0 for m0, m1 in cuts], n, role=None,
                torch=False)
    parts = dict(executor.run(work))
    return _merged([parts[i] for i in sorted(parts)], depth)


def hamming_pairs(query: Dataset, map_: Dataset, name: str, topk: int, *, kind: str = "exact",
                  exclude_same_name: bool = False, rerank: str | None = None, candidates: int = 100,
                  executor: Executor | None = None) -> tuple[list[Pair], dict[str, Any]]:
    """The pairs (score: the number of equal bits) and the record of what made them. With
    ``rerank`` (a float global store of both datasets), each query's ``candidates`` nearest
    codes are ranked again by the cosine of their float descriptors (the score then), ties by
    map order: :func:`cbir.exact.dot` products, the same bits on every machine."""
    same = query.root.resolve() == map_.root.resolve()
    with open_store(map_.store_path("global", name), "global-features") as ms, \
            open_store(query.store_path("global", name), "global-features") as qs:
        store_code_bits(qs)
        bits = store_code_bits(ms)
        check_same_model(qs, ms)
        qnames, qrows = _aligned(qs, query.sensors.image_names())
        mnames, mrows = _aligned(ms, map_.sensors.image_names())
        for label, names, store in (("query", qnames, qs), ("map", mnames, ms)):
            if not names:
                raise CbirError(f"no {label} image of the dataset has a code in this store", store.path)
        qcodes = checked_codes(qs, qrows, bits)
        if bits % 8:  # the map's padding (whole bytes have none): read here once, not in each shard
            checked_codes(ms, mrows, bits)
        map_path = ms.path
        record: dict[str, Any] = {"step": "retrieve", "config": {"metric": "Hamming", "topk": topk, "index": kind,
                                                 "exclude_self": same, "exclude_same_name": exclude_same_name,
                                                 "stores": [name], "descriptors": [ms.config], "code_bits": bits},
                  "inputs": {"query": [qs.fingerprint()], "map": [ms.fingerprint()]}}
    extra = int(same or exclude_same_name)
    depth = max(topk, candidates) if rerank else topk
    distances, rows = search_codes(executor or LocalExecutor(), map_path, mrows, qcodes,
                                   min(depth + extra, len(mnames)), kind)
    found = []
    for qi, q in enumerate(qnames):
        found.append([(int(d), int(r)) for d, r in zip(distances[qi], rows[qi], strict=True)
                      if r >= 0 and not ((same or exclude_same_name) and mnames[r] == q)][:depth])
    if rerank is None:
        return [Pair(q, mnames[r], float(bits - d)) for q, hits in zip(qnames, found, strict=True)
                for d, r in hits[:topk]], record
    record["config"].update({"rerank": rerank, "candidates": candidates})
    return _reranked(query, map_, rerank, qnames, mnames, found, topk, record), record


def _reranked(query: Dataset, map_: Dataset, name: str, qnames: list[str], mnames: list[str],
              found: list[list[tuple[int, int]]], topk: int, record: dict[str, Any]) -> list[Pair]:
    """Each query's Hamming candidates ranked by the cosine of float descriptors ``name``."""
    import torch

    from .. import exact
    from ..retrieval.descriptors import mismatch_message

    with open_store(map_.store_path("global", name), "global-features") as ms, \
            open_store(query.store_path("global", name), "global-features") as qs:
        for s in (qs, ms):
            if is_code_store(s):
                raise CbirError("re-ranking needs float descriptors, not codes", s.path)
        if qs.path.resolve() != ms.path.resolve() and qs.config != ms.config:
            raise CbirError(mismatch_message(qs, ms), qs.path)
        wanted = sorted({r for hits in found for _, r in hits})
        missing = [mnames[r] for r in wanted if mnames[r] not in ms] + [q for q in qnames if q not in qs]
        if missing:
            raise CbirError(f"{len(missing)} images have codes but no float descriptor, e.g. {missing[0]!r}", ms.path)

        def units(store: Store, names: list[str]) -> torch.Tensor:
            rows = np.array([store.index(n) for n in names], dtype=np.int64)
            order = np.argsort(rows, kind="stable")  # read in stored order, put back in the asked order
            raw = np.empty((len(rows), store.dataset("descriptors").shape[1]), np.float32)
            raw[order] = store.read_rows("descriptors", rows[order])
            x = torch.from_numpy(raw)
            return exact.unit_rows(x, exact.norms(x))

        map_units = dict(zip(wanted, units(ms, [mnames[r] for r in wanted]), strict=True))
        query_units = units(qs, qnames)
        record["inputs"]["rerank"] = {"query": qs.fingerprint(), "map": ms.fingerprint()}
        record["config"]["rerank_descriptors"] = ms.config
    pairs = []
    for qi, q in enumerate(qnames):
        hits = [r for _, r in found[qi]]
        if not hits:
            continue
        scores = exact.dot(exact.slice_rows(query_units[qi:qi + 1]),
                           exact.slice_rows(torch.stack([map_units[r] for r in hits])))[0].numpy()
        order = np.lexsort((np.asarray(hits), -scores.astype(np.float64)))[:topk]
        pairs += [Pair(q, mnames[hits[i]], float(scores[i])) for i in order]
    return pairs


@dataclass
class CodeDistances:
    """Every query image's distance to every map image (Q x N), the names in store order,
    the code length, the identity of the hash model that wrote the codes (the ``hash`` of the
    stores' config, formats/SPEC.md 7a), and the fingerprints of the stores read."""

    query_names: list[str]
    map_names: list[str]
    distances: np.ndarray
    bits: int
    identity: dict[str, Any]
    fingerprints: dict[str, list[str]]


def code_distances(query: Dataset, map_: Dataset, name: str) -> CodeDistances:
    """The Hamming distances (int32) between the codes of code store ``name`` of ``query``
    and of ``map_``, every pair (evaluation), the stores checked: widths, padding, one model."""
    from .search import hamming_distances

    with open_store(query.store_path("global", name), "global-features") as qs, \
            open_store(map_.store_path("global", name), "global-features") as ms:
        store_code_bits(qs)
        bits = store_code_bits(ms)
        check_same_model(qs, ms)
        distances = hamming_distances(checked_codes(qs, None, bits), checked_codes(ms, None, bits))
        prints = {"query": [qs.fingerprint()], "map": [ms.fingerprint()]}
        return CodeDistances([str(k) for k in qs.keys], [str(k) for k in ms.keys], distances, bits,
                             dict(ms.config.get("hash") or {}), prints)
