"""NetVLAD: weights in the official MATLAB struct layout and in the pytorch-NetVlad layout
load unchanged, and the forward pass equals independent re-implementations of each
(hloc's reading of the MATLAB network, pytorch-NetVlad's looped residuals).

No official weights can be downloaded here: the files are generated (random weights) in
the official layouts. The official model is vd16_pitts30k_conv5_3_vlad_preL2_intra_white
from github.com/Relja/netvlad (struct version: Pitts30K_struct.mat, as hloc uses it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.io import savemat

from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.backbones import VGG16_CONFIG
from cbir.models.netvlad import NetVLAD

K, D, OUT = 64, 512, 32


def vgg_weights(rng):
    convs, c = [], 3
    for v in VGG16_CONFIG[:-1]:  # up to conv5_3
        if v != "M":
            convs.append(((rng.standard_normal((v, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32),
                          (rng.standard_normal(v) * 0.01).astype(np.float32)))
            c = v
    return convs


def write_struct_mat(path, rng):
    """The layout of net_class2struct exports: MatConvNet layers, VLAD at 30, whitening at 33."""
    convs = vgg_weights(rng)
    layers, ci = [], 0
    for v in VGG16_CONFIG[:-1]:
        if v == "M":
            layers.append({"type": "pool", "name": "pool"})
        else:
            w, b = convs[ci]
            weights = np.empty(2, dtype=object)
            weights[0], weights[1] = w.transpose(2, 3, 1, 0), b  # S x S x IN x OUT
            layers += [{"type": "conv", "name": f"conv{ci}", "weights": weights}, {"type": "relu", "name": "relu"}]
            ci += 1
    layers = layers[:-1]  # conv5_3 without its ReLU: 29 layers
    assert len(layers) == 29
    assign = rng.standard_normal((D, K)).astype(np.float32)
    centres = rng.standard_normal((D, K)).astype(np.float32) * 0.05
    vw = np.empty(2, dtype=object)
    vw[0], vw[1] = assign, -centres
    whiten = (rng.standard_normal((K * D, OUT)) / np.sqrt(K * D)).astype(np.float32)
    wb = (rng.standard_normal(OUT) * 0.01).astype(np.float32)
    ww = np.empty(2, dtype=object)
    ww[0], ww[1] = whiten.reshape(1, 1, K * D, OUT), wb
    layers += [{"type": "normalize", "name": "preL2"}, {"type": "custom", "name": "vlad:core", "weights": vw},
               {"type": "custom", "name": "vlad:intranorm"}, {"type": "custom", "name": "L2"},
               {"type": "conv", "name": "WPCA", "weights": ww}, {"type": "custom", "name": "L2"}]
    cell = np.empty(len(layers), dtype=object)
    for i, layer in enumerate(layers):
        cell[i] = layer
    # a mean *image*, as the published Pitts30K_struct.mat holds (hloc indexes averageImage[0, 0]
    # after squeeze_me, which a 1 x 1 x 3 array would not survive); other pixels differ, so that
    # only the top-left pixel's channels give the right mean
    mean = np.array([122.6778, 116.6522, 103.9997], np.float32)
    average = np.tile(mean, (4, 5, 1)) + rng.uniform(-20, 20, (4, 5, 3)).astype(np.float32)
    average[0, 0] = mean
    savemat(path, {"net": {"layers": cell, "meta": {"normalization": {"averageImage": average}}}})
    from scipy.io import loadmat
    assert np.allclose(loadmat(path, struct_as_record=False, squeeze_me=True)["net"].meta.normalization
                       .averageImage[0, 0], mean)  # hloc's own reader indexes it
    return convs, assign, centres, whiten, wb, mean


def vgg_forward(x, convs):
    ci = 0
    for v in VGG16_CONFIG[:-1]:
        if v == "M":
            x = F.max_pool2d(x, 2, 2)
        else:
            w, b = convs[ci]
            x = F.conv2d(x, torch.from_numpy(w), torch.from_numpy(b), padding=1)
            ci += 1
            if ci < 13:
                x = F.relu(x)
    return x


def image(seed=0, h=96, w=128):
    return LoadedImage((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8), (w, h), (1.0, 1.0))


def test_matlab_struct_layout_equals_hlocs_reading_of_it(tmp_path):
    rng = np.random.default_rng(0)
    convs, assign, centres, whiten, wb, average = write_struct_mat(tmp_path / "Pitts30K_struct.mat", rng)
    ex = NetVLAD({"weights": str(tmp_path / "Pitts30K_struct.mat"), "device": "cpu"})
    img = image()
    ours = ex.extract(img)
    # hloc's NetVLAD forward, written out
    x = torch.from_numpy(img.array).permute(2, 0, 1).float()[None] / 255
    x = torch.clamp(x * 255, 0, 255) - torch.from_numpy(average).view(1, 3, 1, 1)
    with torch.no_grad():
        f = vgg_forward(x, convs)
        f = F.normalize(f.view(1, D, -1), dim=1)
        scores = F.softmax(F.conv1d(f, torch.from_numpy(assign.T.copy())[:, :, None]), dim=1)
        diff = f.unsqueeze(2) - torch.from_numpy(centres).unsqueeze(0).unsqueeze(-1)
        desc = (scores.unsqueeze(1) * diff).sum(dim=-1)
        desc = F.normalize(F.normalize(desc, dim=1).view(1, -1), dim=1)
        ref = F.normalize(F.linear(desc, torch.from_numpy(whiten.T.copy()), torch.from_numpy(wb)), dim=1)[0]
    assert ours.shape == (OUT,) and ex.descriptor_dim == OUT
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-5)


def test_pytorch_netvlad_layout_equals_its_own_forward(tmp_path):
    rng = np.random.default_rng(1)
    convs = vgg_weights(rng)
    state, idx, ci = {}, 0, 0
    for v in VGG16_CONFIG[:-1]:
        if v == "M":
            idx += 1
        else:
            state[f"encoder.{idx}.weight"] = torch.from_numpy(convs[ci][0])
            state[f"encoder.{idx}.bias"] = torch.from_numpy(convs[ci][1])
            idx, ci = idx + 2, ci + 1
    conv_w = torch.from_numpy(rng.standard_normal((K, D, 1, 1)).astype(np.float32))
    centroids = torch.from_numpy(rng.random((K, D)).astype(np.float32))
    wpca_w = torch.from_numpy((rng.standard_normal((OUT, K * D, 1, 1)) / np.sqrt(K * D)).astype(np.float32))
    wpca_b = torch.zeros(OUT)
    state.update({"pool.conv.weight": conv_w, "pool.centroids": centroids, "WPCA.0.weight": wpca_w,
                  "WPCA.0.bias": wpca_b})
    torch.save({"epoch": 30, "best_score": 0.9, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "checkpoint.pth.tar")
    ex = NetVLAD({"weights": str(tmp_path / "checkpoint.pth.tar"), "device": "cpu"})
    img = image(3)
    ours = ex.extract(img)
    x = torch.from_numpy(img.array).permute(2, 0, 1).float().div(255)
    x = ((x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None])
    with torch.no_grad():
        f = F.normalize(vgg_forward(x[None], convs), p=2, dim=1)
        soft = F.softmax(F.conv2d(f, conv_w).view(1, K, -1), dim=1)
        flat = f.view(1, D, -1)
        vlad = torch.zeros(1, K, D)
        for c in range(K):  # pytorch-NetVlad's loop over clusters
            residual = flat - centroids[c][None, :, None]
            vlad[:, c] = (residual * soft[:, c:c + 1]).sum(-1)
        vlad = F.normalize(F.normalize(vlad, p=2, dim=2).view(1, -1), p=2, dim=1)
        ref = F.normalize(F.conv2d(vlad[:, :, None, None], wpca_w, wpca_b).flatten(1), dim=-1)[0]
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-5)


def test_bad_netvlad_files(tmp_path):
    with pytest.raises(CbirError, match="Pitts30K_struct.mat.*not found.*Relja/netvlad"):
        NetVLAD({"weights_dir": str(tmp_path)})
    savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(CbirError, match="other.mat: not a NetVLAD struct .mat"):
        NetVLAD({"weights": str(tmp_path / "other.mat")})
    torch.save({"state_dict": {"encoder.0.weight": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(CbirError, match="not a pytorch-NetVlad checkpoint"):
        NetVLAD({"weights": str(tmp_path / "x.pth")})
