"""Mapping, localization, post-processing and pose evaluation: units on constructed data
with known answers, and the whole pipeline on the real sceaux_castle photos."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from click.testing import CliRunner

from cbir import pipeline
from cbir.cli import main
from cbir.errors import CbirError
from cbir.evaluation.localization import pose_errors, summarize
from cbir.geometry.cameras import Camera
from cbir.geometry.colmap_options import paper_config
from cbir.geometry.poses import Pose
from cbir.geometry.postprocess import estimate_rig, interpolate, interpolate_sequences, propagate_rigs
from cbir.io.pairs import read_pairs
from cbir.io.sensors import ImageRecord, SensorData
from cbir.io.store import open_store
from cbir.localize import QueryResult, correspondences, estimate_one, query_camera


def cbir(*args, ok: bool = True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + r.stderr
    return r.exit_code, r.stdout, r.stderr


def look(yaw_deg: float, center) -> Pose:
    a = np.radians(yaw_deg)
    R = np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])
    return Pose.from_matrix(R, -R @ np.asarray(center, float))


# ---------------------------------------------------------------- 2D-3D correspondences
def test_correspondences_vote_and_keep_each_point_and_keypoint_once():
    lists = [
        (np.array([0, 1, 2]), np.array([10, 11, 12])),  # map image A
        (np.array([0, 1, 3]), np.array([10, 13, 12])),  # map image B: keypoint 1 disagrees, point 12 reused
        (np.array([1]), np.array([13])),  # map image C backs keypoint 1 -> 13
    ]
    q, p = correspondences(lists)
    pairs = set(zip(q.tolist(), p.tolist(), strict=True))
    # kp0 -> 10 (2 votes); kp1 -> 13 (2 votes beat 1); point 12 seen by kp2 and kp3 once each: the lower index wins
    assert pairs == {(0, 10), (1, 13), (2, 12)}
    assert len(correspondences([])[0]) == 0


# ---------------------------------------------------------------- absolute pose on constructed data
def synthetic_task(n=200, collinear=False, outliers=0.3, seed=0, conf="config2"):
    rng = np.random.default_rng(seed)
    cam = Camera("SIMPLE_PINHOLE", 640, 480, (500.0, 320.0, 240.0))
    pose = look(10, [0.5, 0.0, -1.0])
    X = np.c_[rng.uniform(-3, 3, n), rng.uniform(-2, 2, n), rng.uniform(4, 9, n)]
    if collinear:
        X = np.c_[np.linspace(-3, 3, n), np.zeros(n), np.full(n, 6.0)]
    Xc = X @ pose.rotation_matrix.T + np.asarray(pose.tvec)
    uv = Xc[:, :2] / Xc[:, 2:] * 500 + [320, 240]
    bad = rng.random(n) < outliers
    uv[bad] = rng.uniform(0, [640, 480], (bad.sum(), 2))
    task = {"name": "q.jpg", "conf": paper_config(conf), "num_map_images": 3, "points2D": uv, "points3D": X,
            "estimation_overrides": {}, "refinement_overrides": {}, "refine_unknown": True, "focal_known": True,
            "camera": (cam.model, cam.width, cam.height, cam.params)}
    return task, pose


def test_pose_is_recovered_with_outliers():
    task, gt = synthetic_task()
    r = estimate_one(task)
    assert r.success and r.method == "pnp" and r.num_inliers >= 120
    dt, dr = pose_errors({"q": r.pose}, {"q": gt})["q"]
    assert dt < 1e-3 and dr < 1e-3


def test_failures_are_reported_not_raised():
    task, _ = synthetic_task(n=2)
    r = estimate_one(task)
    assert not r.success and "2 2D-3D correspondences" in r.reason
    task, _ = synthetic_task(collinear=True, outliers=0.0)
    r = estimate_one(task)
    assert not r.success and r.reason
    task, _ = synthetic_task(outliers=0.97, conf="config1")  # too few inliers for config1's 30
    r = estimate_one(task)
    assert not r.success and ("inliers" in r.reason or "RANSAC" in r.reason)


def test_unknown_intrinsics_take_the_exif_focal_length(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28  # FocalLengthIn35mmFilm: 28 mm
    Image.new("RGB", (800, 600)).save(tmp_path / "with.jpg", exif=exif)
    Image.new("RGB", (800, 600)).save(tmp_path / "without.jpg")
    cam, known = query_camera(None, 800, 600, tmp_path / "with.jpg")
    assert known and cam.params[0] == pytest.approx(28 / 36 * 800)
    cam, known = query_camera(None, 800, 600, tmp_path / "without.jpg")
    assert not known and cam.params[0] == 960.0


def test_unknown_intrinsics_use_the_colmap_prior():
    cam, known = query_camera(Camera("UNKNOWN_CAMERA", 800, 600, ()), 800, 600, None)
    assert not known and cam.model == "SIMPLE_RADIAL" and cam.params == (960.0, 400.0, 300.0, 0.0)
    cam, known = query_camera(None, 800, 600, None)
    assert not known
    same = Camera("PINHOLE", 800, 600, (500.0, 500.0, 400.0, 300.0))
    assert query_camera(same, 800, 600, None) == (same, True)


# ---------------------------------------------------------------- post-processing
def rig_sensors() -> tuple[SensorData, Pose, Pose]:
    left, right = Camera("SIMPLE_PINHOLE", 640, 480, (500.0, 320.0, 240.0)), \
        Camera("SIMPLE_PINHOLE", 640, 480, (500.0, 320.0, 240.0))
    left_from_rig = Pose((1.0, 0.0, 0.0, 0.0), (0.2, 0.0, 0.0))
    right_from_rig = look(20, [0.5, 0.0, 0.0])
    data = SensorData(sensors={"left": left, "right": right},
                      rigs={"rig": {"left": left_from_rig, "right": right_from_rig}},
                      records=[ImageRecord(t, cam, f"{cam}/{t}.jpg") for t in (0, 1, 2, 5)
                               for cam in ("left", "right")])
    return data, left_from_rig, right_from_rig


def test_rig_propagation_uses_the_extrinsics():
    data, left_from_rig, right_from_rig = rig_sensors()
    rig_from_world = look(30, [1.0, 2.0, 3.0])
    left_pose = left_from_rig * rig_from_world
    results = [QueryResult("left/1.jpg", True, "pnp", qvec=left_pose.qvec, tvec=left_pose.tvec),
               QueryResult("right/1.jpg"), QueryResult("right/2.jpg")]
    out = {r.name: r for r in propagate_rigs(results, data)}
    expected = right_from_rig * rig_from_world
    got = out["right/1.jpg"]
    assert got.success and got.method == "rig" and "left/1.jpg" in got.reason
    np.testing.assert_allclose(got.pose.rotation_matrix, expected.rotation_matrix, atol=1e-9)
    np.testing.assert_allclose(got.pose.tvec, expected.tvec, atol=1e-9)
    assert not out["right/2.jpg"].success  # no partner at timestamp 2
    assert propagate_rigs(results, data, max_time_gap=1)[2].success  # unsynchronized: nearest within 1


def test_rigs_with_unknown_cameras_are_refused():
    data, *_ = rig_sensors()
    data.rigs["rig"]["ghost"] = Pose((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    with pytest.raises(CbirError, match="unknown sensors: ghost"):
        propagate_rigs([], data)


def test_rig_estimation_recovers_the_extrinsics():
    data, left_from_rig, right_from_rig = rig_sensors()
    for t in (0, 1, 2, 5):
        rig_from_world = look(10 * t, [t, 0.5 * t, 1.0])
        data.trajectories[(t, "left")] = left_from_rig * rig_from_world
        data.trajectories[(t, "right")] = right_from_rig * rig_from_world
    rig = estimate_rig(data, ["left", "right"])
    rel = right_from_rig * left_from_rig.inverse()
    np.testing.assert_allclose(rig["right"].rotation_matrix, rel.rotation_matrix, atol=1e-9)
    np.testing.assert_allclose(rig["right"].tvec, rel.tvec, atol=1e-9)


def test_sequences_interpolate_copy_and_split_at_gaps():
    data, *_ = rig_sensors()
    a, b = look(0, [0, 0, 0]), look(40, [2, 0, 0])
    results = [QueryResult("left/0.jpg", True, "pnp", qvec=a.qvec, tvec=a.tvec), QueryResult("left/1.jpg"),
               QueryResult("left/2.jpg", True, "pnp", qvec=b.qvec, tvec=b.tvec), QueryResult("left/5.jpg"),
               QueryResult("right/1.jpg")]
    out = {r.name: r for r in interpolate_sequences(results, data, max_gap=2)}
    mid = out["left/1.jpg"]
    assert mid.method == "sequence" and "interpolated" in mid.reason
    np.testing.assert_allclose(mid.pose.center, [1, 0, 0], atol=1e-9)
    assert pose_errors({"x": mid.pose}, {"x": look(20, [1, 0, 0])})["x"][1] < 1e-6  # slerp halfway
    assert not out["left/5.jpg"].success  # gap 3 > 2: another sequence, with no localized image
    assert not out["right/1.jpg"].success  # another camera: its own sequences
    out = {r.name: r for r in interpolate_sequences(results, data, max_gap=3)}
    assert out["left/5.jpg"].reason == "copied from left/2.jpg"  # one side only: the closest pose
    # timestamps out of order in the results are sorted first
    assert interpolate_sequences(results[::-1], data, 2)[3].method == "sequence"
    assert interpolate(a, b, 0.0) .center == pytest.approx(a.center)


# ---------------------------------------------------------------- evaluation
def test_threshold_table_counts_and_medians():
    gt = {"a": look(0, [0, 0, 0]), "b": look(0, [0, 0, 0]), "c": look(0, [0, 0, 0])}
    est = {"a": look(1, [0.1, 0, 0]), "b": look(3, [0.4, 0, 0])}
    s = summarize(pose_errors(est, gt), ((0.25, 2), (0.5, 5), (5, 10)))
    assert s["queries"] == 3 and s["localized"] == 2 and s["not_localized"] == 1
    assert s["within"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert s["median_translation"] == pytest.approx(0.25) and s["median_rotation_deg"] == pytest.approx(2.0)


# ---------------------------------------------------------------- end to end, real photos
@pytest.fixture(scope="module")
def sceaux_run(sceaux, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe") / "sceaux"
    shutil.copytree(sceaux, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    (root / "pipe.toml").write_text(
        '[datasets]\nmap = "mapping"\nquery = "query"\nquery_gt = "query_gt"\n'
        '[extract]\nlocal = "sift"\nglobal = ["densevlad"]\nlocal_conf = {max_keypoints = 4000}\n'
        '[retrieve]\ntopk = 5\nmap_pairs = 0\n[match]\nratio = 0.8\n[localize]\nconfig = "config1"\n')
    return root


@pytest.mark.slow
def test_pipeline_localizes_the_real_queries(sceaux_run):
    _, out, _ = cbir("pipeline", sceaux_run / "pipe.toml", "--json")
    result = json.loads(out)
    ev = result["evaluation"]["all"]
    assert ev["queries"] == 3 and ev["localized"] == 3
    assert ev["within"][0] >= 2 / 3 and ev["within"][2] == 1.0  # (0.25 m, 2 deg) / (5 m, 10 deg)
    assert ev["median_rotation_deg"] < 1.0
    # resuming: nothing is extracted or matched again
    _, out, _ = cbir("pipeline", sceaux_run / "pipe.toml", "--json")
    steps = json.loads(out)["steps"]
    assert "0 new, 8 present" in steps[0] and "map 0 new pairs" in steps[4]


@pytest.mark.slow
def test_step_commands_and_bad_queries(sceaux_run):
    cbir("pipeline", sceaux_run / "pipe.toml", "--json")
    q, m = sceaux_run / "query", sceaux_run / "mapping"
    _, out, _ = cbir("map", m, "--local", "sift", "--matches", "sift-map", "--json",
                     "--colmap", sceaux_run / "model")
    summary = json.loads(out)
    assert summary["points"] > 1000 and 2 < summary["mean_track_length"] and summary["mean_reprojection_error"] < 1
    rec = pycolmap.Reconstruction(sceaux_run / "model")  # opens as a COLMAP model
    assert rec.num_points3D() == summary["points"] and rec.num_reg_images() == 8
    # a pairs file with a query that retrieves nothing, and one naming an image not in the dataset
    pairs = (q / "cbir" / "pairs" / "densevlad_top5.txt").read_text().splitlines()
    kept = [line for line in pairs if not line.startswith("100_7105.jpg")] + ["ghost.jpg, 100_7100.jpg"]
    (sceaux_run / "partial.txt").write_text("\n".join(kept) + "\n")
    _, out, _ = cbir("localize", "--query", q, "--map", m, "--pairs", sceaux_run / "partial.txt", "--local", "sift",
                     "--matches", "sift-query", "--config", "config2", "--name", "partial", "--json",
                     "--vlnet", sceaux_run / "submission.txt")
    loc = json.loads(out)
    reasons = {f["image"]: f["reason"] for f in loc["failed"]}
    # the foreign name is left out with a warning and counted, not listed as a query
    assert loc["localized"] == 2 and set(reasons) == {"100_7105.jpg"} and loc["queries"] == 3
    assert loc["skipped_pairs"] == {"foreign": 1, "unmatched": 0}
    assert loc["warnings"] == ["1 of 11 pairs name an image that is not of the datasets (first: ghost.jpg "
                               "100_7100.jpg): left out"]
    assert reasons["100_7105.jpg"] == "no retrieved map image"
    assert len((sceaux_run / "submission.txt").read_text().splitlines()) == 2
    _, out, err = cbir("evaluate", "--query", q, "--results", "partial", "--gt", sceaux_run / "query_gt", "--json",
                       "--plot", sceaux_run / "curves.png", "--condition", "second=7105")
    assert f"wrote {sceaux_run / 'curves.png'}" in err
    ev = json.loads(out)["conditions"]
    assert ev["all"]["not_localized"] == 1 and ev["second"]["not_localized"] == 1
    assert (sceaux_run / "curves.png").stat().st_size > 1000
    # the sequence post-processing fills 100_7105 from its neighbours (timestamps 2, 5, 8: gap 3)
    _, out, _ = cbir("localize", "--query", q, "--map", m, "--pairs", sceaux_run / "partial.txt", "--local", "sift",
                     "--matches", "sift-query", "--name", "partial-seq", "--sequence", "--sequence-max-gap", "3",
                     "--json")
    assert json.loads(out)["by_method"]["sequence"] == 1
    # no usable matches (every map image below min_num_matches): each query fails with its reason
    _, out, _ = cbir("localize", "--query", q, "--map", m, "--pairs", sceaux_run / "partial.txt", "--local", "sift",
                     "--matches", "sift-query", "--name", "no-matches", "--conf", "min_num_matches=100000", "--json")
    loc = json.loads(out)
    assert loc["localized"] == 0
    assert {f["reason"] for f in loc["failed"] if f["image"] == "100_7102.jpg"} == \
        {"no retrieved map image with enough matches"}
    code, _, err = cbir("localize", "--query", q, "--map", m, "--pairs", sceaux_run / "partial.txt", "--local",
                        "sift", "--matches", "sift-query", "--conf", "nonsense=1", ok=False)
    assert code == 1 and "unknown localization option" in err


@pytest.mark.slow
def test_inputs_that_do_not_belong_together_exit_1(sceaux_run):
    """A result that would be empty because the pairs, matches, results or ground truth belong
    to other data exits 1 with one line, and writes nothing; partial overlap is a warning with
    the counts in the JSON (issue 26)."""
    cbir("pipeline", sceaux_run / "pipe.toml", "--json")
    q, m, gt = sceaux_run / "query", sceaux_run / "mapping", sceaux_run / "query_gt"
    query_pairs = q / "cbir" / "pairs" / "densevlad_top5.txt"
    foreign = sceaux_run / "strecha_pairs.txt"  # another dataset's names
    foreign.write_text("0001.jpg, 0000.jpg, 0.9\n0004.jpg, 0002.jpg, 0.8\n")
    matches_dir = q / "cbir" / "matches"
    before = sorted(p.name for p in matches_dir.iterdir())

    def refused(*args: object) -> str:
        code, _, err = cbir(*args, ok=False)
        assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        return err

    assert "none of the 2 pairs can be matched" in refused("match", "--query", q, "--map", m, "--pairs", foreign,
                                                           "--local", "sift")
    swapped = refused("match", "--query", m, "--map", q, "--pairs", query_pairs, "--local", "sift", "--name", "x")
    assert "is not an image of" in swapped and "--query (first image)" in swapped
    map_pairs = m / "cbir" / "pairs" / "densevlad_map.txt"
    refused("match", "--query", q, "--map", m, "--pairs", map_pairs, "--local", "sift", "--name", "y")
    assert sorted(p.name for p in matches_dir.iterdir()) == before  # no empty store written
    # some pairs of other images: matched, with a warning and the counts
    mixed = sceaux_run / "mixed.txt"
    mixed.write_text(query_pairs.read_text() + foreign.read_text())
    _, out, err = cbir("match", "--query", q, "--map", m, "--pairs", mixed, "--local", "sift", "--json")
    summary = json.loads(out)
    assert summary["pairs"] == 17 and summary["skipped_count"] == 2 and summary["matched"] == 15
    assert "warning: 2 of 17 pairs skipped" in err
    # localize: another dataset's pairs, map pairs as query pairs, pairs the store never matched
    loc = ["localize", "--query", q, "--map", m, "--local", "sift", "--matches", "sift-query", "--name", "t"]
    assert "none of the 2 pairs names a query image" in refused(*loc, "--pairs", foreign)
    refused(*loc, "--pairs", map_pairs)
    top8 = sceaux_run / "top8.txt"
    cbir("retrieve", "--query", q, "--map", m, "--global", "densevlad", "--topk", "8", "-o", top8)
    matched = {(p.query, p.map) for p in read_pairs(query_pairs)}
    other = sceaux_run / "other.txt"  # pairs of images of the datasets that the store never matched
    other.write_text("".join(f"{p.query}, {p.map}\n" for p in read_pairs(top8) if (p.query, p.map) not in matched))
    err = refused(*loc, "--pairs", other)
    assert "holds none of the 9 pairs" in err and "cbir match --query" in err
    assert not (q / "cbir" / "localization" / "t").exists()
    # top-8 pairs with top-5 matches: localized with the matched ones, and said so
    _, out, err = cbir(*loc, "--pairs", top8, "--json")
    result = json.loads(out)
    assert result["skipped_pairs"] == {"foreign": 0, "unmatched": 9} and result["localized"] == 3
    assert "9 of 24 pairs are not in the matches store" in err
    # evaluate: a ground truth without the results' queries; pairs of another dataset
    assert "none of the 3 queries of the results t has a ground-truth pose" in \
        refused("evaluate", "--query", q, "--results", "t", "--gt", m)
    assert "none of the 2 queries of the pairs has a ground truth" in \
        refused("evaluate", "--retrieval", "--pairs", foreign, "--query-gt", gt, "--map", m)
    _, out, err = cbir("evaluate", "--retrieval", "--pairs", query_pairs, "--query-gt", gt, "--map", m)
    assert "not shown: k = 10, 20" in out and "mAP: the mean average precision" in out
    assert "no localization result yet: run cbir localize" in refused("evaluate", "--query", m, "--gt", gt)
    assert "none of the 2 queries of the pairs is an image of" in \
        refused("report", "--query", q, "--map", m, "--pairs", foreign, "-o", sceaux_run / "foreign.html")
    assert not (sceaux_run / "foreign.html").exists()
    # export vlnet: a query dataset's poses are its results
    assert "no pose to export in sensors/trajectories.txt" in refused("export", "vlnet", q, "-o", sceaux_run / "s.txt")
    assert not (sceaux_run / "s.txt").exists()
    cbir("export", "vlnet", q, "-o", sceaux_run / "s.txt", "--results", "t", "--basename")
    assert len((sceaux_run / "s.txt").read_text().splitlines()) == 3
    # a map name that is not there: the maps there are, and the command that makes one
    err = refused(*loc, "--pairs", query_pairs, "--map-name", "sfit")
    assert "file not found (map stores there: sift); make it with cbir map" in err


@pytest.mark.slow
def test_queries_from_a_plain_image_folder_are_localized(sceaux_run, tmp_path):
    """An hloc user's start: a folder of photos (`cbir import images`, no intrinsics in them),
    then the steps against a kapture map: every query localized, within 5 m and 10 degrees."""
    cbir("pipeline", sceaux_run / "pipe.toml", "--json")
    m, folder, ds = sceaux_run / "mapping", tmp_path / "photos", tmp_path / "queries"
    shutil.copytree(sceaux_run / "query" / "sensors" / "records_data", folder)
    _, out, _ = cbir("import", "images", folder, ds, "--json")
    assert json.loads(out)["unknown_camera_images"] == 3  # these photos carry no focal length
    cbir("extract", ds, "--local", "sift", "--max-keypoints", "4000", "--global", "densevlad",
         "--model", m / "cbir" / "global" / "densevlad.model.h5")
    cbir("retrieve", "--query", ds, "--map", m, "--global", "densevlad", "--topk", "5", "-o", ds / "pairs.txt")
    cbir("match", "--query", ds, "--map", m, "--pairs", ds / "pairs.txt", "--local", "sift", "--verify")
    _, out, _ = cbir("localize", "--query", ds, "--map", m, "--pairs", ds / "pairs.txt", "--local", "sift",
                     "--matches", "sift-pairs", "--json")
    assert json.loads(out)["localized"] == 3
    _, out, _ = cbir("evaluate", "--query", ds, "--gt", sceaux_run / "query_gt", "--json")
    assert json.loads(out)["conditions"]["all"]["within"][2] == 1.0


@pytest.mark.slow
def test_pipeline_reruns_like_a_build_tool(sceaux_run):
    toml = sceaux_run / "pipe.toml"
    q, m = sceaux_run / "query", sceaux_run / "mapping"
    result_dir = q / "cbir" / "localization" / "sift-densevlad-config1"
    cbir("pipeline", toml, "--json")
    kept = {p.name: p.read_bytes() for p in result_dir.iterdir()}
    # unchanged: every step reused, nothing recomputed
    _, out, _ = cbir("pipeline", toml, "--json")
    steps = " ".join(json.loads(out)["steps"])
    assert "(reused)" in steps and "reused: same configuration and inputs" in steps
    assert {p.name: p.read_bytes() for p in result_dir.iterdir()} == kept
    # a bad value is refused before anything runs; the finished result stays as it was
    code, _, err = cbir("pipeline", toml, "--set", "retrieve.topk=0", ok=False)
    assert code == 1 and "topk must be >= 1, got 0" in err
    # a changed step is refused until asked, naming the output and the changed key
    code, _, err = cbir("pipeline", toml, "--set", "match.ratio=0.9", ok=False)
    assert code == 1 and "sift-map.h5 (matcher.ratio: 0.8 -> 0.9)" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in result_dir.iterdir()} == kept
    _, out, _ = cbir("pipeline", toml, "--set", "match.ratio=0.9", "--check", "--json")
    assert {c["step"] for c in json.loads(out)["changes"]} == {"match"}
    # --overwrite: that step and every step after it redone, the steps before reused
    _, out, _ = cbir("pipeline", toml, "--set", "match.ratio=0.9", "--overwrite", "--json")
    steps = json.loads(out)["steps"]
    assert any(s.startswith("match: redone, replacing") for s in steps)
    assert any("extract sift mapping: 0 new, 8 present" in s for s in steps)
    assert any("match + verify: map 28 new pairs" in s for s in steps)
    assert any(s.startswith("map: ") and "(replaced)" in s for s in steps)
    with open_store(m / "cbir" / "matches" / "sift-map.h5") as s:
        assert s.config["matcher"]["ratio"] == 0.9
    record = json.loads((result_dir / "run.json").read_text())
    assert record["inputs"]["matches"] != json.loads(kept["run.json"])["inputs"]["matches"]
    assert json.loads(out)["evaluation"]["all"]["localized"] == 3
    # the map records the matches it came from: matches changed behind its back make it stale
    _, out, _ = cbir("map", m, "--local", "sift", "--matches", "sift-map", "--json")
    assert json.loads(out)["status"] == "reused"
    subset = sceaux_run / "map_subset.txt"
    subset.write_text("\n".join((m / "cbir" / "pairs" / "densevlad_map.txt").read_text().splitlines()[:20]) + "\n")
    cbir("match", "--query", m, "--pairs", subset, "--local", "sift", "--name", "sift-map", "--ratio", "0.9",
         "--verify", "poses", "--overwrite")  # the same configuration (the pipeline's), fewer pairs
    _, out, _ = cbir("map", m, "--local", "sift", "--matches", "sift-map", "--json")
    assert json.loads(out)["status"] == "redone"
    # --from: that step and the later ones, whatever their configuration
    _, out, _ = cbir("pipeline", toml, "--set", "match.ratio=0.9", "--from", "localize", "--json")
    assert any("(replaced)" in s and s.startswith("localize") for s in json.loads(out)["steps"])
    # the running step's progress reaches the caller (the command draws it as a bar)
    updates: dict[str, list[tuple[int, int]]] = {}

    @contextlib.contextmanager
    def recorder(label):
        yield lambda advance, total: updates.setdefault(label, []).append((advance, total))

    plan = pipeline.plan(pipeline.load_config(toml, ["match.ratio=0.9"]), toml)
    pipeline.run(plan, from_step="localize", progress=recorder)
    assert sum(a for a, _ in updates["localize"]) == 3 and {t for _, t in updates["localize"]} == {3}
    assert sum(a for a, _ in updates["match query pairs"]) == 15  # reused pairs count as done
    assert {label.split()[0] for label in updates} == {"extract", "match", "localize", "report"}
    # a standalone localization into the pipeline's result of another configuration is refused
    code, _, err = cbir("localize", "--query", q, "--map", m, "--pairs", q / "cbir" / "pairs" / "densevlad_top5.txt",
                        "--local", "sift", "--matches", "sift-query", "--config", "config2",
                        "--name", "sift-densevlad-config1", ok=False)
    assert code == 1 and "another configuration (config: \"config1\" -> \"config2\"" in err
