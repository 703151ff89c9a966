"""Sharded stores against one file (issue 30): open, list the keys, a random read of 1,000
rows (items) and a full scan, for a global store of 1M images and a local store, each in 1
part, in 1,000 parts, and as the one file a merge makes; then the merge itself, the copy a
sharded store no longer needs.

    python benchmarks/bench_sharded.py --work /tmp/bench-sharded [--images 1000000 --dim 256]

Synthetic random data (the layout is what is measured, not the values). Every figure is the
median of ``--repeat`` runs, warm (every file read once first: the page cache's figures);
opening is timed on its own, the other steps on a store opened afresh. The ratio column is
sharded / one file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def write_parts(root: Path, kind: str, attrs: dict, n_items: int, n_parts: int, make: Callable) -> Path:
    """A sharded store of ``n_parts`` parts at ``root/<name>.h5`` (records and parts written
    directly, as the workers of a cluster write their shards)."""
    from cbir.io.store import SCHEMAS
    from cbir.io.store.layout import _write_arrays
    from cbir.io.store.sharded import part_path, write_record

    schema = SCHEMAS[kind]
    record = root / f"{attrs['name']}.h5"
    bounds = np.linspace(0, n_items, n_parts + 1).astype(int)
    parts = []
    for j in range(n_parts):
        keys, arrays, offsets = make(int(bounds[j]), int(bounds[j + 1]))
        part = part_path(record, j)
        part.parent.mkdir(parents=True, exist_ok=True)
        _write_arrays(part, schema, attrs, keys, arrays, offsets)
        parts.append(part)
    write_record(record, parts, kind, attrs)
    return record


def global_items(dim: int) -> Callable:
    def make(i0: int, i1: int) -> tuple:
        rng = np.random.default_rng(i0)
        return [f"db/{i:08d}.jpg" for i in range(i0, i1)], \
            {"descriptors": rng.standard_normal((i1 - i0, dim), dtype=np.float32)}, None
    return make


def local_items(keypoints: int) -> Callable:
    def make(i0: int, i1: int) -> tuple:
        rng = np.random.default_rng(i0)
        n = (i1 - i0) * keypoints
        offsets = np.arange(0, n + 1, keypoints, dtype=np.int64)
        return [f"db/{i:08d}.jpg" for i in range(i0, i1)], {
            "keypoints": rng.random((n, 2), dtype=np.float32),
            "descriptors": rng.standard_normal((n, 128), dtype=np.float32),
            "scores": rng.random(n, dtype=np.float32),
            "image_sizes": np.tile(np.array([1024, 768], np.int32), (i1 - i0, 1))}, offsets
    return make


def warm(path: Path, kind: str) -> None:
    """Every byte of the store read once (untimed): the figures are the page cache's."""
    from cbir.io.store import open_store

    with open_store(path, kind) as s:
        for _ in s.iter_batches(4096, max_rows=1 << 18):
            pass


def timed(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(path: Path, kind: str, repeat: int, rows: np.ndarray) -> dict[str, float]:
    """Seconds to open (validated), then on the open store: the key index of every name, a
    random read of ``rows`` (a global store's descriptors; a local store's items, every
    column) first after opening and again (the parts it reads already open), and a full
    scan in batches."""
    from cbir.io.store import open_store

    def opened() -> None:
        with open_store(path, kind) as s:
            len(s)

    def on_open(step: Callable) -> Callable[[], float]:
        def run() -> float:
            with open_store(path, kind) as s:
                t0 = time.perf_counter()
                step(s)
                return time.perf_counter() - t0
        return run

    def random_read(s: Any) -> None:
        if kind == "global-features":
            s.read_rows("descriptors", rows)
        else:
            for i in rows.tolist():
                s._get_index(i)

    def scan(s: Any) -> None:
        # batches of at most 2^18 rows (128 MB of 128-D descriptors): a batch of the default 4M rows
        # allocates 2 GB afresh each time, and this VM's first touch of fresh memory is what it then measures
        for _ in s.iter_batches(4096, max_rows=1 << 18):
            pass

    def read_again(s: Any) -> float:  # the reader has read these parts before (kept open)
        random_read(s)
        t0 = time.perf_counter()
        random_read(s)
        return time.perf_counter() - t0

    def on_open_again() -> float:
        with open_store(path, kind) as s:
            return read_again(s)

    return {"open": timed(opened, repeat),
            "list": statistics.median(on_open(lambda s: s.index(s.keys[-1]))() for _ in range(repeat)),
            "random": statistics.median(on_open(random_read)() for _ in range(repeat)),
            "random again": statistics.median(on_open_again() for _ in range(repeat)),
            "scan": statistics.median(on_open(scan)() for _ in range(repeat))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-sharded"))
    ap.add_argument("--images", type=int, default=1_000_000, help="images of the global store")
    ap.add_argument("--dim", type=int, default=256, help="its descriptors' dimension")
    ap.add_argument("--local-images", type=int, default=4_000)
    ap.add_argument("--keypoints", type=int, default=1_000)
    ap.add_argument("--parts", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from cbir.io.store.sharded import merge_sharded

    shutil.rmtree(args.work, ignore_errors=True)
    results = {}
    cases = [("global-features", {"name": "g", "config": {"bench": 1}, "descriptor_dim": args.dim}, args.images,
              global_items(args.dim)),
             ("local-features", {"name": "l", "config": {"bench": 1}, "descriptor_dim": 128}, args.local_images,
              local_items(args.keypoints))]
    for kind, attrs, n, make in cases:
        rows = np.random.default_rng(7).choice(n, min(1000, n), replace=False)
        one = write_parts(args.work / kind / "one", kind, attrs, n, 1, make)
        many = write_parts(args.work / kind / "many", kind, attrs, n, args.parts, make)
        merged = args.work / kind / "merged" / one.name
        merged.parent.mkdir(parents=True)
        shutil.copytree(many.with_name(many.stem + ".parts"), merged.with_name(merged.stem + ".parts"))
        shutil.copy(many, merged)
        t0 = time.perf_counter()
        merge_sharded(merged)
        merge_s = time.perf_counter() - t0
        size = merged.stat().st_size
        row = {"items": n, "bytes": size, "merge_s": merge_s}
        os.sync()  # written back: no measure competes with the writeback of what was just written
        for label, path in (("one file", merged), ("1 part", one), (f"{args.parts} parts", many)):
            warm(path, kind)
            row[label] = measure(path, kind, args.repeat, rows)
        results[kind] = row
        print(f"\n{kind}: {n} items, {size / 1e9:.2f} GB; merging the {args.parts} parts into one file took "
              f"{merge_s:.1f} s ({size / 1e6 / merge_s:.0f} MB/s)")
        print(f"{'':>12} " + " ".join(f"{k:>12}" for k in ("one file", "1 part", f"{args.parts} parts", "ratio")))
        for step in ("open", "list", "random", "random again", "scan"):
            base = row["one file"][step]
            print(f"{step:>12} " + " ".join(f"{row[k][step]:>11.3f}s" for k in ("one file", "1 part",
                                                                                  f"{args.parts} parts"))
                  + f" {row[f'{args.parts} parts'][step] / base:>11.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
