"""Localize query images against a triangulated map (``cbir localize``).

For each query: its retrieved map images (pairs file), the query x map matches (verified
inliers when the store has them), 2D-3D correspondences through the map keypoints that
have a 3D point, then pycolmap's absolute pose (P3P in LO-RANSAC, then non-linear
refinement) with the paper's config1/2/3 (``cbir.geometry.colmap_options``).

Correspondence rule (conflicts): a (query keypoint, 3D point) pair gets one vote per map
image that supports it; each query keypoint keeps its most-voted 3D point and each 3D
point its most-voted query keypoint (ties: the lower index), so the solver sees every
3D point and every query keypoint at most once. Map images with fewer than
``min_num_matches`` matches are ignored, as COLMAP's registrator does.

Queries run in parallel processes; a query that fails (no retrieved image, no match, too
few inliers, degenerate geometry) is reported with its reason and never stops the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from .cores import pool_size
from .errors import CbirError, FormatError
from .geometry.cameras import CAMERA_MODELS, Camera
from .geometry.colmap_options import paper_config, set_dotted
from .geometry.poses import Pose, rotmat_to_qvec, validate_pose
from .io.atomic import atomic_output
from .io.colmap import COLMAP_PIXEL_OFFSET
from .io.dataset import Dataset, check_store_name
from .io.images import exif_focal_px
from .io.kapture_text import format_trajectories
from .io.map_store import read_map
from .io.pairs import Pair, pairs_digest, read_pairs_record
from .io.paths import check_relative_name
from .io.provenance import differences, digest
from .io.store import check_match_indices, check_matches_provenance, open_store
from .io.textfile import parse_json, read_json_object, read_utf8
from .validate import check_bool, check_integer


@dataclass
class QueryResult:
    name: str
    success: bool = False
    method: str = ""  # how the pose was obtained: pnp, rig, sequence
    reason: str = ""  # why it failed, or what the post-processing used
    num_map_images: int = 0
    num_2d3d: int = 0
    num_inliers: int = 0
    qvec: tuple[float, ...] | None = None  # world-to-camera, kapture order
    tvec: tuple[float, ...] | None = None
    camera: tuple | None = None  # (model, width, height, params) used / refined

    @property
    def pose(self) -> Pose | None:
        if self.qvec is None or self.tvec is None:
            return None
        qw, qx, qy, qz = self.qvec
        tx, ty, tz = self.tvec
        return Pose((qw, qx, qy, qz), (tx, ty, tz))


@dataclass(frozen=True)
class PostprocessConf:
    """Poses for the queries that fail: from a localized camera of their rig (``rig``,
    partners up to ``rig_max_gap`` apart in time), then interpolated within their sequence
    (``sequence``; a larger timestamp gap than ``sequence_max_gap`` starts a new one)."""

    rig: bool = False
    rig_max_gap: int = 0
    sequence: bool = False
    sequence_max_gap: int = 1

    def __post_init__(self) -> None:
        check_bool("rig", self.rig)
        check_bool("sequence", self.sequence)
        check_integer("rig_max_gap", self.rig_max_gap, 0)
        check_integer("sequence_max_gap", self.sequence_max_gap, 0)


#: what made a localization result (configuration and inputs), beside its poses
RECORD_FILE = "run.json"


@dataclass
class LocalizeReport:
    directory: Path
    results: list[QueryResult] = field(default_factory=list)
    status: str = "new"  # new, reused (same configuration and inputs), redone (inputs changed), replaced
    seconds: dict[str, float] = field(default_factory=dict)  # 2D-3D correspondences, pose estimation
    #: pairs of the pairs file left out, by why: ``foreign`` (an image not of the datasets),
    #: ``unmatched`` (not in the matches store)
    skipped_pairs: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def localized(self) -> int:
        return sum(r.success for r in self.results)


def query_camera(cam: Camera | None, width: int, height: int, image_path: Path | None) -> tuple[Camera, bool]:
    """The query's camera and whether its focal length is known. Unknown intrinsics: the
    EXIF focal length when the image has one, else COLMAP's prior 1.2 x max(w, h)."""
    if cam is not None and cam.model in CAMERA_MODELS:
        return cam, True
    f = exif_focal_px(image_path, width, height) if image_path else None
    known = f is not None
    f = f or 1.2 * max(width, height)
    return Camera("SIMPLE_RADIAL", width, height, (f, width / 2, height / 2, 0.0)), known


def correspondences(match_lists: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Unique (query keypoint, 3D point) pairs from per-map-image (query kp, point) lists,
    by the voting rule of the module docstring."""
    if not match_lists:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q = np.concatenate([m[0] for m in match_lists])
    p = np.concatenate([m[1] for m in match_lists])
    if len(q) == 0:
        return q, p
    pairs, votes = np.unique(np.stack([q, p], 1), axis=0, return_counts=True)
    # best point per query keypoint: sort by (keypoint, -votes, point), keep first
    order = np.lexsort((pairs[:, 1], -votes, pairs[:, 0]))
    pairs, votes = pairs[order], votes[order]
    first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
    pairs, votes = pairs[first], votes[first]
    # best query keypoint per point
    order = np.lexsort((pairs[:, 0], -votes, pairs[:, 1]))
    pairs = pairs[order]
    first = np.r_[True, pairs[1:, 1] != pairs[:-1, 1]]
    pairs = pairs[first]
    return pairs[:, 0], pairs[:, 1]


def estimate_one(task: dict[str, Any]) -> QueryResult:
    """One query's pose (runs in a worker process)."""
    res = QueryResult(task["name"], num_map_images=task["num_map_images"], num_2d3d=len(task["points2D"]))
    conf = task["conf"]
    if res.num_2d3d < 3:
        res.reason = f"{res.num_2d3d} 2D-3D correspondences (3 needed)" if task["num_map_images"] else \
            task.get("reason", "no retrieved map image")
        return res
    model, w, h, params = task["camera"]
    camera = pycolmap.Camera(model=model, width=w, height=h, params=list(params))
    est = pycolmap.AbsolutePoseEstimationOptions()
    est.ransac.max_error = conf["abs_pose_max_error"]
    est.ransac.min_inlier_ratio = conf["abs_pose_min_inlier_ratio"]
    est.ransac.random_seed = 0
    ref = pycolmap.AbsolutePoseRefinementOptions()
    ref.refine_focal_length = bool(conf["ba_refine_focal_length"]) or not task["focal_known"] and task["refine_unknown"]
    ref.refine_extra_params = bool(conf["ba_refine_extra_params"])
    ref.max_num_iterations = int(conf["ba_local_max_num_iterations"])
    set_dotted(est, task["estimation_overrides"])
    set_dotted(ref, task["refinement_overrides"])
    try:
        out = pycolmap.estimate_and_refine_absolute_pose(task["points2D"], task["points3D"], camera, est, ref)
    except (ValueError, RuntimeError) as e:
        res.reason = f"pose estimation failed: {e}"
        return res
    if out is None:
        res.reason = "RANSAC found no pose (degenerate or too few consistent correspondences)"
        return res
    pose = out["cam_from_world"]
    # inliers after refinement, within filter_max_reproj_error (COLMAP's observation filter)
    mask = np.asarray(out["inlier_mask"], bool)
    proj = camera.img_from_cam(pose * task["points3D"][mask])  # camera is refined in place
    err = np.linalg.norm(proj - task["points2D"][mask], axis=1)
    res.num_inliers = int((err <= conf["filter_max_reproj_error"]).sum())
    if res.num_inliers < conf["abs_pose_min_num_inliers"]:
        res.reason = f"{res.num_inliers} inliers (< {conf['abs_pose_min_num_inliers']})"
        return res
    R = pose.rotation.matrix()
    res.success, res.method = True, "pnp"
    res.qvec = tuple(float(v) for v in rotmat_to_qvec(R))
    res.tvec = tuple(float(v) for v in pose.translation)
    res.camera = (camera.model.name, int(camera.width), int(camera.height), tuple(float(v) for v in camera.params))
    return res


def localization_options(config: str, overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The paper config with its overrides, and the pycolmap estimation / refinement options
    (``estimation.X``, ``refinement.X``), checked: unknown keys and bad values are refused."""
    conf = paper_config(config, overrides)
    est_over = {k.removeprefix("estimation."): v for k, v in overrides.items() if k.startswith("estimation.")}
    ref_over = {k.removeprefix("refinement."): v for k, v in overrides.items() if k.startswith("refinement.")}
    unknown = set(overrides) - set(conf) - {f"estimation.{k}" for k in est_over} - {f"refinement.{k}" for k in ref_over}
    if unknown:
        raise CbirError(f"unknown localization option(s) {sorted(unknown)} (paper options: {', '.join(conf)}; "
                        "pycolmap options as estimation.X or refinement.X)")
    set_dotted(pycolmap.AbsolutePoseEstimationOptions(), est_over)  # bad values fail now, not in a worker
    set_dotted(pycolmap.AbsolutePoseRefinementOptions(), ref_over)
    return conf, est_over, ref_over


def localization_config(local: str, matches: str, map_name: str, config: str, overrides: dict[str, Any],
                        use_unverified: bool, refine_unknown_focal: bool, post: PostprocessConf,
                        pairs: dict[str, Any]) -> dict[str, Any]:
    """The configuration a localization result records (``run.json``); ``pairs`` names the
    pairs file and the retrieval that made it (its ``# cbir:`` record), when known."""
    return {"local_features": local, "matches": matches, "map": map_name, "config": config, "overrides": overrides,
            "use_unverified": use_unverified, "refine_unknown_focal": refine_unknown_focal,
            "postprocess": asdict(post), "pairs": pairs}


def pairs_source(path: str | Path, query: Dataset) -> dict[str, Any]:
    """How a localization names its pairs file: the path (relative to the query dataset
    when inside it, so that moving the dataset keeps it) and the retrieval record it holds."""
    if str(path) == "-":
        return {"file": "-", "retrieval": None}
    resolved = Path(path).resolve()
    try:
        name = resolved.relative_to(query.root.resolve()).as_posix()
    except ValueError:
        name = str(resolved)
    record = read_pairs_record(resolved)
    return {"file": name, "retrieval": record.get("config") if record else None}


def main(query: Dataset, map_: Dataset, pairs: list[Pair], local: str, matches: str, *, map_name: str | None = None,
         config: str = "config2", overrides: dict[str, Any] | None = None, name: str | None = None,
         num_workers: int = 2, use_unverified: bool = False, refine_unknown_focal: bool = True,
         post: PostprocessConf = PostprocessConf(), pairs_source: dict[str, Any] | None = None,
         overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
         estimate: Callable[..., tuple[list[QueryResult], dict[str, float]]] | None = None) -> LocalizeReport:
    """Localize every query image of ``pairs`` (then post-process the failures as ``post``
    says); results in ``QUERY/cbir/localization/<name>/``.

    The result records its configuration and inputs (``run.json``): a result of the same
    configuration made from the same inputs is reused, one made from changed inputs is
    redone, one of another configuration is replaced only with ``overwrite``.
    ``pairs_source``: where the pairs come from (file, retrieval record), part of the
    configuration. ``estimate`` is an executor's pose estimation step
    (:func:`cbir.steps.localize.estimator`; default: in this process, on ``num_workers``
    processes): it makes the tasks of the queries from ``source`` (a :class:`TaskSource`),
    or from the map opened here, and estimates their poses, in order."""
    overrides = dict(overrides or {})
    conf, est_over, ref_over = localization_options(config, overrides)
    name = name or f"{local}-{config}"
    check_store_name(name)  # it names QUERY/cbir/localization/<name>/
    directory = query.root / "cbir" / "localization" / name
    map_path = map_.store_path("map", map_name or local)
    point_map = read_map(map_path)
    record_config = localization_config(local, matches, map_name or local, config, overrides, use_unverified,
                                        refine_unknown_focal, post, pairs_source or {})
    with open_store(query.store_path("matches", matches), "matches") as mstore, \
            open_store(query.store_path("local", local), "local-features") as qfeats:
        check_matches_provenance(mstore, local, qfeats)
        if point_map.local_features not in ("", local, qfeats.config.get("keypoints_type")):
            raise CbirError(f"the map was triangulated from the local features {point_map.local_features!r}, "
                            f"not {local!r}: pass --local {point_map.local_features}", map_path)
        skipped, warnings = screen_pairs(pairs, query, map_, mstore, local, pairs_source or {})
        inputs = {"pairs": pairs_digest(pairs), "map": digest(point_map.config), "matches": mstore.fingerprint(),
                  "local": qfeats.fingerprint()}
        status = _prior_result(directory, record_config, inputs, overwrite)
        if status == "reused":
            return LocalizeReport(directory, read_results(directory), status, skipped_pairs=skipped, warnings=warnings)
        source = TaskSource(str(query.root), str(map_path), str(mstore.path), str(qfeats.path), local, conf, est_over,
                            ref_over, refine_unknown_focal, use_unverified)
        by_query: dict[str, list[str]] = {}
        for p in pairs:
            by_query.setdefault(p.query, []).append(p.map)
        # every image of the query dataset (one without pairs fails as "no retrieved map image");
        # names of the pairs file that are not among them were counted by screen_pairs
        queries = sorted(query.sensors.image_names())
        if estimate is None:
            from .executor import LocalExecutor

            estimate = LocalExecutor().pose_estimator()
        results, seconds = estimate(source, queries, by_query, progress,
                                    opened=lambda: TaskMaker(source, point_map, mstore, qfeats),
                                    num_workers=num_workers)
    report = LocalizeReport(directory, _postprocess(results, query, post), status, seconds, skipped, warnings)
    write_results(report, query, {"config": record_config, "inputs": inputs,
                                  "seconds": {k: round(v, 3) for k, v in report.seconds.items()}})
    return report


def screen_pairs(pairs: list[Pair], query: Dataset, map_: Dataset, mstore: Any, local: str,
                 source: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """Check that the pairs belong to the datasets and were matched: refuse pairs of which none
    can be used (another dataset's, query and map swapped, another pairs file's matches), and
    count (with a warning) those left out when some can."""
    file = source.get("file")
    where = None if not file else "<stdin>" if file == "-" else file if Path(file).is_absolute() else query.root / file
    if not pairs:
        raise CbirError("no pair: nothing to localize", where)
    qnames, mnames = set(query.sensors.image_names()), set(map_.sensors.image_names())
    foreign = [p for p in pairs if p.query not in qnames or p.map not in mnames]
    if len(foreign) == len(pairs):
        p = foreign[0]
        why = f"{p.query} is not an image of {query.root}" if p.query not in qnames else \
            f"{p.map} is not an image of {map_.root}"
        raise CbirError(f"none of the {len(pairs)} pairs names a query image and a map image of the datasets "
                        f"(first: {p.query} {p.map}: {why}): check --query, --map and --pairs", where)
    unmatched = [p for p in pairs if p.query in qnames and p.map in mnames and (p.query, p.map) not in mstore]
    usable = len(pairs) - len(foreign)
    if len(unmatched) == usable:
        raise CbirError(f"holds none of the {usable} pairs to localize (first: {unmatched[0].query} "
                        f"{unmatched[0].map}): match them first (cbir match --query {query.root} --map "
                        f"{map_.root} --pairs {where or 'PAIRS'} --local {local} --verify), or pass the pairs file "
                        "the store was matched from", mstore.path)
    warnings = []
    if foreign:
        warnings.append(f"{len(foreign)} of {len(pairs)} pairs name an image that is not of the datasets "
                        f"(first: {foreign[0].query} {foreign[0].map}): left out")
    if unmatched:
        warnings.append(f"{len(unmatched)} of {usable} pairs are not in the matches store {mstore.path} (first: "
                        f"{unmatched[0].query} {unmatched[0].map}; matched from another pairs file?): the queries "
                        f"use the {usable - len(unmatched)} matched pairs")
    return {"foreign": len(foreign), "unmatched": len(unmatched)}, warnings


def estimate_locally(tasks: list, num_workers: int, progress: Callable[[int, int], None] | None) -> list[QueryResult]:
    """The poses of the queries' tasks, in order, on ``num_workers`` processes of this machine."""
    results: list[QueryResult] = []
    num_workers = pool_size(num_workers, len(tasks))
    if num_workers > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            for r in pool.map(estimate_one, tasks, chunksize=max(1, len(tasks) // (4 * num_workers))):
                results.append(r)
                if progress:
                    progress(1, len(tasks))
    else:
        for t in tasks:
            results.append(estimate_one(t))
            if progress:
                progress(1, len(tasks))
    return results


def _prior_result(directory: Path, config: dict[str, Any], inputs: dict[str, Any], overwrite: bool) -> str:
    """What to do with what ``directory`` holds: ``new`` (nothing), ``reused``, ``redone``
    (same configuration, changed inputs) or ``replaced`` (``overwrite``); a result of another
    configuration, or one without a record, is refused without ``overwrite``."""
    if not (directory / "report.json").exists() and not (directory / RECORD_FILE).exists():
        return "new"
    if overwrite:
        return "replaced"
    if not (directory / RECORD_FILE).exists():
        raise CbirError(f"holds a localization result without a record of its configuration ({RECORD_FILE}, "
                        "written by an earlier cbir): pass --overwrite to replace it, or --name to keep both",
                        directory)
    try:
        record = read_json_object(directory / RECORD_FILE, RECORD_FILE)
        found, found_inputs = record.get("config"), record.get("inputs")  # "seconds": what it took, not compared
        if not isinstance(found, dict) or not isinstance(found_inputs, dict):
            raise FormatError("no 'config' and 'inputs' objects", directory / RECORD_FILE)
    except CbirError as e:
        raise CbirError(f"unreadable {RECORD_FILE} ({e.message}): pass --overwrite to replace the result, or --name "
                        "to keep both", directory) from None
    diffs = differences(found, config)
    if diffs:
        raise CbirError(f"holds a localization of another configuration ({'; '.join(diffs)}): pass --overwrite "
                        "to replace it, or --name to keep both", directory)
    if found_inputs == inputs and (directory / "report.json").exists():
        return "reused"
    return "redone"


@dataclass(frozen=True)
class TaskSource:
    """What the queries' tasks are made from, by path: any process (a Ray actor, say) opens it
    once with :class:`TaskMaker` and makes the tasks of the queries it is given."""

    query_root: str
    map_path: str
    matches_path: str
    local_path: str
    local: str
    conf: dict[str, Any]
    estimation_overrides: dict[str, Any]
    refinement_overrides: dict[str, Any]
    refine_unknown_focal: bool
    use_unverified: bool


class TaskMaker:
    """The map (its keypoint-to-point lookup), the query matches and features of a
    :class:`TaskSource`, open; :meth:`tasks` makes queries' tasks from them."""

    def __init__(self, source: TaskSource, point_map: Any = None, mstore: Any = None, qfeats: Any = None) -> None:
        self.source = source
        self.query = Dataset(Path(source.query_root))
        self.point_map = point_map if point_map is not None else read_map(Path(source.map_path))
        self.lookup = self.point_map.keypoint_to_point()
        self.mstore = mstore if mstore is not None else open_store(source.matches_path, "matches")
        self.qfeats = qfeats if qfeats is not None else open_store(source.local_path, "local-features")
        self.records = self.query.sensors.record_by_name()
        self.verified = "inliers" in self.mstore.columns and not source.use_unverified

    def tasks(self, queries: list[str], by_query: dict[str, list[str]]) -> list[dict[str, Any]]:
        """One task per query: its camera and its 2D-3D correspondences (see the module's rule)."""
        return [self._task(q, by_query) for q in queries]

    def _task(self, q: str, by_query: dict[str, list[str]]) -> dict[str, Any]:
        src, qfeats, mstore = self.source, self.qfeats, self.mstore
        conf = src.conf
        task: dict[str, Any] = {"name": q, "conf": conf, "num_map_images": 0, "points2D": np.zeros((0, 2)),
                                "points3D": np.zeros((0, 3)), "estimation_overrides": src.estimation_overrides,
                                "refinement_overrides": src.refinement_overrides,
                                "refine_unknown": src.refine_unknown_focal, "focal_known": True, "camera": None}
        if q not in self.records:
            task["reason"] = "not an image of the query dataset"
            return task
        if q not in qfeats:
            task["reason"] = f"no {src.local} features"
            return task
        item = qfeats.get(q, ["keypoints", "image_sizes"] if "image_sizes" in qfeats.columns else ["keypoints"])
        kps = item["keypoints"]
        cam = self.query.sensors.cameras.get(self.records[q].camera_id)
        if "image_sizes" in item:
            w, h = (int(v) for v in item["image_sizes"])
        else:
            assert cam is not None  # records_camera.txt names known cameras (validated on read)
            w, h = cam.width, cam.height
        camera, known = query_camera(cam, w, h, self.query.image_path(q))
        task["camera"] = (camera.model, camera.width, camera.height, camera.params)
        task["focal_known"] = known
        lists = []
        for m in by_query.get(q, []):
            if (q, m) not in mstore or m not in self.lookup:
                continue
            it = mstore.get((q, m), ["matches", "inliers"] if self.verified else ["matches"])
            check_match_indices(it["matches"], (len(kps), None), mstore.path, (q, m))
            mm = it["matches"][it["inliers"]] if self.verified else it["matches"]
            if len(mm) < conf["min_num_matches"]:
                continue
            task["num_map_images"] += 1
            kp_sorted, pts = self.lookup[m]
            pos = np.searchsorted(kp_sorted, mm[:, 1])
            ok = pos < len(kp_sorted)
            ok[ok] &= kp_sorted[pos[ok]] == mm[ok, 1]
            lists.append((mm[ok, 0].astype(np.int64), pts[pos[ok]]))
        if not task["num_map_images"]:
            task["reason"] = "no retrieved map image with enough matches" if q in by_query else \
                "no retrieved map image"
        qi, pi = correspondences(lists)
        task["points2D"] = kps[qi].astype(np.float64) + COLMAP_PIXEL_OFFSET
        task["points3D"] = self.point_map.points[pi]
        return task


def _postprocess(results: list[QueryResult], query: Dataset, post: PostprocessConf) -> list[QueryResult]:
    """Rig propagation then sequence interpolation of the failed queries, when asked."""
    from .geometry.postprocess import interpolate_sequences, propagate_rigs

    if post.rig:
        results = propagate_rigs(results, query.sensors, post.rig_max_gap)
    if post.sequence:
        results = interpolate_sequences(results, query.sensors, post.sequence_max_gap)
    return results


def write_results(report: LocalizeReport, query: Dataset, record: dict[str, Any]) -> None:
    """The result directory at once (built beside it, then swapped in): kapture
    ``trajectories.txt`` of the localized queries, ``report.json`` (every query) and
    ``run.json`` (``record``: configuration and inputs)."""
    records = query.sensors.record_by_name()
    trajectories = {(records[r.name].timestamp, records[r.name].camera_id): r.pose
                    for r in report.results if r.success and r.pose is not None and r.name in records}
    with atomic_output(report.directory) as tmp:
        tmp.mkdir()
        (tmp / "trajectories.txt").write_text(format_trajectories(trajectories), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps([asdict(r) for r in report.results], indent=1, default=list)
                                         + "\n", encoding="utf-8")
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_results(directory: Path) -> list[QueryResult]:
    """The results of ``directory/report.json``, each checked (:func:`result_from_json`): a
    crafted or damaged file is a one-line error naming it and the entry."""
    path = Path(directory) / "report.json"
    if not path.exists():
        raise CbirError("no localization report (run cbir localize first)", path)
    items = parse_json(read_utf8(path, "localization report"), path, "localization report")
    if not isinstance(items, list):
        raise FormatError(f"a localization report is a JSON list of results, not {type(items).__name__}", path)
    results, seen = [], set()
    for i, item in enumerate(items):
        result = result_from_json(item, path, i)
        if result.name in seen:
            raise FormatError(f"entry {i}: query {result.name!r} is reported twice", path)
        seen.add(result.name)
        results.append(result)
    return results


_RESULT_FIELDS = {f.name: f for f in fields(QueryResult)}


def result_from_json(item: Any, path: Path, i: int) -> QueryResult:
    """One entry of a ``report.json``, its every field of the type :class:`QueryResult` says
    (a success is ``true``, not ``"no"``; a pose is 4 + 3 finite numbers, as kapture's
    poses: a unit quaternion, a translation within 1e12 m), else a :class:`FormatError`
    naming the file and the entry."""
    def bad(problem: str) -> FormatError:
        return FormatError(f"entry {i}: {problem}", path)

    if not isinstance(item, dict):
        raise bad(f"a result is a JSON object, not {type(item).__name__}")
    unknown = sorted(set(item) - set(_RESULT_FIELDS))
    if unknown:
        raise bad(f"unknown field {unknown[0][:40]!r}")
    name = item.get("name")
    if not isinstance(name, str):
        raise bad(f"the query name {name!r} is not a string" if name is not None else "no query name")
    problem = check_relative_name(name, "query name")
    if problem:
        raise bad(problem)
    for key in ("method", "reason"):
        if not isinstance(item.get(key, ""), str):
            raise bad(f"{key!r} of {name!r} is not a string")
    if not isinstance(item.get("success", False), bool):
        raise bad(f"'success' of {name!r} is {item['success']!r}: true or false")
    for key in ("num_map_images", "num_2d3d", "num_inliers"):
        value = item.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"{key!r} of {name!r} is not a count")
    qvec, tvec = (_vector(item.get(key), n, key, name, bad) for key, n in (("qvec", 4), ("tvec", 3)))
    if (qvec is None) != (tvec is None) or (item.get("success") and qvec is None):
        raise bad(f"{name!r} has a success without a whole pose (qvec and tvec)")
    problem = validate_pose(qvec, tvec) if qvec is not None and tvec is not None else None
    if problem:
        raise bad(f"the pose of {name!r}: {problem}")
    camera = item.get("camera")
    if camera is not None:
        if not (isinstance(camera, list) and len(camera) == 4 and isinstance(camera[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in camera[1:3])
                and isinstance(camera[3], list) and all(_is_number(v) for v in camera[3])):
            raise bad(f"the camera of {name!r} is not [model, width, height, [parameters]]")
        camera = (camera[0], camera[1], camera[2], tuple(camera[3]))
    return QueryResult(name=name, success=item.get("success", False), method=item.get("method", ""),
                       reason=item.get("reason", ""), num_map_images=item.get("num_map_images", 0),
                       num_2d3d=item.get("num_2d3d", 0), num_inliers=item.get("num_inliers", 0),
                       qvec=qvec, tvec=tvec, camera=camera)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _vector(value: Any, n: int, key: str, name: str, bad: Callable[[str], FormatError]) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n or not all(_is_number(v) for v in value):
        raise bad(f"{key!r} of {name!r} is not {n} finite numbers")
    return tuple(float(v) for v in value)

