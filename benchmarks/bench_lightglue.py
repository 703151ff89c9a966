"""LightGlue matching speed: cbir's matcher network against the official module (issue 28).

    python benchmarks/bench_lightglue.py --official /path/to/cvg/LightGlue [--keypoints 1024 --pairs 20]

Both run the same weights (the official module's own initialization, copied into cbir's
network: no released weights are here) on the same pairs: ``--keypoints`` random keypoints
in a 1024 x 768 frame with random unit 128-D descriptors per image (the ALIKED
configuration: 128-D projected to 256, 4 heads, 9 layers), on this machine's CPU, one pair
at a time after a warm-up pair, the two interleaved; medians. With these weights no point is
confident, so every pair runs all 9 layers and nothing is pruned: the fixed cost of a pair,
the same work on both sides. The official checkout's ``lightglue/__init__.py`` must not import its extractors
(they need torchvision and kornia): this script imports ``lightglue/lightglue.py`` alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def official_module(repo: Path):  # noqa: ANN201  # the official class
    spec = importlib.util.spec_from_file_location("official_lightglue", repo / "lightglue" / "lightglue.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LightGlue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="a checkout of github.com/cvg/LightGlue")
    ap.add_argument("--keypoints", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=20)
    args = ap.parse_args()

    from cbir.matching.lightglue import LightGlueNet

    torch.manual_seed(0)
    official = official_module(args.official)(features=None, input_dim=128).eval()
    ours = LightGlueNet(128, 256, 4, 9).eval()
    missing, unexpected = ours.load_state_dict(official.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    rng = np.random.default_rng(0)
    size = torch.tensor([[1024.0, 768.0]])

    def image() -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.from_numpy((rng.random((1, args.keypoints, 2)) * [1024, 768]).astype(np.float32))
        d = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((1, args.keypoints, 128),
                                                                               dtype=np.float32)), dim=-1)
        return k, d

    pairs = [(image(), image()) for _ in range(args.pairs + 1)]

    def run_official(pair: tuple) -> torch.Tensor:
        (k0, d0), (k1, d1) = pair
        out = official({"image0": {"keypoints": k0, "descriptors": d0, "image_size": size},
                        "image1": {"keypoints": k1, "descriptors": d1, "image_size": size}})
        return out["matches0"]

    def run_ours(pair: tuple) -> torch.Tensor:
        (k0, d0), (k1, d1) = pair
        return ours(k0, k1, d0, d1, size, size, 0.95, 0.99, 0.1)[0]

    # interleaved, each first in turn (this VM's caches and clocks drift over a run): medians
    times: dict[str, list[float]] = {"cbir": [], "official": []}
    matches = {"cbir": 0, "official": 0}
    runs = {"cbir": run_ours, "official": run_official}
    with torch.inference_mode():
        for run in runs.values():
            run(pairs[0])  # warm-up
        for i, pair in enumerate(pairs[1:]):
            for label in (("cbir", "official") if i % 2 else ("official", "cbir")):
                t0 = time.perf_counter()
                found = runs[label](pair)
                times[label].append(time.perf_counter() - t0)
                matches[label] += int((found > -1).sum())
    rates = {label: 1 / float(np.median(t)) for label, t in times.items()}
    rates.update({f"{label}_matches": n for label, n in matches.items()})
    assert rates["cbir_matches"] == rates["official_matches"], rates
    print(f"LightGlue (ALIKED configuration), {args.keypoints} keypoints an image, {args.pairs} pairs, CPU "
          f"({torch.get_num_threads()} threads): cbir {rates['cbir']:.2f} pairs/s, official {rates['official']:.2f} "
          f"pairs/s ({rates['cbir'] / rates['official']:.2f}x); {rates['cbir_matches']} matches on both sides")


if __name__ == "__main__":
    main()
