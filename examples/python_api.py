"""The steps of `cbir pipeline`, called from Python, on the README example's datasets.

    python examples/python_api.py examples/_out/scene     # after bash examples/quickstart.sh

Each step is one function of the library, the one its command calls: it takes datasets
(`Dataset`), store names and configuration objects, writes its output into the datasets as
the command does (stores resume and are reused when they were made the same way), and
returns a report. The map's SIFT and DenseVLAD stores of the example's pipeline are reused;
the matches, the map and the localization are written under the name `api`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cbir import localize, mapping
from cbir.evaluation.localization import pose_errors, summarize
from cbir.extract import build_extractor, extract_all
from cbir.io.dataset import Dataset
from cbir.io.pairs import exhaustive_pairs, write_pairs
from cbir.io.store import open_store
from cbir.matching import match
from cbir.matching.nearest_neighbor import MatcherConf
from cbir.matching.verify import VerifyConf
from cbir.retrieval.search import RetrievalConf, open_descriptor_sets, retrieve


def run(scene: Path) -> dict:
    """Localize the example's queries step by step; the accuracy, as `cbir evaluate` gives it."""
    db, query, gt = (Dataset(scene / name) for name in ("mapping", "query", "query_gt"))

    # 1. features: SIFT of both datasets; DenseVLAD learns its vocabulary and PCA on the map,
    #    and the queries are described with the map's model
    sift = build_extractor("sift", {"max_keypoints": 4000})
    extract_all([sift, build_extractor("densevlad", {"learn": True}, "global")], db)
    model = db.root / "cbir" / "global" / "densevlad.model.h5"
    extract_all([sift, build_extractor("densevlad", {"model": str(model)}, "global")], query)

    # 2. retrieval: the 5 most similar map images of each query (exact search)
    with open_descriptor_sets(query, db, ["densevlad"]) as (q, m):
        pairs = retrieve(q, m, RetrievalConf(topk=5))
    write_pairs(query.root / "cbir" / "pairs" / "api.txt", pairs)  # kapture-localization's layout

    # 3. matching: every map pair, verified against the map's known poses; the query pairs by RANSAC
    matcher = MatcherConf(ratio=0.8)
    match.main(db, db, exhaustive_pairs(db.sensors.image_names()), "sift", name="api", matcher=matcher,
               verify=VerifyConf(method="poses"))
    report = match.main(query, db, pairs, "sift", name="api", matcher=matcher, verify=VerifyConf(method="ransac"))
    with open_store(report.path) as store:  # a matches store, read back: one pair's verified matches
        pair = store.get((pairs[0].query, pairs[0].map))
        print(f"{pairs[0].query} x {pairs[0].map}: {int(pair['inliers'].sum())} of {len(pair['matches'])} "
              "matches verified")

    # 4. the map's 3D points, triangulated from its known poses; then each query's pose
    points = mapping.main(db, "sift", "api", name="api")
    print(f"map: {points.points} points, mean track length {points.mean_track_length:.2f}")
    result = localize.main(query, db, pairs, "sift", "api", map_name="api", config="config1", name="api")
    print(f"{result.localized}/{len(result.results)} queries localized -> {result.directory}")

    # 5. accuracy against the ground truth, at the paper's thresholds
    truth = gt.sensors.image_poses()
    errors = pose_errors({r.name: r.pose for r in result.results if r.success},
                         {r.name: truth[r.name] for r in result.results if r.name in truth})
    return summarize(errors)


if __name__ == "__main__":
    accuracy = run(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/_out/scene"))
    print("within (0.25 m, 2°), (0.5 m, 5°), (5 m, 10°):", ", ".join(f"{100 * w:.0f}%" for w in accuracy["within"]))
