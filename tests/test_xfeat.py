"""XFeat: weights generated in the official verlab/accelerated_features layout load
unchanged, and the sparse features equal the official ``detectAndCompute``'s on a real photo
and an odd-sized crop of it (tests/reference/xfeat, written by tests/xfeat_reference.py
running the official modules unchanged). The published ``weights/xfeat.pt`` could not be
fetched here: it is not tested itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.spatial import cKDTree

from cbir.cli import main
from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.xfeat import XFeat, XFeatNet
from tests.xfeat_reference import DESCRIPTOR_STRIDE, IMAGES, official_state, photo

REFERENCE = np.load(Path(__file__).parent / "reference" / "xfeat" / "generated.npz")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xfeat") / "xfeat.pt"
    torch.save(official_state({k: tuple(v.shape) for k, v in XFeatNet().state_dict().items()}), path)
    return path


@pytest.mark.slow
def test_the_official_sparse_features(shared, weights, threads):
    """Every official keypoint found (within 1e-3 px: they are pixel positions scaled by the
    resize), scores and descriptors within 1e-5, at 1, 2 and 3 threads (bit-identical on the
    machine the reference was written on; not claimed across CPUs)."""
    extractor = XFeat({"weights": str(weights), "device": "cpu"})
    for which in IMAGES:
        image = photo(shared, which)
        out = extractor.extract(LoadedImage(image, (image.shape[1], image.shape[0]), (1.0, 1.0)))
        ref_k = REFERENCE[f"{which}_keypoints"]
        dist, idx = cKDTree(out["keypoints"]).query(ref_k)
        assert len(out["keypoints"]) == len(ref_k) == 4096 and dist.max() < 1e-3
        assert np.abs(out["scores"][idx] - REFERENCE[f"{which}_scores"]).max() < 1e-5
        sampled = idx[::DESCRIPTOR_STRIDE]
        assert np.abs(out["descriptors"][sampled] - REFERENCE[f"{which}_descriptors"]).max() < 1e-5
        assert np.all(np.diff(out["scores"]) <= 0) and out["descriptors"].shape[1] == 64


def test_bad_weights_and_small_images(weights, tmp_path):
    other = tmp_path / "xfeat.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(CbirError, match="weights do not fit XFeat"):
        XFeat({"weights": str(other), "device": "cpu"})
    with pytest.raises(CbirError, match=r"xfeat.pt.*not found.*verlab/accelerated_features.*Apache-2.0"):
        XFeat({"weights_dir": str(tmp_path / "none"), "device": "cpu"})
    from cbir.models.base import ImageSkipped

    with pytest.raises(ImageSkipped, match="32 at least"):
        XFeat({"weights": str(weights), "device": "cpu"}).extract(
            LoadedImage(np.zeros((20, 100, 3), np.uint8), (100, 20), (1.0, 1.0)))


def test_extract_and_match_with_xfeat(sample_dataset, weights):
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(sample_dataset), "--local", "xfeat", "--weights", str(weights),
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from cbir.io.store import open_store

    with open_store(sample_dataset / "cbir" / "local" / "xfeat.h5") as s:
        assert len(s) == 3 and s.attrs["descriptor_dim"] == 64 and s.config["extractor"] == "xfeat"
