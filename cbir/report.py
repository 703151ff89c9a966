"""A self-contained HTML page of a localization (or retrieval) run (``cbir report``).

The page holds everything it shows, so it opens anywhere without a network: the summary
(accuracy at each threshold, median errors, retrieval metrics when ground truth exists, the
run's configuration and timings), cumulative error curves, a 3D view of the map (a uniform
sample of its points, the map cameras, each query's estimated camera joined to its ground
truth by an error segment) and one card per query (thumbnail, retrieved map images marked
correct or not, 2D-3D correspondences and inliers, pose error or failure reason, the inlier
matches with its best map image), sortable and filterable. Plots are plotly's, from its
offline bundle (the ``plotly`` package), inlined.

Inputs are streamed: each image is decoded once, reduced to a JPEG thumbnail and dropped;
the 3D view is capped at ``max_points`` points (uniform, seeded sample). A retrieval-only
run (a pairs file, no localization) gets the retrieval cards alone.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .errors import CbirError, FormatError
from .evaluation.localization import DEFAULT_THRESHOLDS, conditions_from, pose_errors, summarize
from .evaluation.retrieval import GroundTruth, evaluate_rankings, ground_truth_from_poses
from .io.atomic import atomic_output
from .io.dataset import Dataset
from .io.images import read_image
from .io.pairs import Pair
from .io.paths import check_relative_name, confined
from .io.textfile import read_json_object
from .validate import check_integer, check_number

if TYPE_CHECKING:  # the drawing imports the matching package (torch): only where a page has matches
    from .matching.draw import PairDrawer


@dataclass(frozen=True)
class ReportConf:
    """``max_points``: 3D points shown at most (uniform sample); ``thumb_size``: longest
    edge of the thumbnails (px); ``topk``: retrieved images shown per query;
    ``max_distance`` (m) / ``max_angle`` (degrees): a retrieved map image is correct when its
    camera is that close to the query's ground truth, as ``cbir evaluate --retrieval``;
    ``match_lines``: inlier matches drawn per query."""

    max_points: int = 100_000
    thumb_size: int = 160
    topk: int = 5
    max_distance: float = 10.0
    max_angle: float = 45.0
    match_lines: int = 100
    thresholds: tuple[tuple[float, float], ...] = DEFAULT_THRESHOLDS
    #: label -> regular expression on query names: a summary row per condition (day, night, ...)
    conditions: tuple[tuple[str, str], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("max_points", self.max_points, 0)
        check_integer("thumb_size", self.thumb_size, 16, 2048)
        check_integer("topk", self.topk, 0)
        check_integer("match_lines", self.match_lines, 0)
        check_number("max_distance", self.max_distance, 0.0, None, low_open=True)
        check_number("max_angle", self.max_angle, 0.0, 180.0, low_open=True)


def collect(query: Dataset, map_: Dataset, *, results: Path | None = None, pairs: list[Pair] | None = None,
            matches: str | None = None, map_name: str | None = None, ground_truth: Dataset | None = None,
            title: str = "", conf: ReportConf = ReportConf(),
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The page's data: ``results`` (a localization result directory) and/or ``pairs``
    (retrieval); ``matches`` (the query x map matches store) and ``map_name`` (the map
    store) default to what the result's ``run.json`` names."""
    from .localize import RECORD_FILE, read_results

    if results is None and pairs is None:
        raise CbirError("a report needs localization results or a pairs file")
    record: dict[str, Any] = {}
    loc = None
    if results is not None:
        loc = {r.name: r for r in read_results(results)}
        record = read_json_object(results / RECORD_FILE, RECORD_FILE) if (results / RECORD_FILE).exists() else {}
        rconf = _localization_config(record, results / RECORD_FILE)
        matches = matches or rconf.get("matches")
        map_name = map_name or rconf.get("map")
        if pairs is None and rconf.get("pairs"):
            pairs = _pairs_of_record(query, rconf["pairs"].get("file"), results / RECORD_FILE)
    ranked: dict[str, list[Pair]] = {}
    for p in pairs or []:
        ranked.setdefault(p.query, []).append(p)
    query_names = set(query.sensors.image_names())
    if ranked and not query_names & set(ranked):  # a page of another dataset's pairs would show nothing right
        raise CbirError(f"none of the {len(ranked)} queries of the pairs is an image of {query.root} (first: "
                        f"{next(iter(ranked))}): check --query and --pairs")
    names = sorted(set(loc or {}) | set(ranked))
    if not names:  # an empty page would look like a report of nothing wrong
        raise CbirError("nothing to report: the results and the pairs name no query",
                        results if results is not None else None)
    gt_poses = ground_truth.sensors.image_poses() if ground_truth is not None else {}
    map_poses = map_.sensors.image_poses()
    relevant = ground_truth_from_poses(gt_poses, map_poses, max_distance=conf.max_distance,
                                       max_angle_deg=conf.max_angle).relevant if gt_poses and map_poses else {}
    data: dict[str, Any] = {"title": title or f"{query.root.name} against {map_.root.name}",
                            "config": record.get("config"), "seconds": record.get("seconds"),
                            "thresholds": [list(t) for t in conf.thresholds]}
    errors = _localization_summary(data, loc, gt_poses, conf) if loc is not None else {}
    if ranked and relevant:
        try:
            data["retrieval"] = evaluate_rankings([p for n in names for p in ranked.get(n, [])],
                                                  GroundTruth(relevant), tuple(sorted({1, conf.topk} - {0})))
            data["retrieval_truth"] = f"{conf.max_distance:g} m and {conf.max_angle:g}°"
        except CbirError:  # no query with a relevant map image: no retrieval metrics, the rest of the page stands
            pass
    data["scene"] = _scene(map_, map_name, loc, gt_poses, conf)
    cards, map_thumbs = [], {}
    query_images, map_images = query_names, set(map_.sensors.image_names())
    with ExitStack() as stack:  # the matches and local-feature stores, opened once for every card
        drawer = _drawer(stack, query, map_, matches) if matches and loc else None
        for name in names:
            r = loc.get(name) if loc else None
            retrieved: list[dict[str, Any]] = [{"name": p.map, "score": _finite(p.score),
                          "correct": (p.map in relevant[name]) if name in relevant else None}
                         for p in ranked.get(name, [])[:conf.topk]]
            for item in retrieved:
                if item["name"] not in map_thumbs:
                    map_thumbs[item["name"]] = _thumbnail(map_, item["name"], conf.thumb_size, map_images)
            card: dict[str, Any] = {"name": name, "thumb": _thumbnail(query, name, conf.thumb_size, query_images),
                                    "retrieved": retrieved}
            if r is not None:
                e = errors.get(name, (float("nan"), float("nan")))
                card.update(success=r.success, method=r.method, reason=r.reason, map_images=r.num_map_images,
                            correspondences=r.num_2d3d, inliers=r.num_inliers, error_t=_finite(e[0]),
                            error_R=_finite(e[1]))
                if drawer is not None and r.success:
                    card["matches"] = _best_matches(drawer, name, [x["name"] for x in retrieved], conf)
            cards.append(card)
            if progress:
                progress(1, len(names))
    data["cards"] = cards
    data["map_thumbs"] = map_thumbs
    return data


def write(data: dict[str, Any], out: Path) -> None:
    """The page, atomically: the template with plotly's bundle and the data inlined."""
    from plotly.offline import get_plotlyjs

    template = resources.files("cbir").joinpath("report.html").read_text(encoding="utf-8")
    # no "</" in the payload: it must not end the <script> element that holds it
    payload = script_safe_json(data)
    head, rest = template.split("/*PLOTLY_JS*/")
    middle, tail = rest.split("/*REPORT_DATA*/")  # spliced, not replaced: the data never meets a marker
    page = head + get_plotlyjs() + middle + payload + tail
    with atomic_output(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


def script_safe_json(data: Any) -> str:
    """``data`` as JSON that can sit inside a ``<script>`` element whatever its strings hold:
    ``<``, ``>`` and ``&`` are written as ``\\u`` escapes (JSON.parse reads them back), so
    no ``</script>``, ``<!--`` or ``<script`` appears (the HTML parser's script states), and
    every non-ASCII character is escaped too (U+2028 and U+2029 included)."""
    text = json.dumps(_json_safe(data), separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _json_safe(value: Any) -> Any:
    """Plain JSON: NumPy numbers as Python's, NaN and infinities as null, sets as lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return _finite(float(value))
    return value


def _finite(v: float) -> float | None:
    return float(v) if v == v and abs(v) != float("inf") else None


def _localization_config(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``config`` of a localization's run.json, checked to name its matches, map and pairs."""
    rconf = record.get("config", {})
    if not isinstance(rconf, dict) or not all(isinstance(rconf.get(k) or "", str) for k in ("matches", "map")) \
            or not isinstance(rconf.get("pairs") or {}, dict):
        raise FormatError("'config' is not the record of a localization (an object naming the matches, map "
                          "and pairs)", path)
    return rconf


def _localization_summary(data: dict[str, Any], loc: dict[str, Any], gt_poses: dict[str, Any],
                          conf: ReportConf) -> dict[str, tuple[float, float]]:
    """The localization's counts and, with a ground truth, its evaluation (per condition) into
    ``data``; the pose errors of the queries with a ground truth."""
    errors: dict[str, tuple[float, float]] = {}
    estimated = {n: r.pose for n, r in loc.items() if r.success}
    if gt_poses:  # the result's queries that have a ground truth; the others are counted apart
        errors = pose_errors(estimated, {n: gt_poses[n] for n in loc if n in gt_poses})
        data["without_ground_truth"] = sum(n not in gt_poses for n in loc)
        data["evaluation"] = summarize(errors, conf.thresholds)
        data["conditions"] = {label: summarize(errors, conf.thresholds, group) for label, group in
                              conditions_from(dict(conf.conditions), list(errors)).items()}
    data["localized"] = sum(r.success for r in loc.values())
    data["queries"] = len(loc)
    data["failed"] = [{"name": n, "reason": r.reason} for n, r in sorted(loc.items()) if not r.success]
    return errors


def _pairs_of_record(query: Dataset, file: Any, record: Path) -> list[Pair] | None:
    """The pairs of the file a result's ``run.json`` names, when that file is inside the query
    dataset; one elsewhere is not read (a dataset from someone else could name any file):
    the error says to pass it with ``--pairs``."""
    from .io.pairs import read_pairs

    if not file or file == "-":
        return None
    if not isinstance(file, str):
        raise FormatError("config.pairs.file is not a path", record)
    if Path(file).is_absolute() or check_relative_name(file, "pairs file", base=f"{query.root.name}/"):
        raise CbirError(f"names the pairs file {file[:200]!r}, outside the query dataset: cbir reads no file a "
                        "dataset names outside itself; pass --pairs FILE to show that file's retrieval", record)
    path = confined(query.root, file, what="pairs file", source=record)
    return read_pairs(path) if path.is_file() else None


def _thumbnail(dataset: Dataset, name: str, size: int, images: set[str]) -> str | None:
    """A JPEG data URI of the image (longest edge ``size``), or None when it is not one of
    the dataset's ``images`` or cannot be read."""
    if name not in images:
        return None
    try:
        image = read_image(dataset.image_path(name), max_size=size)
    except CbirError:
        return None
    return _jpeg(cv2.cvtColor(image.array, cv2.COLOR_RGB2BGR))


def _jpeg(bgr: np.ndarray, quality: int = 80) -> str:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CbirError("cannot encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _drawer(stack: ExitStack, query: Dataset, map_: Dataset, matches: str) -> PairDrawer | None:
    """The pair drawer of the query x map matches, or None when they cannot be read (the
    cards then go without a matches picture, as a pair that cannot be drawn does)."""
    from .matching.draw import PairDrawer

    try:
        return stack.enter_context(PairDrawer(query, map_, matches))
    except CbirError:
        return None


def _best_matches(drawer: PairDrawer, name: str, retrieved: list[str], conf: ReportConf) -> dict[str, Any] | None:
    """The inlier matches of the query with the retrieved map image that has the most."""
    store = drawer.store
    try:
        counts = {m: int(store.get((name, m), ["inliers"])["inliers"].sum()) if "inliers" in store.columns
                  else len(store.get((name, m), ["matches"])["matches"])
                  for m in retrieved if (name, m) in store}
        if not counts:
            return None
        best = max(counts, key=lambda m: (counts[m], m))
        canvas, stats = drawer.render((name, best), inliers_only=True, max_edge=2 * conf.thumb_size,
                                      max_lines=conf.match_lines, seed=conf.seed, label=False)
    except CbirError:
        return None
    return {"map": best, "inliers": stats["inliers"], "image": _jpeg(canvas, 75)}


def _scene(map_: Dataset, map_name: str | None, loc: dict | None, gt_poses: dict, conf: ReportConf) -> dict:
    """The 3D view's data: a sample of the map's points, map camera centres and viewing
    directions, each query's estimated and ground-truth centres."""
    from .io.map_store import read_map

    scene: dict[str, Any] = {"points": [], "colors": [], "total_points": 0}
    map_poses = map_.sensors.image_poses()
    names = sorted(map_poses)
    centres = np.array([map_poses[n].center for n in names]).reshape(-1, 3)
    scale = _scene_scale(centres)
    scene["view"] = _default_view([map_poses[n] for n in names])
    scene["map_cameras"] = {"names": names, "centres": _rounded(centres),
                            "axes": _rounded(centres + scale * np.array([map_poses[n].rotation_matrix[2]
                                                                         for n in names]).reshape(-1, 3))}
    if map_name:
        path = map_.store_path("map", map_name)
        if path.exists():
            pm = read_map(path)
            n = len(pm.points)
            keep = np.arange(n)
            if n > conf.max_points:
                keep = np.sort(np.random.default_rng(conf.seed).choice(n, conf.max_points, replace=False))
            scene["points"] = _rounded(pm.points[keep])
            scene["colors"] = ["#" + "".join(f"{int(v):02x}" for v in c) for c in pm.colors[keep]]
            scene["total_points"] = n
    queries = []
    for name in sorted(set(loc or {}) | set(gt_poses)):
        r = loc.get(name) if loc else None
        est = r.pose.center if r is not None and r.success else None
        gt = gt_poses[name].center if name in gt_poses else None
        queries.append({"name": name, "estimate": _rounded(est) if est is not None else None,
                        "truth": _rounded(gt) if gt is not None else None})
    scene["queries"] = queries
    scene["bounds"] = _view_bounds(np.asarray(scene["points"], np.float64).reshape(-1, 3), centres,
                                   [p for r in queries for p in (r["estimate"], r["truth"]) if p is not None])
    return scene


def _view_bounds(points: np.ndarray, centres: np.ndarray, queries: list) -> list | None:
    """The box the 3D view opens on: the cameras, the queries and the central 98% of the
    points on each axis (a few far points would otherwise shrink the scene to a dot)."""
    parts = [centres, np.asarray(queries, np.float64).reshape(-1, 3)]
    if len(points):
        parts.append(np.percentile(points, [1, 99], axis=0))
    allp = np.concatenate(parts)
    if not len(allp):
        return None
    lo, hi = allp.min(0), allp.max(0)
    pad = 0.05 * max(float((hi - lo).max()), 1e-6)
    return _rounded(np.stack([lo - pad, hi + pad]))


def _default_view(poses: list) -> dict | None:
    """Where the 3D view looks from: behind and above the map cameras on average, their
    mean up direction up (datasets put the world's axes anywhere; cameras know up)."""
    if not poses:
        return None
    rot = np.stack([p.rotation_matrix for p in poses])
    up = -rot[:, 1].mean(0)  # a camera's y axis points down in its image
    forward = rot[:, 2].mean(0)
    if np.linalg.norm(up) < 1e-6 or np.linalg.norm(forward) < 1e-6:
        return None
    up /= np.linalg.norm(up)
    forward /= np.linalg.norm(forward)
    eye = -1.6 * forward + 0.9 * up
    return {"up": _rounded(up), "eye": _rounded(eye)}


def _scene_scale(centres: np.ndarray) -> float:
    """The length of the drawn viewing directions: a tenth of the map cameras' extent."""
    if len(centres) < 2:
        return 1.0
    return max(float(np.linalg.norm(centres.max(0) - centres.min(0))) / 10, 1e-3)


def _rounded(a: np.ndarray) -> list:
    return np.round(np.asarray(a, np.float64), 4).tolist()
