"""Extraction throughput: SIFT, R2D2 (cbir) and the official naver/r2d2 code on the same
weights and images; DenseVLAD, AP-GeM and NetVLAD (global); DELG global only, local only
and both in one pass, in one script.

AP-GeM, NetVLAD and DELG run on checkpoints generated in the official layouts (random
weights: the official files cannot be downloaded here; the speed is the same). DELG runs
the official configuration (1024 px, 7 scales, 3 global scales, top 1000) except the
attention threshold, 0 instead of 175, which random weights would never reach: every
position is a candidate, the most expensive case for the selection.

Each variant runs in its own subprocess, so its peak memory (``VmHWM``) is its own.
The official code is imported from a checkout of github.com/naver/r2d2 (``--official-repo``:
extract.py, nets/, tools/common.py; torchvision is only needed for its image transform,
which is the same ToTensor + Normalize that cbir computes, so it is supplied here), and
run as its extract.py does: ``extract_multiscale`` then the top-k of the scores.

    python benchmarks/bench_extract.py --shared ../shared --official-repo /path/to/r2d2 --images 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from memory import peak_rss_mb


def image_paths(shared: Path, n: int) -> list[Path]:
    return sorted((shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data").glob("*.jpg"))[:n]


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    from cbir.io.images import read_image
    from cbir.models.base import to_tensor
    from cbir.models.r2d2 import R2D2
    from cbir.models.sift import SIFT

    paths = image_paths(args.shared, args.images)
    weights = args.shared / "weights" / "r2d2" / "r2d2_WASF_N16.pt"
    top_k = 5000
    if variant in ("apgem", "netvlad", "densevlad"):
        return run_global(variant, args, paths)
    if variant.startswith("delg"):
        return run_delg(variant, args, paths)
    if variant == "sift":
        ex = SIFT({"max_size": 1024})
        run = lambda p: len(ex.extract(read_image(p, grayscale=True, max_size=1024))["keypoints"])  # noqa: E731
    elif variant == "r2d2":
        ex = R2D2({"weights": str(weights), "max_keypoints": top_k, "device": "cpu"})
        run = lambda p: len(ex.extract(read_image(p))["keypoints"])  # noqa: E731
    else:
        sys.path.insert(0, str(args.official_repo))
        sys.modules["tools.dataloader"] = types.SimpleNamespace(norm_RGB=None)  # transform supplied below
        import extract as official  # noqa: E402  (naver/r2d2 extract.py)

        net = official.load_network(str(weights))
        detector = official.NonMaxSuppression(rel_thr=0.7, rep_thr=0.7)

        def run(p: Path) -> int:
            img = to_tensor(read_image(p).array, torch.device("cpu"))
            xys, desc, scores = official.extract_multiscale(net, img, detector, scale_f=2 ** 0.25, min_scale=0.0,
                                                            max_scale=1, min_size=256, max_size=1024)
            idxs = scores.cpu().numpy().argsort()[-top_k:]
            return len(xys.cpu().numpy()[idxs])

    return timed_run(variant, run, paths)


def timed_run(variant: str, run, paths: list[Path]) -> dict:
    """One warm-up image (allocator, oneDNN primitives) not timed, then every image."""
    run(paths[0])
    t = time.perf_counter()
    count = sum(run(p) for p in paths)
    dt = time.perf_counter() - t
    return {"variant": variant, "images": len(paths), "seconds": dt, "images_per_s": len(paths) / dt,
            "keypoints_per_image": count / len(paths),
            "peak_rss_MB": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def generated_weights(variant: str, work: Path) -> Path:
    """A checkpoint in the official layout with random weights (ResNet-101 AP-GeM, VGG-16 NetVLAD)."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if variant == "apgem":
        from cbir.models.apgem import ResNetGeM

        path = work / "Resnet101-AP-GeM-LM18.pt"
        if not path.exists():
            state = {"module." + k.removeprefix("trunk."): v for k, v in ResNetGeM("resnet101").state_dict().items()}
            torch.save({"model_options": {"arch": "resnet101_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3},
                        "state_dict": state}, path)
        return path
    from cbir.models.netvlad import NetVLADNet

    path = work / "netvlad_pitts30k.pth"
    if not path.exists():
        net = NetVLADNet(64, 512, 4096)
        rename = {"assign.weight": "pool.conv.weight", "centroids": "pool.centroids",
                  "whiten.weight": "WPCA.0.weight", "whiten.bias": "WPCA.0.bias"}
        state = {rename.get(k, k): v for k, v in net.state_dict().items()}
        state["WPCA.0.weight"] = state["WPCA.0.weight"][:, :, None, None]
        torch.save({"state_dict": state}, path)
    return path


def run_global(variant: str, args: argparse.Namespace, paths: list[Path]) -> dict:
    from cbir.extract import build_extractor
    from cbir.io.images import read_image

    if variant == "densevlad":
        ex = build_extractor("densevlad", {"learn": True}, "global")
        ex.prepare(args.work / "densevlad.h5", [str(p) for p in paths],
                   lambda p: read_image(p, grayscale=True, max_size=ex.loader_max_size))
    else:
        ex = build_extractor(variant, {"weights": str(generated_weights(variant, args.work)), "device": "cpu"},
                             "global")

    def run(p: Path) -> int:
        return len(ex.extract(read_image(p, grayscale=ex.grayscale, max_size=ex.loader_max_size)))

    return timed_run(variant, run, paths)


def delg_weights(work: Path) -> Path:
    """Generated DELG weights under the official names, through the converter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cbir.weights import convert_delg
    from tests.delg_reference import write_generated_npz

    path = work / "r50delg_gld_20200814.pt"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_generated_npz(work / "delg_vars.npz")
        convert_delg(work / "delg_vars.npz", path)
    return path


def run_delg(variant: str, args: argparse.Namespace, paths: list[Path]) -> dict:
    """delg-global, delg-local, or delg-both (one pass for both, as `cbir extract --local delg
    --global delg` runs it)."""
    from cbir.io.images import read_image
    from cbir.models.delg import DelgGlobal, DelgLocal

    conf = {"weights": str(delg_weights(args.work)), "device": "cpu"}
    extractors = []
    if variant in ("delg-local", "delg-both"):
        extractors.append(DelgLocal({**conf, "score_threshold": 0.0}))
    if variant in ("delg-global", "delg-both"):
        extractors.append(DelgGlobal(conf))
    if len(extractors) == 2:
        extractors[0].share_pass(extractors[1])

    def run(p: Path) -> int:
        image = read_image(p)
        for e in extractors:
            e.begin_image(extractors)
        outs = [e.extract(image) for e in extractors]
        return len(outs[0]["keypoints"]) if isinstance(outs[0], dict) else len(outs[0])

    return timed_run(variant, run, paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--official-repo", type=Path, help="checkout of github.com/naver/r2d2 (omit to skip)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["sift", "r2d2", "official", "densevlad", "apgem", "netvlad",
                                                      "delg-global", "delg-local", "delg-both"])
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "extract")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_variant(args.only, args)))
        return
    results = {}
    for v in args.variants:
        if v == "official" and not args.official_repo:
            print("official: skipped (no --official-repo)")
            continue
        cmd = [sys.executable, __file__, "--only", v, "--shared", str(args.shared), "--images", str(args.images),
               "--work", str(args.work)]
        if args.official_repo:
            cmd += ["--official-repo", str(args.official_repo)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results[v] = r
        unit = "dims" if v in ("apgem", "netvlad", "densevlad", "delg-global") else "keypoints"
        print(f"{v:9s} {r['images_per_s']:7.3f} images/s  {r['seconds'] / r['images']:7.2f} s/image  "
              f"{r['keypoints_per_image']:7.0f} {unit}  peak RSS {r['peak_rss_MB']:6.0f} MB", flush=True)
    if all(f"delg-{k}" in results for k in ("global", "local", "both")):
        separate = results["delg-global"]["seconds"] + results["delg-local"]["seconds"]
        print(f"DELG one pass for both: {results['delg-both']['seconds'] / separate:.2f} of the two separate passes")
    if "r2d2" in results and "official" in results:
        speedup = results['official']['seconds'] / results['r2d2']['seconds']
        print(f"R2D2 speed-up over the official code: x{speedup:.2f}")


if __name__ == "__main__":
    main()
