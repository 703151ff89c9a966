"""Retrieval over code stores: each query's ``topk`` nearest map images by the Hamming
distance of their codes, ties by map order; the query's own image left out when the query
and the map are one dataset. What ``cbir retrieve`` runs for code stores and ``cbir hash
search`` runs always."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CbirError
from ..io.dataset import Dataset
from ..io.pairs import Pair
from ..io.store import Store, open_store
from .model import code_store_problem, padding_is_zero
from .search import hamming_topk


def is_code_store(store: Store) -> bool:
    """Whether a global store holds binary descriptors (``metric_type`` Hamming)."""
    return store.config.get("metric_type") == "Hamming"


def code_bits(store: Store) -> int:
    """A code store's code length, its header and padding checked (formats/SPEC.md 7a); a
    binary store of another origin (imported from kapture) uses every bit of its bytes."""
    codes = store.dataset("descriptors")
    if store.config.get("extractor") != "hash":
        if codes.dtype != np.uint8:
            raise CbirError(f"binary descriptors must be uint8, not {codes.dtype}", store.path)
        return int(codes.shape[1]) * 8
    problem = code_store_problem(dict(store.config), codes.dtype, int(codes.shape[1]))
    if problem:
        raise CbirError(problem, store.path)
    return int(store.config["code_bits"])


def _aligned(store: Store, images: list[str]) -> tuple[list[str], np.ndarray]:
    """The store's images that the dataset records, in stored order, and their codes."""
    known = set(images)
    rows = [i for i, n in enumerate(store.names) if n in known]
    names = [str(store.names[i]) for i in rows]
    codes = store.read_rows("descriptors", np.asarray(rows, dtype=np.int64)) if rows else \
        np.zeros((0, store.dataset("descriptors").shape[1]), np.uint8)
    return names, np.asarray(codes, dtype=np.uint8)


def hamming_pairs(query: Dataset, map_: Dataset, name: str, topk: int, *, kind: str = "exact",
                  exclude_same_name: bool = False, rerank: str | None = None,
                  candidates: int = 100) -> tuple[list[Pair], dict[str, Any]]:
    """The pairs (score: the number of equal bits) and the record of what made them. With
    ``rerank`` (a float global store of both datasets), each query's ``candidates`` nearest
    codes are ranked again by the cosine of their float descriptors (the score then), ties by
    map order: :func:`cbir.exact.dot` products, the same bits on every machine."""
    same = query.root.resolve() == map_.root.resolve()
    with open_store(map_.store_path("global", name), "global-features") as ms, \
            open_store(query.store_path("global", name), "global-features") as qs:
        for s in (qs, ms):
            if not is_code_store(s):
                raise CbirError("not binary codes (metric_type is not Hamming): search it with cbir retrieve",
                                s.path)
        bits = code_bits(ms)
        if code_bits(qs) != bits or qs.config.get("hash", {}).get("model") != ms.config.get("hash", {}).get("model"):
            raise CbirError(f"the query codes were written by another hash model than {ms.path}'s: their bits mean "
                            "different things; encode both with the same model", qs.path)
        qnames, qcodes = _aligned(qs, query.sensors.image_names())
        mnames, mcodes = _aligned(ms, map_.sensors.image_names())
        for label, names, codes, store in (("query", qnames, qcodes, qs), ("map", mnames, mcodes, ms)):
            if not names:
                raise CbirError(f"no {label} image of the dataset has a code in this store", store.path)
            if not padding_is_zero(codes, bits):
                raise CbirError("padding bits past code_bits are not zero", store.path)
        record: dict[str, Any] = {"step": "retrieve", "config": {"metric": "Hamming", "topk": topk, "index": kind,
                                                 "exclude_self": same, "exclude_same_name": exclude_same_name,
                                                 "stores": [name], "descriptors": [ms.config], "code_bits": bits},
                  "inputs": {"query": [qs.fingerprint()], "map": [ms.fingerprint()]}}
    extra = int(same or exclude_same_name)
    depth = max(topk, candidates) if rerank else topk
    distances, rows = hamming_topk(qcodes, mcodes, min(depth + extra, len(mnames)), kind)
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
