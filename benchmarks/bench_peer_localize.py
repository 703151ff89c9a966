"""Mapping and localization, cbir against kapture-localization's pipeline (the peer the paper
released), on the same features, pairs and data, in one script.

The peer runs as its users run it: kapture_pipeline_mapping.py (its own matching, COLMAP
geometric verification, COLMAP point_triangulator) then kapture_pipeline_localize.py
(matching, verification, COLMAP image_registrator), config 1, with the COLMAP binary of
Debian's ``colmap`` package. Both sides get the same SIFT features (8k) and pairs (every
map x map pair, DenseVLAD top-5 for the queries: ``benchmarks/datasets.py``; exported with
``cbir export kapture`` for the peer), mutual nearest-neighbour matching without ratio test on
both sides. cbir runs twice: map pairs verified by RANSAC as the peer does, and with their
known poses (``--verify poses``, the pipeline's default); its time is split by phase.

Set-up of the peer (a separate environment: it needs numpy < 1.24):
    apt-get install colmap
    python -m venv /tmp/klvenv && /tmp/klvenv/bin/pip install --no-deps kapture-localization==1.1.10
    /tmp/klvenv/bin/pip install kapture==1.1.12 numpy==1.23.5 numpy-quaternion==2022.4.3 \\
        "opencv-python-headless<4.9" tabulate tqdm torch==2.13.0
    # kapture 1.1.12 installs its tools without .py; the peer calls kapture_merge.py etc.:
    for f in /tmp/klvenv/lib/python3.11/site-packages/tools/kapture_*.py; do ln -s $f /tmp/klvenv/bin/; done

    python benchmarks/bench_peer_localize.py --peer-venv /tmp/klvenv [--datasets sceaux_castle ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets

from cbir import localize as localize_mod
from cbir import mapping
from cbir.evaluation.localization import pose_errors, summarize
from cbir.io.dataset import Dataset
from cbir.io.kapture_text import read_trajectories
from cbir.io.pairs import read_pairs
from cbir.matching import MatcherConf, VerifyConf
from cbir.matching import match as match_mod


def run(cmd: list[str], env: dict, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def evaluate(estimated: dict, gt_root: Path) -> dict:
    gt = Dataset(gt_root).sensors.image_poses()
    return summarize(pose_errors(estimated, gt))


def cbir_side(m: Dataset, q: Dataset, map_pairs: Path, query_pairs: Path, method: str, gt: Path) -> dict:
    """cbir's same steps in process, timed by phase: map matching + verification (``method``)
    + triangulation, then query matching + RANSAC verification + pose estimation."""
    matcher = MatcherConf()
    t = time.perf_counter()
    mm = match_mod.main(m, m, read_pairs(map_pairs), "sift", name=f"peer-cmp-map-{method}", matcher=matcher,
                        verify=VerifyConf(method=method), overwrite=True)
    mr = mapping.main(m, "sift", f"peer-cmp-map-{method}", name=f"peer-cmp-{method}", overwrite=True)
    t_map = time.perf_counter() - t
    t = time.perf_counter()
    qpairs = read_pairs(query_pairs)
    qm = match_mod.main(q, m, qpairs, "sift", name="peer-cmp-query", matcher=matcher, verify=VerifyConf(),
                        overwrite=True)
    rep = localize_mod.main(q, m, qpairs, "sift", "peer-cmp-query", map_name=f"peer-cmp-{method}", config="config1",
                            name=f"peer-cmp-{method}", overwrite=True)  # computed every time, never reused
    t_loc = time.perf_counter() - t
    profile = {"map: features": mm.seconds["features"], "map: matching": mm.seconds["matching"],
               "map: verification": mm.seconds["verification"], "map: writing matches": mm.seconds["writing"],
               "map: COLMAP database": mr.seconds["database"], "map: triangulation": mr.seconds["triangulation"],
               "query: features": qm.seconds["features"], "query: matching": qm.seconds["matching"],
               "query: verification": qm.seconds["verification"], "query: writing matches": qm.seconds["writing"],
               "query: 2D-3D": rep.seconds["correspondences"], "query: pose (PnP)": rep.seconds["pose"]}
    profile["other (Python, I/O)"] = t_map + t_loc - sum(profile.values())
    return {"map": t_map, "loc": t_loc, "points": mr.points,
            "ev": evaluate({r.name: r.pose for r in rep.results if r.success}, gt), "profile": profile}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--datasets", nargs="+", default=["sceaux_castle", "strecha_fountain_p11"],
                    choices=datasets.DATASETS)
    ap.add_argument("--peer-venv", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "peer")
    args = ap.parse_args()
    for name in args.datasets:
        root = datasets.working_copy(args.shared, args.work / "data", name)
        m, q, map_pairs, query_pairs = datasets.prepare(root)
        peer = peer_side(m, q, map_pairs, query_pairs, args.peer_venv, args.work / "peer" / name, root / "query_gt")
        rows = {"kapture-localization": peer}
        for method in ("ransac", "poses"):
            rows[f"cbir --verify {method}"] = cbir_side(m, q, map_pairs, query_pairs, method, root / "query_gt")
        print(f"== {name}: {len(read_pairs(map_pairs))} map pairs, {len(read_pairs(query_pairs))} query pairs")
        for label, r in rows.items():
            ev = r["ev"]
            speed = "" if r is peer else (f"  x{peer['map'] / r['map']:.1f} mapping, x{peer['loc'] / r['loc']:.1f} "
                                          f"localization, x{(peer['map'] + peer['loc']) / (r['map'] + r['loc']):.1f} "
                                          "end to end")
            print(f"{label:22s} mapping {r['map']:6.1f} s  localization {r['loc']:6.1f} s  "
                  + " / ".join(f"{100 * v:.1f}" for v in ev["within"])
                  + f"  median {ev['median_translation']:.3f} m {ev['median_rotation_deg']:.3f} deg" + speed,
                  flush=True)
        profile = rows["cbir --verify poses"]["profile"]
        total = sum(profile.values())
        print("cbir --verify poses, where the time goes: " +
              ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in profile.items()), flush=True)


def peer_side(m: Dataset, q: Dataset, map_pairs: Path, query_pairs: Path, venv: Path, work: Path, gt: Path) -> dict:
    """kapture-localization's mapping and localization pipelines on the same features and pairs."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cbir = [sys.executable, "-m", "cbir", "-q"]
    for name, ds in (("mapping", m), ("query", q)):
        subprocess.run(cbir + ["export", "kapture", str(ds.root), str(work / name), "--local", "sift",
                               "--global", "densevlad"], check=True)
    feats = work / "features"  # the peer reads map and query features from one folder
    for kind, ext in (("keypoints", "kpt"), ("descriptors", "desc")):
        shutil.copytree(work / "mapping" / "reconstruction" / kind / "sift", feats / kind)
        for f in (work / "query" / "reconstruction" / kind / "sift").glob(f"*.{ext}"):
            shutil.copy(f, feats / kind)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "QT_QPA_PLATFORM": "offscreen"}
    py = str(venv / "bin" / "python")
    common = ["-kpt", str(feats / "keypoints"), "-desc", str(feats / "descriptors"), "-matches", str(work / "matches"),
              "-matches-gv", str(work / "matches_gv"), "--colmap-map", str(work / "colmap-map"), "-colmap", "colmap",
              "--auto-python-binary", "--config", "1", "--keypoints-type", "sift", "--descriptors-type", "sift"]
    t_map = run([py, str(venv / "bin" / "kapture_pipeline_mapping.py"), "-i", str(work / "mapping"),
                 "--pairsfile-path", str(map_pairs), *common], env, work / "peer_mapping.log")
    t_loc = run([py, str(venv / "bin" / "kapture_pipeline_localize.py"), "-i", str(work / "mapping"),
                 "--query", str(work / "query"), "--pairsfile-path", str(query_pairs), "-o", str(work / "loc"),
                 "-s", "evaluate", "export_LTVL2020", *common], env, work / "peer_localize.log")
    traj = read_trajectories(work / "loc" / "kapture_localized_recover" / "sensors" / "trajectories.txt")
    poses = {r.name: traj[(r.timestamp, r.camera_id)] for r in q.sensors.records if (r.timestamp, r.camera_id) in traj}
    return {"map": t_map, "loc": t_loc, "ev": evaluate(poses, gt)}


if __name__ == "__main__":
    main()
