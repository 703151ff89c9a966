"""Matching and verification throughput.

* the machine's float32 matrix-multiply rate (torch, 4096^3), the ceiling of the similarity step;
* cbir's blocked mutual nearest neighbour (``match_descriptors``) at 2k, 8k and 20k keypoints
  per image (128-D), its effective similarity rate, and a straightforward NumPy mutual NN
  (full similarity matrix, argmax both ways) on the same pairs;
* pycolmap verification (``verify_pair``) of pairs with 1,000 matches, 40% outliers.

    python benchmarks/bench_match.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cbir.geometry.cameras import Camera
from cbir.matching import MatcherConf, VerifyConf, match_descriptors, verify_pair
from cbir.matching.verify import verification_camera


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n ** 3 / best_of(lambda: torch.mm(a, b), 3) / 1e9


def pair(k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    base = rng.standard_normal((k, 128)).astype(np.float32)
    d0 = base + 0.3 * rng.standard_normal(base.shape).astype(np.float32)
    d1 = base[rng.permutation(k)] + 0.3 * rng.standard_normal(base.shape).astype(np.float32)
    return (d0 / np.linalg.norm(d0, axis=1, keepdims=True), d1 / np.linalg.norm(d1, axis=1, keepdims=True))


def numpy_mutual_nn(d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
    sim = d0 @ d1.T
    nn01, nn10 = sim.argmax(1), sim.argmax(0)
    i = np.flatnonzero(nn10[nn01] == np.arange(len(d0)))
    return np.stack([i, nn01[i]], 1)


def verification_scene(rng: np.random.Generator, n: int = 1000, outlier_ratio: float = 0.4):
    cam = Camera("SIMPLE_RADIAL", 1024, 768, (900.0, 512.0, 384.0, 0.0))
    X = np.c_[rng.uniform(-3, 3, n), rng.uniform(-2, 2, n), rng.uniform(5, 12, n)]
    a = 0.15
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    proj = lambda P: P[:, :2] / P[:, 2:] * 900.0 + [512.0, 384.0] - 0.5  # noqa: E731
    kp0, kp1 = proj(X), proj(X @ R.T + [-1.0, 0.0, 0.2])
    bad = rng.random(n) < outlier_ratio
    kp1[bad] = rng.uniform(0, [1024, 768], (bad.sum(), 2))
    m = np.c_[np.arange(n), np.arange(n)].astype(np.int32)
    return verification_camera(cam, 1024, 768), kp0, kp1, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 20000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    peak = matmul_gflops()
    print(f"torch float32 matmul (4096^3, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    for k in args.sizes:
        d0, d1 = pair(k, rng)
        t0, t1 = torch.from_numpy(d0), torch.from_numpy(d1)
        ours = best_of(lambda t0=t0, t1=t1: match_descriptors(t0, t1, MatcherConf()), args.repeat)
        theirs = best_of(lambda d0=d0, d1=d1: numpy_mutual_nn(d0, d1), max(1, args.repeat - 1))
        m_ours, _ = match_descriptors(t0, t1, MatcherConf())
        assert np.array_equal(m_ours, numpy_mutual_nn(d0, d1)), "results differ from the NumPy reference"
        rate = 2 * k * k * 128 / ours / 1e9
        print(f"{k:6d} keypoints: cbir {1 / ours:8.2f} pairs/s ({rate:6.1f} GFLOP/s = {100 * rate / peak:5.1f}% "
              f"of matmul), NumPy mutual NN {1 / theirs:7.2f} pairs/s, speed-up x{theirs / ours:5.1f}, "
              f"{len(m_ours)} matches", flush=True)
    cam, kp0, kp1, m = verification_scene(rng)
    n_pairs = 20
    t = best_of(lambda: [verify_pair(cam, kp0, cam, kp1, m, VerifyConf(seed=i)) for i in range(n_pairs)], 1)
    v = verify_pair(cam, kp0, cam, kp1, m, VerifyConf())
    print(f"verification (1000 matches, 40% outliers): {n_pairs / t:.1f} pairs/s on one thread, "
          f"{int(v.inliers.sum())} inliers found")


if __name__ == "__main__":
    main()
