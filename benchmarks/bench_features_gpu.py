"""Today's features on a GPU, each against its official code in the same run (issue 28).

    python benchmarks/bench_features_gpu.py --official DIR --photos DIR --aliked-weights FILE --out gpu.json

``--official`` holds the official sources, unchanged: ``ALIKED/`` (Shiaoming/ALIKED, with its
``custom_ops`` built by this script when nvcc is there, else its own torch fallback, as its
code chooses), ``LightGlue/lightglue/lightglue.py`` (cvg/LightGlue), ``accelerated_features/``
(verlab/accelerated_features), ``disk/`` (cvlab-epfl/disk with the unets, torch_dimcheck and
torch_localize packages of its pinned submodules), ``MegaLoc/megaloc_model.py``
(gmberton/MegaLoc). Sections (each one's failure is printed and the others still run):

* ``aliked``: the published ``aliked-n16`` on photos of 1024 x 769, official defaults (full
  resolution, scores above 0.2, at most 5,000 keypoints): images/s, and the two outputs
  compared (keypoint counts, largest keypoint and descriptor differences);
* ``disk``, ``xfeat``: weights generated in the official layout (none published here), the
  same photos (DISK's cut to 1024 x 768, which its official code needs): images/s, outputs
  compared;
* ``lightglue``: the ALIKED configuration with the official module's own initialization,
  1,024 random keypoints an image, random unit descriptors, every mutual best match kept
  (``filter_threshold`` 0: these weights are confident of none): pairs/s of the official module
  (one pair a call, its flash path), cbir one pair at a time and cbir in batches of 16 and
  64 (padded; each pair stops at its own layer), and how many matches equal the official's;
* ``megaloc``: the published architecture (DINOv2 ViT-B/14 + SALAD, 8,448-D) with the
  official module's own initialization, photos resized to 640 x 480: images/s, descriptors
  compared.

Times are wall-clock with the device synchronized (each output is copied to the host, as a
user gets it); the official and cbir's runs alternate image by image, after a warm-up of
each; medians. ``--device cpu`` runs the same code on a CPU (the official ALIKED and MegaLoc
need torchvision there). The image is decoded once, outside the
timing (both sides get the same RGB array).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


DEVICE = "cuda"


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[Any], Any], items: list, warmup: int = 2) -> tuple[float, list]:
    """Median seconds of ``run`` over ``items`` (after ``warmup`` untimed runs) and the outputs."""
    for item in items[:warmup]:
        run(item)
    sync()
    times, outs = [], []
    for item in items:
        t0 = time.perf_counter()
        outs.append(run(item))
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), outs


def interleaved(official: Callable[[Any], Any], ours: Callable[[Any], Any],
                items: list) -> tuple[float, float, Any, Any]:
    """Median seconds of the official and cbir's run on each item, the two alternating which
    goes first (a machine's clocks and caches drift over a run), after one warm-up each; and
    their outputs on the first item."""
    runs = {"official": official, "cbir": ours}
    first = {label: run(items[0]) for label, run in runs.items()}
    sync()
    times: dict[str, list[float]] = {"official": [], "cbir": []}
    for i, item in enumerate(items):
        for label in (("official", "cbir") if i % 2 else ("cbir", "official")):
            t0 = time.perf_counter()
            runs[label](item)
            sync()
            times[label].append(time.perf_counter() - t0)
    return statistics.median(times["official"]), statistics.median(times["cbir"]), first["official"], first["cbir"]


def photos(folder: Path, n: int) -> list[np.ndarray]:
    import cv2

    found = sorted(folder.glob("*.jpg"))
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in found]
    return [rgb[i % len(rgb)] for i in range(n)]


def loaded(rgb: np.ndarray):  # noqa: ANN201  # cbir's LoadedImage
    from cbir.io.images import LoadedImage

    return LoadedImage(rgb, (rgb.shape[1], rgb.shape[0]), (1.0, 1.0))


def build_aliked_ops(official: Path) -> str:
    ops = official / "ALIKED" / "custom_ops"
    if list(ops.glob("get_patches*.so")):
        return "compiled"
    try:
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ops, check=True, timeout=150,
                       capture_output=True, env={**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"})
        return "compiled"
    except (subprocess.SubprocessError, OSError) as e:
        print("ALIKED custom_ops not built:", type(e).__name__, str(e)[:200])
        return "fallback"


def bench_aliked(args: argparse.Namespace) -> dict:
    from cbir.models.aliked import ALIKED as Ours

    patches = build_aliked_ops(args.official)
    sys.path.insert(0, str(args.official / "ALIKED"))
    from nets.aliked import ALIKED  # the official module

    official = ALIKED(model_name="aliked-n16", device=DEVICE, top_k=-1, scores_th=0.2, n_limit=5000,
                      load_pretrained=False)
    official.load_state_dict(torch.load(args.aliked_weights, map_location="cpu", weights_only=True))
    official = official.eval().to(DEVICE)
    ours = Ours({"weights": str(args.aliked_weights), "device": DEVICE})
    images = photos(args.photos, args.images)
    with torch.inference_mode():
        t_off, t_ours, o, m = interleaved(official.run, lambda im: ours.extract(loaded(im)), images)
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(m["keypoints"]).query(o["keypoints"])
    return {"patches": patches, "official_images_per_s": 1 / t_off, "cbir_images_per_s": 1 / t_ours,
            "ratio": t_off / t_ours, "keypoints": [len(o["keypoints"]), len(m["keypoints"])],
            "max_keypoint_px": float(dist.max()),
            "max_descriptor_diff": float(np.abs(o["descriptors"] - m["descriptors"][idx]).max())}


def bench_disk(args: argparse.Namespace) -> dict:
    from cbir.models.disk import DISK as Ours
    from tests.disk_reference import official_state

    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = object  # type: ignore[attr-defined]
    sys.modules["torch.utils.tensorboard"] = board
    sys.path.insert(0, str(args.official / "disk"))
    from disk import DISK  # the official module

    state = official_state()
    path = Path("/tmp/depth-save.pth")
    torch.save(state, path)
    official = DISK(window=8, desc_dim=128)
    official.load_state_dict(state["extractor"])
    official = official.eval().to(DEVICE)
    ours = Ours({"weights": str(path), "device": DEVICE})
    images = [np.ascontiguousarray(im[:768]) for im in photos(args.photos, args.images)]

    def run_official(rgb: np.ndarray) -> dict:  # as detect.py does
        bitmap = torch.from_numpy(rgb).to(DEVICE).to(torch.float32).permute(2, 0, 1) / 255.0
        f = official.features(bitmap[None], kind="nms", window_size=5, cutoff=0.0, n=None)[0].to("cpu")
        order = np.argsort(f.kp_logp.numpy())[::-1]
        return {"keypoints": f.kp.numpy()[order], "descriptors": f.desc.numpy()[order]}

    with torch.no_grad():
        t_off, t_ours, o, m = interleaved(run_official, lambda im: ours.extract(loaded(im)), images)
    same = {tuple(k) for k in o["keypoints"].tolist()} == {tuple(k) for k in m["keypoints"].tolist()}
    return {"official_images_per_s": 1 / t_off, "cbir_images_per_s": 1 / t_ours, "ratio": t_off / t_ours,
            "keypoints": [len(o["keypoints"]), len(m["keypoints"])], "same_keypoints": same}


def bench_xfeat(args: argparse.Namespace) -> dict:
    from cbir.models.xfeat import XFeat as Ours
    from cbir.models.xfeat import XFeatNet
    from tests.xfeat_reference import official_state

    sys.path.insert(0, str(args.official / "accelerated_features"))
    from modules.xfeat import XFeat  # the official module

    state = official_state({k: tuple(v.shape) for k, v in XFeatNet().state_dict().items()})
    path = Path("/tmp/xfeat.pt")
    torch.save(state, path)
    official = XFeat(weights=state, top_k=4096, detection_threshold=0.05)
    ours = Ours({"weights": str(path), "device": DEVICE})
    images = photos(args.photos, args.images * 2)

    def run_official(rgb: np.ndarray) -> dict:
        found = official.detectAndCompute(official.parse_input(rgb))[0]
        return {k: v.cpu().numpy() for k, v in found.items()}

    with torch.inference_mode():
        t_off, t_ours, o, m = interleaved(run_official, lambda im: ours.extract(loaded(im)), images)
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(m["keypoints"]).query(o["keypoints"])
    return {"official_images_per_s": 1 / t_off, "cbir_images_per_s": 1 / t_ours, "ratio": t_off / t_ours,
            "keypoints": [len(o["keypoints"]), len(m["keypoints"])], "max_keypoint_px": float(dist.max()),
            "max_descriptor_diff": float(np.abs(o["descriptors"] - m["descriptors"][idx]).max())}


def bench_lightglue(args: argparse.Namespace) -> dict:
    from cbir.matching.lightglue import LightGlue

    spec = importlib.util.spec_from_file_location("official_lightglue",
                                                  args.official / "LightGlue" / "lightglue" / "lightglue.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    official = module.LightGlue(features=None, input_dim=128, filter_threshold=0.0).eval().to(DEVICE)
    path = Path("/tmp/aliked_lightglue.pth")
    torch.save(official.state_dict(), path)
    rng = np.random.default_rng(0)
    n, size = args.keypoints, np.array([1024.0, 768.0], np.float32)

    def image() -> dict:
        d = rng.standard_normal((n, 128)).astype(np.float32)
        return {"keypoints": (rng.random((n, 2)) * size).astype(np.float32),
                "descriptors": d / np.linalg.norm(d, axis=1, keepdims=True), "image_sizes": size}

    pairs = [(image(), image()) for _ in range(args.pairs)]
    cuda = torch.device(DEVICE)
    result: dict[str, Any] = {"keypoints": n, "pairs": args.pairs}

    def run_official(pair: tuple) -> np.ndarray:
        data = {f"image{i}": {"keypoints": torch.from_numpy(p["keypoints"]).to(cuda)[None],
                              "descriptors": torch.from_numpy(p["descriptors"]).to(cuda)[None],
                              "image_size": torch.from_numpy(size).to(cuda)[None]} for i, p in enumerate(pair)}
        return official(data)["matches0"][0].cpu().numpy()

    with torch.inference_mode():
        t_off, off = timed(run_official, pairs)
    result["official_pairs_per_s"] = 1 / t_off
    reference = sum(int((m > -1).sum()) for m in off)
    for batch_size in (1, 16, 64):
        matcher = LightGlue({"features": "aliked", "weights": str(path), "batch_size": batch_size,
                             "filter_threshold": 0.0})

        def upload(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(cuda, non_blocking=True)

        prepared = [tuple(matcher.prepare(p, upload) for p in pair) for pair in pairs]
        batch = matcher.batch()
        for f0, f1 in prepared[:batch_size]:  # warm-up
            batch.add(f0, f1)
        batch.results()
        sync()
        t0 = time.perf_counter()
        for f0, f1 in prepared:
            batch.add(f0, f1)
        found = batch.results()
        sync()
        seconds = time.perf_counter() - t0
        same = sum(int(np.array_equal(np.flatnonzero(o > -1), m[:, 0]) and np.array_equal(o[o > -1], m[:, 1]))
                   for o, (m, _) in zip(off, found, strict=True))
        result[f"cbir_batch{batch_size}_pairs_per_s"] = len(pairs) / seconds
        result[f"cbir_batch{batch_size}_pairs_with_the_official_matches"] = same
        result[f"cbir_batch{batch_size}_matches"] = int(sum(len(m) for m, _ in found))
    result["official_matches"] = reference
    return result


def bench_megaloc(args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file

    from cbir.models.megaloc import MegaLoc as Ours

    sys.path.insert(0, str(args.official / "MegaLoc"))
    from megaloc_model import MegaLoc  # the official model

    torch.manual_seed(0)
    official = MegaLoc().eval().to(DEVICE)
    path = Path("/tmp/model.safetensors")
    save_file({k: v.contiguous().cpu() for k, v in official.state_dict().items()}, str(path))
    ours = Ours({"weights": str(path), "device": DEVICE, "max_size": None})
    import cv2

    images = [cv2.resize(im, (640, 480), interpolation=cv2.INTER_AREA) for im in photos(args.photos, args.images)]
    mean = torch.tensor([0.485, 0.456, 0.406], device=DEVICE)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=DEVICE)[:, None, None]

    def run_official(rgb: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(rgb).to(DEVICE).permute(2, 0, 1).float() / 255 - mean) / std
        return official(x[None])[0].cpu().numpy()

    with torch.inference_mode():
        t_off, t_ours, o, m = interleaved(run_official, lambda im: ours.extract(loaded(im)), images)
    return {"official_images_per_s": 1 / t_off, "cbir_images_per_s": 1 / t_ours, "ratio": t_off / t_ours,
            "dim": int(o.shape[0]), "max_descriptor_diff": float(np.abs(o - m).max())}


SECTIONS = {"aliked": bench_aliked, "disk": bench_disk, "xfeat": bench_xfeat, "lightglue": bench_lightglue,
            "megaloc": bench_megaloc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True)
    ap.add_argument("--photos", type=Path, required=True, help="a folder of JPEG photos (sceaux_castle's map)")
    ap.add_argument("--aliked-weights", type=Path, required=True, help="the published aliked-n16.pth")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--keypoints", type=int, default=1024)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--device", default="cuda", help="cpu: the same code at small sizes, to check it runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    name = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu"
    results: dict[str, Any] = {"device": name, "torch": torch.__version__}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args)
        except Exception:  # noqa: BLE001  # a section's failure is reported, the others still run
            results[name] = {"error": traceback.format_exc()[-1500:]}
        results[name]["section_seconds"] = time.perf_counter() - t0
        print(name, json.dumps(results[name], indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
