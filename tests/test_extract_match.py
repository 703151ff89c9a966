"""``cbir extract``, ``cbir pairs``, ``cbir match --verify`` and ``cbir show`` on real photos,
plus the bad inputs each must survive (reported skips, one-line errors, intact outputs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.io.dataset import Dataset
from cbir.io.images import read_image
from cbir.io.store import open_store
from cbir.models.sift import SIFT, rootsift


def cbir(*args, ok: bool = True) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result.exit_code, result.stdout, result.stderr


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reconstruction"))
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return dst


@pytest.fixture(scope="module")
def sift_map(sceaux, tmp_path_factory) -> Path:
    """The sceaux_castle map with SIFT features and verified matches of all its pairs."""
    root = writable_copy(sceaux / "mapping", tmp_path_factory.mktemp("sceaux") / "mapping")
    cbir("extract", root, "--local", "sift", "--max-keypoints", "4000")
    cbir("pairs", "exhaustive", "--map", root, "-o", root / "pairs.txt")
    cbir("match", "--query", root, "--pairs", root / "pairs.txt", "--local", "sift", "--verify", "--ratio", "0.8")
    return root


# ---------------------------------------------------------------- SIFT / RootSIFT units
def test_rootsift_is_the_hellinger_map():
    d = np.random.default_rng(0).integers(0, 200, (50, 128)).astype(np.float32)
    r = rootsift(d)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1, atol=1e-5)
    # inner product of RootSIFT = Bhattacharyya coefficient of the L1-normalized histograms
    p = d / d.sum(1, keepdims=True)
    np.testing.assert_allclose(r @ r.T, np.sqrt(p) @ np.sqrt(p).T, atol=1e-5)


def test_sift_limits_orders_and_maps_back(sceaux):
    path = sceaux / "mapping" / "sensors" / "records_data" / "100_7100.jpg"
    full = SIFT({"max_keypoints": 500, "max_size": 2000}).extract(read_image(path, grayscale=True))
    half = SIFT({"max_keypoints": 500, "max_size": 512}).extract(read_image(path, grayscale=True, max_size=512))
    assert len(full["keypoints"]) == 500 and np.all(np.diff(full["scores"]) <= 0)
    np.testing.assert_allclose(np.linalg.norm(full["descriptors"], axis=1), 1, atol=1e-5)
    # keypoints of the half-size image are in original pixels: inside the 1024 x 769 frame
    assert half["keypoints"][:, 0].max() > 700 and half["keypoints"][:, 0].max() < 1024
    assert half["keypoint_params"][:, 0].mean() > 1.5 * full["keypoint_params"][:, 0].mean() / 2


def test_upright_sift_has_one_orientation_per_location(sceaux):
    path = sceaux / "mapping" / "sensors" / "records_data" / "100_7100.jpg"
    out = SIFT({"upright": True, "max_keypoints": 0}).extract(read_image(path, grayscale=True))
    assert np.all(out["keypoint_params"][:, 1] == 0)
    located = np.c_[out["keypoints"], out["keypoint_params"][:, :1]].round(2)
    assert len(np.unique(located, axis=0)) == len(out["keypoints"])


def test_blank_image_has_no_keypoints():
    from cbir.io.images import LoadedImage

    out = SIFT().extract(LoadedImage(np.full((300, 400), 77, np.uint8), (400, 300), (1.0, 1.0)))
    assert out["keypoints"].shape == (0, 2) and out["descriptors"].shape == (0, 128)


# ---------------------------------------------------------------- end to end, real photos
def overlapping_by_pose(ds: Dataset) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Pairs whose viewing directions are within 20 degrees, and the rest (all face the facade)."""
    poses = ds.sensors.image_poses()
    names = sorted(poses)
    close, far = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            za, zb = poses[a].rotation_matrix[2], poses[b].rotation_matrix[2]  # optical axes in world
            (close if np.degrees(np.arccos(np.clip(za @ zb, -1, 1))) < 20 else far).append((a, b))
    return close, far


@pytest.mark.slow
def test_sift_matches_verify_on_overlapping_pairs(sift_map):
    ds = Dataset(sift_map)
    close, far = overlapping_by_pose(ds)
    assert len(close) >= 10 and len(far) >= 10
    with open_store(ds.store_path("matches", "sift-pairs"), "matches") as s:
        assert len(s) == 28 and s.attrs["local_features"] == "sift"
        for pair in close:
            item = s.get(pair)
            assert item["inliers"].sum() >= 100, pair
            assert item["geometry_config"] in (2, 3)  # calibrated / uncalibrated
        for pair in far:  # wide baselines, still the same facade
            assert s.get(pair)["inliers"].sum() >= 30, pair


@pytest.mark.slow
def test_overlapped_verification_writes_the_same_store(sift_map, tmp_path, monkeypatch):
    """A GPU's schedule (chunks queued, read back and verified while the next is matched),
    run here on the CPU with chunks of 5 pairs: the same matches and inliers as the CPU's
    schedule, pair for pair."""
    from cbir.io.pairs import read_pairs
    from cbir.matching import MatcherConf, VerifyConf
    from cbir.matching import match as match_mod

    monkeypatch.setattr(match_mod, "VERIFY_CHUNK", 5)
    root = writable_copy(sift_map, tmp_path / "mapping")
    ds = Dataset(root)
    pairs = read_pairs(root / "pairs.txt")
    reports = [match_mod.main(ds, ds, pairs, "sift", name=f"sched-{o}", matcher=MatcherConf(ratio=0.8),
                              verify=VerifyConf(), device="cpu", num_workers=2, overlap=o) for o in (False, True)]
    assert [r.matched for r in reports] == [28, 28]
    assert all(set(r.seconds) == {"features", "matching", "verification", "writing"} and r.bound_by in r.seconds
               and r.seconds["verification"] > 0 for r in reports)
    with open_store(ds.store_path("matches", "sched-False")) as a, \
            open_store(ds.store_path("matches", "sched-True")) as b:
        assert sorted(a.keys) == sorted(b.keys)
        for key in a.keys:
            x, y = a.get(key), b.get(key)
            np.testing.assert_array_equal(x["matches"], y["matches"])
            assert x["inliers"].sum() == y["inliers"].sum() > 0


@pytest.mark.slow
def test_unrelated_scenes_do_not_verify(sift_map, maupertuis, tmp_path):
    other = writable_copy(maupertuis, tmp_path / "maupertuis")
    cbir("extract", other, "--local", "sift", "--max-keypoints", "4000")
    cbir("pairs", "exhaustive", "--query", other, "--map", sift_map, "-o", tmp_path / "cross.txt")
    _, out, _ = cbir("match", "--query", other, "--map", sift_map, "--pairs", tmp_path / "cross.txt",
                     "--local", "sift", "--verify", "--ratio", "0.8", "--json")
    summary = json.loads(out)
    assert summary["matched"] == 4 * 8
    with open_store(summary["store"]) as s:
        inliers = [int(s.get(k)["inliers"].sum()) for k in s.keys]
    assert np.median(inliers) == 0 and max(inliers) < 30  # vs >= 100 on overlapping pairs


@pytest.mark.slow
def test_resume_skips_what_is_done(sift_map):
    _, out, _ = cbir("extract", sift_map, "--local", "sift", "--max-keypoints", "4000", "--json")
    assert json.loads(out)["already_present"] == 8 and json.loads(out)["extracted"] == 0
    assert set(json.loads(out)["seconds"]) == {"decoding", "extraction", "writing"}
    _, out, _ = cbir("match", "--query", sift_map, "--pairs", sift_map / "pairs.txt", "--local", "sift",
                     "--verify", "--ratio", "0.8", "--json")
    assert json.loads(out)["already_present"] == 28 and json.loads(out)["matched"] == 0
    # another configuration is refused, the store is kept
    code, _, err = cbir("extract", sift_map, "--local", "sift", "--max-keypoints", "100", ok=False)
    assert code == 1 and "another configuration" in err and "--overwrite" in err


@pytest.mark.slow
def test_show_matches_draws_a_picture(sift_map, tmp_path):
    cbir("show", "matches", sift_map, "--pair", "100_7101.jpg", "100_7100.jpg", "-o", tmp_path / "m.png")
    img = cv2.imread(str(tmp_path / "m.png"))
    assert img.shape[1] == 2048 and img.shape[0] == 769
    green = (img[:, :, 1] > 150) & (img[:, :, 0] < 100) & (img[:, :, 2] < 100)
    assert green.sum() > 1000  # inlier lines are drawn
    # dense matches: a sample of lines, said so, so that the images stay visible
    _, _, err = cbir("show", "matches", sift_map, "--pair", "100_7101.jpg", "100_7100.jpg", "-o", tmp_path / "s.png",
                     "--max-lines", "20")
    assert "(20 drawn)" in err
    sparse = cv2.imread(str(tmp_path / "s.png"))
    sparse_green = (sparse[:, :, 1] > 150) & (sparse[:, :, 0] < 100) & (sparse[:, :, 2] < 100)
    assert 0 < sparse_green.sum() < green.sum() / 5


@pytest.mark.slow
def test_r2d2_extract_and_match_end_to_end(sceaux, shared, tmp_path):
    root = writable_copy(sceaux / "mapping", tmp_path / "mapping")
    (tmp_path / "three.txt").write_text("100_7100.jpg\n100_7101.jpg\n100_7103.jpg\n")
    _, out, _ = cbir("extract", root, "--local", "r2d2", "--weights", shared / "weights" / "r2d2",
                     "--max-size", "512", "--max-keypoints", "3000", "--images", tmp_path / "three.txt",
                     "--device", "cpu", "--json")
    assert json.loads(out)["extracted"] == 3
    with open_store(Dataset(root).store_path("local", "r2d2_WASF_N16")) as s:
        assert s.config["weights"] == "r2d2_WASF_N16.pt" and s.attrs["keypoint_params"] == "scale"
        assert len(s.get("100_7100.jpg")["keypoints"]) == 3000
    (tmp_path / "p.txt").write_text("100_7100.jpg, 100_7101.jpg\n100_7101.jpg, 100_7103.jpg\n")
    _, out, _ = cbir("match", "--query", root, "--pairs", tmp_path / "p.txt", "--local", "r2d2_WASF_N16",
                     "--verify", "--json")
    summary = json.loads(out)
    assert summary["matched"] == 2 and summary["inliers"] >= 2 * 200


# ---------------------------------------------------------------- bad input
@pytest.fixture
def odd_images(sample_dataset, sceaux) -> Path:
    """The golden sample dataset with a grayscale, an RGBA 16-bit and a corrupt image."""
    photo = cv2.imread(str(sceaux / "mapping" / "sensors" / "records_data" / "100_7100.jpg"))[200:600, 100:600]
    rd = sample_dataset / "sensors" / "records_data"
    cv2.imwrite(str(rd / "left" / "000.png"), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))
    rgba16 = (cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA).astype(np.uint16) * 257)
    cv2.imwrite(str(rd / "left" / "001.png"), rgba16)
    (rd / "right" / "000.png").write_bytes(b"\x89PNG truncated")
    return sample_dataset


def test_odd_images_are_extracted_and_corrupt_ones_reported(odd_images):
    _, out, err = cbir("extract", odd_images, "--local", "rootsift", "--json")
    summary = json.loads(out)
    assert summary["extracted"] == 2
    assert summary["failed"] == [{"image": "right/000.png", "reason": "cannot decode image (empty, corrupt or "
                                                                       "unsupported format)"}]
    assert "skipped" in err and "right/000.png" in err
    with open_store(Dataset(odd_images).store_path("local", "rootsift")) as s:
        assert sorted(s.keys) == ["left/000.png", "left/001.png"]
        assert all(len(s.get(k)["keypoints"]) > 50 for k in s.keys)
        assert s.get("left/001.png")["image_sizes"].tolist() == [500, 400]


def test_match_reports_unknown_images_and_refuses_foreign_features(odd_images, tmp_path):
    cbir("extract", odd_images, "--local", "sift")
    (tmp_path / "p.txt").write_text("left/000.png, left/001.png\nleft/000.png, nowhere.png\n"
                                    "left/001.png, left/000.png\nleft/000.png, left/000.png\n")
    _, out, _ = cbir("match", "--query", odd_images, "--pairs", tmp_path / "p.txt", "--local", "sift", "--json")
    summary = json.loads(out)
    assert summary["matched"] == 1 and summary["duplicates"] == 1
    reasons = " ".join(s["reason"] for s in summary["skipped"])
    assert "nowhere.png is not an image of" in reasons and "paired with itself" in reasons
    other = tmp_path / "other"
    shutil.copytree(odd_images, other, ignore=shutil.ignore_patterns("cbir"))
    cbir("extract", other, "--local", "rootsift", "--name", "sift")  # same name, another extractor
    code, _, err = cbir("match", "--query", other, "--map", odd_images, "--pairs", tmp_path / "p.txt",
                        "--local", "sift", ok=False)
    assert code == 1 and "another extractor configuration" in err and len(err.strip().splitlines()) == 1
    assert 'extractor: "sift" -> "rootsift"; root: false -> true' in err  # the keys that differ, named
    # a keypoint budget is no other description: matched, as hloc does
    cbir("extract", other, "--local", "sift", "--max-keypoints", "50", "--overwrite")
    _, out, _ = cbir("match", "--query", other, "--map", odd_images, "--pairs", tmp_path / "p.txt", "--local", "sift",
                     "--json")
    assert json.loads(out)["matched"] == 3  # of two datasets: a pair of same-named images is no self-pair


def test_the_cli_names_every_extractor_of_the_registries():
    """EXTRACTOR_NAMES (what --help lists without importing torch) is the registries' names."""
    from cbir.models import EXTRACTOR_NAMES, GLOBAL_EXTRACTORS, LOCAL_EXTRACTORS

    assert EXTRACTOR_NAMES == {"local": tuple(sorted(LOCAL_EXTRACTORS)), "global": tuple(sorted(GLOBAL_EXTRACTORS))}


def test_extract_errors_are_one_line(sample_dataset, tmp_path):
    code, _, err = cbir("extract", sample_dataset, "--local", "r2d2", "--weights", tmp_path, ok=False)
    assert code == 1 and "r2d2_WASF_N16.pt" in err and "github.com/naver/r2d2" in err
    (tmp_path / "list.txt").write_text("left/000.png\nmissing.png\n")
    code, _, err = cbir("extract", sample_dataset, "--local", "sift", "--images", tmp_path / "list.txt", ok=False)
    assert code == 1 and "list.txt:2" in err and "missing.png" in err
    code, _, err = cbir("extract", sample_dataset, "--local", "sift", "--conf", "nope=1", ok=False)
    assert code == 1 and "unknown option" in err


def test_an_error_in_the_writer_thread_stops_the_run_and_keeps_what_was_written(sceaux, tmp_path):
    """Outputs are checked and stored by the writer thread: a non-finite output stops the
    run with a one-line error naming the image, nothing of it is stored, the images written
    before stay in the store's batches (a re-run resumes), and nothing hangs."""
    from cbir import extract as extract_mod
    from cbir.errors import CbirError
    from cbir.models.sift import SIFT

    class PoisonedSIFT(SIFT):  # real SIFT, except on the second image (images go in name order)
        calls = 0

        def extract(self, image):
            out = super().extract(image)
            PoisonedSIFT.calls += 1
            if PoisonedSIFT.calls == 2:
                out["descriptors"] = out["descriptors"].astype(np.float32) * np.nan
            return out

    ds = Dataset(writable_copy(sceaux / "mapping", tmp_path / "mapping"))
    names = sorted(ds.sensors.image_names())[:3]
    with pytest.raises(CbirError, match=f"non-finite descriptors for image '{names[1]}'"):
        extract_mod.main(PoisonedSIFT({"max_keypoints": 500}), ds, images=names, num_workers=2)
    report = extract_mod.main(SIFT({"max_keypoints": 500}), ds, images=names, num_workers=2)  # resumes
    # the images written before the error stay (the one after it too, if the writer was late)
    assert 1 <= report.already_present <= 2 and report.extracted == 3 - report.already_present
    with open_store(report.path) as store:
        assert sorted(store.names) == names
        assert all(np.isfinite(store.get(n)["descriptors"]).all() for n in names)
