"""DenseVLAD, `cbir retrieve` and `cbir evaluate --retrieval` on the real sceaux_castle photos,
and the retrieval metrics against hand-computed values."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError
from cbir.evaluation.retrieval import (
    GroundTruth,
    average_precision,
    evaluate_rankings,
    ground_truth_from_poses,
    read_ground_truth,
)
from cbir.geometry.poses import Pose
from cbir.io.images import LoadedImage
from cbir.io.pairs import Pair
from cbir.models.densevlad import DenseVLAD, read_model, vlad


def cbir(*args, ok: bool = True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + r.stderr
    return r.exit_code, r.stdout, r.stderr


# ---------------------------------------------------------------- DenseVLAD units
def test_vlad_is_intra_normalized_residual_sums():
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((4, 8)).astype(np.float32)
    desc = np.repeat(centroids, 5, axis=0) + 0.01 * rng.standard_normal((20, 8)).astype(np.float32)
    v = vlad(desc, centroids).reshape(4, 8)
    # each block is the normalized sum of its own cluster's residuals, then the whole is unit L2
    for c in range(4):
        r = (desc[c * 5:(c + 1) * 5] - centroids[c]).sum(0)
        np.testing.assert_allclose(v[c] * 2, r / np.linalg.norm(r), atol=1e-5)
    assert abs(np.linalg.norm(v) - 1) < 1e-5
    assert not vlad(np.zeros((0, 8), np.float32), centroids).any()


def test_densevlad_needs_a_model_and_refuses_another_configuration(tmp_path):
    ex = DenseVLAD()
    with pytest.raises(CbirError, match="extract the map with --learn first"):
        _ = ex.descriptor_dim
    images = {f"{i}.png": LoadedImage((np.random.default_rng(i).random((120, 160)) * 255).astype(np.uint8),
                                      (160, 120), (1.0, 1.0)) for i in range(3)}
    with pytest.raises(CbirError, match="pass --model .*or --learn"):  # a model is learned only when asked
        DenseVLAD({"clusters": 8, "step": 8}).prepare(tmp_path / "dv.h5", sorted(images), images.__getitem__)
    ex = DenseVLAD({"clusters": 8, "step": 8, "learn": True})
    steps: list[tuple[int, int]] = []
    ex.prepare(tmp_path / "dv.h5", sorted(images), images.__getitem__, progress=lambda a, t: steps.append((a, t)))
    assert steps == [(1, 7)] * 7  # each image sampled, the k-means, each image described
    model = tmp_path / "dv.model.h5"
    assert model.exists() and ex.descriptor_dim == 8 * 128  # 3 images < pca_dim: no PCA
    assert len(ex._learned) == 3  # the VLADs of the learning, kept for the extraction
    d = ex.extract(images["0.png"])
    assert len(ex._learned) == 2  # taken, not described again: `again` below describes it, bit for bit
    assert d.shape == (1024,) and abs(np.linalg.norm(d) - 1) < 1e-5
    again = DenseVLAD({"clusters": 8, "step": 8, "model": str(model)})
    np.testing.assert_array_equal(again.extract(images["0.png"]), d)
    assert again.identity()["model_digest"] == ex.identity()["model_digest"]
    with pytest.raises(CbirError, match="learned with step=8"):
        read_model(model, DenseVLAD({"clusters": 8, "step": 4}))


# ---------------------------------------------------------------- metrics
def test_average_precision_matches_the_revisited_definition():
    assert average_precision(np.array([0, 1]), 2) == 1.0
    # relevant at ranks 1 and 3 (0-based) of 2 relevant: (0 + 1/2)/2/2 + (1/3 + 2/4)/2/2
    assert average_precision(np.array([1, 3]), 2) == pytest.approx((0.5 / 2 + (1 / 3 + 0.5) / 2) / 2)
    assert average_precision(np.array([0]), 4) == pytest.approx(0.25)


def test_rankings_with_junk_and_missing_queries():
    pairs = [Pair("q1", "a"), Pair("q1", "j"), Pair("q1", "b"), Pair("q2", "x"), Pair("q2", "y")]
    gt = GroundTruth({"q1": {"b"}, "q2": {"z"}, "q3": {"a"}}, {"q1": {"j"}})
    r = evaluate_rankings(pairs, gt, ks=(1, 2))
    assert r["queries"] == 2 and r["queries_without_pairs"] == ["q3"]
    assert r["recall@k"] == {1: 0.0, 2: 0.5}  # junk j removed: b is second for q1
    assert r["precision@k"][2] == pytest.approx((0.5 + 0.0) / 2)
    assert r["mAP"] == pytest.approx((average_precision(np.array([1]), 1) + 0.0) / 2)


def test_ground_truth_file_errors(tmp_path):
    f = tmp_path / "gt.txt"
    f.write_text("# query, map\nq, a\nq, b, junk\n")
    gt = read_ground_truth(f)
    assert gt.relevant == {"q": {"a"}} and gt.junk == {"q": {"b"}}
    f.write_text("q, a, maybe\n")
    with pytest.raises(CbirError, match="gt.txt:1: label must be"):
        read_ground_truth(f)


def test_pose_ground_truth_uses_distance_and_direction():
    ident = Pose.from_matrix(np.eye(3), np.zeros(3))
    turned = Pose.from_matrix(np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float), np.zeros(3))
    far = Pose.from_matrix(np.eye(3), np.array([0, 0, -50.0]))
    gt = ground_truth_from_poses({"q": ident}, {"same": ident, "turned": turned, "far": far},
                                 max_distance=10, max_angle_deg=45)
    assert gt.relevant == {"q": {"same"}}


# ---------------------------------------------------------------- end to end, real photos
@pytest.mark.slow
def test_densevlad_fusion_retrieval_on_real_photos(sceaux, tmp_path):
    root = tmp_path / "sceaux"
    shutil.copytree(sceaux, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    m, q = root / "mapping", root / "query"
    cbir("extract", m, "--global", "densevlad", "--learn")
    cbir("extract", m, "--global", "densevlad", "--name", "densevlad32", "--conf", "clusters=32", "--learn")
    cbir("check", m)  # the DenseVLAD models beside the stores are not taken for stores
    cbir("extract", q, "--global", "densevlad", "--model", m / "cbir/global/densevlad.model.h5")
    cbir("extract", q, "--global", "densevlad", "--name", "densevlad32", "--conf", "clusters=32",
         "--model", m / "cbir/global/densevlad32.model.h5")
    _, out, _ = cbir("retrieve", "--map", m, "--query", q, "--global", "densevlad,densevlad32",
                     "--fusion", "gharm", "--topk", "3", "-o", tmp_path / "pairs.txt", "--json")
    assert json.loads(out)["pair_count"] == 9
    _, out, _ = cbir("evaluate", "--retrieval", "--pairs", tmp_path / "pairs.txt", "--map", m,
                     "--query-gt", root / "query_gt", "--ks", "1,3", "--json")
    metrics = json.loads(out)
    assert metrics["queries"] == 3
    assert metrics["recall@k"]["1"] >= 2 / 3 and metrics["mAP"] > 0.5
    # a query store made with another vocabulary is refused
    code, _, err = cbir("retrieve", "--map", m, "--query", q, "--global", "densevlad", "-o", "-", ok=False)
    assert code == 0  # same model: fine
    shutil.copy(m / "cbir/global/densevlad32.h5", q / "cbir/global/densevlad.h5")
    code, _, err = cbir("retrieve", "--map", m, "--query", q, "--global", "densevlad", "-o", "-", ok=False)
    assert code == 1 and ("another configuration" in err or "dimension" in err)
