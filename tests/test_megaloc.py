"""MegaLoc: weights generated in the official gmberton/MegaLoc layout (written as the
published ``model.safetensors`` is) load unchanged, and the descriptors equal the official
model's on two images cut from a real photo, one of them resized by the official code
(tests/reference/megaloc, written by tests/megaloc_reference.py running the official
``megaloc_model.py`` unchanged). The published weights could not be fetched here: they are
not tested themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.base import ImageSkipped
from cbir.models.megaloc import MegaLoc, MegaLocNet, sinkhorn_log
from tests.megaloc_reference import CONFIG, official_state

REFERENCE = np.load(Path(__file__).parent / "reference" / "megaloc" / "generated.npz")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    net = MegaLocNet(CONFIG["feat_dim"], CONFIG["num_clusters"], CONFIG["cluster_dim"], CONFIG["token_dim"],
                     CONFIG["mlp_dim"])
    path = tmp_path_factory.mktemp("megaloc") / "model.safetensors"
    save_file(official_state({k: tuple(v.shape) for k, v in net.state_dict().items()}), str(path))
    return path


def test_the_official_descriptors(weights, threads):
    """Within 1e-5 of the official model's at 1, 2 and 3 threads (not bit-identical: its
    attention and sums are reduced in other orders)."""
    extractor = MegaLoc({"weights": str(weights), "device": "cpu"})
    assert extractor.descriptor_dim == 512 and extractor.default_store_name() == "megaloc"
    for label in ("resized", "square"):
        rgb = REFERENCE[f"{label}_image"]
        ours = extractor.extract(LoadedImage(rgb, (rgb.shape[1], rgb.shape[0]), (1.0, 1.0)))
        np.testing.assert_allclose(ours, REFERENCE[f"{label}_descriptor"], atol=1e-5, rtol=0)
        assert ours.dtype == np.float32 and abs(np.linalg.norm(ours) - 1) < 1e-5


def test_sinkhorn_marginals():
    """The assignment's columns (patches) sum to one over the clusters and the dustbin after
    the last (column) step; the dustbin row takes the surplus of patches over clusters."""
    scores = torch.randn(2, 5, 12)
    p = sinkhorn_log(scores, torch.tensor(1.0), iterations=20).exp()
    assert p.shape == (2, 6, 12)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(2)[:, :5], torch.ones(2, 5), atol=1e-3, rtol=0)


def test_bad_weights_and_small_images(weights, tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(CbirError, match="not a safetensors file"):
        MegaLoc({"weights": str(broken), "device": "cpu"})
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(CbirError, match="not a MegaLoc state dict"):
        MegaLoc({"weights": str(other), "device": "cpu"})
    with pytest.raises(CbirError, match=r"model.safetensors.*not found.*huggingface.co/gberton/MegaLoc.*MIT"):
        MegaLoc({"weights_dir": str(tmp_path / "none"), "device": "cpu"})
    with pytest.raises(ImageSkipped, match="more 14 x 14 patches than its 16 clusters"):
        MegaLoc({"weights": str(weights), "device": "cpu"}).extract(
            LoadedImage(np.zeros((56, 56, 3), np.uint8), (56, 56), (1.0, 1.0)))


def test_images_too_small_are_skipped_and_reported(sample_dataset, weights):
    """64 x 48 pixels are 5 x 3 patches, fewer than the clusters: each image is skipped and
    reported, and a run that extracts none is an error."""
    result = CliRunner().invoke(main, ["extract", str(sample_dataset), "--global", "megaloc", "--weights",
                                       str(weights), "--device", "cpu"])
    assert result.exit_code == 1 and "no image could be extracted" in result.output
    assert result.output.count("MegaLoc needs more 14 x 14 patches than its 16 clusters") >= 3


@pytest.mark.slow
def test_extract_and_retrieve_with_megaloc(shared, weights, tmp_path):
    """`cbir extract --global megaloc --conf max_size=322` on three photos of sceaux_castle,
    then `cbir retrieve` over them: the store holds the extractor's own descriptors."""
    from cbir.io.images import read_image
    from cbir.io.store import open_store
    from tests.conftest import writable_copy

    root = writable_copy(shared / "data" / "sceaux_castle" / "mapping", tmp_path / "map")
    names = ["100_7100.jpg", "100_7101.jpg", "100_7103.jpg"]
    (tmp_path / "images.txt").write_text("\n".join(names) + "\n")
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(root), "--global", "megaloc", "--weights", str(weights), "--device",
                                  "cpu", "--images", str(tmp_path / "images.txt"), "--conf", "max_size=322"])
    assert result.exit_code == 0, result.output
    extractor = MegaLoc({"weights": str(weights), "device": "cpu", "max_size": 322})
    with open_store(root / "cbir" / "global" / "megaloc.h5") as s:
        assert sorted(s.keys) == names and s.config["max_size"] == 322
        image = read_image(root / "sensors" / "records_data" / names[0], max_size=322)
        np.testing.assert_allclose(s.get(names[0])["descriptors"], extractor.extract(image), atol=1e-6, rtol=0)
    out = tmp_path / "pairs.txt"
    result = runner.invoke(main, ["retrieve", "--map", str(root), "--global", "megaloc", "--topk", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
