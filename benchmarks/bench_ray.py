"""Extraction and matching on Ray's multi-node test cluster (1, 2 and 4 nodes of one CPU each
on this machine): correctness (the stores equal a local run's), wall time, the cost of a
shard beyond its work, the merge's rate; then a projection to 10M images on N GPU nodes
from those measured costs and the per-GPU rates of benchmarks/README.md (stated as a
projection, not a measurement).

    python benchmarks/bench_ray.py --shared ../shared --images 96

The images are crops of the shared photos (640 x 480), SIFT with 1,000 keypoints, and each
image paired with its next three (matching with RANSAC).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def make_dataset(shared: Path, root: Path, n: int) -> None:
    import cv2

    from cbir.geometry.cameras import Camera
    from cbir.io.kapture_text import write_sensor_data
    from cbir.io.sensors import ImageRecord, SensorData

    sources = sorted(p for name in ("sceaux_castle", "strecha_fountain_p11")
                     for p in (shared / "data" / name).rglob("*.jpg"))
    images = root / "sensors" / "records_data"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = cv2.imread(str(sources[i % len(sources)]))
        h, w = img.shape[:2]
        s = rng.uniform(0.6, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        cv2.imwrite(str(images / f"{i:05d}.jpg"), cv2.resize(img[y:y + ch, x:x + cw], (640, 480)),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
    data = SensorData(sensors={"cam0": Camera("PINHOLE", 640, 480, (560.0, 560.0, 320.0, 240.0))})
    data.records = [ImageRecord(i, "cam0", f"{i:05d}.jpg") for i in range(n)]
    write_sensor_data(root, data)


def same_store(a: Path, b: Path) -> bool:
    from cbir.io.store import open_store

    with open_store(a) as x, open_store(b) as y:
        if x.names != y.names or x.config != y.config:
            return False
        try:  # NaN equal to NaN (the models verification did not estimate)
            for n in x.names:
                for c, v in x.get(n).items():
                    np.testing.assert_array_equal(v, y.get(n)[c])
        except AssertionError:
            return False
        return True


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from cbir import extract as extract_mod
    from cbir.distributed import RayConf, extract_on_ray, match_on_ray
    from cbir.io.dataset import Dataset
    from cbir.io.pairs import Pair
    from cbir.matching import MatcherConf, VerifyConf
    from cbir.matching import match as match_mod
    from cbir.models.sift import SIFT

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    base = work / "base"
    make_dataset(args.shared, base, args.images)
    conf = {"max_keypoints": 1000}
    names = sorted(Dataset(base).sensors.image_names())
    pairs = [Pair(a, names[(i + j) % len(names)]) for i, a in enumerate(names) for j in range(1, 4)]
    matching = {"name": "m", "matcher": MatcherConf(ratio=0.8), "verify": VerifyConf(), "device": "cpu"}

    def copy(label: str) -> Dataset:
        shutil.copytree(base, work / label)
        return Dataset(work / label)

    out: dict = {"images": args.images, "pairs": len(pairs), "image_shard": args.image_shard,
                 "pair_shard": args.pair_shard}
    local = copy("local")
    t = time.perf_counter()
    local_features = extract_mod.main(SIFT(conf), local, num_workers=1).path
    out["local_extract_s"] = time.perf_counter() - t
    t = time.perf_counter()
    local_matches = match_mod.main(local, local, pairs, "sift", num_workers=1, **matching).path
    out["local_match_s"] = time.perf_counter() - t
    rows = []
    for nodes in args.nodes:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        ds = copy(f"ray{nodes}")
        t = time.perf_counter()
        [report] = extract_on_ray([("local", "sift", conf)], ds, store_names=[None],
                                  conf=RayConf(shard_size=args.image_shard))
        extract_s = time.perf_counter() - t
        t = time.perf_counter()
        mreport = match_on_ray(ds, ds, pairs, "sift", conf=RayConf(shard_size=args.pair_shard), **matching)
        match_s = time.perf_counter() - t
        row = {"nodes": nodes, "extract_s": extract_s, "match_s": match_s,
               "extract_equal": same_store(report.path, local_features),
               "match_equal": same_store(mreport.path, local_matches),
               "work_extract_s": report.seconds["extraction"] + report.seconds["decoding"] + report.seconds["writing"],
               "work_match_s": sum(mreport.seconds.values())}
        shards = -(-args.images // args.image_shard)
        # beyond its work, each shard costs: (wall x nodes - work) / shards
        row["extract_overhead_per_shard_s"] = (extract_s * nodes - row["work_extract_s"]) / shards
        rows.append(row)
        ray.shutdown()
        cluster.shutdown()
        print(f"{nodes} node(s): extract {extract_s:.1f} s (local {out['local_extract_s']:.1f} s), "
              f"match {match_s:.1f} s "
              f"(local {out['local_match_s']:.1f} s); equal to local: {row['extract_equal']}, {row['match_equal']}; "
              f"overhead a shard {row['extract_overhead_per_shard_s']:.2f} s", flush=True)
    out["rows"] = rows
    # the merge's rate: the final store read and written again
    from cbir.io.store import SCHEMAS, merge_stores, open_store

    with open_store(local_features) as s:
        attrs = {"name": s.attrs["name"], "config": s.config, "descriptor_dim": s.attrs["descriptor_dim"],
                 "descriptor_dtype": s.attrs["descriptor_dtype"], "keypoint_params": s.attrs.get("keypoint_params", "")}
    t = time.perf_counter()
    merge_stores([local_features], work / "merged.h5", SCHEMAS["local-features"], attrs)
    merge_s = time.perf_counter() - t
    out["merge_MB_per_s"] = local_features.stat().st_size / 1e6 / merge_s
    return out


def projection(out: dict) -> dict:
    """10M images of R2D2 (top 5k) on N nodes of one H200: the measured per-GPU rates
    (benchmarks/README.md: 34-35 images/s for the network alone, 22-23 for the whole command)
    and the shard overhead and merge rate measured here."""
    images, per_image_bytes = 10_000_000, 2.6e6  # R2D2 top 5k, float32 descriptors
    # on one node nothing else competes for the cores: what a shard costs beyond its work
    overhead = next(r["extract_overhead_per_shard_s"] for r in out["rows"] if r["nodes"] == 1)
    shards = images / 1000  # 1,000 images a task at that scale
    rows = []
    for nodes in (1, 8, 64, 256):
        for label, rate in (("network rate", 35.0), ("command rate", 22.9)):
            compute_h = images / (nodes * rate) / 3600
            overhead_h = shards * overhead / nodes / 3600
            merge_h = images * per_image_bytes / (out["merge_MB_per_s"] * 1e6) / 3600
            rows.append({"nodes": nodes, "rate": label, "compute_h": compute_h, "shard_overhead_h": overhead_h,
                         "merge_h": merge_h})
    return {"images": images, "store_TB": images * per_image_bytes / 1e12, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--image-shard", type=int, default=8)
    ap.add_argument("--pair-shard", type=int, default=32)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "ray")
    args = ap.parse_args()
    out = run(args)
    out["projection"] = projection(out)
    for r in out["projection"]["rows"]:
        print(f"projection, 10M images, {r['nodes']:3d} H200 node(s) at the {r['rate']}: compute "
              f"{r['compute_h']:.1f} h, shard overhead {r['shard_overhead_h']:.2f} h, one-file merge "
              f"{r['merge_h']:.1f} h ({out['projection']['store_TB']:.0f} TB)")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
