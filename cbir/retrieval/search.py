"""Exact top-k retrieval over one or several global descriptors, with late fusion.

Queries are processed in blocks and the map in chunks: for each (block, chunk) the
similarity of every descriptor is one matrix product, the operator fuses them in place,
and a top-k of the chunk is merged into the block's running top-k. Memory is bounded by
one map chunk and ``n + 1`` similarity blocks, whatever the size of the map; nothing is
ever fully sorted. round_robin keeps a running top-k per descriptor instead and merges
the rankings at the end, as kapture-localization does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import CbirError
from ..io.dataset import model_path
from ..io.pairs import Pair
from ..io.provenance import differences
from ..io.store import Store
from ..validate import check_integer
from .fusion import FusionConf, fuse, nan_last, restore_nan


@dataclass(frozen=True)
class RetrievalConf:
    topk: int = 20
    fusion: FusionConf = field(default_factory=FusionConf)
    exclude_self: bool = False  # map x map: an image never retrieves itself
    #: query x map of two datasets: drop a map image named as the query, as kapture-localization
    #: does (off by default: in separate datasets a shared name is a different image)
    exclude_same_name: bool = False

    @property
    def excludes_names(self) -> bool:
        return self.exclude_self or self.exclude_same_name
    query_block: int = 1024
    map_chunk: int = 16384
    cache_bytes: int = 512 << 20  # keep the map in memory across query blocks below this size

    def __post_init__(self) -> None:  # the rules of `cbir retrieve` and the pipeline alike
        check_integer("topk", self.topk, 1)
        if not isinstance(self.fusion, FusionConf):
            raise TypeError("fusion must be a FusionConf")

    def record(self) -> dict:
        """The options the pairs depend on (recorded with them)."""
        return {"topk": self.topk, "fusion": self.fusion.record(), "exclude_self": self.exclude_self,
                "exclude_same_name": self.exclude_same_name}


def mismatch_message(query_store: Store, map_store: Store) -> str:
    """Why descriptors of two stores do not compare, and the command that fixes it."""
    diffs = differences(query_store.config, map_store.config)
    extractor = map_store.config.get("extractor", query_store.attrs.get("name"))
    if "model_digest" in map_store.config:  # a model learned on the map (DenseVLAD)
        model = model_path(map_store.path)
        fix = f"re-extract the queries with the map's model: cbir extract QUERY --global {extractor} --model {model} " \
              "--overwrite"
    else:
        fix = f"re-extract the queries (or the map) with the same options: cbir extract ... --global {extractor} " \
              "--conf KEY=VALUE --overwrite"
    return (f"extracted with another configuration than {map_store.path} ({'; '.join(diffs)}): descriptors of "
            f"different models cannot be compared; {fix}")


def pairs_record(conf: RetrievalConf, query: "DescriptorSet", database: "DescriptorSet",
                 **options: object) -> dict:
    """What made a pairs file: the retrieval options (``options``: expansion, index), the
    descriptor stores by name and configuration, and the digests of their contents."""
    return {"step": "retrieve",
            "config": {**conf.record(), **options, "stores": [s.attrs.get("name") for s in database.stores],
                       "descriptors": [s.config for s in database.stores]},
            "inputs": {"query": [s.fingerprint() for s in query.stores],
                       "map": [s.fingerprint() for s in database.stores]}}


@dataclass
class DescriptorSet:
    """Several global stores of one dataset, aligned on the images they all have."""

    stores: list[Store]
    names: list[str]
    rows: list[np.ndarray]  # per store: the row of each name
    dropped: list[str] = field(default_factory=list)  # images missing from some store
    #: in-memory unit descriptors replacing the stores' (query expansion, database augmentation)
    arrays: list[np.ndarray] | None = None
    #: images in the stores but not in the dataset (a feature folder shared by several datasets)
    foreign: list[str] = field(default_factory=list)

    @classmethod
    def align(cls, stores: list[Store], images: Iterable[str] | None = None) -> "DescriptorSet":
        """The images every store has; with ``images`` (the dataset's records), only those: a
        store may hold descriptors of images of another dataset, which must not be retrieved."""
        common = set(stores[0].names)
        for s in stores[1:]:
            common &= set(s.names)
        everything = set().union(*(set(s.names) for s in stores))
        foreign: set[str] = set()
        if images is not None:
            known = set(images)
            foreign = everything - known
            common &= known
            everything &= known
        names = [n for n in stores[0].names if n in common]
        dropped = sorted(everything - common)
        rows = [np.array([s.index(n) for n in names], dtype=np.int64) for s in stores]
        return cls(stores, names, rows, dropped, foreign=sorted(foreign))

    def with_arrays(self, arrays: list[np.ndarray]) -> "DescriptorSet":
        return DescriptorSet(self.stores, self.names, self.rows, self.dropped, arrays, self.foreign)

    @property
    def dims(self) -> list[int]:
        return [s.dataset("descriptors").shape[1] for s in self.stores]

    def read(self, start: int, stop: int, device: torch.device) -> list[torch.Tensor]:
        """Unit-L2 float32 descriptors of images ``start:stop``, one tensor per store."""
        return self.take(np.arange(start, stop), device)

    def take(self, index: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """Unit-L2 float32 descriptors of the images at ``index``, one tensor per store."""
        if self.arrays is not None:
            return [torch.from_numpy(a[index]).to(device) for a in self.arrays]
        out = []
        for store, rows in zip(self.stores, self.rows):
            d = torch.from_numpy(store.read_rows("descriptors", rows[index]).astype(np.float32, copy=False))
            norms = torch.linalg.vector_norm(d, dim=1)  # NaN and inf propagate into the norm
            bad = ~torch.isfinite(norms) | (norms == 0)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                what = "zero descriptor" if norms[i] == 0 else "non-finite descriptor"
                hint = ": it cannot be compared" if norms[i] == 0 else ""
                raise CbirError(f"{what} for image {self.names[int(index[i])]!r}{hint}", store.path)
            out.append(d.div_(norms[:, None]).to(device))
        return out


def _merge_topk(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.cat([vals, new_vals], dim=1)
    i = torch.cat([idx, new_idx], dim=1)
    top = torch.topk(v, min(k, v.shape[1]), dim=1, sorted=True)
    return top.values, torch.gather(i, 1, top.indices)


def retrieve(query: DescriptorSet, database: DescriptorSet, conf: RetrievalConf = RetrievalConf(),
             device: torch.device = torch.device("cpu"),
             progress: Callable[[int, int], None] | None = None,
             timings: dict[str, float] | None = None) -> list[Pair]:
    """The top-k database images of every query, best first, as pairs with their fused score
    (round_robin: the peer's rank score ``topk - position``). ``timings`` (optional) is
    filled with the seconds spent reading, in the matrix products, and fusing + selecting."""
    clock = _Clock(timings, device)
    if len(query.stores) != len(database.stores):
        raise ValueError("query and database need the same descriptors")
    nq, nm = len(query.names), len(database.names)
    if nm == 0:
        raise CbirError("the map has no image with every descriptor", database.stores[0].path)
    for qs, ms, dq, dm in zip(query.stores, database.stores, query.dims, database.dims):
        if dq != dm:
            raise CbirError(f"descriptor dimension {dq} differs from the map's {dm} ({ms.path})", qs.path)
        if qs.config != ms.config:
            raise CbirError(mismatch_message(qs, ms), qs.path)
    k = min(conf.topk, nm - (1 if conf.excludes_names else 0))
    if k <= 0:
        return []
    round_robin = conf.fusion.name == "round_robin"
    n_desc = len(query.stores)
    map_index = {n: i for i, n in enumerate(database.names)} if conf.excludes_names else {}
    cache: dict[int, list[torch.Tensor]] | None = {} if nm * sum(database.dims) * 4 <= conf.cache_bytes else None
    pairs: list[Pair] = []
    with torch.inference_mode():
        for q0 in range(0, nq, conf.query_block):
            q1 = min(nq, q0 + conf.query_block)
            with clock("read"):
                qd = query.read(q0, q1, device)
            self_idx = torch.tensor([map_index.get(n, -1) for n in query.names[q0:q1]], device=device)
            lists = n_desc if round_robin else 1
            vals = [torch.full((q1 - q0, 0), -torch.inf, device=device) for _ in range(lists)]
            idxs = [torch.zeros((q1 - q0, 0), dtype=torch.int64, device=device) for _ in range(lists)]
            for m0 in range(0, nm, conf.map_chunk):
                m1 = min(nm, m0 + conf.map_chunk)
                md = cache.get(m0) if cache is not None else None
                if md is None:
                    with clock("read"):
                        md = database.read(m0, m1, device)
                    if cache is not None:
                        cache[m0] = md
                with clock("similarity"):
                    sims = [torch.mm(a, b.t()) for a, b in zip(qd, md)]
                with clock("fuse_topk"):
                    scores = sims if round_robin else [nan_last(fuse(sims, conf.fusion))]
                    mask = (self_idx >= m0) & (self_idx < m1) if conf.excludes_names else None
                    for j, s in enumerate(scores):
                        if mask is not None and mask.any():
                            rows = mask.nonzero()[:, 0]
                            s[rows, self_idx[rows] - m0] = -torch.inf
                        top = torch.topk(s, min(k, s.shape[1]), dim=1, sorted=False)
                        vals[j], idxs[j] = _merge_topk(vals[j], idxs[j], top.values, top.indices + m0, k)
                del sims, scores
            names = query.names[q0:q1]
            if round_robin:
                pairs += _round_robin(names, [i.cpu().numpy() for i in idxs], database.names, k)
            else:
                v, i = restore_nan(vals[0].cpu().numpy()), idxs[0].cpu().numpy()
                for r, qname in enumerate(names):
                    pairs += [Pair(qname, database.names[m], float(s)) for m, s in zip(i[r], v[r])]
            if progress:
                progress(q1 - q0, nq)
    return pairs


class _Clock:
    """Accumulates the time of named steps into a dict (nothing when there is none)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings, self.device, self._name, self._t = timings, device, "", 0.0

    def __call__(self, name: str) -> "_Clock":
        self._name = name
        return self

    def __enter__(self) -> None:
        if self.timings is not None:
            self._t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.timings is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.timings[self._name] = self.timings.get(self._name, 0.0) + time.perf_counter() - self._t


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
