"""R2D2: checkpoint loading in the official layout, the official pyramid, and exactness
against the official extractor's outputs (../shared/reference, real weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from cbir.errors import CbirError
from cbir.io.images import LoadedImage, read_image
from cbir.models.r2d2 import R2D2, QuadL2Net, load_r2d2, parse_net_spec, pyramid_levels


def official_checkpoint(path: Path, spec: str = "Quad_L2Net_ConfCFS()", **kwargs) -> dict:
    """A checkpoint as naver/r2d2's train.py saves it: {'net': str, 'state_dict': 'module.'-prefixed}."""
    torch.manual_seed(0)
    net = QuadL2Net(**kwargs)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so folding is exercised
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"net": spec, "state_dict": state}, path)
    return state


def test_net_spec_parsing_accepts_official_strings_and_refuses_code(tmp_path):
    assert parse_net_spec("Quad_L2Net_ConfCFS()", tmp_path) == {"fast": False}
    assert parse_net_spec("Quad_L2Net_ConfCFS(mchan=6)", tmp_path) == {"fast": False, "mchan": 6}
    assert parse_net_spec("Fast_Quad_L2Net_ConfCFS()", tmp_path) == {"fast": True}
    for bad in ("__import__('os').system('x')", "Quad_L2Net_ConfCFS(mchan=__import__('os'))",
                "Quad_L2Net_ConfCFS(foo=1)", "PatchNet()"):
        with pytest.raises(CbirError):
            parse_net_spec(bad, tmp_path)


@pytest.mark.parametrize("spec,kwargs", [("Quad_L2Net_ConfCFS()", {}), ("Quad_L2Net_ConfCFS(mchan=6)", {"mchan": 6}),
                                         ("Fast_Quad_L2Net_ConfCFS()", {"fast": True})])
def test_official_layout_loads_strict(tmp_path, spec, kwargs):
    state = official_checkpoint(tmp_path / "w.pt", spec, **kwargs)
    net = load_r2d2(tmp_path / "w.pt")
    loaded = net.state_dict()
    assert set(loaded) == {k.removeprefix("module.") for k in state}
    assert all(torch.equal(loaded[k.removeprefix("module.")], v) for k, v in state.items())


def test_batchnorm_folding_keeps_outputs(tmp_path):
    official_checkpoint(tmp_path / "w.pt")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = load_r2d2(tmp_path / "w.pt")(x)
        fused = load_r2d2(tmp_path / "w.pt").fuse_batchnorm()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        out = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    for k in ("descriptors", "reliability", "repeatability"):
        assert ref[k].shape == out[k].shape
        assert torch.allclose(ref[k], out[k], atol=1e-5), k


def test_missing_and_corrupt_weights_are_named(tmp_path):
    with pytest.raises(CbirError, match="not found.*github.com/naver/r2d2"):
        R2D2({"weights": str(tmp_path / "r2d2_WASF_N16.pt")})
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CbirError, match="bad.pt: not an official R2D2 checkpoint"):
        load_r2d2(tmp_path / "bad.pt")
    torch.save({"net": "Quad_L2Net_ConfCFS(mchan=6)", "state_dict": {"module.ops.0.weight": torch.zeros(1)}},
               tmp_path / "wrong.pt")
    with pytest.raises(CbirError, match="weights do not fit"):
        load_r2d2(tmp_path / "wrong.pt")


def test_pyramid_follows_the_official_loop():
    conf = dict(R2D2.default_conf)
    levels = pyramid_levels(1024, 769, conf)
    scales = [s for s, *_ in levels]
    # 2**(-i/4) down to min_size / longest edge = 0.25, all kept (max_size = 1024)
    assert np.allclose(scales, [2 ** (-i / 4) for i in range(9)])
    assert all(keep for *_, keep in levels)
    assert levels[1][1:3] == (round(1024 * 2 ** -0.25), round(769 * 2 ** -0.25))
    big = pyramid_levels(4000, 3000, conf)  # levels above max_size are resized through but skipped
    assert [keep for *_, keep in big][:5] == [False] * 5 and big[-1][0] * 4000 >= 256 - 4
    assert pyramid_levels(200, 100, conf) == []  # smaller than min_size: nothing to extract


def test_tiny_and_blank_images(tmp_path):
    official_checkpoint(tmp_path / "w.pt")
    ex = R2D2({"weights": str(tmp_path / "w.pt"), "device": "cpu"})
    tiny = ex.extract(LoadedImage(np.zeros((20, 30, 3), np.uint8), (30, 20), (1.0, 1.0)))
    assert tiny["keypoints"].shape == (0, 2) and tiny["descriptors"].shape == (0, 128)
    blank = ex.extract(LoadedImage(np.full((260, 300, 3), 128, np.uint8), (300, 260), (1.0, 1.0)))
    assert blank["keypoints"].shape[1] == 2 and len(blank["keypoints"]) == len(blank["descriptors"])


@pytest.mark.slow
def test_exactness_against_official_outputs(shared):
    """Same weights, same image: the keypoints, descriptors and scores of naver/r2d2 extract.py."""
    weights = shared / "weights" / "r2d2" / "r2d2_WASF_N16.pt"
    name = "100_7100.jpg"
    ref = np.load(shared / "reference" / "r2d2_WASF_N16" / f"{name}.npz")
    ex = R2D2({"weights": str(weights), "max_keypoints": 5000, "device": "cpu"})
    image = read_image(shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data" / name)
    assert tuple(ref["imsize"]) == image.size
    out = ex.extract(image)
    assert len(out["keypoints"]) == len(ref["keypoints"]) == 5000
    assert np.all(np.diff(out["scores"]) <= 0)  # best first
    ours = np.c_[out["keypoints"], out["keypoint_params"]]
    dist, idx = cKDTree(ours).query(ref["keypoints"], k=1)
    close = dist < 0.5
    assert close.mean() >= 0.99
    assert np.abs(out["descriptors"][idx[close]] - ref["descriptors"][close]).max() < 1e-4
    assert np.abs(out["scores"][idx[close]] - ref["scores"][close]).max() < 1e-4
