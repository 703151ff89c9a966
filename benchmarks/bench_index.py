"""Kept faiss indexes (``cbir index build``) against exact search, on clustered synthetic
descriptors: build once, then query; each phase in its own process for its peak memory.

* build: train and fill the index from the store (streamed), write it (time, peak RSS, size);
* query: load the kept index, retrieve the top-20 of every query with exact rescoring of
  the candidates (time, peak RSS);
* exact: the exact fused top-20 over the whole map (time, peak RSS);
* recall@20 of the indexed search against the exact one, over every query.

Query and exact search run ``--repeat`` times, alternating, each in a fresh process: the
speed-up is reported from the fastest runs and from the medians (on a machine that reclaims
page cache behind the process's back, the candidates' rows are sometimes read from disk).
``--reuse`` keeps the stores and the kept index already in ``--work``.

``--real ../shared/data`` takes real descriptors instead (128-D RootSIFT of the sample
datasets' photos, in the shape of SIFT1M: :func:`write_real_stores`).

    python benchmarks/bench_index.py [--map-size 200000] [--queries 1000] [--dim 2048] [--index ivfpq]
        [--repeat 3] [--reuse] [--real DATA]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from memory import peak_rss_mb

from cbir.io.pairs import read_pairs, write_pairs
from cbir.io.store import StoreWriter, open_store
from cbir.retrieval import DescriptorSet, RetrievalConf, retrieve

HERE = Path(__file__).resolve().parent


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray, noise: float) -> np.ndarray:
    """Unit vectors around random cluster centres (the shape of real global descriptors:
    places seen from several views)."""
    x = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_store(path: Path, prefix: str, n: int, dim: int, rng, centres, noise: float, chunk: int = 20_000) -> None:
    if path.exists():
        return
    attrs = {"name": path.stem, "config": {"synthetic": True, "dim": dim}, "descriptor_dim": dim,
             "descriptor_dtype": "float32"}
    with StoreWriter(path, "global-features", attrs, batch_size=chunk) as w:
        for s in range(0, n, chunk):
            block = clustered(min(chunk, n - s), dim, rng, centres, noise)
            for i, d in enumerate(block):
                w.add(f"{prefix}/{s + i:07d}.jpg", descriptors=d)


def write_real_stores(work: Path, data: Path, map_size: int, queries: int, seed: int = 0) -> None:
    """Real descriptors in the shape of SIFT1M: RootSIFT (cbir's extractor, every keypoint
    over a low contrast threshold) of the sample datasets' photos, each descriptor a row of
    a 128-D global store. The map holds those of the mapping photos at four sizes (2262,
    1600, 1131 and 800 px: about 1.46M), a seeded sample of ``map_size`` of them; the
    queries a seeded sample of those of the query photos (other views of the same places),
    so that their neighbours are real matches."""
    from cbir.io.images import read_image
    from cbir.models.sift import SIFT

    rng = np.random.default_rng(seed)
    attrs = {"config": {"real": "rootsift", "data": str(data)}, "descriptor_dim": 128, "descriptor_dtype": "float32"}
    for split, sizes, want, path in (("mapping", (2262, 1600, 1131, 800), map_size, work / "map.h5"),
                                     ("query", (1600,), queries, work / "query.h5")):
        if path.exists():
            continue
        extractor = SIFT({"max_keypoints": 0, "max_size": max(sizes), "root": True, "contrast_threshold": 0.005})
        photos = sorted(f for f in data.glob(f"*/{split}/sensors/records_data/**/*")
                        if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        names, rows = [], []
        for photo in photos:
            for size in sizes:
                d = extractor.extract(read_image(photo, grayscale=True, max_size=size))["descriptors"]
                names += [f"{photo.relative_to(data)}@{size}/{i}" for i in range(len(d))]
                rows.append(d)
        if len(names) < want:
            raise SystemExit(f"{data}: {len(names)} {split} descriptors, fewer than the {want} asked")
        pick = np.sort(rng.choice(len(names), want, replace=False))
        everything = np.concatenate(rows)
        with StoreWriter(path, "global-features", {**attrs, "name": path.stem}, batch_size=20_000) as w:
            for i in pick.tolist():
                w.add(names[i], descriptors=everything[i])


def phase(args: argparse.Namespace) -> dict:
    """One phase, in this process: its result and peak memory."""
    import torch

    from cbir.io.index_file import build_files
    from cbir.retrieval.index import (
        IndexConf,
        build_indexes,
        index_record,
        load_indexes,
        retrieve_indexed,
        save_indexes,
    )

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = args.work
    index_file = work / f"map.{args.index}.h5"
    with open_store(work / "map.h5") as ms, open_store(work / "query.h5") as qs:
        mset, qset = DescriptorSet.align([ms]), DescriptorSet.align([qs])
        conf = RetrievalConf(topk=20)
        iconf = IndexConf(args.index, candidates=args.candidates, nprobe=args.nprobe, pq_m=args.pq_m)
        t = time.perf_counter()
        if args.phase == "build":
            save_indexes(index_file, build_indexes(mset, iconf, torch.device("cpu")), index_record(mset, iconf))
            kept = [index_file, *build_files(index_file)]  # the record and its faiss files
            out = {"size_mb": sum(f.stat().st_size for f in kept) / 2 ** 20}
        elif args.phase == "query":
            indexes = load_indexes(index_file, mset, iconf)
            t_load = time.perf_counter() - t
            steps: dict[str, float] = {}
            write_pairs(work / "indexed.txt", retrieve_indexed(qset, mset, conf, iconf, indexes=indexes, timings=steps))
            out = {"load_s": t_load, "steps": steps}
        else:
            write_pairs(work / "exact.txt", retrieve(qset, mset, conf))
            out = {}
        out.update(seconds=time.perf_counter() - t, peak_rss_mb=peak_rss_mb())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map-size", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--index", default="ivfpq")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--pq-m", type=int, default=0, help="ivfpq sub-quantizers (default: dim / 8)")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--real", type=Path, default=None, metavar="DATA",
                    help="real descriptors instead of synthetic ones: RootSIFT of the photos of the datasets in "
                         "DATA (../shared/data), 128-D")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the query and of exact search, alternating")
    ap.add_argument("--reuse", action="store_true", help="keep the stores and index already in --work")
    ap.add_argument("--phase", choices=["build", "query", "exact"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.real:
        args.dim = 128
    args.work = args.work or HERE / "_work" / (f"index-real-sift-{args.map_size}" if args.real
                                               else f"index-{args.map_size}-{args.dim}")
    if args.phase:
        print(json.dumps(phase(args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    reuse = args.reuse and (args.work / "map.h5").exists() and (args.work / "query.h5").exists()
    if not reuse and args.real:
        t = time.perf_counter()
        write_real_stores(args.work, args.real, args.map_size, args.queries)
        print(f"stores: {args.map_size} map x {args.queries} queries of real RootSIFT "
              f"({time.perf_counter() - t:.0f} s)",
              flush=True)
    elif not reuse:
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((max(10, args.map_size // 100), args.dim), dtype=np.float32)
        t = time.perf_counter()
        write_store(args.work / "map.h5", "map", args.map_size, args.dim, rng, centres, args.noise)
        write_store(args.work / "query.h5", "query", args.queries, args.dim, rng, centres, args.noise)
        print(f"stores: {args.map_size} map x {args.queries} queries x {args.dim}-D ({time.perf_counter() - t:.0f} s)",
              flush=True)

    def run(name: str) -> dict:
        cmd = [sys.executable, __file__, "--phase", name, "--work", str(args.work), "--index", args.index,
               "--candidates", str(args.candidates), "--nprobe", str(args.nprobe), "--pq-m", str(args.pq_m)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(name, result, flush=True)
        return result

    build = None if reuse and (args.work / f"map.{args.index}.h5").exists() else run("build")
    runs: dict[str, list[dict]] = {"query": [], "exact": []}
    for _ in range(args.repeat):
        for name in runs:
            runs[name].append(run(name))
    exact, indexed = {}, {}
    for p in read_pairs(args.work / "exact.txt"):
        exact.setdefault(p.query, set()).add(p.map)
    for p in read_pairs(args.work / "indexed.txt"):
        indexed.setdefault(p.query, set()).add(p.map)
    recall = float(np.mean([len(exact[q] & indexed.get(q, set())) / len(exact[q]) for q in exact]))
    q_s, e_s = (sorted(r["seconds"] for r in runs[n]) for n in ("query", "exact"))
    median = lambda v: float(np.median(v))  # noqa: E731
    built = f"build {build['seconds']:.0f} s ({build['size_mb']:.0f} MB, peak {build['peak_rss_mb']:.0f} MB); " \
        if build else "kept index reused; "
    print(f"{args.index} at {args.map_size} x {args.queries} x {args.dim}-D: {built}query {q_s[0]:.2f} s fastest, "
          f"{median(q_s):.2f} s median of {len(q_s)} (load {median([r['load_s'] for r in runs['query']]):.2f} s, peak "
          f"{max(r['peak_rss_mb'] for r in runs['query']):.0f} MB) vs exact {e_s[0]:.1f} s fastest, "
          f"{median(e_s):.1f} s median (peak {max(r['peak_rss_mb'] for r in runs['exact']):.0f} MB): "
          f"x{e_s[0] / q_s[0]:.1f} fastest, "
          f"x{median(e_s) / median(q_s):.1f} median; recall@20 {recall:.3f}", flush=True)
    steps = {name: median([r["steps"][name] for r in runs["query"]]) for name in runs["query"][0]["steps"]}
    print("query, median seconds of each step: " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()), flush=True)


if __name__ == "__main__":
    main()
