"""What the bounded reads of issue 31 cost: a kept faiss index read first in a child process
with a memory budget (faiss allocates what a header claims, and can crash on a crafted
file: the child takes both) and then compared with its record, against faiss reading the
same file alone (the floor: the read cbir did before); a Radiance HDR image sized in a child
before it is decoded, against decoding it alone.

    python benchmarks/bench_bounded_reads.py [--images 200000] [--dim 2048] [--repeat 5] [--train 100000]

Synthetic unit descriptors (clustered), an ivfpq index of 4-bit fast-scan codes built as
``cbir index build`` builds it; times are the fastest of ``--repeat`` reads (the file in the
page cache), in this process.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

CHUNK = 50_000


def _nothing() -> None:
    return None


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--train", type=int, default=100_000,
                    help="training sample (the read's cost does not depend on it)")
    args = ap.parse_args()

    import faiss

    from cbir.io.child import in_child
    from cbir.io.images import read_image
    from cbir.io.index_file import IndexBytes
    from cbir.retrieval.index import IndexConf, _factory, _load_index_bytes, _read_index, structure_problem

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, args.dim)).astype(np.float32)

    def descriptors(n: int) -> np.ndarray:
        x = centres[rng.integers(0, len(centres), n)]
        x += 0.05 * rng.normal(size=x.shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    conf = IndexConf("ivfpq")
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "index.faiss"
        t0 = time.perf_counter()
        index = _factory("ivfpq", args.dim, args.images, conf)
        index.train(descriptors(min(args.images, args.train)))
        for start in range(0, args.images, CHUNK):  # in chunks: a million 2048-D rows are 8 GB
            index.add(descriptors(min(CHUNK, args.images - start)))
        faiss.write_index(index, str(path))
        print(f"built an ivfpq index of {args.images} x {args.dim}-D in {time.perf_counter() - t0:.1f} s, "
              f"{path.stat().st_size / 1e6:.0f} MB")
        del index  # a retrieval holds no training data: the fork's cost follows the process's memory
        gc.collect()
        where = IndexBytes(path, 0, path.stat().st_size)
        plain = best(lambda: _load_index_bytes(where), args.repeat)
        bounded = best(lambda: _read_index(where), args.repeat)
        loaded = _load_index_bytes(where)
        checked = best(lambda: structure_problem(loaded, "ivfpq", args.dim, args.images, conf), args.repeat)
        child = best(lambda: in_child(_nothing, (), 30.0, memory=1 << 30), args.repeat)
        print(f"kept index: faiss alone {plain * 1e3:.1f} ms; bounded read (child, then faiss) {bounded * 1e3:.1f} ms, "
              f"of which an empty child costs {child * 1e3:.1f} ms; structure check {checked * 1e3:.1f} ms; "
              f"total x{(bounded + checked) / plain:.2f} the floor, +{(bounded + checked - plain) * 1e3:.0f} ms")

        image = np.random.default_rng(1).random((1500, 2000, 3), dtype=np.float32)
        ok, hdr = cv2.imencode(".hdr", image)
        hdr_path = Path(work) / "photo.hdr"
        hdr_path.write_bytes(hdr.tobytes())
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
        decode = best(lambda: cv2.imdecode(np.frombuffer(hdr_path.read_bytes(), np.uint8), flags), args.repeat)
        cbir_read = best(lambda: read_image(hdr_path), args.repeat)
        print(f"2000 x 1500 Radiance HDR: OpenCV decode alone {decode * 1e3:.0f} ms; cbir's read (sized in a child, "
              f"then decoded and converted to 8 bits) {cbir_read * 1e3:.0f} ms, x{cbir_read / decode:.2f}")


if __name__ == "__main__":
    main()
