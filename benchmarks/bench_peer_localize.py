"""Mapping and localization, cbir against kapture-localization's pipeline (the peer the paper
released), on the same features, pairs and data, in one script.

The peer runs as its users run it: kapture_pipeline_mapping.py (its own matching, COLMAP
geometric verification, COLMAP point_triangulator) then kapture_pipeline_localize.py
(matching, verification, COLMAP image_registrator), config 1, with the COLMAP binary of
Debian's ``colmap`` package. Both sides get the SIFT features and DenseVLAD pairs that
``benchmarks/bench_localize.py`` made (exported with ``cbir export kapture``), mutual
nearest-neighbour matching without ratio test on both sides.

Set-up of the peer (a separate environment: it needs numpy < 1.24):
    apt-get install colmap
    python -m venv /tmp/klvenv && /tmp/klvenv/bin/pip install --no-deps kapture-localization==1.1.10
    /tmp/klvenv/bin/pip install kapture==1.1.12 numpy==1.23.5 numpy-quaternion==2022.4.3 \\
        "opencv-python-headless<4.9" tabulate tqdm torch==2.13.0
    # kapture 1.1.12 installs its tools without .py; the peer calls kapture_merge.py etc.:
    for f in /tmp/klvenv/lib/python3.11/site-packages/tools/kapture_*.py; do ln -s $f /tmp/klvenv/bin/; done

    python benchmarks/bench_peer_localize.py --peer-venv /tmp/klvenv
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).parent / "_work" / "localize" / "sceaux_castle",
                    help="made by bench_localize.py (SIFT and DenseVLAD stores, pairs)")
    ap.add_argument("--peer-venv", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "peer")
    args = ap.parse_args()
    m, q = Dataset(args.data / "mapping"), Dataset(args.data / "query")
    map_pairs = args.data / "mapping" / "cbir" / "pairs" / "densevlad_map.txt"
    query_pairs = args.data / "query" / "cbir" / "pairs" / "densevlad_top5.txt"
    work = args.work
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
    env = {**os.environ, "PATH": f"{args.peer_venv / 'bin'}:{os.environ['PATH']}", "QT_QPA_PLATFORM": "offscreen"}
    py = str(args.peer_venv / "bin" / "python")
    common = ["-kpt", str(feats / "keypoints"), "-desc", str(feats / "descriptors"), "-matches", str(work / "matches"),
              "-matches-gv", str(work / "matches_gv"), "--colmap-map", str(work / "colmap-map"), "-colmap", "colmap",
              "--auto-python-binary", "--config", "1", "--keypoints-type", "sift", "--descriptors-type", "sift"]
    t_peer_map = run([py, str(args.peer_venv / "bin" / "kapture_pipeline_mapping.py"), "-i", str(work / "mapping"),
                      "--pairsfile-path", str(map_pairs), *common], env, work / "peer_mapping.log")
    t_peer_loc = run([py, str(args.peer_venv / "bin" / "kapture_pipeline_localize.py"), "-i", str(work / "mapping"),
                      "--query", str(work / "query"), "--pairsfile-path", str(query_pairs), "-o", str(work / "loc"),
                      "-s", "evaluate", "export_LTVL2020", *common], env, work / "peer_localize.log")
    traj = read_trajectories(work / "loc" / "kapture_localized_recover" / "sensors" / "trajectories.txt")
    peer_poses = {r.name: traj[(r.timestamp, r.camera_id)] for r in q.sensors.records
                  if (r.timestamp, r.camera_id) in traj}
    peer_ev = evaluate(peer_poses, args.data / "query_gt")

    # cbir, the same steps in process: matching + verification + triangulation, then the same for queries
    matcher, verify = MatcherConf(), VerifyConf()
    t = time.perf_counter()
    match_mod.main(m, m, read_pairs(map_pairs), "sift", name="peer-cmp-map", matcher=matcher, verify=verify,
                   overwrite=True)
    mapping.main(m, "sift", "peer-cmp-map", name="peer-cmp", overwrite=True)  # computed, never reused
    t_map = time.perf_counter() - t
    t = time.perf_counter()
    qpairs = read_pairs(query_pairs)
    match_mod.main(q, m, qpairs, "sift", name="peer-cmp-query", matcher=matcher, verify=verify, overwrite=True)
    rep = localize_mod.main(q, m, qpairs, "sift", "peer-cmp-query", map_name="peer-cmp", config="config1",
                            name="peer-cmp", overwrite=True)
    t_loc = time.perf_counter() - t
    ours_ev = evaluate({r.name: r.pose for r in rep.results if r.success}, args.data / "query_gt")
    for label, tm, tl, ev in (("kapture-localization", t_peer_map, t_peer_loc, peer_ev),
                              ("cbir", t_map, t_loc, ours_ev)):
        print(f"{label:20s} mapping {tm:6.1f} s  localization {tl:6.1f} s  "
              + " / ".join(f"{100 * v:.1f}" for v in ev["within"])
              + f"  median {ev['median_translation']:.3f} m {ev['median_rotation_deg']:.3f} deg", flush=True)
    print(f"speed-up: mapping x{t_peer_map / t_map:.1f}, localization x{t_peer_loc / t_loc:.1f}, "
          f"end to end x{(t_peer_map + t_peer_loc) / (t_map + t_loc):.1f}")


if __name__ == "__main__":
    main()
