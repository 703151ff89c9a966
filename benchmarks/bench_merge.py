"""Merging store parts into one file (what closes every store writer, and what joins the
shards of a Ray run): throughput against the hardware floor, peak memory.

Parts of R2D2-sized local features (5,000 keypoints a image, 128-D float32 descriptors:
2.6 MB an image, the projection's size), each a finished store (with its checksums):

* ``floor``: ``copy_file_range`` of the same bytes from one file to another, nothing else;
* ``kernel``: ``merge_stores`` as it runs (columns copied by ``copy_file_range``, the parts'
  recorded CRCs combined);
* ``through``: the same with ``copy_file_range`` unavailable (read here, CRC computed,
  written back: what a file system that refuses kernel copies gets);
* ``close``: a store writer's close after the same images were added in batches of
  ``--images`` (its batch files merged into the store): what ends every ``cbir extract``.

Each in its own process (peak RSS from ``getrusage``, before the merged store's checksums
are verified), page cache warm.

    python benchmarks/bench_merge.py [--parts 8] [--images 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from memory import peak_rss_mb

HERE = Path(__file__).resolve().parent
KP, DIM = 5000, 128
ATTRS = {"name": "r2d2-like", "config": {"synthetic": True}, "descriptor_dim": DIM, "descriptor_dtype": "float32"}


def columns() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"keypoints": rng.uniform(0, 1024, (KP, 2)).astype(np.float32),
            "descriptors": rng.standard_normal((KP, DIM)).astype(np.float32),
            "scores": rng.uniform(0, 1, KP).astype(np.float32), "image_sizes": np.array([1024, 768])}


def write_parts(work: Path, parts: int, images: int) -> list[Path]:
    from cbir.io.store import StoreWriter

    cols = columns()
    paths = []
    for p in range(parts):
        path = work / f"part-{p:03d}.h5"
        if not path.exists():
            with StoreWriter(path, "local-features", ATTRS, batch_size=images) as w:
                for i in range(images):
                    w.add(f"p{p:03d}/{i:06d}.jpg", **cols)
        paths.append(path)
    return paths


def writer_close(out: Path, parts: int, images: int) -> float:
    """Seconds of a writer's close after ``parts`` batches of ``images`` images."""
    from cbir.io.store import StoreWriter

    cols = columns()
    w = StoreWriter(out, "local-features", ATTRS, batch_size=images)
    for p in range(parts):
        for i in range(images):
            w.add(f"p{p:03d}/{i:06d}.jpg", **cols)
    w.flush()
    t = time.perf_counter()
    w.close()
    return time.perf_counter() - t


def phase(name: str, work: Path, parts: list[Path], images: int) -> dict:
    from cbir.io.store import SCHEMAS, merge_stores, open_store

    out = work / "merged.h5"
    out.unlink(missing_ok=True)
    if name == "through":
        del os.copy_file_range  # as on a file system without kernel copies
    t = time.perf_counter()
    if name == "floor":
        fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        at = 0
        for part in parts:
            with open(part, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                done = 0
                while done < size:
                    done += os.copy_file_range(f.fileno(), fd_out, size - done, done, at + done)
                at += size
        os.close(fd_out)
    elif name == "close":
        seconds = writer_close(out, len(parts), images)
    else:
        merge_stores(parts, out, SCHEMAS["local-features"], ATTRS)
    if name != "close":
        seconds = time.perf_counter() - t
    peak = peak_rss_mb()  # before the check maps the file
    mb = sum(p.stat().st_size for p in parts) / 1e6
    if name != "floor":
        with open_store(out) as s:
            assert s.verify_checksums() == [], "merged checksums do not verify"
    out.unlink()
    return {"seconds": seconds, "MB": mb, "MB_per_s": mb / seconds, "peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--images", type=int, default=100, help="images a part")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "merge")
    ap.add_argument("--phase", choices=["floor", "kernel", "through", "close"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    parts = write_parts(args.work, args.parts, args.images)
    if args.phase:
        print(json.dumps(phase(args.phase, args.work, parts, args.images)))
        return
    results = {}
    for name in ("floor", "kernel", "through", "close"):
        cmd = [sys.executable, __file__, "--phase", name, "--parts", str(args.parts), "--images", str(args.images),
               "--work", str(args.work)]
        results[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        r = results[name]
        print(f"{name:8s} {r['MB']:.0f} MB in {r['seconds']:.2f} s: {r['MB_per_s']:.0f} MB/s "
              f"({r['MB_per_s'] / results['floor']['MB_per_s']:.0%} of the floor), peak {r['peak_rss_mb']:.0f} MB",
              flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
