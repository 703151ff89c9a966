"""Mutual nearest-neighbour matching and two-view verification, against plain references."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest
import torch

from cbir.geometry.cameras import Camera
from cbir.matching import MatcherConf, PairBatch, VerifyConf, match_descriptors, verify_pair
from cbir.matching.nearest_neighbor import as_unit_tensor
from cbir.matching.verify import UNDEFINED, verification_camera


def unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_mutual_nn(d0, d1, ratio=None, max_distance=None):
    """The textbook reference: full similarity matrix, argmax both ways."""
    sim = d0 @ d1.T
    nn01, nn10 = sim.argmax(1), sim.argmax(0)
    keep = nn10[nn01] == np.arange(len(d0))
    best = sim[np.arange(len(d0)), nn01]
    if ratio is not None:
        second = np.sort(sim, axis=1)[:, -2]
        keep &= (2 - 2 * best) < ratio ** 2 * (2 - 2 * second)
    if max_distance is not None:
        keep &= (2 - 2 * best) <= max_distance ** 2
    i = np.flatnonzero(keep)
    return np.stack([i, nn01[i]], 1), best[i]


@pytest.mark.parametrize("ratio,max_distance", [(None, None), (0.9, None), (None, 1.2), (0.8, 1.0)])
@pytest.mark.parametrize("block", [(4096, 4096), (7, 64), (3, 5)])  # one tile, many tiles, tiny tiles
def test_matches_equal_the_numpy_reference(ratio, max_distance, block):
    rng = np.random.default_rng(1)
    base = unit(rng, 400)
    d0 = base + 0.1 * rng.standard_normal(base.shape).astype(np.float32)
    d1 = np.concatenate([base[::-1], unit(rng, 150)])  # 400 true matches and 150 distractors
    d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
    m, s = match_descriptors(torch.from_numpy(d0), torch.from_numpy(d1),
                             MatcherConf(ratio=ratio, max_distance=max_distance, block_rows=block[0],
                                                         block_cols=block[1]))
    rm, rs = numpy_mutual_nn(d0, d1, ratio, max_distance)
    assert m.dtype == np.int32 and s.dtype == np.float32
    np.testing.assert_array_equal(m, rm)
    np.testing.assert_allclose(s, rs, atol=1e-5)
    if ratio is None and max_distance is None:
        assert len(m) >= 390 and np.all(m[:, 1] == 399 - m[:, 0])  # recovers the true matches


def test_non_mutual_keeps_every_row():
    rng = np.random.default_rng(2)
    d0, d1 = unit(rng, 50), unit(rng, 70)
    m, _ = match_descriptors(torch.from_numpy(d0), torch.from_numpy(d1), MatcherConf(mutual=False))
    np.testing.assert_array_equal(m[:, 1], (d0 @ d1.T).argmax(1))


def test_empty_and_mismatched_inputs():
    e = torch.zeros((0, 16))
    d = torch.from_numpy(unit(np.random.default_rng(0), 5, 16))
    for a, b in ((e, d), (d, e), (e, e)):
        m, s = match_descriptors(a, b)
        assert m.shape == (0, 2) and s.shape == (0,)
    m, _ = match_descriptors(d, d[:1], MatcherConf(ratio=0.8))  # no second neighbour: no ratio test possible
    assert m.shape == (0, 2)
    with pytest.raises(ValueError, match="dimensions differ"):
        match_descriptors(d, torch.from_numpy(unit(np.random.default_rng(0), 5, 8)))


def test_raw_descriptors_are_normalized_before_matching():
    raw = np.random.default_rng(3).integers(0, 255, (20, 128)).astype(np.uint8)  # SIFT as kapture stores it
    t = as_unit_tensor(raw, torch.device("cpu"))
    assert torch.allclose(t.norm(dim=1), torch.ones(20))


CONFS = [MatcherConf(), MatcherConf(ratio=0.8), MatcherConf(mutual=False, max_distance=1.0),
         MatcherConf(ratio=0.9, max_distance=1.2)]


def both_paths(pairs, conf, tile_bytes):
    """The GPU's path (whole-row tiles, queued, one copy back) and the CPU's (cache tiles),
    both run here on the CPU."""
    out = []
    for path, c in (("rows", MatcherConf(**{**conf.__dict__, "device_tile_bytes": tile_bytes})), ("tiled", conf)):
        batch = PairBatch(c, path=path)
        for d0, d1 in pairs:
            batch.add(torch.from_numpy(d0), torch.from_numpy(d1))
        out.append(batch.results())
    return out


@pytest.mark.parametrize("conf", CONFS, ids=["mutual", "ratio", "distance", "ratio+distance"])
@pytest.mark.parametrize("tile_bytes", [1 << 30, 4 * 70 * 550, 1])  # whole matrix, 70 rows, one row
def test_device_path_equals_cpu_path(conf, tile_bytes):
    """The GPU's row tiles give the CPU path's matches, pair by pair and in order, exact
    ties included (a column tied between rows goes to the first row), and its scores up to
    the rounding of another product shape."""
    rng = np.random.default_rng(4)
    base = unit(rng, 400)
    d0 = base + 0.1 * rng.standard_normal(base.shape).astype(np.float32)
    d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
    d1 = np.concatenate([base[::-1], unit(rng, 150)])
    tied = np.concatenate([d0[:50], d0[:50]])  # every column tied between two rows
    pairs = [(d0, d1), (d1, d0), (d0[:0], d1), (tied, d0[:60]), (d0, d1[:1]), (unit(rng, 3), unit(rng, 900))]
    rows, tiled = both_paths(pairs, conf, tile_bytes)
    assert len(rows) == len(tiled) == len(pairs)
    for (m0, s0), (m1, s1) in zip(rows, tiled, strict=True):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_allclose(s0, s1, rtol=0, atol=1e-6)
    assert len(rows[0][0]) > 300 and len(rows[2][0]) == 0


@pytest.mark.parametrize("conf", CONFS, ids=["mutual", "ratio", "distance", "ratio+distance"])
def test_device_path_equals_cpu_path_on_real_sift(shared, conf):
    """Real SIFT of kapture's maupertuis sample (about 6k features an image), every pair."""
    root = shared / "data" / "kapture_maupertuis" / "reconstruction" / "descriptors" / "SIFT"
    descs = [np.fromfile(f, np.uint8).reshape(-1, 128).astype(np.float32) for f in sorted(root.glob("*.desc"))]
    descs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in descs]
    pairs = [(a, b) for i, a in enumerate(descs) for b in descs[i + 1:]]
    rows, tiled = both_paths(pairs, conf, 16 << 20)
    for (m0, s0), (m1, s1) in zip(rows, tiled, strict=True):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_allclose(s0, s1, rtol=0, atol=1e-6)
    assert sum(len(m) for m, _ in rows) > 1000


# ---------------------------------------------------------------- verification
def two_view_scene(n=300, outliers=100, seed=0):
    """Points seen by two calibrated cameras (known relative pose), plus random outliers."""
    rng = np.random.default_rng(seed)
    cam = Camera("SIMPLE_PINHOLE", 640, 480, (500.0, 320.0, 240.0))
    X = np.c_[rng.uniform(-2, 2, n), rng.uniform(-1.5, 1.5, n), rng.uniform(4, 8, n)]
    angle = 0.1
    R = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    t = np.array([-0.8, 0.05, 0.1])

    def project(P):
        x = P[:, :2] / P[:, 2:] * 500.0 + [320.0, 240.0]
        return x - 0.5  # cbir convention: pixel centre at 0

    kp0 = project(X)
    kp1 = project(X @ R.T + t)
    kp0 = np.r_[kp0, rng.uniform(0, [640, 480], (outliers, 2))]
    kp1 = np.r_[kp1, rng.uniform(0, [640, 480], (outliers, 2))]
    matches = np.c_[np.arange(n + outliers), np.r_[np.arange(n), n + rng.permutation(outliers)]].astype(np.int32)
    return cam, kp0.astype(np.float32), kp1.astype(np.float32), matches, n


def test_verification_keeps_the_true_matches():
    cam, kp0, kp1, matches, n = two_view_scene()
    pc = verification_camera(cam, 640, 480)
    v = verify_pair(pc, kp0, pc, kp1, matches, VerifyConf())
    assert v.config == int(pycolmap.TwoViewGeometryConfiguration.CALIBRATED)
    assert v.inliers[:n].mean() > 0.97 and v.inliers[n:].mean() < 0.1
    assert np.isfinite(v.E).all() and np.isfinite(v.F).all()


def test_verification_without_intrinsics_falls_back_to_fundamental():
    cam, kp0, kp1, matches, n = two_view_scene(seed=1)
    pc = verification_camera(Camera("UNKNOWN_CAMERA", 640, 480, ()), 640, 480)
    v = verify_pair(pc, kp0, pc, kp1, matches, VerifyConf())
    assert v.config == int(pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED)
    assert v.inliers[:n].mean() > 0.95


@pytest.mark.parametrize("count", [0, 3, 10])
def test_too_few_matches_give_an_empty_verified_set(count):
    cam, kp0, kp1, matches, _ = two_view_scene()
    pc = verification_camera(cam, 640, 480)
    v = verify_pair(pc, kp0, pc, kp1, matches[:count], VerifyConf(min_inliers=15))
    assert v.inliers.shape == (count,) and not v.inliers.any()
    if count < 5:
        assert v.config == UNDEFINED and np.isnan(v.F).all()


def test_pure_noise_is_not_verified():
    rng = np.random.default_rng(5)
    cam = Camera("SIMPLE_PINHOLE", 640, 480, (500.0, 320.0, 240.0))
    kp0, kp1 = rng.uniform(0, [640, 480], (200, 2)), rng.uniform(0, [640, 480], (200, 2))
    m = np.c_[np.arange(200), np.arange(200)].astype(np.int32)
    pc = verification_camera(cam, 640, 480)
    v = verify_pair(pc, kp0, pc, kp1, m, VerifyConf())
    assert v.inliers.sum() < 30


def test_models_pycolmap_did_not_estimate_are_nan_matrices():
    """pycolmap gives None for a model it did not estimate (a default TwoViewGeometry has
    F None; a sceaux pair verified in tests/test_ray.py returned one): the store still gets
    a 3x3 NaN matrix, as its columns require, and zeros mean "none" too."""
    from cbir.matching.verify import _matrix

    assert pycolmap.TwoViewGeometry().F is None
    for missing in (None, np.zeros((3, 3)), np.float64(np.nan)):
        assert _matrix(missing).shape == (3, 3) and np.isnan(_matrix(missing)).all()
    np.testing.assert_array_equal(_matrix(np.eye(3)), np.eye(3))
