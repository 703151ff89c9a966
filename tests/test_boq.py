"""BoQ: weights generated in the official amaralibey/Bag-of-Queries layout (both published
configurations: ResNet-50 16,384-D and DINOv2 12,288-D) load unchanged, and the descriptors
equal the official model's on crops of a real photo at the official input sizes
(tests/reference/boq, written by tests/boq_reference.py running the official modules; its
docstring says what stands in for torchvision). The published weights could not be fetched
here: they are not tested themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.boq import RESNET_NAMES, BoQ, BoQNet
from tests.boq_reference import DINOV2_BLOCKS, RUNS, official_state, photo

REFERENCE = np.load(Path(__file__).parent / "reference" / "boq" / "generated.npz")
TO_OFFICIAL = {v: k for k, v in RESNET_NAMES.items()}


def official_shapes(net: BoQNet) -> dict[str, tuple[int, ...]]:
    """The official model's parameter names and shapes, from cbir's network."""
    shapes = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "backbone" and net.kind == "dinov2":
            key = ".".join(["backbone", "dino", *parts[1:]])
        elif parts[0] == "backbone":
            key = ".".join(["backbone", "net", TO_OFFICIAL[parts[1]], *parts[2:]])
        shapes[key] = tuple(value.shape)
    if net.kind == "dinov2":
        shapes["backbone.dino.mask_token"] = (1, 768)
    return shapes


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("boq")
    paths = {}
    for backbone, name, dim in (("resnet50", "resnet50_16384.pth", 512), ("dinov2", "dinov2_12288.pth", 384)):
        shapes = official_shapes(BoQNet(backbone, dim, 64, 2, 32, depth=DINOV2_BLOCKS))
        torch.save(official_state(shapes), folder / name)
        paths[backbone] = folder / name
    return paths


def _loaded(rgb: np.ndarray) -> LoadedImage:
    return LoadedImage(rgb, (rgb.shape[1], rgb.shape[0]), (1.0, 1.0))


def test_resnet50_the_official_descriptors(shared, weights, threads):
    """Within 1e-5 of the official (unit descriptors of 16,384 dimensions), at the official
    384 x 384 and at 256 x 320, at 1, 2 and 3 threads."""
    for run in ("resnet", "resnet_small"):
        _, crop, size = RUNS[run]
        conf = {"weights": str(weights["resnet50"]), "device": "cpu"}
        if size != (384, 384):
            conf["image_size"] = list(size)
        extractor = BoQ(conf)
        assert extractor.descriptor_dim == 16384
        out = extractor.extract(_loaded(photo(shared, crop)))
        assert out.shape == (16384,) and out.dtype == np.float32
        assert np.abs(out - REFERENCE[run]).max() < 1e-5


@pytest.mark.slow
def test_dinov2_the_official_descriptor(shared, weights):
    _, crop, _ = RUNS["dinov2"]
    extractor = BoQ({"weights": str(weights["dinov2"]), "device": "cpu"})
    assert extractor.descriptor_dim == 12288 and extractor.size == (322, 322)
    out = extractor.extract(_loaded(photo(shared, crop)))
    assert np.abs(out - REFERENCE["dinov2"]).max() < 1e-5


def test_bad_weights_and_sizes(weights, tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CbirError, match="not a BoQ state dict"):
        BoQ({"weights": str(other), "device": "cpu"})
    with pytest.raises(CbirError, match=r"resnet50_16384.pth.*not found.*Bag-of-Queries.*MIT"):
        BoQ({"weights_dir": str(tmp_path / "none"), "device": "cpu"})
    with pytest.raises(CbirError, match="multiples of 14"):
        BoQ({"weights": str(weights["dinov2"]), "device": "cpu", "image_size": [320, 320]})
    with pytest.raises(CbirError, match=r"\[height, width\]"):
        BoQ({"weights": str(weights["resnet50"]), "device": "cpu", "image_size": 384})
