"""ALIKED extraction speed and memory: cbir against the official code (issue 28).

    python benchmarks/bench_aliked.py --official /path/to/Shiaoming/ALIKED [--model aliked-n16 --images 8]

Both extract the same photos (sceaux_castle's map, 1024 x 769, ../shared/data) at full
resolution with the official defaults (scores above 0.2, at most 5,000 keypoints) and the
published weights (../shared/weights/aliked), on this machine's CPU, one image at a time
after one warm-up image; each runs in a process of its own, whose peak resident memory is
reported. The official code runs unchanged (``nets/aliked.py``: ``ALIKED(...).run(rgb)``)
except for what it imports from torchvision, whose CPU build is not installable beside
this torch: its ``deform_conv2d`` is cbir's (the same computation), so the comparison is
everything else (the full-resolution feature maps the official code builds, its descriptor
head); without the compiled ``custom_ops`` it uses its own fallback ``get_patches``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
SHARED = Path(os.environ.get("CBIR_SHARED", HERE.parent.parent / "shared"))


def photos(n: int) -> list[Path]:
    folder = SHARED / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data"
    found = sorted(folder.glob("*.jpg"))
    return [found[i % len(found)] for i in range(n)]


def timed(run: Callable[[Any], object], inputs: list) -> list[float]:
    """Seconds of ``run`` on each input, after one untimed run on the first (warm-up)."""
    run(inputs[0])
    times = []
    for item in inputs:
        t0 = time.perf_counter()
        run(item)
        times.append(time.perf_counter() - t0)
    return times


def run_cbir(model: str, images: list[Path]) -> list[float]:
    from cbir.io.images import read_image
    from cbir.models.aliked import ALIKED

    extractor = ALIKED({"weights": f"{model}.pth", "weights_dir": str(SHARED / "weights" / "aliked"),
                        "device": "cpu"})
    loaded = [read_image(p) for p in images]
    return timed(extractor.extract, loaded)


def run_official(model: str, images: list[Path], official: Path) -> list[float]:
    import types

    import cv2
    import torch
    from torch import nn

    from cbir.models.aliked import deform_conv2d

    def deform(input, offset, weight, bias=None, stride=1, padding=(0, 0), dilation=1, mask=None):  # noqa: A002
        assert bias is None and mask is None
        return deform_conv2d(input, offset, weight, padding[0])

    tv = types.ModuleType("torchvision")
    tv.ops = types.SimpleNamespace(deform_conv2d=deform)
    resnet = types.SimpleNamespace(
        conv1x1=lambda i, o, stride=1: nn.Conv2d(i, o, 1, stride=stride, bias=False),
        conv3x3=lambda i, o, stride=1, groups=1, dilation=1: nn.Conv2d(i, o, 3, stride=stride, padding=dilation,
                                                                       groups=groups, bias=False, dilation=dilation))
    tv.models = types.SimpleNamespace(resnet=resnet)
    tv.transforms = types.SimpleNamespace(
        ToTensor=lambda: (lambda a: torch.from_numpy(a.transpose(2, 0, 1)).contiguous().float().div(255)))
    for name, module in (("torchvision", tv), ("torchvision.ops", tv.ops), ("torchvision.models", tv.models),
                         ("torchvision.models.resnet", resnet), ("torchvision.transforms", tv.transforms)):
        sys.modules[name] = module  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    sys.path.insert(0, str(official))
    from nets.aliked import ALIKED  # the official module

    net = ALIKED(model_name=model, device="cpu", top_k=-1, scores_th=0.2, n_limit=5000, load_pretrained=False)
    net.load_state_dict(torch.load(SHARED / "weights" / "aliked" / f"{model}.pth", map_location="cpu",
                                   weights_only=True))
    net.eval()
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in images]
    return timed(net.run, rgb)


def child(which: str, model: str, n: int, official: str) -> None:
    images = photos(n)
    times = run_cbir(model, images) if which == "cbir" else run_official(model, images, Path(official))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="a checkout of github.com/Shiaoming/ALIKED")
    ap.add_argument("--model", default="aliked-n16")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.images, str(args.official))
        return
    results = {}
    for which in ("cbir", "official"):
        out = subprocess.run([sys.executable, __file__, "--official", str(args.official), "--model", args.model,
                              "--images", str(args.images), "--child", which], check=True, capture_output=True,
                             text=True).stdout
        results[which] = json.loads(out.strip().splitlines()[-1])
    import torch

    print(f"{args.model}, {args.images} photos of 1024 x 769, CPU ({torch.get_num_threads()} threads):")
    for which, r in results.items():
        total = sum(r["times"])
        print(f"  {which:>8}: {len(r['times']) / total:.3f} images/s ({total / len(r['times']):.2f} s an image), "
              f"peak memory {r['peak_bytes'] / 2**30:.2f} GiB")
    ratio = sum(results["official"]["times"]) / sum(results["cbir"]["times"])
    print(f"  cbir / official rate: {ratio:.2f}x")


if __name__ == "__main__":
    main()
