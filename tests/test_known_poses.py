"""Verification against known poses (`cbir match --verify poses`): exact epipolar geometry
of posed cameras, distortion undone, outliers rejected, RANSAC where a pair has no pose."""

from __future__ import annotations

import json

import numpy as np
import pycolmap
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.geometry.poses import Pose
from cbir.io.colmap import COLMAP_PIXEL_OFFSET
from cbir.io.store import open_store
from cbir.matching.known_poses import (
    PosedPair,
    essential_matrix,
    has_baseline,
    relative_pose,
    sampson_errors,
    verify_with_poses,
)

from .conftest import render_example, writable_copy


def look_at(center, target=(0.0, 0.0, 10.0)) -> Pose:
    """World-to-camera pose of a camera at ``center`` looking at ``target`` (y down)."""
    c, t = np.asarray(center, float), np.asarray(target, float)
    z = (t - c) / np.linalg.norm(t - c)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    rot = np.stack([x, y, z])
    return Pose.from_matrix(rot, -rot @ c)


def project(camera: pycolmap.Camera, pose: Pose, points: np.ndarray) -> np.ndarray:
    """Pixels (cbir convention) of world points, with the camera's distortion."""
    cam = points @ pose.rotation_matrix.T + np.asarray(pose.tvec)
    return np.asarray(camera.img_from_cam(cam), np.float64)[:, :2] - COLMAP_PIXEL_OFFSET


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    points = rng.uniform([-4, -3, 8], [4, 3, 14], (300, 3))
    camera = pycolmap.Camera(model="RADIAL", width=1000, height=800, params=[900.0, 500.0, 400.0, -0.12, 0.03])
    camera.has_prior_focal_length = True
    pose0, pose1 = look_at([0, 0, 0]), look_at([1.5, 0.2, 0.5])
    kp0 = project(camera, pose0, points) + rng.normal(0, 0.3, (300, 2))
    kp1 = project(camera, pose1, points) + rng.normal(0, 0.3, (300, 2))
    return camera, pose0, pose1, kp0, kp1, rng


def test_relative_pose_and_essential_matrix_agree_with_the_poses(scene):
    camera, pose0, pose1, *_ = scene
    rot, t = relative_pose(pose0, pose1)
    p = np.array([0.3, -0.2, 9.0])
    in0 = pose0.rotation_matrix @ p + pose0.tvec
    in1 = pose1.rotation_matrix @ p + pose1.tvec
    np.testing.assert_allclose(rot @ in0 + t, in1, atol=1e-9)
    e = essential_matrix(pose0, pose1)
    assert abs((in1 / in1[2]) @ e @ (in0 / in0[2])) < 1e-12  # x1^T E x0 = 0


def test_correct_matches_are_inliers_and_outliers_are_not(scene):
    camera, pose0, pose1, kp0, kp1, rng = scene
    good = np.stack([np.arange(300), np.arange(300)], 1)
    bad = np.stack([np.arange(300), rng.permutation(300)], 1)
    bad = bad[bad[:, 0] != bad[:, 1]]
    matches = np.concatenate([good, bad])
    [(mask, e)] = verify_with_poses([PosedPair(camera, pose0, kp0, camera, pose1, kp1, matches)], 4.0, 15)
    assert mask[:300].all()  # 0.3 px noise, distortion undone: every correct match passes
    assert mask[300:].mean() < 0.1  # a random match passes only near its epipolar line
    np.testing.assert_allclose(e, essential_matrix(pose0, pose1))


def test_each_image_has_its_own_camera_and_distortion_is_undone(scene):
    _, pose0, pose1, _, _, rng = scene
    points = rng.uniform([-4, -3, 8], [4, 3, 14], (300, 3))
    pinhole = pycolmap.Camera(model="PINHOLE", width=1000, height=800, params=[900.0, 900.0, 500.0, 400.0])
    wide = pycolmap.Camera(model="RADIAL", width=1600, height=1200, params=[700.0, 800.0, 600.0, -0.3, 0.1])
    kp0, kp1 = project(pinhole, pose0, points), project(wide, pose1, points)
    good = np.stack([np.arange(300), np.arange(300)], 1)
    [(mask, _)] = verify_with_poses([PosedPair(pinhole, pose0, kp0, wide, pose1, kp1, good)], 4.0, 0)
    assert mask.all()
    wrong = pycolmap.Camera(model="PINHOLE", width=1600, height=1200, params=[700.0, 700.0, 800.0, 600.0])
    [(mask, _)] = verify_with_poses([PosedPair(pinhole, pose0, kp0, wrong, pose1, kp1, good)], 4.0, 0)
    assert mask.mean() < 0.9  # had the distortion been ignored, correct matches would fail


def test_sampson_error_is_the_smallest_joint_displacement_in_pixels():
    # camera 1 translated along x: epipolar lines are horizontal. Keypoints 3 px apart
    # vertically become consistent by moving each 1.5 px: a joint displacement of 3/sqrt(2)
    # px, however the offset is split between the images
    e = essential_matrix(Pose.from_matrix(np.eye(3), np.zeros(3)), Pose.from_matrix(np.eye(3), np.array([-1.0, 0, 0])))
    f = np.full(2, 1000.0)
    x0 = np.array([[0.1, 0.2], [0.1, 0.2 - 1.5 / 1000]])
    x1 = np.array([[0.05, 0.2 + 3 / 1000], [0.05, 0.2 + 1.5 / 1000]])
    err = sampson_errors(x0, x1, np.stack([e, e]), f, f)
    np.testing.assert_allclose(err, [3 / np.sqrt(2)] * 2, rtol=1e-9)
    # the pixel size of each camera counts: camera 1 twice finer, its offset weighs half
    err = sampson_errors(x0[:1], x1[:1], e[None], np.array([1000.0]), np.array([2000.0]))
    np.testing.assert_allclose(err, 3 * 2 / np.sqrt(5), rtol=1e-9)


def test_few_inliers_keep_none_and_empty_pairs_pass(scene):
    camera, pose0, pose1, kp0, kp1, _ = scene
    few = np.stack([np.arange(10), np.arange(10)], 1)
    none = np.zeros((0, 2), np.int64)
    out = verify_with_poses([PosedPair(camera, pose0, kp0, camera, pose1, kp1, few),
                             PosedPair(camera, pose0, kp0, camera, pose1, kp1, none)], 4.0, 15)
    assert not out[0][0].any() and out[1][0].shape == (0,)


def test_a_pair_without_baseline_is_detected():
    pose = look_at([1, 2, 3])
    turned = Pose.from_matrix(np.eye(3), -np.eye(3) @ np.array([1.0, 2.0, 3.0]))  # same centre, other rotation
    assert not has_baseline(pose, turned) and has_baseline(pose, look_at([1, 2, 3.01]))


@pytest.mark.slow
def test_cli_verifies_map_pairs_with_poses_and_queries_with_ransac(sceaux, tmp_path):
    root = writable_copy(sceaux, tmp_path / "sceaux")
    m, q = root / "mapping", root / "query"

    def run(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r

    for ds in (m, q):
        run("extract", ds, "--local", "sift", "--max-keypoints", "2000")
    run("pairs", "exhaustive", "--map", m, "-o", tmp_path / "map.txt")
    out = json.loads(run("match", "--query", m, "--pairs", tmp_path / "map.txt", "--local", "sift", "--ratio", "0.8",
                         "--verify", "poses", "--name", "poses", "--json").stdout)
    assert out["verified_with_poses"] == 28 and out["ransac_fallbacks"] == [] and out["inliers"] > 1000
    with open_store(m / "cbir/matches/poses.h5") as s:
        assert s.config["verify"]["method"] == "poses"
        assert set(s.read_all("geometry_config").tolist()) <= {2}  # CALIBRATED, E from the poses
    run("pairs", "exhaustive", "--map", m, "--query", q, "-o", tmp_path / "query.txt")
    out = json.loads(run("match", "--query", q, "--map", m, "--pairs", tmp_path / "query.txt", "--local", "sift",
                         "--verify", "poses", "--name", "q", "--json").stdout)
    assert out["verified_with_poses"] == 0 and len(out["ransac_fallbacks"]) == 24
    assert {f["reason"] for f in out["ransac_fallbacks"]} == {"an image without pose"}


def _map_and_localize(root, method: str) -> dict:
    """Map x map matches verified by ``method``, the map they give and the localization of
    the queries against it (the same RANSAC-verified query matches for both methods)."""
    from cbir import localize as localize_mod
    from cbir import mapping
    from cbir.evaluation.localization import pose_errors, summarize
    from cbir.io.dataset import Dataset
    from cbir.io.map_store import read_map
    from cbir.io.pairs import exhaustive_pairs
    from cbir.matching import MatcherConf, VerifyConf
    from cbir.matching import match as match_mod

    m, q = Dataset(root / "mapping"), Dataset(root / "query")
    matcher = MatcherConf(ratio=0.8)
    match_mod.main(m, m, exhaustive_pairs(m.sensors.image_names()), "sift", name=method, matcher=matcher,
                   verify=VerifyConf(method=method))
    report = mapping.main(m, "sift", method, name=method)
    query_pairs = exhaustive_pairs(q.sensors.image_names(), m.sensors.image_names())
    match_mod.main(q, m, query_pairs, "sift", name="query", matcher=matcher, verify=VerifyConf())
    loc = localize_mod.main(q, m, query_pairs, "sift", "query", map_name=method, config="config1", name=method)
    ev = summarize(pose_errors({r.name: r.pose for r in loc.results if r.success},
                               Dataset(root / "query_gt").sensors.image_poses()))
    return {"points": report.points, "track": report.mean_track_length,
            "reprojection": float(np.nanmean(read_map(m.store_path("map", method)).errors)), **ev}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["sceaux_castle", "strecha_fountain_p11", "rendered_example"])
def test_known_pose_maps_localize_as_well_as_ransac_maps(dataset, shared, tmp_path):
    """Accuracy unchanged: the same queries localized as precisely, a map as precise (track
    length, reprojection error) and nearly as large (RANSAC's F and E models also keep a
    few matches more than 4 px off the known epipolar geometry: 1-3% more points)."""
    from cbir import extract as extract_mod
    from cbir.io.dataset import Dataset

    root = render_example(tmp_path / dataset) if dataset == "rendered_example" else \
        writable_copy(shared / "data" / dataset, tmp_path / dataset)
    sift = extract_mod.build_extractor("sift", {"max_keypoints": 4000}, "local")
    for part in ("mapping", "query"):
        extract_mod.extract_all([sift], Dataset(root / part))
    ransac, poses = _map_and_localize(root, "ransac"), _map_and_localize(root, "poses")
    assert poses["localized"] == ransac["localized"] == poses["queries"]
    assert all(p >= r for p, r in zip(poses["within"], ransac["within"], strict=True))
    assert poses["median_translation"] <= ransac["median_translation"] * 1.1 + 0.002
    assert poses["median_rotation_deg"] <= ransac["median_rotation_deg"] * 1.1 + 0.01
    assert poses["reprojection"] <= ransac["reprojection"] + 0.005
    assert poses["track"] >= ransac["track"] - 0.02
    assert poses["points"] >= 0.96 * ransac["points"]


def test_pairs_the_poses_cannot_verify_go_to_ransac_with_their_reason(scene):
    from cbir.matching.match import _posed, _VerifyJob
    from cbir.matching.verify import VerifyConf, verification_camera

    camera, pose0, pose1, kp0, kp1, _ = scene
    m = np.stack([np.arange(10), np.arange(10)], 1)
    job = _VerifyJob(camera, kp0, camera, kp1, m, VerifyConf(method="poses"))
    assert _posed(job, pose0, pose1)[0] is not None
    assert _posed(job, pose0, None) == (None, "an image without pose")
    assert _posed(job, pose0, pose0) == (None, "no baseline (the camera centres coincide)")
    guessed = verification_camera(None, 1000, 800)  # no calibration: COLMAP's focal prior, not a calibration
    job = _VerifyJob(camera, kp0, guessed, kp1, m, VerifyConf(method="poses"))
    assert _posed(job, pose0, pose1) == (None, "a camera without known intrinsics")
