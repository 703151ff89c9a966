"""Retrieval + late fusion (gharm, top-20) of 3 global descriptors (256, 2048, 4096 dims):
cbir against kapture-localization 1.1.10's own functions on the same descriptors.

The peer runs as its kapture_image_retrieval_late_fusion.py chains them:
get_similarity_matrix (per descriptor), fuse_similarities, get_similarity_dict_from_similarity_matrix,
get_image_pairs. Each side runs in its own subprocess (``VmHWM`` is its peak); both read
the same cbir stores (the peer's arrays are loaded whole, as its stack_global_features does).

    python benchmarks/bench_retrieval.py --map-sizes 20000 100000 --peer-max 20000
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

DIMS = (256, 2048, 4096)


def make_stores(root: Path, n_query: int, n_map: int) -> None:
    from cbir.io.store import StoreWriter

    rng = np.random.default_rng(0)
    for label, n in (("query", n_query), ("map", n_map)):
        for d in DIMS:
            path = root / f"{label}_{n}_{d}.h5"
            if path.exists():
                continue
            attrs = {"name": f"g{d}", "config": {"dim": d}, "descriptor_dim": d, "descriptor_dtype": "float32"}
            with StoreWriter(path, "global-features", attrs, batch_size=4096) as w:
                for s in range(0, n, 4096):
                    block = rng.standard_normal((min(4096, n - s), d)).astype(np.float32)
                    block /= np.linalg.norm(block, axis=1, keepdims=True)
                    for i, v in enumerate(block):
                        w.add(f"{label}/{s + i:07d}.jpg", descriptors=v)


def run_ours(root: Path, n_query: int, n_map: int, topk: int) -> tuple[float, list]:
    import torch

    from cbir.io.store import open_store
    from cbir.retrieval import DescriptorSet, FusionConf, RetrievalConf, retrieve

    q = DescriptorSet.align([open_store(root / f"query_{n_query}_{d}.h5") for d in DIMS])
    m = DescriptorSet.align([open_store(root / f"map_{n_map}_{d}.h5") for d in DIMS])
    steps: dict[str, float] = {}
    t = time.perf_counter()
    pairs = retrieve(q, m, RetrievalConf(topk=topk, fusion=FusionConf("gharm")), device=torch.device("cpu"),
                     timings=steps)
    return time.perf_counter() - t, [(p.query, p.map, p.score) for p in pairs], steps


def run_peer(root: Path, n_query: int, n_map: int, topk: int) -> tuple[float, list, dict]:
    from kapture_localization.image_retrieval.fusion import LateFusionMethod, fuse_similarities
    from kapture_localization.image_retrieval.pairing import (
        StackedGlobalFeatures,
        get_image_pairs,
        get_similarity_dict_from_similarity_matrix,
        get_similarity_matrix,
    )

    from cbir.io.store import open_store

    def stacked(label: str, n: int, d: int) -> StackedGlobalFeatures:
        with open_store(root / f"{label}_{n}_{d}.h5") as s:
            return StackedGlobalFeatures(np.array(s.names, dtype=object), s.read_all("descriptors"))

    qf = [stacked("query", n_query, d) for d in DIMS]
    mf = [stacked("map", n_map, d) for d in DIMS]
    steps = {}
    t = time.perf_counter()
    sims = [get_similarity_matrix(a, b) for a, b in zip(qf, mf, strict=True)]
    steps["similarity"] = time.perf_counter() - t
    t1 = time.perf_counter()
    fused = fuse_similarities(sims, LateFusionMethod.generalized_harmonic_mean, {"weights": [], "gamma": 0.5})
    steps["fuse"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    d = get_similarity_dict_from_similarity_matrix(fused, qf[0].index, mf[0].index)
    pairs = get_image_pairs(d, topk)
    steps["topk"] = time.perf_counter() - t2
    return time.perf_counter() - t, [(a, b, float(s)) for a, b, s in pairs], steps


def child(args: argparse.Namespace) -> None:
    if args.only == "ours":
        seconds, pairs, steps = run_ours(args.work, args.queries, args.n_map, args.topk)
    else:
        seconds, pairs, steps = run_peer(args.work, args.queries, args.n_map, args.topk)
    out = args.work / f"pairs_{args.only}_{args.n_map}.json"
    out.write_text(json.dumps(pairs))
    print(json.dumps({"seconds": seconds, "steps": steps,
                      "peak_rss_MB": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map-sizes", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--peer-max", type=int, default=20000,
                    help="largest map the peer runs on (it holds every similarity and a full argsort)")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "retrieval")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--n-map", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        child(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for n in args.map_sizes:
        make_stores(args.work, args.queries, n)
        results = {}
        for side in ("ours", "peer"):
            if side == "peer" and n > args.peer_max:
                continue
            cmd = [sys.executable, __file__, "--only", side, "--n-map", str(n), "--queries", str(args.queries),
                   "--topk", str(args.topk), "--work", str(args.work)]
            results[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                      text=True).stdout.splitlines()[-1])
            r = results[side]
            steps = ", ".join(f"{k} {v:.0f}" if k.endswith(("queries", "scored")) else f"{k} {v:.1f} s"
                              for k, v in r["steps"].items())  # counts, and seconds
            print(f"{n:7d} map images  {side:5s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_MB']:7.0f} MB"
                  + (f"  ({steps})" if steps else ""), flush=True)
        if "peer" in results:
            ours = json.loads((args.work / f"pairs_ours_{n}.json").read_text())
            theirs = json.loads((args.work / f"pairs_peer_{n}.json").read_text())
            differ = [(a, b) for a, b in zip(ours, theirs, strict=True) if a[:2] != b[:2]]
            gap = max((abs(a[2] - b[2]) for a, b in differ), default=0.0)
            print(f"{n:7d} map images  speed-up x{results['peer']['seconds'] / results['ours']['seconds']:.1f}, "
                  f"top-{args.topk} identical for {len(theirs) - len(differ)}/{len(theirs)} pairs; where the "
                  f"order differs the two scores at that rank differ by at most {gap:.1e} (float rounding ties)",
                  flush=True)


if __name__ == "__main__":
    main()
