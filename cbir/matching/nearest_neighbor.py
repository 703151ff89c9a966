"""Mutual nearest-neighbour matching of L2-normalized descriptors, on torch.

The similarity of a pair is computed once, in tiles, so a 20k x 20k pair never holds
the whole matrix: each tile updates the running row-wise nearest neighbour (and the
ratio test's second best) and the running column-wise maximum. A row's nearest
neighbour is mutual when its similarity equals that column maximum, so the reverse
nearest-neighbour indices are never materialized (index-tracking reductions along
columns are the slow part).

Two paths compute the same result: on the CPU, tiles of ``block_rows x block_cols``
that stay in cache and NumPy's argmax; on a GPU, tiles of whole rows (one large matrix
product each), queued pair after pair with no host synchronisation (:class:`PairBatch`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from ..devices import exact_float32
from ..validate import check_bool, check_number
from .base import Matcher, Upload


@dataclass(frozen=True)
class MatcherConf:
    """``ratio``: Lowe's ratio on L2 distances (None: off); ``max_distance``: L2 distance
    bound (None: off); ``mutual``: keep only mutual nearest neighbours."""

    mutual: bool = True
    ratio: float | None = None
    max_distance: float | None = None
    # tiles of block_rows x block_cols similarities (8 MiB of float32) stay in cache for
    # the reductions while the matrix product runs at full speed (measured: benchmarks/)
    block_rows: int = 1024
    block_cols: int = 2048
    # on a GPU: tiles of whole rows, at most this many bytes of similarities each
    device_tile_bytes: int = 2 << 30  # measured on an H200: one tile for 20k x 20k (bench_gpu.py)

    def __post_init__(self) -> None:  # the rules of `cbir match` and the pipeline alike
        check_bool("mutual", self.mutual)
        check_number("ratio", self.ratio, 0.0, 1.0, low_open=True, optional=True)
        check_number("max_distance", self.max_distance, 0.0, 2.0, optional=True)


class MutualNearestNeighbor(Matcher):
    """The matcher ``nn``: nearest neighbours of L2-normalized descriptors (float, or uint8
    SIFT histograms), mutual by default, with Lowe's ratio test and an L2 distance bound
    (:class:`MatcherConf`); GPU pairs batched (:class:`PairBatch`)."""

    name = "nn"
    default_conf = {f.name: f.default for f in fields(MatcherConf)}
    runtime_keys = ("block_rows", "block_cols", "device_tile_bytes")

    def __init__(self, conf: dict[str, Any] | MatcherConf | None = None):
        super().__init__(asdict(conf) if isinstance(conf, MatcherConf) else conf)
        self.matcher_conf = MatcherConf(**self.conf)

    def identity(self) -> dict[str, Any]:
        # without its name: the form of the stores written before matchers were plugins
        return {k: v for k, v in self.conf.items() if k not in self.runtime_keys}

    def prepare(self, features: dict[str, np.ndarray], upload: Upload) -> torch.Tensor:
        # raw descriptors travel (uint8 SIFT: a quarter of the bytes); normalized on the device
        d = upload(features["descriptors"])
        return as_unit_tensor(d, d.device)

    def batch(self) -> PairBatch:
        return PairBatch(self.matcher_conf)


def as_unit_tensor(desc: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 on ``device``, rows L2-normalized (stores may hold raw SIFT histograms)."""
    t = torch.as_tensor(np.asarray(desc) if not isinstance(desc, torch.Tensor) else desc)
    t = t.to(device=device, dtype=torch.float32)
    return torch.nn.functional.normalize(t, dim=1)


@torch.inference_mode()
def match_descriptors(d0: torch.Tensor, d1: torch.Tensor,
                      conf: MatcherConf = MatcherConf()) -> tuple[np.ndarray, np.ndarray]:
    """Match unit descriptors ``d0`` (K0 x D) to ``d1`` (K1 x D), on their device.

    Returns ``matches`` (M, 2) int32 (index in d0, index in d1), sorted by the index in
    d0, and ``scores`` (M,) float32 cosine similarities. To match many pairs on a GPU,
    :class:`PairBatch` queues them and copies the results back once.
    """
    batch = PairBatch(conf)
    batch.add(d0, d1)
    return batch.results()[0]


class PairBatch:
    """Pairs matched together. On the CPU each pair is matched when added (cache-sized
    tiles, NumPy argmax). On a CUDA device ``add`` only queues the pair's kernels (no host
    synchronisation), and :meth:`results` copies every pair's nearest neighbours back in
    one transfer: the host queues the next pairs while the device works. ``path`` forces
    one of the two ("tiled", "rows"; default "auto": by the descriptors' device), so that
    tests can compare them on the CPU."""

    def __init__(self, conf: MatcherConf = MatcherConf(), path: str = "auto"):
        if path not in ("auto", "tiled", "rows"):
            raise ValueError(f"unknown matching path {path!r}")
        self.conf, self.path = conf, path
        self._items: list[tuple] = []  # per pair: ("queued", device tensors (nn, keep, best)) or ("done", result)
        self._copied: tuple[list[torch.Tensor], torch.cuda.Event | None] | None = None

    @torch.inference_mode()
    def add(self, d0: torch.Tensor, d1: torch.Tensor) -> None:
        if self._copied is not None:
            raise RuntimeError("pairs added after finish(): take the results first")
        n0, n1 = d0.shape[0], d1.shape[0]
        if n0 == 0 or n1 == 0 or (self.conf.ratio is not None and n1 < 2):
            self._items.append(("done", _EMPTY))
            return
        if d0.shape[1] != d1.shape[1]:
            raise ValueError(f"descriptor dimensions differ: {d0.shape[1]} and {d1.shape[1]}")
        if self.path == "tiled" or (self.path == "auto" and d0.device.type == "cpu"):
            nn01, keep, best = nearest_neighbors_tiled(d0, d1, self.conf)
            self._items.append(("done", select(nn01.numpy(), keep.numpy(), best.numpy(), self.conf.mutual)))
        else:
            with exact_float32():
                self._items.append(("queued", nearest_neighbors(d0, d1, self.conf)))

    @torch.inference_mode()
    def finish(self) -> None:
        """Queue the copy of every queued pair's results to the host (no wait): call it right
        after the last :meth:`add`, so that :meth:`results` waits for these pairs only, not
        for pairs another batch queues after them."""
        if self._copied is not None:
            return
        queued = [item for state, item in self._items if state == "queued"]
        if not queued:
            self._copied = ([], None)
            return
        packed = [torch.cat([q[c] for q in queued]) for c in range(3)]
        if packed[0].device.type == "cpu":
            self._copied = (packed, None)
            return
        host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in packed]
        for h, p in zip(host, packed, strict=True):
            h.copy_(p, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._copied = (host, done)

    @torch.inference_mode()
    def results(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(matches, scores)`` of every pair, in the order added; the batch is emptied."""
        self.finish()
        assert self._copied is not None  # finish() set it
        copied, done = self._copied
        if done is not None:
            done.synchronize()
        host = [c.numpy() for c in copied]
        out, start = [], 0
        for state, item in self._items:
            if state == "done":
                out.append(item)
                continue
            stop = start + item[0].shape[0]
            out.append(select(host[0][start:stop], host[1][start:stop], host[2][start:stop], self.conf.mutual))
            start = stop
        self._items, self._copied = [], None
        return out


_EMPTY = (np.zeros((0, 2), np.int32), np.zeros((0,), np.float32))


def nearest_neighbors(d0: torch.Tensor, d1: torch.Tensor,
                      conf: MatcherConf = MatcherConf()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device path, without any host synchronisation: ``(nn01 int32, keep bool, best
    float32)`` per row of ``d0``, from tiles of whole rows of at most ``conf.device_tile_bytes``
    similarities (one large matrix product each; the row and column reductions read a tile
    while the cache still holds it)."""
    n0, n1 = d0.shape[0], d1.shape[0]
    ratio = conf.ratio is not None
    rows = max(1, min(n0, conf.device_tile_bytes // (4 * n1)))
    if rows == n0:  # one tile: the fewest kernel launches
        sim = torch.mm(d0, d1.t())
        best, nn01 = _row_best(sim, ratio)
        col_best = torch.amax(sim, dim=0) if conf.mutual else None
        return nn01.int(), keep_mask(best, nn01, col_best, conf), best[:, 0]
    nn01 = torch.empty((n0,), dtype=torch.int64, device=d0.device)
    best = torch.empty((n0, 2 if ratio else 1), dtype=torch.float32, device=d0.device)
    col_best = None
    d1t = d1.t()
    for r0 in range(0, n0, rows):
        r1 = min(n0, r0 + rows)
        sim = torch.mm(d0[r0:r1], d1t)
        best[r0:r1], nn01[r0:r1] = _row_best(sim, ratio)
        if conf.mutual:
            col = torch.amax(sim, dim=0)
            col_best = col if col_best is None else torch.maximum(col_best, col, out=col_best)
        del sim
    return nn01.int(), keep_mask(best, nn01, col_best, conf), best[:, 0]


def _row_best(sim: torch.Tensor, ratio: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best similarity (and second best, for the ratio test), rows x 1 or 2, and
    the column of the best."""
    if ratio:  # a tie of the best two fails the (strict) ratio test, whichever index topk gives
        top = torch.topk(sim, 2, dim=1, sorted=True)
        return top.values, top.indices[:, 0]
    best, index = torch.max(sim, dim=1)  # the first column of a tie, as argmax
    return best[:, None], index


def nearest_neighbors_tiled(d0: torch.Tensor, d1: torch.Tensor,
                            conf: MatcherConf = MatcherConf()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU path: ``(nn01, keep, best)`` as :func:`nearest_neighbors`, from tiles of
    ``block_rows x block_cols`` similarities that stay in the CPU's cache."""
    n0, n1 = d0.shape[0], d1.shape[0]
    k = 2 if conf.ratio is not None else 1
    dev = d0.device
    best = torch.full((n0, k), -torch.inf, dtype=torch.float32, device=dev)
    nn01 = torch.zeros((n0,), dtype=torch.int64, device=dev)
    col_best = torch.full((n1,), -torch.inf, dtype=torch.float32, device=dev)
    rows, cols = min(n0, conf.block_rows), min(n1, conf.block_cols)
    d1 = d1.contiguous()
    # one buffer for every tile: fresh multi-MB allocations each cost page faults
    buf = torch.empty((rows, cols), dtype=torch.float32, device=dev)
    for r0 in range(0, n0, rows):
        r1 = min(n0, r0 + rows)
        for c0 in range(0, n1, cols):
            c1 = min(n1, c0 + cols)
            # d1[c0:c1].t() is a transposed view of contiguous rows: BLAS reads it without a copy
            sim = torch.mm(d0[r0:r1], d1[c0:c1].t(), out=buf[: r1 - r0, : c1 - c0])
            if conf.mutual:  # values only: the column's best row is recovered below
                torch.maximum(col_best[c0:c1], torch.amax(sim, dim=0), out=col_best[c0:c1])
            idx = _row_argmax(sim)
            top = sim.gather(1, idx[:, None])[:, 0]
            b = best[r0:r1]
            if k == 2:  # merge the running best two with the tile's best two
                sim.scatter_(1, idx[:, None], -torch.inf)
                second = torch.amax(sim, dim=1) if sim.shape[1] > 1 else torch.full_like(top, -torch.inf)
                b[:, 1] = torch.maximum(torch.minimum(b[:, 0], top), torch.maximum(b[:, 1], second))
            better = top > b[:, 0]  # strict: the first column wins ties, as argmax does
            nn01[r0:r1] = torch.where(better, idx + c0, nn01[r0:r1])
            b[:, 0] = torch.where(better, top, b[:, 0])
    return nn01.int(), keep_mask(best, nn01, col_best if conf.mutual else None, conf), best[:, 0]


def keep_mask(best: torch.Tensor, nn01: torch.Tensor, col_best: torch.Tensor | None,
              conf: MatcherConf) -> torch.Tensor:
    """Rows whose nearest neighbour passes the mutual check, the ratio test and the distance
    bound. ``best``: each row's best (and second best) similarity; ``col_best``: each
    column's best similarity (None: no mutual check). Computed on the device, no host
    synchronisation; exact ties are resolved by :func:`select`."""
    n0 = best.shape[0]
    keep = torch.ones(n0, dtype=torch.bool, device=best.device)
    if conf.ratio is not None:
        # squared L2 distances of unit vectors: 2 - 2 cos
        keep &= (2 - 2 * best[:, 0]) < conf.ratio ** 2 * (2 - 2 * best[:, 1])
    if conf.max_distance is not None:
        keep &= (2 - 2 * best[:, 0]) <= conf.max_distance ** 2
    if conf.mutual and col_best is not None:
        # row i is its column's nearest neighbour iff its best similarity is the column's maximum
        keep &= best[:, 0] >= col_best[nn01]
    return keep


def select(nn01: np.ndarray, keep: np.ndarray, best: np.ndarray, mutual: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(matches, scores)`` of the kept rows, from host copies of the results. With
    ``mutual``, a column kept by several rows (exact ties) goes to the first row, as argmax
    would pick; on a GPU this runs on the host while the device matches the next chunk."""
    i0 = np.flatnonzero(keep)
    j = nn01[i0]
    if mutual and len(j) and np.bincount(j).max() > 1:
        _, first = np.unique(j, return_index=True)
        first.sort()
        i0, j = i0[first], j[first]
    return np.stack([i0, j], axis=1).astype(np.int32), best[i0].astype(np.float32, copy=False)


def _row_argmax(sim: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum. On the CPU through NumPy, whose SIMD argmax is several
    times faster than torch's on wide rows (zero-copy: the same memory)."""
    if sim.device.type == "cpu":
        return torch.from_numpy(sim.numpy().argmax(axis=1))
    return sim.argmax(dim=1)
