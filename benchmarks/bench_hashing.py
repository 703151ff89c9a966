"""Hashing (issue 29): the methods' mAP on digits, and Hamming search against exact float
search.

    python benchmarks/bench_hashing.py digits [--bits 12,24,32,48,64] [--seeds 3] [--methods lsh,spectral]
    python benchmarks/bench_hashing.py search [--codes 10000000 --float-images 200000 --queries 100]
    python benchmarks/bench_hashing.py regions [--bits 32] [--map 600 --query 150 --epochs 15]

``digits``: scikit-learn's digits (1,797 images of 8 x 8 pixels, 10 classes, bundled with
the library), the survey's single-label protocol in small: 200 queries drawn at random (one
draw per seed), the other 1,597 images the database and the training set, the 64 pixels as
the descriptor; mAP over the whole database ranked by Hamming distance (ties by map order),
relevant = same digit. Each method with its default configuration; mean and spread over
the seeds (each seed draws the split and the method's own randomness).

``search``: ``--codes`` codes of 64 bits searched with faiss's ``IndexBinaryFlat`` (every
code, XOR and popcount) against exact float search (``IndexFlatIP``, every descriptor) of
2048-D float32 descriptors, top 20, the same queries. A float map of 10M x 2048-D (80 GB)
does not fit this machine: the float search runs on ``--float-images`` and its time is
scaled linearly to ``--codes`` (exact search is one pass over the map: its time is linear in
the map's size). The descriptors are synthetic (a mixture of 1,000 Gaussian clusters in
2048-D, L2-normalized), the codes ITQ's trained on 20,000 of them; recall@20 is the share of
the float top 20 found in the Hamming top 20 on the ``--float-images`` map, and in the
Hamming top 1,000 re-ranked by the float descriptors (``--rerank``).

``regions``: Region-DH against image-level hashing on the multi-instance set of
``examples/make_instances.py`` (SYNTHETIC compositions of real photos, 160 x 160, 1 to 3
objects of 11 classes an image): both trained by ``cbir hash train-regions`` on the map
images with the same backbone (ResNet-18 to layer3, from random weights: no ImageNet weights
on this machine), configuration, seed and epochs, the image-level one with ``regions=false``
(H2 alone). Queries ranked by ``cbir hash evaluate`` (the CLI, as a user runs it): Region-DH by
its image codes and by its instance codes (``--instances``), the image-level network by its
image codes. Relevance: sharing a label (the survey's multi-label protocol), and, for the
queries of 2 or 3 objects, holding all of the query's labels (multi-instance retrieval).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def digits(bits_list: list[int], seeds: int, only: list[str] | None = None) -> None:
    from sklearn.datasets import load_digits

    from cbir.hashing.itq import ITQ
    from cbir.hashing.lsh import LSH
    from cbir.hashing.metrics import hashing_metrics, label_relevance
    from cbir.hashing.pairwise import DPSH, DSDH, HashNet
    from cbir.hashing.search import hamming_distances
    from cbir.hashing.spectral import SpectralHashing

    data = load_digits()
    x, y = data.data.astype(np.float32), np.eye(10, dtype=bool)[data.target]
    methods = tuple(m for m in (LSH, SpectralHashing, ITQ, DPSH, HashNet, DSDH) if not only or m.name in only)
    results: dict[tuple[str, int], list[float]] = {}
    seconds: dict[str, list[float]] = {m.name: [] for m in methods}
    for seed in range(seeds):
        perm = np.random.default_rng(seed).permutation(len(x))
        q, db = perm[:200], perm[200:]
        relevance = label_relevance(y[q], y[db])
        for bits in bits_list:
            for cls in methods:
                t0 = time.perf_counter()
                model = cls().fit(x[db], bits, y[db] if cls.supervised else None, seed=seed)
                seconds[cls.name].append(time.perf_counter() - t0)
                d = hamming_distances(model.encode(x[q]), model.encode(x[db]))
                results.setdefault((cls.name, bits), []).append(hashing_metrics(d, relevance, bits)["map"])
    print(f"digits, 200 queries / 1,597 database images, {seeds} seeds: mAP (mean +- std over seeds)\n")
    print("| method | " + " | ".join(f"{b} bits" for b in bits_list) + " | training s |")
    print("|---|" + "---:|" * (len(bits_list) + 1))
    for cls in methods:
        cells = []
        for b in bits_list:
            v = results[(cls.name, b)]
            cells.append(f"{statistics.mean(v):.3f} +- {statistics.pstdev(v):.3f}")
        print(f"| {cls.name} | " + " | ".join(cells) + f" | {statistics.mean(seconds[cls.name]):.2f} |")


def search(codes_n: int, float_n: int, queries: int, dim: int = 2048, bits: int = 64) -> None:
    import faiss

    from cbir.hashing.itq import ITQ
    from cbir.hashing.search import build_index, hamming_topk

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim), dtype=np.float32)

    def sample(n: int) -> np.ndarray:
        out = np.empty((n, dim), np.float32)
        for start in range(0, n, 50_000):
            m = min(50_000, n - start)
            out[start:start + m] = centres[rng.integers(0, 1000, m)] + 0.7 * rng.standard_normal((m, dim),
                                                                                                 dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    model = ITQ().fit(sample(20_000), bits)
    xq = sample(queries)
    fmap = sample(float_n)
    qcodes = model.encode(xq)
    # exact float search on float_n images, its time scaled to codes_n
    index = faiss.IndexFlatIP(dim)
    index.add(fmap)
    t0 = time.perf_counter()
    _, float_top = index.search(xq, 20)
    float_seconds = (time.perf_counter() - t0) / queries * codes_n / float_n
    # recall@20 of the float top 20, on the same float_n map
    mcodes = model.encode(fmap)
    _, ham_top = hamming_topk(qcodes, mcodes, 20)
    recall = float(np.mean([len(set(a) & set(b)) / 20 for a, b in zip(float_top, ham_top, strict=True)]))
    # the Hamming top 1,000 ranked again by the float descriptors (what --rerank does)
    _, cand = hamming_topk(qcodes, mcodes, 1000)
    reranked = [c[np.argsort(-(fmap[c] @ q), kind="stable")[:20]] for q, c in zip(xq, cand, strict=True)]
    recall_rerank = float(np.mean([len(set(a) & set(b)) / 20 for a, b in zip(float_top, reranked, strict=True)]))
    t0 = time.perf_counter()
    for q, c in zip(xq, cand, strict=True):
        np.argsort(-(fmap[c] @ q))
    rerank_seconds = (time.perf_counter() - t0) / queries
    del fmap, index, mcodes
    # Hamming search over codes_n codes (synthetic codes past float_n: the time of a flat search
    # does not depend on the bits' values)
    big = np.random.default_rng(1).integers(0, 256, (codes_n, bits // 8), dtype=np.uint8)
    hindex = build_index(big)
    t0 = time.perf_counter()
    hamming_topk(qcodes, big, 20, index=hindex)
    ham_seconds = (time.perf_counter() - t0) / queries
    print(f"{codes_n:,} images, {queries} queries, top 20, {os.cpu_count()} cores:")
    print("| search | bytes / image | ms / query | recall@20 of the float top 20 |")
    print("|---|---:|---:|---:|")
    print(f"| exact float, {dim}-D float32 (IndexFlatIP; timed on {float_n:,}, scaled) | {dim * 4} | "
          f"{1000 * float_seconds:.1f} | 1.000 |")
    print(f"| Hamming, {bits}-bit ITQ codes (IndexBinaryFlat, exact, ties by map order) | {bits // 8} | "
          f"{1000 * ham_seconds:.1f} | {recall:.3f} |")
    print(f"| the same, its top 1,000 re-ranked by the float descriptors (held in memory here) | {bits // 8} "
          f"(+ the float store) | {1000 * (ham_seconds + rerank_seconds):.1f} | {recall_rerank:.3f} |")
    print(f"\nspeed-up {float_seconds / ham_seconds:.0f}x at 1/{dim * 4 // (bits // 8)} of the memory")


def regions(bits: int, map_n: int, query_n: int, epochs: int) -> None:
    import importlib.util
    import json
    import subprocess
    import tempfile

    from cbir.hashing.labels import label_matrix, read_labels
    from cbir.hashing.metrics import hashing_metrics, label_relevance

    spec = importlib.util.spec_from_file_location("make_instances", HERE.parent / "examples" / "make_instances.py")
    assert spec and spec.loader
    mi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mi)
    root = Path(tempfile.mkdtemp(prefix="cbir-regions-"))
    mi.main(root, map_n, query_n)
    labels = root / "labels.txt"
    labels.write_text((root / "map" / "labels.txt").read_text() + (root / "query" / "labels.txt").read_text())
    conf = ["backbone=resnet18", "anchor_sizes=[32,64,128]", "rpn_channels=256", "hidden=512", "roi_channels=64",
            f"epochs={epochs}"]

    def cbir(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "cbir", *args], check=True, capture_output=True, text=True,
                              cwd=root).stdout

    rows = []
    for k, (label, extra) in enumerate((("Region-DH", []), ("image-level (H2 alone)", ["regions=false"]))):
        model = root / f"m{k}.npz"
        start = time.perf_counter()
        cbir("hash", "train-regions", "map", "--boxes", "map/boxes.txt", "--bits", str(bits), "--out", str(model),
             *[a for c in conf + extra for a in ("--conf", c)])
        train_s = time.perf_counter() - start
        name = f"m{k}"
        for d in ("map", "query"):
            cbir("hash", "encode", d, "--model", str(model), "--name", name)
        levels = [("image codes", [])] + ([("instance codes", ["--instances"])] if not extra else [])
        for level, flag in levels:
            out = json.loads(cbir("hash", "evaluate", "--map", "map", "--query", "query", "--global", name,
                                  "--labels", str(labels), "--k", "20", *flag))
            rows.append((name, label, level, out, train_s))
    # multi-instance queries: relevant = holds every label of the query
    table = read_labels(labels)
    qnames = sorted(n for n in table if n.startswith("query"))
    mnames = sorted(n for n in table if n.startswith("map"))
    ql, vocab = label_matrix(table, qnames, labels)
    ml, _ = label_matrix(table, mnames, labels, vocab)
    multi = ql.sum(1) >= 2
    all_rel = (ql.astype(int) @ ml.T.astype(int)) == ql.sum(1, keepdims=True)
    print(f"{map_n} map / {query_n} query images ({int(multi.sum())} queries of 2-3 objects), {bits} bits, "
          f"{epochs} epochs, {os.cpu_count()} CPUs")
    print("| network | ranked by | mAP (share a label) | mAP@20 | P@20 | mAP, multi-object queries (all labels) "
          "| training (s) |")
    print("|---|---|---|---|---|---|---|")
    from cbir.hashing.instances import region_distances
    from cbir.hashing.retrieve import code_distances
    from cbir.io.dataset import Dataset

    for name, label, level, out, train_s in rows:
        ranking = region_distances if level == "instance codes" else code_distances
        found = ranking(Dataset(root / "query"), Dataset(root / "map"), name)
        assert found.query_names == qnames and found.map_names == mnames
        strict = hashing_metrics(found.distances[multi], all_rel[multi], found.bits, (20,), 2)["map"]
        print(f"| {label} | {level} | {out['map']:.3f} | {out['map@20']:.3f} | {out['precision@20']:.3f} | "
              f"{strict:.3f} | {train_s:.0f} |")
    chance = hashing_metrics(np.zeros_like(all_rel[multi], float), all_rel[multi], bits, (20,), 2)["map"]
    loose = hashing_metrics(np.zeros((len(qnames), len(mnames))), label_relevance(ql, ml), bits, (20,), 2)["map"]
    print(f"| (no ranking: every distance equal, map order) | | {loose:.3f} | | | {chance:.3f} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["digits", "search", "regions"])
    ap.add_argument("--bits", default="12,24,32,48,64")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--codes", type=int, default=10_000_000)
    ap.add_argument("--float-images", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--methods", help="digits: these methods only (comma-separated names)")
    ap.add_argument("--map", type=int, default=600)
    ap.add_argument("--query", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    if args.what == "regions":
        regions(int(args.bits.split(",")[0]) if args.bits != "12,24,32,48,64" else 32, args.map, args.query,
                args.epochs)
    elif args.what == "digits":
        digits([int(b) for b in args.bits.split(",")], args.seeds, args.methods.split(",") if args.methods else None)
    else:
        search(args.codes, args.float_images, args.queries)


if __name__ == "__main__":
    main()
