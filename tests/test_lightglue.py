"""LightGlue (the matcher ``lightglue``): on weights generated in the official layout, the
official module's matches, scores and stopping layer (tests/reference/lightglue, written by
tests/lightglue_reference.py running cvg/LightGlue's module unchanged), with the adaptive
depth and width and without; both checkpoint layouts load; `cbir match --matcher lightglue`
runs end to end; bad weights and features it has no weights for are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError
from cbir.matching.lightglue import LightGlue, LightGlueNet, load_lightglue
from tests.lightglue_reference import DIM, FEATURES, HEADS, INPUT_DIM, LAYERS, RUNS, THRESHOLDS, official_state

REFERENCES = {f: np.load(Path(__file__).parent / "reference" / "lightglue" / f"{f}.npz") for f in FEATURES}
REFERENCE = REFERENCES["aliked"]


def _state(scale_ori: bool = False) -> dict[str, torch.Tensor]:
    net = LightGlueNet(INPUT_DIM, DIM, HEADS, LAYERS, scale_ori)
    return official_state({k: tuple(v.shape) for k, v in net.state_dict().items()})


def _released_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer names of the first release (``self_attn.N``), no thresholds buffer."""
    out = {}
    for k, v in state.items():
        for kind in ("self_attn", "cross_attn"):
            if k.startswith("transformers.") and f".{kind}." in k:
                i = k.split(".")[1]
                k = k.replace(f"transformers.{i}.{kind}", f"{kind}.{i}")
        out[k] = v
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Generated weights of both configurations, in the released files' layout and names."""
    folder = tmp_path_factory.mktemp("lightglue")
    for features in FEATURES:
        torch.save(_released_layout(_state(features == "sift")), folder / f"{features}_lightglue.pth")
    return folder / "aliked_lightglue.pth"


def _run(net: LightGlueNet, depth: float, width: float, threshold: float,
         features: str = "aliked") -> tuple[np.ndarray, np.ndarray, int]:
    r = REFERENCES[features]
    args = [torch.from_numpy(r[f"keypoints{i}"])[None] for i in (0, 1)] + \
        [torch.from_numpy(r[f"descriptors{i}"].astype(np.float32))[None] for i in (0, 1)] + \
        [torch.from_numpy(r[f"size{i}"])[None] for i in (0, 1)]
    extra = [torch.from_numpy(r[f"scale_ori{i}"])[None] for i in (0, 1)] if features == "sift" else []
    with torch.inference_mode():
        m0, p0, stop = net(*args, depth, width, threshold, *extra)
    return m0[0].numpy(), p0[0].numpy(), stop


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_the_official_modules_matches_and_scores(weights, features, run, threshold):
    net = load_lightglue(weights.with_name(f"{features}_lightglue.pth"), features)
    conf = {"depth_confidence": 0.95, "width_confidence": 0.99, **RUNS[run]}
    m0, p0, stop = _run(net, conf["depth_confidence"], conf["width_confidence"], threshold, features)
    reference = REFERENCES[features]
    key = f"{run}_{threshold}"
    assert stop == int(reference[f"{key}_stop"]) == (3 if run == "adaptive" else 9)
    np.testing.assert_array_equal(m0, reference[f"{key}_matches0"])
    valid = m0 > -1
    assert valid.sum() > 50 or (threshold > 0 and features == "sift")  # random weights: few confident matches
    np.testing.assert_allclose(p0[valid], reference[f"{key}_scores0"][valid], atol=1e-5, rtol=0)


def test_the_same_matches_at_any_thread_count(weights, threads):
    """Matches identical, scores within 1e-5 at 1, 2 and 3 threads (not bit-identical: the
    products are reduced in other orders)."""
    m0, p0, _ = _run(load_lightglue(weights, "aliked"), 0.95, 0.99, 0.1)
    np.testing.assert_array_equal(m0, REFERENCE["adaptive_0.1_matches0"])
    np.testing.assert_allclose(p0[m0 > -1], REFERENCE["adaptive_0.1_scores0"][m0 > -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("features", ["aliked", "sift"])
def test_pairs_batched_are_matched_as_one_by_one(weights, features, threads):
    """Pairs of different sizes padded into batches (as on a GPU below 1,536 keypoints; here
    with the pruning off, on the CPU), each stopping at its own layer: the same matches as
    one pair at a time, probabilities within 1e-5, at 1, 2 and 3 threads; the batch is
    emptied by each ``results()``."""
    r = REFERENCES[features]
    rng = np.random.default_rng(0)
    prepared = []
    for _ in range(8):
        feats = []
        for i in (0, 1):
            keep = np.sort(rng.choice(len(r[f"keypoints{i}"]), int(rng.integers(40, 240)),
                                      replace=False))
            f = {"keypoints": r[f"keypoints{i}"][keep], "descriptors": r[f"descriptors{i}"][keep],
                 "image_sizes": r[f"size{i}"]}
            if features == "sift":
                so = r[f"scale_ori{i}"][keep]
                f["keypoint_params"] = np.stack([so[:, 0], np.rad2deg(so[:, 1])], -1)
            feats.append(f)
        prepared.append(feats)
    # thresholds at which these pairs stop at different layers (1 or 3; 2 or 3)
    layer, threshold, filter_threshold = (0, 0.08, 0.1) if features == "aliked" else (1, 0.44, 0.0)
    runs, stops = {}, set()
    for size in (1, 4):
        matcher = LightGlue({"features": features, "weights": str(weights.with_name(f"{features}_lightglue.pth")),
                             "width_confidence": -1, "batch_size": size, "filter_threshold": filter_threshold})
        net = matcher.network(torch.device("cpu"))
        net.confidence_thresholds[layer] = threshold
        batch = matcher.batch()
        out = []
        for chunk in (prepared[:5], prepared[5:]):
            for f0, f1 in chunk:
                (k0, d0, s0, o0), (k1, d1, s1, o1) = (matcher.prepare(f, torch.from_numpy) for f in (f0, f1))
                batch.add((k0, d0, s0, o0), (k1, d1, s1, o1))
                with torch.inference_mode():
                    stops.add(net(k0[None], k1[None], d0[None], d1[None], s0[None], s1[None], 0.95, -1,
                                  filter_threshold, *([o0[None], o1[None]] if o0 is not None else []))[2])
            batch.finish()
            got = batch.results()
            assert len(got) == len(chunk)
            out += got
        runs[size] = out
    for (m1, p1), (m4, p4) in zip(runs[1], runs[4], strict=True):
        np.testing.assert_array_equal(m1, m4)
        np.testing.assert_allclose(p1, p4, atol=1e-5, rtol=0)
    assert sum(len(m) for m, _ in runs[1]) > 100 and len(stops) == 2


def test_todays_state_dict_loads_as_the_released_layout(weights, tmp_path):
    today = tmp_path / "today.pth"
    net = load_lightglue(weights, "aliked")
    torch.save(net.state_dict(), today)  # transformers.N.self_attn..., with the thresholds buffer
    again = load_lightglue(today, "aliked")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))


def test_bad_weights_and_features_without_weights_are_one_line_errors(weights, tmp_path):
    with pytest.raises(CbirError, match="these weights are not those of superpoint"):
        load_lightglue(weights, "superpoint")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"nothing")
    with pytest.raises(CbirError, match="not a LightGlue checkpoint"):
        load_lightglue(broken, "aliked")
    torch.save({"conv.weight": torch.zeros(1)}, broken)
    with pytest.raises(CbirError, match="no transformer layers"):
        load_lightglue(broken, "aliked")
    with pytest.raises(CbirError, match="no weights for 'orb'"):
        LightGlue({"features": "orb"})
    with pytest.raises(CbirError, match="encode keypoints without scale and orientation: they are not those of sift"):
        load_lightglue(weights, "sift")
    matcher = LightGlue({"weights_dir": str(tmp_path)})
    matcher.conf["features"] = "aliked"
    with pytest.raises(CbirError, match=r"aliked_lightglue.pth.*not found.*github.com/cvg/LightGlue.*Apache-2.0"):
        matcher.network(torch.device("cpu"))


@pytest.mark.slow
def test_cbir_match_with_lightglue(shared, weights, tmp_path):
    """ALIKED and RootSIFT features of two photos matched by `cbir match --matcher lightglue`
    (the weights chosen by each store's extractor; SIFT's keypoints with their scale and
    orientation): each pair's stored matches are the network's own on the stored features;
    weights of other features are refused in one line."""
    from cbir.io.store import open_store
    from tests.conftest import writable_copy

    root = writable_copy(shared / "data" / "sceaux_castle" / "mapping", tmp_path / "map")
    images = tmp_path / "images.txt"
    images.write_text("100_7100.jpg\n100_7101.jpg\n")
    runner = CliRunner()
    for local, extra in (("aliked", ["--weights", str(shared / "weights" / "aliked"), "--device", "cpu"]),
                         ("rootsift", [])):
        result = runner.invoke(main, ["extract", str(root), "--local", local, "--images", str(images), *extra])
        assert result.exit_code == 0, result.output
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("100_7100.jpg 100_7101.jpg\n")
    args = ["match", "--query", str(root), "--pairs", str(pairs), "--matcher", "lightglue", "--device", "cpu",
            "--conf", f"weights_dir={weights.parent}"]
    for local, features in (("aliked-n16", "aliked"), ("rootsift", "sift")):
        result = runner.invoke(main, [*args, "--local", local, "--name", f"lg-{local}"])
        assert result.exit_code == 0, result.output
        local_store, matches = root / "cbir" / "local" / f"{local}.h5", root / "cbir" / "matches" / f"lg-{local}.h5"
        with open_store(local_store) as s, open_store(matches) as m:
            assert m.config["matcher"]["features"] == features
            assert m.config["matcher"]["weights"] == f"{features}_lightglue.pth"
            stored = m.get(("100_7100.jpg", "100_7101.jpg"))
            f = [s.get(name) for name in ("100_7100.jpg", "100_7101.jpg")]
        net = load_lightglue(weights.with_name(f"{features}_lightglue.pth"), features)
        extra = [torch.from_numpy(np.stack([x["keypoint_params"][:, 0], np.deg2rad(x["keypoint_params"][:, 1])],
                                           -1).astype(np.float32))[None] for x in f] if features == "sift" else []
        with torch.inference_mode():
            m0, _, _ = net(*(torch.from_numpy(x["keypoints"])[None] for x in f),
                           *(torch.from_numpy(x["descriptors"].astype(np.float32))[None] for x in f),
                           *(torch.from_numpy(x["image_sizes"].astype(np.float32))[None] for x in f),
                           0.95, 0.99, 0.1, *extra)
        valid = np.flatnonzero(m0[0].numpy() > -1)
        np.testing.assert_array_equal(stored["matches"], np.stack([valid, m0[0].numpy()[valid]], -1))
    result = runner.invoke(main, [*args, "--local", "aliked-n16", "--name", "lg-sp", "--conf", "features=superpoint"])
    assert result.exit_code == 1 and "superpoint weights take 256" in result.output
