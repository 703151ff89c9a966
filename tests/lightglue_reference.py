"""Reference outputs of the official LightGlue module (cvg/LightGlue ``lightglue/lightglue.py``),
for the exactness tests of cbir.matching.lightglue; the files it writes are committed in
``tests/reference/lightglue/`` (``aliked.npz``, ``sift.npz``).

    python tests/lightglue_reference.py OFFICIAL_REPO SHARED OUT_DIR

No released LightGlue weights are here, so the weights are generated (:func:`official_state`:
seeded NumPy draws, by parameter name, in the official layout of the ALIKED and SIFT
configurations: 128-D descriptors projected to 256, 4 heads, 9 layers; SIFT's keypoints
encoded with their scale and orientation), scaled so that the adaptive parts
decide something: layer 2's confidence tokens are all confident (the module stops after
layer 3) and layer 0's matchability is nil while its tokens spread around the threshold (the
confident points are pruned there). The inputs are the 512 best ALIKED or RootSIFT
keypoints of two photos of sceaux_castle at full resolution (descriptors rounded to float16,
then float32: the inputs are those values).
The official module runs unchanged (from a checkout whose ``lightglue/__init__.py`` is
emptied: it imports the package's extractors, which need torchvision and kornia),
``LightGlue(features=None, input_dim=128)`` with the
generated state dict loaded strictly, on the CPU, with its defaults and with the adaptive
parts off (``depth_confidence=-1, width_confidence=-1``), each with the default match
threshold and with 0 (every mutual match).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

INPUT_DIM, DIM, HEADS, LAYERS = 128, 256, 4, 9
STOP_LAYER = 2  # the tokens of this layer are all confident: the module stops after it
PRUNE_LAYER = 0  # matchability nil here: the confident points are pruned
RUNS = {"adaptive": {}, "fixed": {"depth_confidence": -1, "width_confidence": -1}}
#: the configurations: ALIKED's, and SIFT's (keypoints encoded with scale and orientation)
FEATURES = ("aliked", "sift")
THRESHOLDS = (0.1, 0.0)


def official_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for the parameters ``shapes`` (name -> shape, the official names), drawn in
    sorted name order from one seeded generator: linear weights ~ N(0, 1/fan_in), biases and
    layer-norm shifts ~ N(0, 0.02), layer-norm scales 1 + N(0, 0.02), the Fourier projection
    N(0, 1) (the official initialization), then the adaptive parts set as the module doc says."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name == "confidence_thresholds":
            continue
        if name.endswith("weight") and len(shape) == 2:
            std = 1.0 if name.startswith("posenc") else shape[1] ** -0.5
            value = rng.normal(0, std, shape)
        elif ".ffn.1." in name and name.endswith("weight"):  # layer norm scale
            value = 1 + rng.normal(0, 0.02, shape)
        else:
            value = rng.normal(0, 0.02, shape)
        state[name] = torch.from_numpy(value.astype(np.float32))
    state[f"token_confidence.{STOP_LAYER}.token.0.bias"] = torch.tensor([30.0])
    state[f"token_confidence.{PRUNE_LAYER}.token.0.weight"] *= 8
    state[f"token_confidence.{PRUNE_LAYER}.token.0.bias"] = torch.tensor([1.5])
    state[f"log_assignment.{PRUNE_LAYER}.matchability.bias"] = torch.tensor([-30.0])
    return state


def inputs(shared: Path, features: str) -> dict[str, np.ndarray]:
    """The 512 best keypoints of two photos of sceaux_castle (``aliked``: ALIKED n16;
    ``sift``: RootSIFT, with scales and orientations in radians), descriptors float16."""
    from cbir.io.images import read_image
    from cbir.models.aliked import ALIKED
    from cbir.models.sift import RootSIFT

    extractor = ALIKED({"weights_dir": str(shared / "weights" / "aliked"), "device": "cpu"}) \
        if features == "aliked" else RootSIFT()
    folder = shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data"
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(("100_7100.jpg", "100_7101.jpg")):
        image = read_image(folder / name, grayscale=extractor.grayscale)
        found = extractor.extract(image)  # best first
        out[f"keypoints{i}"] = found["keypoints"][:512]
        out[f"descriptors{i}"] = found["descriptors"][:512].astype(np.float16)
        out[f"size{i}"] = np.array(image.size, dtype=np.float32)
        if features == "sift":
            params = found["keypoint_params"][:512]
            out[f"scale_ori{i}"] = np.stack([params[:, 0], np.deg2rad(params[:, 1])], -1).astype(np.float32)
    return out


def main(official: Path, shared: Path, out: Path) -> None:
    sys.path.insert(0, str(official))
    from lightglue.lightglue import LightGlue  # the official module

    from cbir.matching.lightglue import LightGlueNet

    for features in FEATURES:
        scale_ori = features == "sift"
        given = inputs(shared, features)
        net = LightGlueNet(INPUT_DIM, DIM, HEADS, LAYERS, scale_ori)
        state = official_state({k: tuple(v.shape) for k, v in net.state_dict().items()})
        results = dict(given)
        for run, conf in RUNS.items():
            for threshold in THRESHOLDS:
                official_net = LightGlue(features=None, input_dim=INPUT_DIM, add_scale_ori=scale_ori,
                                         filter_threshold=threshold, **conf).eval()
                missing, unexpected = official_net.load_state_dict(state, strict=False)
                assert set(missing) <= {"confidence_thresholds"} and not unexpected, (missing, unexpected)
                data = {}
                for i in (0, 1):
                    data[f"image{i}"] = {
                        "keypoints": torch.from_numpy(given[f"keypoints{i}"])[None],
                        "descriptors": torch.from_numpy(given[f"descriptors{i}"].astype(np.float32))[None],
                        "image_size": torch.from_numpy(given[f"size{i}"])[None]}
                    if scale_ori:
                        data[f"image{i}"]["scales"] = torch.from_numpy(given[f"scale_ori{i}"][:, 0])[None]
                        data[f"image{i}"]["oris"] = torch.from_numpy(given[f"scale_ori{i}"][:, 1])[None]
                with torch.no_grad():
                    pred = official_net(data)
                key = f"{run}_{threshold}"
                results[f"{key}_matches0"] = pred["matches0"][0].numpy()
                results[f"{key}_scores0"] = pred["matching_scores0"][0].numpy()
                results[f"{key}_stop"] = np.array(pred["stop"])
                print(features, key, "stop", pred["stop"], "matches", int((pred["matches0"][0] > -1).sum()))
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / f"{features}.npz", **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
