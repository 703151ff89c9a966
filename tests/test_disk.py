"""DISK: weights generated in the official cvlab-epfl/disk layout load unchanged, and the
features equal the official ``DISK.features(kind="nms")`` with ``detect.py``'s defaults on
two crops of a real photo, one of sides not multiples of 16 (tests/reference/disk, written by
tests/disk_reference.py running the official modules unchanged). The published
``depth-save.pth`` could not be fetched here: it is not tested itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.disk import DISK
from tests.disk_reference import CROPS, official_state, photo

REFERENCE = np.load(Path(__file__).parent / "reference" / "disk" / "generated.npz")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "depth-save.pth"
    torch.save(official_state(), path)
    return path


def _loaded(image: np.ndarray) -> LoadedImage:
    return LoadedImage(image, (image.shape[1], image.shape[0]), (1.0, 1.0))


def test_the_official_features(shared, weights, threads):
    """The official keypoints, every one (integer pixels: equal), scores and descriptors within
    1e-5, best first, at 1, 2 and 3 threads (bit-identical on the machine the reference was
    written on; not claimed across CPUs)."""
    extractor = DISK({"weights": str(weights), "device": "cpu"})
    for which in CROPS:
        out = extractor.extract(_loaded(photo(shared, which)))
        ref_k = REFERENCE[f"{which}_keypoints"]
        ref_s = REFERENCE[f"{which}_scores"]
        # the official order is raster order; the store's is best first (ties in raster order)
        order = np.argsort(-ref_s, kind="stable")
        assert len(out["keypoints"]) == len(ref_k) > 100
        np.testing.assert_array_equal(out["keypoints"], ref_k[order])
        assert np.abs(out["scores"] - ref_s[order]).max() < 1e-5
        assert np.abs(out["descriptors"] - REFERENCE[f"{which}_descriptors"][order]).max() < 1e-5
        assert out["descriptors"].dtype == np.float32 and out["descriptors"].shape[1] == 128


def test_max_keypoints_keeps_the_best(shared, weights):
    image = _loaded(photo(shared, "crop"))
    every = DISK({"weights": str(weights), "device": "cpu"}).extract(image)
    best = DISK({"weights": str(weights), "device": "cpu", "max_keypoints": 50}).extract(image)
    assert len(best["keypoints"]) == 50
    np.testing.assert_array_equal(best["keypoints"], every["keypoints"][:50])
    tiny = DISK({"weights": str(weights), "device": "cpu", "max_keypoints": 5000}).extract(image)
    assert len(tiny["keypoints"]) == len(every["keypoints"])  # fewer than n: all kept


def test_bad_weights_and_conf(weights, tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"extractor": {"unet.path_up.3.conv.3.bias": torch.zeros(129)}}, other)
    with pytest.raises(CbirError, match="weights do not fit DISK"):
        DISK({"weights": str(other), "device": "cpu"})
    torch.save({"model": {}}, other)
    with pytest.raises(CbirError, match="no 'extractor' or 'disk' entry"):
        DISK({"weights": str(other), "device": "cpu"})
    with pytest.raises(CbirError, match=r"depth-save.pth.*not found.*cvlab-epfl/disk.*Apache-2.0"):
        DISK({"weights_dir": str(tmp_path / "none"), "device": "cpu"})
    with pytest.raises(CbirError, match="nms_window must be odd"):
        DISK({"weights": str(weights), "device": "cpu", "nms_window": 4})
    from cbir.models.base import ImageSkipped

    disk = DISK({"weights": str(weights), "device": "cpu"})
    with pytest.raises(ImageSkipped, match="more than 16"):
        disk.extract(_loaded(np.zeros((16, 7, 3), np.uint8)))
    thin = disk.extract(_loaded(np.full((5, 17, 3), 128, np.uint8)))  # padded to 16 x 32
    assert thin["descriptors"].shape[1] == 128 and np.all(thin["keypoints"] < [17, 5])


def test_extract_and_match_with_disk(sample_dataset, weights):
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(sample_dataset), "--local", "disk", "--weights", str(weights),
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from cbir.io.store import open_store

    with open_store(sample_dataset / "cbir" / "local" / "disk-depth.h5") as s:
        assert len(s) == 3 and s.attrs["descriptor_dim"] == 128 and s.config["extractor"] == "disk"
        assert s.config["weights"] == "depth-save.pth"
        names = sorted(s.keys)[:2]
    pairs = sample_dataset / "pairs.txt"
    pairs.write_text(" ".join(names) + "\n")
    result = runner.invoke(main, ["match", "--query", str(sample_dataset), "--local", "disk-depth", "--pairs",
                                  str(pairs), "--name", "m", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open_store(sample_dataset / "cbir" / "matches" / "m.h5") as m:
        assert len(m) == 1
