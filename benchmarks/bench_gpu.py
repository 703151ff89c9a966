"""GPU throughput of matching, retrieval and extraction, each against its floor in the same run.

Sections (each one's failure is printed and the others still run):

* ``ceilings``: the device's float32 matrix-product rate (TF32 off) and copy bandwidth;
* ``match_kernel``: mutual nearest neighbours of 128-D descriptors at 8k and 20k keypoints,
  descriptors resident: cbir's :class:`PairBatch` (several row-tile sizes) against the
  float32 product alone and a naive full-matrix torch mutual NN, its matches checked
  against the CPU path's;
* ``retrieval``: 200k map images x 4,096 queries x (256, 2048, 4096)-D, gharm top-20, from
  stores on disk: cbir fp32 / fp16 / bf16 against the products alone with the map resident
  (fp32, TF32, fp16), the pairs of each mode compared with fp32's, and fp32 GPU with the CPU
  on a sample of queries;
* ``extract``: 1,000 JPEGs of 1024 x 768 made from the shared photos (crops, flips,
  brightness): ``cbir extract --device cuda`` end to end (R2D2 top 5k, AP-GeM on generated
  weights in the official layout), against each extractor alone on decoded images in
  memory; R2D2 against the official naver/r2d2 code on the same images and GPU;
* ``match_e2e``: ``cbir match`` on 5,000 pairs of those R2D2 features, without and with
  RANSAC verification, with its time by phase and what bounds it.

    python benchmarks/bench_gpu.py --shared ../shared --official-repo PATH/TO/naver-r2d2 --out gpu.json
    python benchmarks/bench_gpu.py --quick --device cpu      # the same code paths, small sizes, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cbir.devices import exact_float32  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall-clock seconds of ``fn()``, the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------- ceilings

def ceilings(args, device) -> dict:
    n = 2048 if args.quick else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    with exact_float32():
        t = timed(lambda: torch.mm(a, b), device, repeat=5)
    x = torch.randn(256 << 20 if not args.quick else 16 << 20, device=device)  # 1 GiB of float32
    y = torch.empty_like(x)
    tc = timed(lambda: y.copy_(x), device, repeat=5)
    out = {"fp32_tflops": 2 * n ** 3 / t / 1e12, "copy_GBps": 2 * x.numel() * 4 / tc / 1e9}
    print(f"ceilings: fp32 product {out['fp32_tflops']:.1f} TFLOP/s, copy {out['copy_GBps']:.0f} GB/s", flush=True)
    return out


# ---------------------------------------------------------------- matching kernel

def descriptor_pairs(k: int, count: int, device: torch.device,
                     seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(seed)
    pairs = []
    for _ in range(count):
        base = torch.randn(k, 128, device=device, generator=g)
        d0 = torch.nn.functional.normalize(base + 0.3 * torch.randn(base.shape, device=device, generator=g), dim=1)
        d1 = torch.nn.functional.normalize(base[torch.randperm(k, device=device, generator=g)]
                                           + 0.3 * torch.randn(base.shape, device=device, generator=g), dim=1)
        pairs.append((d0, d1))
    return pairs


def naive_mnn(d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    sim = d0 @ d1.t()
    nn01, nn10 = sim.argmax(1), sim.argmax(0)
    return nn10[nn01] == torch.arange(len(d0), device=d0.device)


def match_kernel(args, device) -> dict:
    from cbir.matching import MatcherConf, PairBatch

    out = {}
    sizes = ((2000, 16), (4000, 4)) if args.quick else ((8000, 64), (20000, 16))
    for k, per_run in sizes:
        distinct = descriptor_pairs(k, 4, device)
        work = [distinct[i % len(distinct)] for i in range(per_run)]

        def product(work=work):
            for d0, d1 in work:
                torch.mm(d0, d1.t())

        def naive(work=work):
            for d0, d1 in work:
                naive_mnn(d0, d1)

        with exact_float32():
            t_product, t_naive = timed(product, device), timed(naive, device)
        row = {"product_pairs_per_s": per_run / t_product, "naive_pairs_per_s": per_run / t_naive, "cbir": {}}
        for tile in (64 << 20, 256 << 20, 1 << 30, 4 << 30):
            conf = MatcherConf(device_tile_bytes=tile)

            def ours(conf=conf, work=work):
                batch = PairBatch(conf)
                for d0, d1 in work:
                    batch.add(d0, d1)
                return batch.results()

            row["cbir"][f"{tile >> 20}MB"] = per_run / timed(ours, device)
        best = max(row["cbir"], key=row["cbir"].get)
        conf = MatcherConf(device_tile_bytes=int(best.removesuffix("MB")) << 20)

        def pipelined(batches: int = 4, conf=conf, work=work):
            """As cbir match runs: batch b+1 queued before the matches of batch b are taken."""
            previous = None
            for _ in range(batches):
                batch = PairBatch(conf)
                for d0, d1 in work:
                    batch.add(d0, d1)
                batch.finish()
                if previous is not None:
                    previous.results()
                previous = batch
            previous.results()

        row["cbir_pipelined"] = 4 * per_run / timed(pipelined, device)
        # the same pairs on the CPU path: the same matches
        d0, d1 = distinct[0]
        batch = PairBatch(MatcherConf(device_tile_bytes=int(best.removesuffix("MB")) << 20))
        batch.add(d0, d1)
        gpu_matches = batch.results()[0][0]
        cpu_batch = PairBatch(MatcherConf())
        cpu_batch.add(d0.cpu(), d1.cpu())
        cpu_matches = cpu_batch.results()[0][0]
        row["same_matches_as_cpu"] = bool(np.array_equal(gpu_matches, cpu_matches))
        row["matches_differing_from_cpu"] = len(set(map(tuple, gpu_matches)) ^ set(map(tuple, cpu_matches)))
        row["best_tile"] = best
        row["share_of_product"] = row["cbir"][best] / row["product_pairs_per_s"]
        row["pipelined_share_of_product"] = row["cbir_pipelined"] / row["product_pairs_per_s"]
        out[str(k)] = row
        print(f"match {k} x {k}: product {row['product_pairs_per_s']:.0f} pairs/s, "
              f"naive {row['naive_pairs_per_s']:.0f}, "
              f"cbir {row['cbir'][best]:.0f} ({best} tiles; {100 * row['share_of_product']:.0f}% of the product; "
              f"pipelined as cbir match runs {row['cbir_pipelined']:.0f}, "
              f"{100 * row['pipelined_share_of_product']:.0f}%; "
              f"all tiles: {', '.join(f'{t} {v:.0f}' for t, v in row['cbir'].items())}); "
              f"same matches as the CPU: {row['same_matches_as_cpu']} ({row['matches_differing_from_cpu']} differ)",
              flush=True)
    return out


# ---------------------------------------------------------------- retrieval

def clustered(n: int, dim: int, centres: torch.Tensor, labels: torch.Tensor, noise: float,
              g: torch.Generator) -> torch.Tensor:
    x = centres[labels] + noise * torch.randn((n, dim), device=centres.device, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def write_global(path: Path, names: list[str], desc: np.ndarray, extractor: str) -> None:
    from cbir.io.store import StoreWriter

    attrs = {"name": extractor, "config": {"extractor": extractor}, "descriptor_dim": desc.shape[1],
             "descriptor_dtype": "float32"}
    with StoreWriter(path, "global-features", attrs, batch_size=50_000, batch_rows=1 << 40) as w:
        for n, d in zip(names, desc, strict=True):
            w.add(n, descriptors=d)


def retrieval(args, device) -> dict:
    from cbir.io.store import open_store
    from cbir.retrieval import DescriptorSet, RetrievalConf, retrieve

    nm, nq = (20_000, 512) if args.quick else (200_000, 4096)
    dims = (64, 128, 256) if args.quick else (256, 2048, 4096)
    root = args.work / "retrieval"
    g = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, 2000, (nm,), device=device, generator=g)
    qlabels = labels[torch.randint(0, nm, (nq,), device=device, generator=g)]
    mnames, qnames = [f"m/{i:06d}.jpg" for i in range(nm)], [f"q/{i:05d}.jpg" for i in range(nq)]
    resident = []
    t = time.perf_counter()
    for j, d in enumerate(dims):
        centres = torch.randn((2000, d), device=device, generator=g) / d ** 0.5
        m = clustered(nm, d, centres, labels, 0.6 / d ** 0.5, g)
        q = clustered(nq, d, centres, qlabels, 0.6 / d ** 0.5, g)
        resident.append((q, m))
        if not (root / f"m{j}.h5").exists():
            root.mkdir(parents=True, exist_ok=True)
            write_global(root / f"m{j}.h5", mnames, m.cpu().numpy(), f"synthetic{d}")
            write_global(root / f"q{j}.h5", qnames, q.cpu().numpy(), f"synthetic{d}")
    print(f"retrieval: stores written in {time.perf_counter() - t:.1f} s", flush=True)
    out: dict = {"map": nm, "queries": nq, "dims": dims}
    chunk = 32768

    def products(cast):
        qs = [cast(q) for q, _ in resident]
        ms = [cast(m) for _, m in resident]

        def run():
            for m0 in range(0, nm, chunk):
                for q, m in zip(qs, ms, strict=True):
                    torch.mm(q, m[m0:m0 + chunk].t())
        return run

    with exact_float32():
        out["floor_fp32_s"] = timed(products(lambda x: x), device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        out["floor_tf32_s"] = timed(products(lambda x: x), device)
        torch.backends.cuda.matmul.allow_tf32 = False
        out["floor_fp16_s"] = timed(products(lambda x: x.half()), device)
    resident.clear()  # the device memory goes back before the next measurement
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stores_q = [open_store(root / f"q{j}.h5") for j in range(len(dims))]
    stores_m = [open_store(root / f"m{j}.h5") for j in range(len(dims))]
    qset, mset = DescriptorSet.align(stores_q), DescriptorSet.align(stores_m)
    results = {}
    # a first call loads the search's kernels (lazy module loading), not counted
    retrieve(DescriptorSet(qset.stores, qset.names[:8], [r[:8] for r in qset.rows]), mset,
             RetrievalConf(topk=20), device=device)
    variants = [("fp32", None, None), ("fp16", None, None), ("bf16", None, None)]
    if not args.quick:
        variants += [("fp32", 4096, 65536), ("fp32", 8192, 32768)]
    for precision, block, chunk_size in variants:
        timings: dict = {}
        t = time.perf_counter()
        pairs = retrieve(qset, mset, RetrievalConf(topk=20, precision=precision, query_block=block,
                                                   map_chunk=chunk_size), device=device, timings=timings)
        total = time.perf_counter() - t
        label = precision if block is None else f"{precision}-{block}x{chunk_size}"
        results[label] = pairs
        search = total - timings.get("read", 0.0)
        row = {"total_s": total, "read_s": timings.get("read", 0.0), "search_s": search, "timings": timings,
               "vs_fp32_floor": search / out["floor_fp32_s"], **compare_pairs(pairs, results["fp32"])}
        out[label] = row
        print(f"retrieval {label}: {total:.2f} s = read {timings.get('read', 0):.2f} s + search {search:.3f} s "
              f"({search / out['floor_fp32_s']:.2f}x the fp32 floor {out['floor_fp32_s']:.3f} s; making the pairs "
              f"{timings.get('pairs', 0):.3f} s); fallback queries {timings.get('fallback_queries', 0)}; "
              f"vs fp32: {row['queries_differing']} queries differ, largest score difference at a rank "
              f"{row['largest_rank_score_difference']:.1e}", flush=True)
    if device.type == "cuda":
        sample = 64
        sub = DescriptorSet(qset.stores, qset.names[:sample], [r[:sample] for r in qset.rows])
        cpu = retrieve(sub, mset, RetrievalConf(topk=20), device=torch.device("cpu"))
        gpu = [p for p in results["fp32"] if p.query in set(sub.names)]
        out["fp32_gpu_equals_cpu_on_sample"] = [(p.query, p.map) for p in cpu] == [(p.query, p.map) for p in gpu]
        out["max_score_difference_cpu_gpu"] = max(abs(a.score - b.score) for a, b in zip(cpu, gpu, strict=True))
        print(f"retrieval: fp32 GPU pairs equal the CPU's on {sample} queries: {out['fp32_gpu_equals_cpu_on_sample']} "
              f"(largest score difference {out['max_score_difference_cpu_gpu']:.2e})", flush=True)
    print(f"retrieval floors: fp32 {out['floor_fp32_s']:.3f} s" +
          (f", tf32 {out['floor_tf32_s']:.3f} s, fp16 {out['floor_fp16_s']:.3f} s" if "floor_tf32_s" in out else ""),
          flush=True)
    return out


def compare_pairs(pairs: list, reference: list) -> dict:
    """Queries whose ranked list differs from the reference's, and the largest difference of
    the scores at the same rank: lists that differ only by the order of scores equal to
    float32 rounding have a tiny one."""
    def by_query(ps):
        out: dict = {}
        for p in ps:
            out.setdefault(p.query, []).append(p)
        return out

    a, b = by_query(pairs), by_query(reference)
    differ = [q for q in b if [p.map for p in a.get(q, [])] != [p.map for p in b[q]]]
    largest = max((abs(x.score - y.score) for q in b for x, y in zip(a.get(q, []), b[q], strict=False)), default=0.0)
    return {"queries_differing": len(differ), "largest_rank_score_difference": largest,
            "same_sets": all({p.map for p in a.get(q, [])} == {p.map for p in b[q]} for q in differ)}


# ---------------------------------------------------------------- extraction

def _make_image(task) -> None:
    import cv2

    i, sources, out, size = task
    rng = np.random.default_rng(i)
    img = cv2.imread(str(sources[i % len(sources)]))
    h, w = img.shape[:2]
    scale = rng.uniform(0.6, 1.0)
    ch, cw = int(h * scale), int(w * scale)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = img[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if cw > size[0] else cv2.INTER_LINEAR)
    crop = np.clip(crop.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    cv2.imwrite(str(out / f"{i:05d}.jpg"), crop, [cv2.IMWRITE_JPEG_QUALITY, 92])


def source_photos(args) -> list[Path]:
    return sorted(p for name in ("sceaux_castle", "strecha_fountain_p11")
                  for p in (args.shared / "data" / name).rglob("*.jpg"))


def make_dataset(args, n: int) -> Path:
    """``n`` JPEGs of 1024 x 768 (one pinhole camera) from the shared photos."""
    from cbir.geometry.cameras import Camera
    from cbir.io.kapture_text import write_sensor_data
    from cbir.io.sensors import ImageRecord, SensorData

    root = args.work / f"images{n}"
    if root.exists():
        return root
    size = (1024, 768)
    sources = source_photos(args)
    images = root / "sensors" / "records_data"
    images.mkdir(parents=True)
    pool = Pool(os.cpu_count())
    pool.map(_make_image, [(i, sources, images, size) for i in range(n)])
    pool.close()  # not terminate(): its SIGTERM makes pycolmap's handler print a stack trace
    pool.join()
    data = SensorData(sensors={"cam0": Camera("PINHOLE", size[0], size[1], (900.0, 900.0, 512.0, 384.0))})
    data.records = [ImageRecord(i, "cam0", f"{i:05d}.jpg") for i in range(n)]
    write_sensor_data(root, data)
    return root


def apgem_weights(work: Path) -> Path:
    from cbir.models.apgem import ResNetGeM

    path = work / "Resnet101-AP-GeM-LM18.pt"
    if not path.exists():
        torch.manual_seed(0)
        state = {"module." + k.removeprefix("trunk."): v for k, v in ResNetGeM("resnet101").state_dict().items()}
        torch.save({"model_options": {"arch": "resnet101_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3},
                    "state_dict": state}, path)
    return path


def cli_extract(root: Path, options: list[str], device: torch.device) -> dict:
    """``cbir extract`` as a user runs it, its wall time (start and model loading included)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cbir", "extract", str(root), *options, "--device", device.type,
                           "--json"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                                                          os.environ.get("PYTHONPATH")]))})
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"cbir extract failed: {proc.stderr[-2000:]}")
    return {"wall_s": wall, "summary": json.loads(proc.stdout)}


def extract(args, device) -> dict:
    from cbir.io.images import read_image
    from cbir.models.apgem import APGeM
    from cbir.models.r2d2 import R2D2

    n, n_model = (6, 2) if args.quick else (1000, 200)
    root = make_dataset(args, n)
    paths = sorted((root / "sensors" / "records_data").glob("*.jpg"))
    weights = args.shared / "weights" / "r2d2" / "r2d2_WASF_N16.pt"
    out: dict = {"images": n, "size": "1024x768"}
    decoded = [read_image(p) for p in paths[:n_model]]
    # the extractors alone, on decoded images in memory
    r2d2 = R2D2({"weights": str(weights), "max_keypoints": 5000, "device": device.type})
    apgem = APGeM({"weights": str(apgem_weights(args.work)), "device": device.type})
    for name, ex in (("r2d2", r2d2), ("apgem", apgem)):
        ex.extract(decoded[0])
        sync(device)
        t = time.perf_counter()
        for im in decoded:
            ex.extract(im)
        sync(device)
        out[f"{name}_model_images_per_s"] = len(decoded) / (time.perf_counter() - t)
    # the official R2D2 code on the same images and GPU
    if args.official_repo:
        sys.path.insert(0, str(args.official_repo))
        sys.modules["tools.dataloader"] = types.SimpleNamespace(norm_RGB=None)
        import extract as official  # naver/r2d2 extract.py

        from cbir.models.base import to_tensor

        net = official.load_network(str(weights)).to(device)
        detector = official.NonMaxSuppression(rel_thr=0.7, rep_thr=0.7).to(device)

        def run_official(im):
            img = to_tensor(im.array, device)
            xys, desc, scores = official.extract_multiscale(net, img, detector)
            idx = scores.argsort()[-5000:]
            return xys[idx].cpu().numpy(), desc[idx].cpu().numpy()

        run_official(decoded[0])
        sync(device)
        t = time.perf_counter()
        for im in decoded:
            run_official(im)
        sync(device)
        out["r2d2_official_images_per_s"] = len(decoded) / (time.perf_counter() - t)
        ours = r2d2.extract(decoded[1])
        theirs, _ = run_official(decoded[1])
        a = {tuple(np.round(k, 2)) for k in ours["keypoints"]}
        b = {tuple(np.round(k[:2], 2)) for k in theirs}
        out["r2d2_keypoints_shared_with_official"] = len(a & b) / max(1, len(b))
    # the whole command, 1,000 images decoded, extracted and written
    r2d2_options = ["--local", "r2d2", "--weights", str(weights), "--max-keypoints", "5000"]
    for name, options in (("r2d2", r2d2_options),
                          ("apgem", ["--global", "apgem", "--weights", str(apgem_weights(args.work))])):
        r = cli_extract(root, options, device)
        out[f"{name}_command_seconds"] = r["summary"].get("seconds")
        out[f"{name}_command_bound_by"] = r["summary"].get("bound_by")
        out[f"{name}_command_s"] = r["wall_s"]
        out[f"{name}_command_images_per_s"] = n / r["wall_s"]
        out[f"{name}_command_share_of_model"] = out[f"{name}_command_images_per_s"] / out[f"{name}_model_images_per_s"]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import torch, cbir.cli; torch.zeros(1, device='{device.type}')"],
                   check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                       str(HERE.parent), os.environ.get("PYTHONPATH")]))})
    out["start_s"] = time.perf_counter() - t
    official_rate = out.get("r2d2_official_images_per_s")
    print(f"extract R2D2 (top 5k): command {out['r2d2_command_images_per_s']:.1f} images/s, model alone "
          f"{out['r2d2_model_images_per_s']:.1f} ({100 * out['r2d2_command_share_of_model']:.0f}%)" +
          (f", official code {official_rate:.1f} images/s "
           f"(cbir model x{out['r2d2_model_images_per_s'] / official_rate:.2f}, "
           f"{100 * out['r2d2_keypoints_shared_with_official']:.1f}% keypoints shared)" if official_rate else ""),
          flush=True)
    print(f"extract AP-GeM: command {out['apgem_command_images_per_s']:.1f} images/s, model alone "
          f"{out['apgem_model_images_per_s']:.1f} ({100 * out['apgem_command_share_of_model']:.0f}%)", flush=True)
    for name in ("r2d2", "apgem"):
        print(f"extract {name} command: {out[f'{name}_command_s']:.1f} s = start {out['start_s']:.1f} s + "
              f"{out[f'{name}_command_seconds']} (bound by {out[f'{name}_command_bound_by']})", flush=True)
    return out


# ---------------------------------------------------------------- matching end to end

def match_e2e(args, device) -> dict:
    from cbir.io.dataset import Dataset
    from cbir.io.pairs import Pair
    from cbir.matching import MatcherConf, VerifyConf
    from cbir.matching import match as match_mod

    n = 6 if args.quick else 1000
    root = args.work / f"images{n}"
    ds = Dataset(root)
    names = sorted(ds.sensors.image_names())
    sources = len(source_photos(args))  # image i is a crop of photo i % sources: pair crops of one photo
    pairs = [Pair(a, names[(i + j * sources) % n]) for i, a in enumerate(names) for j in range(1, 6)]
    out: dict = {"pairs": len(pairs), "threads": os.cpu_count()}
    for label, verify in (("no_verify", None), ("ransac", VerifyConf())):
        t = time.perf_counter()
        r = match_mod.main(ds, ds, pairs, "r2d2_WASF_N16", name=f"bench-{label}", matcher=MatcherConf(),
                           verify=verify, device=device.type, overwrite=True)
        wall = time.perf_counter() - t
        out[label] = {"wall_s": wall, "pairs_per_s": r.matched / wall,
                      "matches_per_pair": r.matches / max(1, r.matched),
                      "inliers_per_pair": r.inliers / max(1, r.matched), "seconds": r.seconds, "bound_by": r.bound_by}
        print(f"cbir match ({label}): {r.matched} pairs in {wall:.1f} s = {r.matched / wall:.0f} pairs/s, "
              f"{r.matches / max(1, r.matched):.0f} matches/pair; " +
              ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()) + f"; bound by {r.bound_by}", flush=True)
    out["verification_scaling"] = verification_scaling(ds, "bench-ransac", 16 if args.quick else 256)
    return out


def verification_scaling(ds, matches: str, count: int) -> dict:
    """pycolmap verification of the same pairs on 1 thread and on every core: how far the
    threads scale (the GIL, or the library's own threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from cbir.io.store import open_store
    from cbir.matching import VerifyConf, verify_pair
    from cbir.matching.match import _Cameras

    cameras = _Cameras()
    with open_store(ds.store_path("matches", matches)) as ms, open_store(ds.store_path("local", "r2d2_WASF_N16")) as fs:
        jobs = []
        for a, b in ms.keys[:count]:
            kp0, kp1 = fs.get(a, ["keypoints"])["keypoints"], fs.get(b, ["keypoints"])["keypoints"]
            jobs.append((cameras.get(ds, a, None), kp0, cameras.get(ds, b, None), kp1, ms.get((a, b))["matches"]))
    out = {}
    for threads in (1, os.cpu_count()):
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(lambda j: verify_pair(*j, VerifyConf()), jobs))
            out[f"{threads}_threads_pairs_per_s"] = len(jobs) / (time.perf_counter() - t)
    print("verification alone: " + ", ".join(f"{k.split('_')[0]} threads {v:.0f} pairs/s" for k, v in out.items()),
          flush=True)
    return out


SECTIONS = {"ceilings": ceilings, "match_kernel": match_kernel, "retrieval": retrieval, "extract": extract,
            "match_e2e": match_e2e}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared")
    ap.add_argument("--official-repo", type=Path, help="checkout of github.com/naver/r2d2 (omit to skip)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (a check of the script on a CPU)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "gpu")
    ap.add_argument("--out", type=Path, help="results as JSON")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    print(f"device: {results['device']}, torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    for name in args.sections:
        t = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args, device)
        except Exception as e:  # noqa: BLE001 - one section's failure must not cost the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - t
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results.get("section_seconds")), flush=True)


if __name__ == "__main__":
    main()
