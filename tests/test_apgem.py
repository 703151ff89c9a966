"""AP-GeM: a checkpoint in the official deep-image-retrieval layout (model_options,
'module.'-prefixed state_dict, preprocess, a pickled scikit-learn PCA) loads unchanged and
its forward pass equals an independent functional re-implementation of the official one.

No official weights can be downloaded here: the checkpoints are generated (random weights)
in the official key layout. The official file is Resnet101-AP-GeM-LM18.pt, linked from
the README of github.com/naver/deep-image-retrieval."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.apgem import APGeM, ResNetGeM, build_from_checkpoint
from cbir.models.backbones import RESNET_LAYERS


class _FakeSklearnPCA:  # pickled as sklearn.decomposition._pca.PCA, as the official checkpoint has it
    pass


def official_checkpoint(path, arch="resnet50", prefix="module.", pca=True, seed=0):
    torch.manual_seed(seed)
    net = ResNetGeM(arch, out_dim=2048, gemp=3.0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
        net.adpool.p.fill_(2.7)
    own = net.state_dict()
    state = {prefix + (k.removeprefix("trunk.")): v for k, v in own.items()}
    ckpt = {"epoch": 12, "model_options": {"arch": f"{arch}_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3},
            "state_dict": state, "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                "input_size": 224}}
    if pca:
        names = ("sklearn", "sklearn.decomposition", "sklearn.decomposition._pca")
        saved = {n: sys.modules.get(n) for n in names}
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        module = sys.modules[names[-1]]
        _FakeSklearnPCA.__module__, _FakeSklearnPCA.__qualname__ = module.__name__, "PCA"
        module.PCA = _FakeSklearnPCA
        p = _FakeSklearnPCA()
        rng = np.random.default_rng(seed)
        p.mean_ = rng.standard_normal(2048) * 0.01
        p.components_ = np.linalg.qr(rng.standard_normal((2048, 256)))[0].T
        p.explained_variance_ = np.sort(rng.uniform(0.001, 0.1, 256))[::-1]
        p.whiten = True
        ckpt["pca"] = {"Landmarks_clean": p}
        try:
            torch.save(ckpt, path)
        finally:  # loading must not need (or import) scikit-learn
            for n, m in saved.items():
                if m is None:
                    del sys.modules[n]
                else:
                    sys.modules[n] = m
    else:
        torch.save(ckpt, path)
    return state, ckpt


def reference_forward(state, x, p, eps=1e-6):
    """deep-image-retrieval's ResNet_RMAC.forward, functionally, from the raw state dict."""
    def bn(t, name):
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    s = {k.removeprefix("module."): v for k, v in state.items()}
    state = s
    x = F.relu(bn(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for li, blocks in enumerate(RESNET_LAYERS["resnet50"], 1):
        for b in range(blocks):
            n = f"layer{li}.{b}"
            stride = 2 if (b == 0 and li > 1) else 1
            out = F.relu(bn(F.conv2d(x, s[f"{n}.conv1.weight"]), f"{n}.bn1"))
            out = F.relu(bn(F.conv2d(out, s[f"{n}.conv2.weight"], stride=stride, padding=1), f"{n}.bn2"))
            out = bn(F.conv2d(out, s[f"{n}.conv3.weight"]), f"{n}.bn3")
            res = x if f"{n}.downsample.0.weight" not in s else \
                bn(F.conv2d(x, s[f"{n}.downsample.0.weight"], stride=stride), f"{n}.downsample.1")
            x = F.relu(out + res)
    x = F.adaptive_avg_pool2d(x.clamp(min=eps).pow(p), 1).pow(1.0 / p)  # GeM
    x = x.squeeze()
    x = F.linear(x, s["fc.weight"], s["fc.bias"])
    return F.normalize(x, p=2, dim=-1)


def image(seed=0, h=150, w=200):
    return LoadedImage((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8), (w, h), (1.0, 1.0))


def test_forward_equals_the_official_computation(tmp_path):
    state, _ = official_checkpoint(tmp_path / "Resnet50-AP-GeM.pt", pca=False)
    ex = APGeM({"weights": str(tmp_path / "Resnet50-AP-GeM.pt"), "device": "cpu"})
    img = image()
    ours = ex.extract(img)
    x = torch.from_numpy(img.array).permute(2, 0, 1).float().div(255)
    x = ((x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None])
    with torch.no_grad():
        ref = reference_forward(state, x[None], torch.tensor([2.7]))
    ref = F.normalize(ref[None], dim=1)[0].numpy()
    assert ours.shape == (2048,) and abs(np.linalg.norm(ours) - 1) < 1e-5
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_pca_whitening_from_the_pickled_sklearn_object(tmp_path):
    _, ckpt = official_checkpoint(tmp_path / "w.pt")
    assert "sklearn.decomposition._pca" not in sys.modules
    plain = APGeM({"weights": str(tmp_path / "w.pt"), "device": "cpu"}).extract(image(1))
    ex = APGeM({"weights": str(tmp_path / "w.pt"), "device": "cpu", "whiten": "Landmarks_clean",
                "whitenp": 0.25})
    white = ex.extract(image(1))
    pca = ckpt["pca"]["Landmarks_clean"]
    ref = (plain.astype(np.float64) - pca.mean_) @ pca.components_.T / np.power(pca.explained_variance_, 0.25)
    ref /= np.linalg.norm(ref)
    assert white.shape == (256,) and ex.descriptor_dim == 256
    np.testing.assert_allclose(white, ref, atol=1e-5)
    with pytest.raises(CbirError, match="no PCA 'Paris'.*Landmarks_clean"):
        APGeM({"weights": str(tmp_path / "w.pt"), "device": "cpu", "whiten": "Paris"})


def test_multiscale_pools_with_symmetric_gem(tmp_path):
    official_checkpoint(tmp_path / "w.pt", pca=False)
    one = APGeM({"weights": str(tmp_path / "w.pt"), "device": "cpu"})
    multi = APGeM({"weights": str(tmp_path / "w.pt"), "device": "cpu", "scales": [1.0, 0.5]})
    img = image(2, 200, 240)
    d1 = one.extract(img)
    d2 = multi.extract(img)
    from PIL import Image

    resized = np.array(Image.fromarray(img.array).resize((120, 100), Image.BILINEAR))  # official Scale(0.5)
    half = one.extract(LoadedImage(resized, (120, 100), (1.0, 1.0)))
    sym = lambda v, p: np.sign(v) * np.maximum(np.abs(v), 1e-6) ** p  # noqa: E731
    ref = sym((sym(d1, 3) + sym(half, 3)) / 2, 1 / 3)
    np.testing.assert_allclose(d2, ref / np.linalg.norm(ref), atol=1e-5)


def test_resnet101_layout_loads_strict_without_prefix(tmp_path):
    official_checkpoint(tmp_path / "r101.pt", arch="resnet101", prefix="", pca=False)
    net, ckpt = build_from_checkpoint(tmp_path / "r101.pt")
    assert ckpt["epoch"] == 12 and len(net.trunk.layer3) == 23


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CbirError, match="Resnet101-AP-GeM-LM18.pt.*not found.*deep-image-retrieval"):
        APGeM({"weights_dir": str(tmp_path)})
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(CbirError, match="junk.pt: not a readable checkpoint"):
        build_from_checkpoint(tmp_path / "junk.pt")
    torch.save({"model_options": {"arch": "vgg16_rmac"}, "state_dict": {}}, tmp_path / "vgg.pt")
    with pytest.raises(CbirError, match="unsupported architecture 'vgg16_rmac'"):
        build_from_checkpoint(tmp_path / "vgg.pt")


def test_a_malicious_pickle_runs_nothing(tmp_path, capfd):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model_options": {"arch": "resnet50_rmac"}, "state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CbirError):  # the state_dict does not fit
        build_from_checkpoint(tmp_path / "evil.pt")
    assert "pwned" not in capfd.readouterr().out  # and print was never called


def test_cli_extracts_apgem_into_a_global_store(tmp_path, sample_dataset):
    from click.testing import CliRunner

    from cbir.cli import main
    from cbir.io.dataset import Dataset
    from cbir.io.store import open_store

    official_checkpoint(tmp_path / "Resnet50-AP-GeM.pt", pca=False)
    r = CliRunner().invoke(main, ["extract", str(sample_dataset), "--global", "apgem", "--weights",
                                  str(tmp_path / "Resnet50-AP-GeM.pt"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    with open_store(Dataset(sample_dataset).store_path("global", "Resnet50-AP-GeM"), "global-features") as s:
        d = s.read_all("descriptors")
        assert d.shape == (3, 2048) and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
        assert s.config["extractor"] == "apgem" and s.config["weights"] == "Resnet50-AP-GeM.pt"
