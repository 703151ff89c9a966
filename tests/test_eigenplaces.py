"""EigenPlaces: a checkpoint in the official gmberton/EigenPlaces layout (``backbone.N``
indices of torchvision's ResNet children, ``aggregation.1.p``, ``aggregation.3``) loads
unchanged and its descriptor equals an independent functional statement of the official
forward (torchvision's ResNet-50 v1.5 written with ``F.conv2d``/``F.batch_norm`` from the
state dict, then the official L2Norm, GeM, Flatten, Linear, L2Norm).

No official weights can be downloaded here: the checkpoints are generated (random weights)
in the official key layout. The official files are ``ResNet50_2048_eigenplaces.pth`` etc.,
released at github.com/gmberton/EigenPlaces (MIT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.eigenplaces import EigenPlaces

LAYERS = (3, 4, 6, 3)  # ResNet-50


def official_state(dim: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names: torchvision's resnet50 children 0-7 as
    ``backbone.N``, then the aggregation's GeM ``p`` and fc."""
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        state[f"{name}.weight"] = torch.from_numpy(rng.normal(0, (2 / (inp * k * k)) ** 0.5, (out, inp, k, k))
                                                   .astype(np.float32))

    def bn(name: str, n: int) -> None:
        state[f"{name}.weight"] = torch.from_numpy(rng.uniform(0.5, 1.0, n).astype(np.float32))
        state[f"{name}.bias"] = torch.from_numpy(rng.uniform(-0.1, 0.1, n).astype(np.float32))
        state[f"{name}.running_mean"] = torch.from_numpy(rng.uniform(-0.1, 0.1, n).astype(np.float32))
        state[f"{name}.running_var"] = torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32))
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("backbone.0", 64, 3, 7)
    bn("backbone.1", 64)
    inplanes = 64
    for li, (blocks, planes) in enumerate(zip(LAYERS, (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            name = f"backbone.{4 + li}.{b}"
            conv(f"{name}.conv1", planes, inplanes, 1)
            bn(f"{name}.bn1", planes)
            conv(f"{name}.conv2", planes, planes, 3)
            bn(f"{name}.bn2", planes)
            conv(f"{name}.conv3", planes * 4, planes, 1)
            bn(f"{name}.bn3", planes * 4)
            if b == 0:
                conv(f"{name}.downsample.0", planes * 4, inplanes, 1)
                bn(f"{name}.downsample.1", planes * 4)
            inplanes = planes * 4
    state["aggregation.1.p"] = torch.tensor([2.6])
    state["aggregation.3.weight"] = torch.from_numpy(rng.normal(0, 2048 ** -0.5, (dim, 2048)).astype(np.float32))
    state["aggregation.3.bias"] = torch.from_numpy(rng.normal(0, 0.01, dim).astype(np.float32))
    return state


def official_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The official network's forward, written out (torchvision ResNet-50: v1.5, stride on
    the 3x3 conv, batch-norm eps 1e-5; EigenPlaces' aggregation)."""
    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(x, state["backbone.0.weight"], stride=2, padding=3), "backbone.1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for li, blocks in enumerate(LAYERS):
        for b in range(blocks):
            name = f"backbone.{4 + li}.{b}"
            stride = 2 if b == 0 and li > 0 else 1
            out = F.relu(bn(F.conv2d(x, state[f"{name}.conv1.weight"]), f"{name}.bn1"))
            out = F.relu(bn(F.conv2d(out, state[f"{name}.conv2.weight"], stride=stride, padding=1), f"{name}.bn2"))
            out = bn(F.conv2d(out, state[f"{name}.conv3.weight"]), f"{name}.bn3")
            identity = x if b else bn(F.conv2d(x, state[f"{name}.downsample.0.weight"], stride=stride),
                                      f"{name}.downsample.1")
            x = F.relu(out + identity)
    x = F.normalize(x, p=2.0, dim=1)  # L2Norm
    p = state["aggregation.1.p"]
    x = F.avg_pool2d(x.clamp(min=1e-6).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)  # GeM
    x = F.linear(x[:, :, 0, 0], state["aggregation.3.weight"], state["aggregation.3.bias"])
    return F.normalize(x, p=2.0, dim=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("eigenplaces") / "ResNet50_256_eigenplaces.pth"
    torch.save(official_state(), path)
    return path


def test_the_official_layout_loads_and_gives_the_official_descriptor(weights, threads):
    """Within 1e-5 of the official forward at 1, 2 and 3 threads (the convolutions' sums are
    reduced in other orders: not bit-identical), on a photo-sized image of odd size."""
    extractor = EigenPlaces({"weights": str(weights), "device": "cpu"})
    assert extractor.descriptor_dim == 256
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (237, 311, 3), dtype=np.uint8)
    ours = extractor.extract(LoadedImage(pixels, (311, 237), (1.0, 1.0)))
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.inference_mode():
        theirs = official_forward(official_state(), x[None])[0].numpy()
    assert ours.dtype == np.float32 and abs(np.linalg.norm(ours) - 1) < 1e-6
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_other_checkpoints_are_one_line_errors(tmp_path):
    other = tmp_path / "ResNet18_256_eigenplaces.pth"
    torch.save({"backbone.6.0.conv1.weight": torch.zeros(1), "aggregation.3.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CbirError, match="not an EigenPlaces ResNet-50/101 state dict"):
        EigenPlaces({"weights": str(other), "device": "cpu"})
    with pytest.raises(CbirError, match=r"ResNet50_2048_eigenplaces.pth.*not found.*gmberton/EigenPlaces.*MIT"):
        EigenPlaces({"weights_dir": str(tmp_path), "device": "cpu"})


def test_extract_and_fuse_with_eigenplaces(sample_dataset, weights, tmp_path):
    """`cbir extract --global eigenplaces --weights FILE` writes a global store that
    `cbir retrieve` fuses with another global store."""
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(sample_dataset), "--global", "eigenplaces", "--weights",
                                  str(weights), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from cbir.io.store import open_store

    with open_store(sample_dataset / "cbir" / "global" / "ResNet50_256_eigenplaces.h5") as s:
        assert s.attrs["descriptor_dim"] == 256 and len(s) == 3
        assert s.config["extractor"] == "eigenplaces" and s.config["weights"] == "ResNet50_256_eigenplaces.pth"
    out = tmp_path / "pairs.txt"
    result = runner.invoke(main, ["retrieve", "--map", str(sample_dataset), "--global",
                                  "ResNet50_256_eigenplaces,sample", "--fusion", "gharm", "--topk", "1", "-o",
                                  str(out)])
    assert result.exit_code == 0, result.output
    assert len([line for line in out.read_text().splitlines() if not line.startswith("#")]) == 3
