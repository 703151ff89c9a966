"""Retrieval metrics: mAP, precision@k, recall@k, from a ground truth that is a file,
the revisited Oxford/Paris protocol, or the poses of a localization dataset.

Conventions (stated once, as in the papers the numbers are compared with):
* ``recall@k`` is the share of queries with at least one relevant image among their
  first k (the convention of NetVLAD and of visual localization papers);
* ``precision@k`` is the share of relevant images among the first k, averaged over queries;
* AP is the revisited Oxford/Paris ``compute_ap`` (trapezoidal interpolation between
  ranks, divided by the number of relevant images), with junk images removed from the
  ranking before anything is counted; mAP is the mean over queries with >= 1 relevant image.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import CbirError, FormatError
from ..geometry.poses import Pose
from ..io.pairs import Pair
from ..io.textfile import read_utf8, split_lines


@dataclass
class GroundTruth:
    relevant: dict[str, set[str]]
    junk: dict[str, set[str]] = field(default_factory=dict)


def ground_truth_from_labels(labels: dict[str, tuple[str, ...]], queries: list[str],
                             map_names: list[str]) -> GroundTruth:
    """A map image is relevant to a query when they share a label (the hashing survey's
    multi-label relevance; a labels file of formats/SPEC.md 7a). The query itself is not."""
    missing = [n for n in queries if n not in labels]
    if missing:
        raise CbirError(f"{len(missing)} queries have no label, e.g. {missing[0]!r}")
    by_label: dict[str, set[str]] = {}
    for n in map_names:
        for label in labels.get(n, ()):
            by_label.setdefault(label, set()).add(n)
    return GroundTruth({q: set().union(*(by_label.get(label, set()) for label in labels[q])) - {q} for q in queries})


def ground_truth_from_poses(query_poses: dict[str, Pose], map_poses: dict[str, Pose], *,
                            max_distance: float, max_angle_deg: float) -> GroundTruth:
    """A map image is relevant to a query when its camera centre is within ``max_distance``
    of the query's and their optical axes are within ``max_angle_deg``."""
    if not map_poses:
        raise CbirError("the map has no pose: pose-based ground truth needs trajectories.txt")
    mnames = sorted(map_poses)
    mc = np.stack([map_poses[n].center for n in mnames])
    maxis = np.stack([map_poses[n].rotation_matrix[2] for n in mnames])  # optical axis in world coordinates
    cos_max = np.cos(np.radians(max_angle_deg))
    relevant = {}
    for q, pose in query_poses.items():
        close = np.linalg.norm(mc - pose.center, axis=1) <= max_distance
        facing = maxis @ pose.rotation_matrix[2] >= cos_max
        relevant[q] = {mnames[i] for i in np.flatnonzero(close & facing) if mnames[i] != q}
    return GroundTruth(relevant)


def read_ground_truth(path: str | Path) -> GroundTruth:
    """``query_image, map_image[, positive|junk]`` a line (``#`` comments)."""
    path = Path(path)
    text = read_utf8(path, "ground-truth file")
    gt = GroundTruth({}, {})
    for lineno, line in enumerate(split_lines(text), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
            raise FormatError("expected 'query_image, map_image[, positive|junk]'", path, lineno)
        label = fields[2] if len(fields) == 3 else "positive"
        if label not in ("positive", "junk"):
            raise FormatError(f"label must be 'positive' or 'junk', not {label!r}", path, lineno)
        target = gt.relevant if label == "positive" else gt.junk
        target.setdefault(fields[0], set()).add(fields[1])
        gt.relevant.setdefault(fields[0], set())
    return gt


REVISITED_PROTOCOLS = {
    # protocol: (relevant keys, junk keys), as in the revisited Oxford/Paris evaluation code
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def revisited_ground_truth(path: str | Path, protocol: str, query_names: list[str],
                           map_names: list[str]) -> GroundTruth:
    """The ``gnd_r{oxford5k,paris6k}.pkl`` file of the revisited benchmarks (Radenovic et al.
    2018). Its image names have no extension; they are matched to the datasets' names by
    file stem. The file is a pickle: only load one from its official source."""
    if protocol not in REVISITED_PROTOCOLS:
        raise CbirError(f"unknown protocol {protocol!r} (easy, medium, hard)")
    try:
        with open(path, "rb") as f:
            cfg = pickle.load(f)
        imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    except FileNotFoundError:
        raise CbirError("ground-truth file not found", path) from None
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
        raise FormatError(f"not a revisited Oxford/Paris ground truth ({e})", path) from None
    by_stem_map = {PurePosixPath(n).stem: n for n in map_names}
    by_stem_query = {PurePosixPath(n).stem: n for n in query_names}
    pos_keys, junk_keys = REVISITED_PROTOCOLS[protocol]
    gt = GroundTruth({}, {})
    for qname, g in zip(qimlist, gnd, strict=True):
        q = by_stem_query.get(qname)
        if q is None:
            continue
        gt.relevant[q] = {by_stem_map[imlist[i]] for k in pos_keys for i in g.get(k, []) if imlist[i] in by_stem_map}
        gt.junk[q] = {by_stem_map[imlist[i]] for k in junk_keys for i in g.get(k, []) if imlist[i] in by_stem_map}
    return gt


def average_precision(ranks: np.ndarray, n_relevant: int) -> float:
    """AP from the 0-based ranks of the relevant images (junk removed), trapezoidal."""
    if n_relevant == 0:
        return float("nan")
    ap, recall_step = 0.0, 1.0 / n_relevant
    for j, r in enumerate(np.sort(ranks)):
        precision_0 = 1.0 if r == 0 else j / r
        precision_1 = (j + 1) / (r + 1)
        ap += (precision_0 + precision_1) * recall_step / 2
    return ap


def evaluate_rankings(pairs: list[Pair], gt: GroundTruth, ks: tuple[int, ...] = (1, 5, 10, 20)) -> dict:
    """Metrics of the ranked lists of a pairs file (pairs of one query in rank order)."""
    ranked: dict[str, list[str]] = {}
    for p in pairs:
        ranked.setdefault(p.query, []).append(p.map)
    queries = [q for q in gt.relevant if q in ranked]
    if not queries:  # metrics of no query are no result: the pairs and the ground truth do not belong together
        first = next(iter(ranked), None)
        raise CbirError(f"none of the {len(ranked)} queries of the pairs has a ground truth (first: {first}; the "
                        f"ground truth has {len(gt.relevant)} queries): check the pairs file and the ground truth"
                        if ranked else "no pair to evaluate")
    missing = sorted(q for q in gt.relevant if q not in ranked)
    aps: list[float] = []
    hits: dict[int, list[float]] = {k: [] for k in ks}
    precisions: dict[int, list[float]] = {k: [] for k in ks}
    for q in queries:
        junk = gt.junk.get(q, set())
        ranking = [m for m in ranked[q] if m not in junk]
        rel = gt.relevant[q]
        is_rel = np.array([m in rel for m in ranking], bool)
        if rel:
            aps.append(average_precision(np.flatnonzero(is_rel), len(rel)))
        for k in ks:
            hits[k].append(bool(is_rel[:k].any()))
            precisions[k].append(float(is_rel[:k].sum()) / k)
    with_relevant = [q for q in queries if gt.relevant[q]]
    if not with_relevant:
        raise CbirError(f"none of the {len(queries)} evaluated queries has a relevant map image in the ground "
                        "truth: every metric would be undefined (pose-based: widen --max-distance or --max-angle)")
    return {
        "queries": len(queries),
        "queries_with_relevant": len(with_relevant),
        "queries_without_pairs": missing,
        "queries_without_ground_truth": sorted(q for q in ranked if q not in gt.relevant),
        # what bounds the metrics: AP counts every relevant map image, a list ranks only so many
        "ranked_per_query_max": max(len(ranked[q]) for q in queries),
        "relevant_per_query_mean": float(np.mean([len(gt.relevant[q]) for q in with_relevant])),
        "mAP": float(np.mean(aps)) if aps else float("nan"),
        "recall@k": {k: float(np.mean([h for h, q in zip(hits[k], queries, strict=True) if gt.relevant[q]]))
                     if with_relevant else float("nan") for k in ks},
        "precision@k": {k: float(np.mean(precisions[k])) if queries else float("nan") for k in ks},
    }
