"""Localization accuracy and speed on the real datasets with ground truth (../shared/data):
the paper's threshold table for each local feature x retrieval setting x COLMAP config,
the time of mapping and localization, and the localization throughput as the number of
retrieved map images grows.

    python benchmarks/bench_localize.py --shared ../shared [--r2d2]

Works on a copy of the data in benchmarks/_work/localize (extraction and matching resume
between settings, so each feature is extracted once).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from cbir import localize as localize_mod
from cbir import pipeline
from cbir.evaluation.localization import pose_errors, summarize
from cbir.io.dataset import Dataset
from cbir.io.pairs import read_pairs


def prepare(shared: Path, work: Path) -> Path:
    root = work / "sceaux_castle"
    if not root.exists():
        shutil.copytree(shared / "data" / "sceaux_castle", root)
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    return root


def run_setting(root: Path, local: str, local_conf: dict, globals_: list[str], config: str, weights: str | None,
                topk: int) -> dict:
    toml = root / "bench.toml"
    glist = ", ".join(f'"{g}"' for g in globals_)
    lconf = ", ".join(f"{k} = {json.dumps(v)}" for k, v in local_conf.items())
    toml.write_text(f'[datasets]\nmap = "mapping"\nquery = "query"\nquery_gt = "query_gt"\n'
                    f'[extract]\nlocal = "{local}"\nglobal = [{glist}]\nlocal_conf = {{ {lconf} }}\n'
                    + (f'weights = "{weights}"\n' if weights else "")
                    + f'[retrieve]\ntopk = {topk}\nmap_pairs = 0\n[match]\nratio = {0.8 if "sift" in local else 0.0}\n'
                    f'[localize]\nconfig = "{config}"\n')
    plan = pipeline.plan(pipeline.load_config(toml), toml)
    t = time.perf_counter()
    result = pipeline.run(plan, overwrite=True)  # a work folder of an older configuration is redone
    total = time.perf_counter() - t
    ev = result.evaluation["all"]
    return {"local": local, "global": "+".join(globals_), "config": config, "within": ev["within"],
            "median_t": ev["median_translation"], "median_R": ev["median_rotation_deg"],
            "localized": f"{ev['localized']}/{ev['queries']}", "pipeline_s": total, "steps": result.steps}


def localization_scaling(root: Path, local: str, matches: str, pairs_file: Path, repeat: int = 5) -> list[dict]:
    q, m = Dataset(root / "query"), Dataset(root / "mapping")
    all_pairs = read_pairs(pairs_file)
    gt = Dataset(root / "query_gt").sensors.image_poses()
    out = []
    for k in (1, 3, 5, 8):
        pairs, seen = [], {}
        for p in all_pairs:
            if seen.get(p.query, 0) < k:
                pairs.append(p)
                seen[p.query] = seen.get(p.query, 0) + 1
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            rep = localize_mod.main(q, m, pairs, local, matches, config="config2", name=f"scaling-{k}", num_workers=1,
                                    overwrite=True)  # computed every time, not reused
            times.append(time.perf_counter() - t)
        ev = summarize(pose_errors({r.name: r.pose for r in rep.results if r.success}, gt))
        out.append({"topk": k, "queries_per_s": len(rep.results) / min(times), "within": ev["within"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "localize")
    ap.add_argument("--r2d2", action="store_true", help="also R2D2 (r2d2_WASF_N16, ~15 s per image on CPU)")
    args = ap.parse_args()
    root = prepare(args.shared, args.work)
    settings = [("sift", {"max_keypoints": 8000}, None)]
    if args.r2d2:
        settings.append(("r2d2", {"max_keypoints": 20000}, str(args.shared / "weights" / "r2d2")))
    rows = []
    for local, lconf, weights in settings:
        for globals_ in (["densevlad"],):
            for config in ("config1", "config2"):
                rows.append(run_setting(root, local, lconf, globals_, config, weights, topk=5))
                r = rows[-1]
                print(f"{r['local']:5s} {r['global']:10s} {r['config']}: "
                      + " / ".join(f"{100 * v:.1f}" for v in r["within"])
                      + f"  median {r['median_t']:.3f} m {r['median_R']:.3f} deg  {r['localized']}  "
                        f"pipeline {r['pipeline_s']:.1f} s", flush=True)
    pairs_file = root / "query" / "cbir" / "pairs" / "densevlad_top5.txt"
    for row in localization_scaling(root, "sift", "sift-query", pairs_file):
        print(f"localization (sift, config2, 1 process) top-{row['topk']}: {row['queries_per_s']:.1f} queries/s  "
              + " / ".join(f"{100 * v:.1f}" for v in row["within"]), flush=True)


if __name__ == "__main__":
    main()
