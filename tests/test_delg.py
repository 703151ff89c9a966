"""DELG: the PyTorch network and extraction against an independent NumPy re-implementation
of the official TensorFlow computation (tests/delg_reference.py), the weight converter
(.npz without TensorFlow; SavedModel and checkpoints with it), one-pass local + global
extraction, and the whole pipeline on the real sceaux_castle photos.

The published DELG weights cannot be downloaded here: every test uses random weights
generated under the official variable names and layouts.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cbir.cli import main
from cbir.errors import CbirError
from cbir.extract import extract_all
from cbir.io.dataset import Dataset
from cbir.io.images import LoadedImage, read_image
from cbir.io.store import open_store
from cbir.models import delg
from cbir.retrieval.fusion import METHODS
from cbir.weights import convert_delg

from . import delg_reference as ref

HAS_TF = importlib.util.find_spec("tensorflow") is not None
#: Keras 2 for TensorFlow >= 2.16 (the official training code's Keras); .ci/venv.sh installs it
HAS_TF_KERAS = HAS_TF and importlib.util.find_spec("tf_keras") is not None


def cbir(*args, ok: bool = True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + r.stderr
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def variables() -> dict[str, np.ndarray]:
    return ref.official_variables(0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Generated weights converted by the converter itself (from an .npz, no TensorFlow)."""
    d = tmp_path_factory.mktemp("delg")
    ref.write_generated_npz(d / "vars.npz")
    convert_delg(d / "vars.npz", d / "r50delg_gld_20200814.pt")
    return d / "r50delg_gld_20200814.pt"


def photo(size: tuple[int, int]) -> np.ndarray:
    """A real photo (sceaux_castle when available, else scikit-image's) at ``size`` (w, h)."""
    path = Path(__file__).resolve().parents[2] / "shared/data/sceaux_castle/mapping/sensors/records_data/100_7100.jpg"
    if path.exists():
        return np.asarray(Image.open(path).convert("RGB").resize(size, Image.BILINEAR))
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize(size, Image.BILINEAR))


# ---------------------------------------------------------------- the network
@pytest.mark.parametrize("size", [(96, 72), (101, 77)])  # even and odd: TF's SAME padding differs
def test_forward_equals_the_official_computation(variables, size):
    net = delg.DelgNet(**delg.config_from_official(variables))
    net.load_state_dict(delg.state_dict_from_official(variables, net))
    net.eval()
    x = (photo(size).astype(np.float64) - 128) / 128
    b3 = ref.block3(variables, x)
    att, desc = ref.local_head(variables, b3)
    g = ref.global_head(variables, b3)
    with torch.no_grad():
        tb3 = net.block3(torch.from_numpy(x).permute(2, 0, 1)[None].float())
        tatt, tdesc = net.local_head(tb3)
        tg = net.global_head(tb3)
    assert tb3.shape[2:] == b3.shape[:2]
    np.testing.assert_allclose(tb3[0].permute(1, 2, 0).numpy(), b3, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(tatt[0, 0].numpy(), att, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(tdesc[0].permute(1, 2, 0).numpy(), desc, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(tg[0].numpy(), g, atol=1e-5, rtol=1e-4)
    # folding the batch norms (done for extraction) changes nothing but rounding
    with torch.no_grad():
        fused = net.fuse_batchnorm()
        np.testing.assert_allclose(fused.global_head(fused.block3(torch.from_numpy(x).permute(2, 0, 1)[None].float()))
                                   [0].numpy(), g, atol=1e-5, rtol=1e-4)


def test_official_names_cover_every_parameter_once(variables):
    net = delg.DelgNet()
    names = [delg.official_name(k) for k in net.state_dict()]
    names = [n for n in names if n is not None]
    assert len(names) == len(set(names)) == len(variables)
    assert set(names) == set(variables)
    assert delg.official_name("backbone.layer3.5.conv2.weight") == "backbone/l4f/conv2b/kernel"
    assert delg.official_name("backbone.layer1.0.downsample.1.running_var") == \
        "backbone/l2a/bn_shortcut/moving_variance"


# ---------------------------------------------------------------- the official extraction
def _threshold_in_a_gap(scores: np.ndarray) -> float:
    """A threshold around the 40th percentile with no score within 1e-3 of it (float32 vs
    float64 rounding cannot flip a selection)."""
    s = np.sort(scores)
    lo, hi = len(s) // 3, len(s) // 2
    i = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
    assert s[i + 1] - s[i] > 2e-3
    return float((s[i] + s[i + 1]) / 2)


def test_extraction_equals_the_official_computation(variables, weights):
    rgb = photo((123, 91))
    scales, global_idx, max_size = [0.5, 0.70710677, 1.0, 1.4142135], [1, 2, 3], 100  # resized: 100 x 74
    everything = ref.extract(variables, rgb, scales, global_idx, -np.inf, 10 ** 9, max_size)
    threshold = _threshold_in_a_gap(everything["scores"])
    kept = np.sort(everything["scores"][everything["scores"] >= threshold])[::-1]
    k = next(k for k in range(len(kept) // 2, len(kept) - 1) if kept[k - 1] - kept[k] > 1e-4)
    want = ref.extract(variables, rgb, scales, global_idx, threshold, k, max_size)
    conf = {"weights": str(weights), "device": "cpu", "scales": scales, "max_size": max_size}
    local = delg.DelgLocal({**conf, "score_threshold": threshold, "max_keypoints": k})
    glob = delg.DelgGlobal({**conf, "global_scale_indices": global_idx})
    image = LoadedImage(rgb, (123, 91), (1.0, 1.0))
    got, g = local.extract(image), glob.extract(image)
    assert len(got["keypoints"]) == len(want["keypoints"]) == k
    np.testing.assert_allclose(got["keypoints"], want["keypoints"], atol=1e-4)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5)
    np.testing.assert_allclose(got["descriptors"], want["descriptors"], atol=1e-5)
    np.testing.assert_allclose(got["keypoint_params"][:, 0], want["scales"], rtol=1e-6)
    np.testing.assert_allclose(g, want["global"], atol=1e-6)
    assert got["descriptors"].shape[1] == 128 and g.shape == (2048,)
    assert np.all(np.diff(got["scores"]) <= 0)  # sorted by decreasing attention


@pytest.mark.parametrize("size", [(30, 8), (30, 9)])
def test_images_too_small_for_the_pyramid(weights, size):
    """The official code gives an image under 10 px a side no local features and an empty
    global descriptor: cbir gives no local features and skips the image for the global
    descriptor with its reason (never a descriptor of zeros)."""
    local = delg.DelgLocal({"weights": str(weights), "device": "cpu", "score_threshold": 0})
    glob = delg.DelgGlobal({"weights": str(weights), "device": "cpu"})
    w, h = size
    image = LoadedImage(np.full((h, w, 3), 127, np.uint8), (w, h), (1.0, 1.0))
    assert len(local.extract(image)["keypoints"]) == 0
    with pytest.raises(delg.ImageSkipped, match=f"too small for DELG's global descriptor \\({w}x{h} px"):
        glob.extract(image)


def test_a_tiny_image_is_skipped_and_reported(weights, sample_dataset):
    """Through the command: the tiny image is listed as failed with its reason, the others
    are extracted, and the store holds no row for it."""
    Image.fromarray(np.full((9, 30, 3), 127, np.uint8)).save(sample_dataset / "sensors/records_data/right/000.png")
    _, out, _ = cbir("extract", sample_dataset, "--global", "delg", "--conf", f"weights={weights}", "--name", "delg",
                     "--json")
    summary = json.loads(out)
    assert summary["failed"] == [{"image": "right/000.png", "reason": "too small for DELG's global descriptor (30x9 "
                                  "px: it needs 10 px a side, and 5 px at one of its global scales)"}]
    with open_store(Dataset(sample_dataset).store_path("global", "delg")) as s:
        assert sorted(s.keys) == ["left/000.png", "left/001.png"]


# ---------------------------------------------------------------- one pass for both
def test_one_pass_serves_local_and_global(weights, sample_dataset):
    conf = {"weights": str(weights), "device": "cpu", "scales": [0.5, 1.0], "max_size": 64}
    local = delg.DelgLocal({**conf, "score_threshold": 0.0, "max_keypoints": 50})
    glob = delg.DelgGlobal({**conf, "global_scale_indices": [0, 1]})
    net = local.engine.net
    block3, global_head = net.block3, net.global_head
    calls: list[str] = []
    net.block3 = lambda x: calls.append("block3") or block3(x)
    net.global_head = lambda x: calls.append("global") or global_head(x)
    ds = Dataset(sample_dataset)
    n = len(ds.sensors.image_names())
    reports = extract_all([local, glob], ds)
    assert glob.engine is local.engine  # shared
    assert [r.extracted for r in reports] == [n, n]
    # block 3 once per scale and image for both heads; block 4 at the 2 global scales
    assert calls.count("block3") == 2 * n and calls.count("global") == 2 * n
    # a store that has every image already costs nothing: only the other one is computed
    calls.clear()
    reports = extract_all([local, glob], ds, store_names=["other", None])
    assert [r.extracted for r in reports] == [n, 0] and reports[1].already_present == n
    assert calls.count("block3") == 2 * n and calls.count("global") == 0
    # the shared pass gives what separate extractors give
    separate = delg.DelgGlobal({**conf, "global_scale_indices": [0, 1]})
    with open_store(ds.store_path("global", "r50delg_gld_20200814")) as g:
        name = g.keys[0]
        np.testing.assert_allclose(g.get(name)["descriptors"], separate.extract(read_image(ds.image_path(name))),
                                   atol=1e-6)


# ---------------------------------------------------------------- the converter
def test_converter_from_npz_and_its_errors(tmp_path, variables):
    npz = tmp_path / "vars.npz"
    ref.write_generated_npz(npz, prefix="model/")  # a training checkpoint's prefix
    _, out, _ = cbir("weights", "convert", "delg", npz, tmp_path / "d.pt", "--json")
    summary = json.loads(out)
    assert summary["config"] == {"gem_power": 3.0, "embedding_dim": 2048, "reduced_dim": 128, "block3_strides": True}
    net, header = delg.load_delg(tmp_path / "d.pt")
    assert header["source"] == ref.GENERATED_NOTE
    np.testing.assert_array_equal(net.backbone.layer2[0].conv1.weight.detach().numpy(),
                                  variables["backbone/l3a/conv2a/kernel"].transpose(3, 2, 0, 1))
    code, _, err = cbir("weights", "convert", "delg", npz, tmp_path / "d.pt", ok=False)
    assert code == 1 and "exists" in err
    broken = dict(variables)
    del broken["attention/conv2/bias"]
    broken["backbone/l2a/conv2b/kernel"] = broken["backbone/l2a/conv2b/kernel"][..., :32]
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(CbirError, match="shape"):
        convert_delg(tmp_path / "broken.npz", tmp_path / "b.pt")
    del broken["backbone/l2a/conv2b/kernel"]
    np.savez(tmp_path / "broken.npz", **broken)
    code, _, err = cbir("weights", "convert", "delg", tmp_path / "broken.npz", tmp_path / "b.pt", ok=False)
    assert code == 1 and "missing" in err and "attention/conv2/bias" in err
    assert not (tmp_path / "b.pt").exists()
    np.savez(tmp_path / "two.npz", **{f"a/{k}": v for k, v in variables.items()},
             **{f"b/{k}": v for k, v in variables.items()})
    with pytest.raises(CbirError, match="several DELG models"):
        convert_delg(tmp_path / "two.npz", tmp_path / "b.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CbirError, match="junk.pt"):
        delg.load_delg(tmp_path / "junk.pt")
    with pytest.raises(CbirError, match="storage.googleapis.com/delf"):
        delg.DelgLocal({"weights": str(tmp_path / "absent.pt")})


TF_WRITER = r"""
import sys
import numpy as np
import tensorflow as tf

npz, saved_model, ckpt_dir = sys.argv[1:4]
data = np.load(npz)

def model_tree():
    model = tf.Module()
    for name in data.files:
        if name.startswith("__"):
            continue
        node, parts = model, name.split("/")[1:]  # drop the npz's own prefix
        for p in parts[:-1]:
            if not hasattr(node, p):
                setattr(node, p, tf.Module())
            node = getattr(node, p)
        setattr(node, parts[-1], tf.Variable(data[name]))
    # a training head and a step counter, as in the official training checkpoints
    model.desc_classification = tf.Module()
    model.desc_classification.kernel = tf.Variable(np.ones((2048, 5), np.float32))
    return model

export = tf.Module()
export._model = model_tree()  # the attribute of the official export's _ExtractModule
tf.saved_model.save(export, saved_model)
ckpt = tf.train.Checkpoint(model=model_tree(), step=tf.Variable(7))
tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=1).save()
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TF, reason="TensorFlow not installed (pip install 'cbir[convert]'): the converter's "
                                       "TensorFlow reader is not tested")
def test_converter_reads_the_official_tensorflow_files(tmp_path, weights):
    """A SavedModel with the official export's object paths (_model/backbone/...) and a
    training checkpoint directory (model/backbone/..., extra heads) written by TensorFlow
    itself (in a subprocess: this process never imports TensorFlow) convert to exactly
    the tensors of the .npz conversion."""
    npz = tmp_path / "vars.npz"
    ref.write_generated_npz(npz)
    subprocess.run([sys.executable, "-c", TF_WRITER, str(npz), str(tmp_path / "sm"), str(tmp_path / "ckpt")],
                   check=True, capture_output=True)
    expected = torch.load(weights, weights_only=True)["state_dict"]
    for src in (tmp_path / "sm", tmp_path / "ckpt"):
        r = subprocess.run([sys.executable, "-m", "cbir", "weights", "convert", "delg", str(src),
                            str(tmp_path / f"{src.name}.pt"), "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = torch.load(tmp_path / f"{src.name}.pt", weights_only=True)
        assert got["source"].startswith(f"converted from {src.name}")
        assert got["state_dict"].keys() == expected.keys()
        assert all(torch.equal(got["state_dict"][k], expected[k]) for k in expected)
    r = subprocess.run([sys.executable, "-m", "cbir", "weights", "convert", "delg", str(tmp_path),
                        str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert r.returncode == 1 and "neither a SavedModel" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TF_KERAS, reason="TensorFlow with tf-keras not installed: the official Keras export "
                                             "is not tested")
@pytest.mark.parametrize("export", ["tf2", "tf1"])
def test_converter_reads_the_official_keras_export(tmp_path, weights, export):
    """DELG built with the official Keras layer structure and saved as the official TF2
    export script saves it, where Keras keys its variables by position (``_model/backbone/
    l2a/variables/3``) and the converter finds each one's layer through the object graph;
    or saved from a TensorFlow 1 graph, where variables carry the Keras layer names
    (``backbone/<block>/res2a_branch2a/kernel``). Both convert to the .npz's tensors."""
    npz = tmp_path / "vars.npz"
    ref.write_generated_npz(npz)
    made = subprocess.run([sys.executable, str(Path(__file__).with_name("delg_keras_export.py")), str(npz),
                           str(tmp_path / "export"), *(["--tf1"] if export == "tf1" else [])],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    said = made.stdout.split()
    assert said[0] == str(len(ref.official_variables(0))), made.stdout
    assert int(said[2]) > 300 if export == "tf2" else said[2:] == ["named", "by", "layer"], made.stdout
    r = subprocess.run([sys.executable, "-m", "cbir", "weights", "convert", "delg", str(tmp_path / "export"),
                        str(tmp_path / "export.pt"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = torch.load(weights, weights_only=True)["state_dict"]
    got = torch.load(tmp_path / "export.pt", weights_only=True)["state_dict"]
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_official_layer_names_are_object_paths():
    """TF1 graph names of the official Keras layers, mapped to the object paths."""
    renamed = {"backbone/_identity_block_3/res4f_branch2c/kernel": "backbone/l4f/conv2c/kernel",
               "DELG/backbone/_conv_block/bn3a_branch1/moving_mean": "DELG/backbone/l3a/bn_shortcut/moving_mean",
               "attention/attn_conv2/bias": "attention/conv2/bias",
               "attention/bn_conv1/gamma": "attention/bn_conv1/gamma",
               "autoencoder/autoenc_conv1/kernel": "autoencoder/conv1/kernel",
               "backbone/embedding_layer/kernel": "backbone/embedding_layer/kernel",
               "backbone/block/res2a_branch2a/kernel/Momentum": "backbone/block/res2a_branch2a/kernel/Momentum"}
    for tf1, path in renamed.items():
        assert delg.from_layer_names(tf1) == path


# ---------------------------------------------------------------- end to end, real photos
@pytest.mark.slow
def test_delg_pipeline_on_the_real_photos(sceaux, weights, tmp_path):
    """`cbir extract --local delg --global delg` (one pass), fusion with DenseVLAD, matching
    with verification, mapping and localization run through on sceaux_castle. The
    weights are random, so no pose accuracy is expected; the output says so."""
    root = tmp_path / "sceaux"
    shutil.copytree(sceaux, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    m, q = root / "mapping", root / "query"
    opts = ["--weights", weights, "--max-size", "320", "--conf", "score_threshold=0", "--conf", "max_keypoints=500"]
    _, out, err = cbir("extract", m, "--local", "delg", "--global", "delg", *opts, "--json")
    local_report, global_report = json.loads(out)
    assert local_report["extracted"] == global_report["extracted"] == 8
    assert "GENERATED random weights" in local_report["weights_source"]
    with open_store(m / "cbir" / "local" / "r50delg_gld_20200814.h5") as s:
        assert s.config["extractor"] == "delg" and s.attrs["keypoint_params"] == "scale"
        for name in s.keys:
            f = s.get(name)
            w, h = f["image_sizes"]
            assert 0 < len(f["keypoints"]) <= 500
            assert (f["keypoints"] >= 0).all()
            assert (f["keypoints"][:, 0] <= w).all() and (f["keypoints"][:, 1] <= h).all()
            np.testing.assert_allclose(np.linalg.norm(f["descriptors"], axis=1), 1, atol=1e-5)
    (root / "pipe.toml").write_text(
        '[datasets]\nmap = "mapping"\nquery = "query"\nquery_gt = "query_gt"\n'
        f'[extract]\nlocal = "delg"\nglobal = ["delg", "densevlad"]\nweights = "{weights}"\n'
        'local_conf = {max_size = 320, score_threshold = 0, max_keypoints = 500}\nglobal_conf = {max_size = 320}\n'
        '[retrieve]\ntopk = 3\nmap_pairs = 0\nfusion = "gharm"\n[localize]\nconfig = "config1"\n')
    _, out, _ = cbir("pipeline", root / "pipe.toml", "--json")
    result = json.loads(out)
    assert "8 present" in result["steps"][0]  # the map's DELG features were kept
    assert "gharm of r50delg_gld_20200814+densevlad" in " ".join(result["steps"])
    assert result["evaluation"]["all"]["queries"] == 3
    report = json.loads(next((q / "cbir" / "localization").rglob("report.json")).read_text())
    assert len(report) == 3 and all(r["success"] or r["reason"] for r in report)
    # DELG's global descriptor in every fusion operator
    for method in METHODS:
        _, out, _ = cbir("retrieve", "--map", m, "--query", q, "--global", "r50delg_gld_20200814,densevlad",
                         "--fusion", method, "--topk", 2, "-o", "-")
        lines = [line for line in out.splitlines() if line and not line.startswith("#")]
        assert len(lines) == 3 * 2, method
