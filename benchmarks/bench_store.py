"""Storage benchmark: cbir's columnar HDF5 store against the two layouts users know.

* cbir   : one file, ``names`` + ``offsets`` + concatenated columns (formats/SPEC.md)
* hloc   : one HDF5 group per image (``<name>/keypoints``, ``descriptors`` D x K, ``scores``)
* kapture: one file per image (``<name>.kpt``, ``<name>.desc``: raw arrays, kapture's binary layout)

Workloads per store size N (local: 500 keypoints, 128-D float16 descriptors; global: 2048-D
float32): write throughput (MB/s), open + list names, latency of reading one random image,
full-scan throughput and the scan's peak memory (tracemalloc: numpy buffers). Warm page
cache throughout (the same for every layout). Each layout's files are deleted after its
run, so the disk needs about twice the largest store.

    python benchmarks/bench_store.py --sizes 1000 10000 100000 --out benchmarks/results_store.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from cbir.io.store import StoreWriter, open_store

KP, DIM, GDIM = 500, 128, 2048
RNG = np.random.default_rng(0)
# one shared block of random data: generation time must not count as write time
KP_BLOCK = RNG.uniform(0, 1024, (KP, 2)).astype(np.float32)
DESC_BLOCK = RNG.standard_normal((KP, DIM)).astype(np.float16)
SCORE_BLOCK = RNG.uniform(0, 1, KP).astype(np.float32)
GLOBAL_BLOCK = RNG.standard_normal((1024, GDIM)).astype(np.float32)


def image_names(n: int) -> list[str]:
    return [f"seq{i // 1000:03d}/img{i:07d}.jpg" for i in range(n)]


def local_bytes(n: int) -> int:
    return n * (KP_BLOCK.nbytes + DESC_BLOCK.nbytes + SCORE_BLOCK.nbytes)


# ------------------------------------------------------------------ the three layouts
class CbirLayout:
    name = "cbir"

    def __init__(self, root: Path, kind: str):
        self.kind = kind
        self.path = root / f"{kind}.h5"

    def write(self, names: list[str]) -> None:
        if self.kind == "local":
            attrs = {"name": "bench", "config": {}, "descriptor_dim": DIM, "descriptor_dtype": "float16"}
            with StoreWriter(self.path, "local-features", attrs, batch_size=4096) as w:
                for n in names:
                    w.add(n, keypoints=KP_BLOCK, descriptors=DESC_BLOCK, scores=SCORE_BLOCK)
        else:
            attrs = {"name": "bench", "config": {}, "descriptor_dim": GDIM, "descriptor_dtype": "float32"}
            with StoreWriter(self.path, "global-features", attrs, batch_size=4096) as w:
                for i, n in enumerate(names):
                    w.add(n, descriptors=GLOBAL_BLOCK[i % len(GLOBAL_BLOCK)])

    def open_list(self) -> tuple[object, list[str]]:
        s = open_store(self.path)
        return s, s.names

    def read_one(self, handle, name: str) -> None:
        handle.get(name)

    def scan(self, handle) -> int:
        total = 0
        for _, cols, _ in handle.iter_batches(1024):
            total += sum(a.nbytes for a in cols.values())
        return total

    def close(self, handle) -> None:
        handle.close()


class HlocLayout:
    name = "hloc"

    def __init__(self, root: Path, kind: str):
        self.kind = kind
        self.path = root / f"{kind}_hloc.h5"

    def write(self, names: list[str]) -> None:
        with h5py.File(self.path, "w", libver="latest") as f:
            for i, n in enumerate(names):
                g = f.create_group(n)
                if self.kind == "local":
                    g.create_dataset("keypoints", data=KP_BLOCK)
                    g.create_dataset("descriptors", data=DESC_BLOCK.T)
                    g.create_dataset("scores", data=SCORE_BLOCK)
                else:
                    g.create_dataset("global_descriptor", data=GLOBAL_BLOCK[i % len(GLOBAL_BLOCK)])

    def open_list(self):
        f = h5py.File(self.path, "r")
        names: list[str] = []
        # hloc's list_h5_names: every group holding datasets, names nested by '/'
        f.visititems(lambda k, obj: names.append(k) if isinstance(obj, h5py.Dataset) and k.endswith(
            ("/keypoints", "/global_descriptor")) else None)
        return f, [n.rsplit("/", 1)[0] for n in names]

    def read_one(self, f, name: str) -> None:
        g = f[name]
        for k in g:
            g[k][()]

    def scan(self, f) -> int:
        total = 0
        for n in self._names:
            g = f[n]
            total += sum(g[k][()].nbytes for k in g)
        return total

    def close(self, f) -> None:
        f.close()


class KaptureLayout:
    name = "kapture"

    def __init__(self, root: Path, kind: str):
        self.kind = kind
        self.root = root / f"{kind}_kapture"

    def _files(self, name: str) -> list[tuple[Path, np.dtype, int]]:
        if self.kind == "local":
            return [(self.root / "keypoints" / f"{name}.kpt", np.dtype(np.float32), 3),
                    (self.root / "descriptors" / f"{name}.desc", np.dtype(np.float16), DIM)]
        return [(self.root / "global_features" / f"{name}.gfeat", np.dtype(np.float32), GDIM)]

    def write(self, names: list[str]) -> None:
        kps = np.concatenate([KP_BLOCK, SCORE_BLOCK[:, None]], axis=1)  # kapture keeps extra columns
        for i, n in enumerate(names):
            files = self._files(n)
            files[0][0].parent.mkdir(parents=True, exist_ok=True)
            if self.kind == "local":
                files[1][0].parent.mkdir(parents=True, exist_ok=True)
                kps.tofile(files[0][0])
                DESC_BLOCK.tofile(files[1][0])
            else:
                GLOBAL_BLOCK[i % len(GLOBAL_BLOCK)].tofile(files[0][0])

    def open_list(self):
        # kapture's listing: walk the feature directory for files of the extension
        sub, ext = ("keypoints", ".kpt") if self.kind == "local" else ("global_features", ".gfeat")
        base = self.root / sub
        names = []
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            names += [os.path.join(rel, f[:-len(ext)]) if rel != "." else f[:-len(ext)]
                      for f in files if f.endswith(ext)]
        return None, names

    def read_one(self, _, name: str) -> None:
        for path, dtype, dsize in self._files(name):
            np.fromfile(path, dtype=dtype).reshape(-1, dsize)

    def scan(self, _) -> int:
        total = 0
        for n in self._names:
            for path, dtype, dsize in self._files(n):
                total += np.fromfile(path, dtype=dtype).reshape(-1, dsize).nbytes
        return total

    def close(self, _) -> None:
        pass


# ------------------------------------------------------------------ measurement
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure(layout, names: list[str], n_random: int) -> dict[str, float]:
    data_mb = (local_bytes(len(names)) if layout.kind == "local" else len(names) * GDIM * 4) / 1e6
    t_write, _ = timed(lambda: layout.write(names))
    t_open, (handle, listed) = timed(layout.open_list)
    assert len(listed) == len(names), (layout.name, len(listed))
    layout._names = listed
    picks = random.Random(0).sample(names, min(n_random, len(names)))
    layout.read_one(handle, picks[0])  # first access builds indexes: counted in open below
    t0 = time.perf_counter()
    for n in picks:
        layout.read_one(handle, n)
    t_read = (time.perf_counter() - t0) / len(picks)
    tracemalloc.start()
    t_scan, scanned = timed(lambda: layout.scan(handle))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    layout.close(handle)
    return {"write_MBps": data_mb / t_write, "open_list_s": t_open, "random_read_ms": t_read * 1e3,
            "scan_MBps": scanned / 1e6 / t_scan, "scan_peak_MB": peak / 1e6, "data_MB": data_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--kinds", nargs="+", default=["local", "global"])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "store")
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--layouts", nargs="+", default=["cbir", "hloc", "kapture"])
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    results = []
    for kind in args.kinds:
        for n in args.sizes:
            names = image_names(n)
            for cls in (c for c in (CbirLayout, HlocLayout, KaptureLayout) if c.name in args.layouts):
                root = args.work / f"{kind}_{n}_{cls.name}"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                try:
                    r = measure(cls(root, kind), names, args.random_reads)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                r.update(kind=kind, images=n, layout=cls.name)
                results.append(r)
                print(f"{kind:6s} {n:7d} {cls.name:8s} write {r['write_MBps']:8.1f} MB/s  "
                      f"open+list {r['open_list_s']:8.4f} s  random read {r['random_read_ms']:7.3f} ms  "
                      f"scan {r['scan_MBps']:8.1f} MB/s  scan peak {r['scan_peak_MB']:7.1f} MB", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print_ratios(results)


def print_ratios(results: list[dict]) -> None:
    print("\nratios (peer / cbir): open+list, random read")
    by = {(r["kind"], r["images"], r["layout"]): r for r in results}
    for (kind, n, layout), r in by.items():
        if layout == "cbir":
            continue
        c = by.get((kind, n, "cbir"))
        if c is None:
            continue
        print(f"{kind:6s} {n:7d} {layout:8s} open+list x{r['open_list_s'] / c['open_list_s']:7.1f}   "
              f"random read x{r['random_read_ms'] / c['random_read_ms']:6.1f}")


if __name__ == "__main__":
    sys.exit(main())
