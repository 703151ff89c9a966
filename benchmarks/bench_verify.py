"""Map-pair verification with the known poses (``--verify poses``) against RANSAC
(pycolmap's two-view geometry, ``--verify ransac``), on the real datasets with ground truth
and the README's rendered example, in one script:

* verification throughput on the same matches (pairs/s; RANSAC on one core and on the
  machine's pool as ``cbir match`` runs it), and the ratio;
* the map each gives (points, mean track length, mean reprojection error) and the
  localization of the queries against it (same query matches, config1), side by side.

    python benchmarks/bench_verify.py --shared ../shared

Works on copies in benchmarks/_work/verify (SIFT 8k, ratio 0.8, every map x map pair,
DenseVLAD top-5 query pairs).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np

from cbir import localize as localize_mod
from cbir import mapping
from cbir.evaluation.localization import pose_errors, summarize
from cbir.io.dataset import Dataset
from cbir.io.map_store import read_map
from cbir.io.pairs import read_pairs
from cbir.io.store import open_store
from cbir.matching import MatcherConf, VerifyConf
from cbir.matching import match as match_mod
from cbir.matching.known_poses import PosedPair, verify_with_poses
from cbir.matching.verify import verification_camera, verify_pair

HERE = Path(__file__).resolve().parent


def prepare(root: Path) -> tuple[Dataset, Dataset, list, list]:
    """The datasets with their features and pairs, the query matches (RANSAC) and the map
    matches without verification."""
    m, q, map_path, query_path = datasets.prepare(root)
    map_pairs, query_pairs = read_pairs(map_path), read_pairs(query_path)
    matcher = MatcherConf(ratio=0.8)
    match_mod.main(m, m, map_pairs, "sift", name="unverified", matcher=matcher)
    match_mod.main(q, m, query_pairs, "sift", name="query", matcher=matcher, verify=VerifyConf())
    return m, q, map_pairs, query_pairs


def verification_rates(m: Dataset, workers: int) -> dict:
    """Pairs/s of each verification over the same unverified map matches."""
    poses = m.sensors.image_poses()
    records = m.sensors.record_by_name()
    cams = {n: verification_camera(m.sensors.cameras[r.camera_id], 0, 0) for n, r in records.items()}
    with open_store(m.store_path("matches", "unverified")) as s, open_store(m.store_path("local", "sift")) as f:
        kps = {n: f.get(n, ["keypoints"])["keypoints"] for n in f.keys}
        items = [(a, b, s.get((a, b), ["matches"])["matches"]) for a, b in s.keys]
    conf = VerifyConf()
    jobs = [(cams[a], kps[a], cams[b], kps[b], mm, conf) for a, b, mm in items]
    t = time.perf_counter()
    for job in jobs:
        verify_pair(*job)
    ransac_1 = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda j: verify_pair(*j), jobs))
    ransac_n = time.perf_counter() - t
    posed = [PosedPair(cams[a], poses[a], kps[a], cams[b], poses[b], kps[b], mm) for a, b, mm in items]
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        verify_with_poses(posed, conf.max_error, conf.min_inliers)
        runs.append(time.perf_counter() - t)
    known = min(runs)
    n = len(items)
    return {"pairs": n, "matches": int(sum(len(mm) for *_, mm in items)), "ransac_1": n / ransac_1,
            "ransac_n": n / ransac_n, "poses": n / known, "ratio_1": ransac_1 / known, "ratio_n": ransac_n / known}


def map_and_localize(m: Dataset, q: Dataset, map_pairs: list, query_pairs: list, method: str, gt: Path) -> dict:
    name = f"map-{method}"
    t = time.perf_counter()
    match_mod.main(m, m, map_pairs, "sift", name=name, matcher=MatcherConf(ratio=0.8),
                   verify=VerifyConf(method=method), overwrite=True)
    t_verify = time.perf_counter() - t
    report = mapping.main(m, "sift", name, name=name, overwrite=True)
    t_map = time.perf_counter() - t
    loc = localize_mod.main(q, m, query_pairs, "sift", "query", map_name=name, config="config1", name=name,
                            overwrite=True)
    ev = summarize(pose_errors({r.name: r.pose for r in loc.results if r.success}, Dataset(gt).sensors.image_poses()))
    errors = read_map(m.store_path("map", name)).errors
    return {"method": method, "points": report.points, "track": report.mean_track_length,
            "reproj": float(np.nanmean(errors)), "within": ev["within"], "median_t": ev["median_translation"],
            "median_R": ev["median_rotation_deg"], "localized": f"{ev['localized']}/{ev['queries']}",
            "match_verify_s": t_verify, "mapping_s": t_map}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "verify")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for label in datasets.DATASETS:
        root = datasets.working_copy(args.shared, args.work, label)
        m, q, map_pairs, query_pairs = prepare(root)
        r = verification_rates(m, args.workers)
        print(f"{label}: {r['pairs']} map pairs, {r['matches']} matches: RANSAC {r['ransac_1']:.1f} pairs/s "
              f"(1 core), {r['ransac_n']:.1f} pairs/s ({args.workers} threads); known poses {r['poses']:.0f} "
              f"pairs/s: x{r['ratio_1']:.0f} / x{r['ratio_n']:.0f}", flush=True)
        for method in ("ransac", "poses"):
            s = map_and_localize(m, q, map_pairs, query_pairs, method, root / "query_gt")
            print(f"  {method:6s} {s['points']:6d} points, track {s['track']:.2f}, reproj {s['reproj']:.3f} px; "
                  f"queries {s['localized']} " + " / ".join(f"{100 * v:.1f}" for v in s["within"]) +
                  f"  median {s['median_t']:.3f} m {s['median_R']:.3f} deg; match+verify {s['match_verify_s']:.1f} s,"
                  f" + triangulation {s['mapping_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
