"""Ray extraction with and without the final merge (issue 30): `cbir extract --executor ray`
leaves its stores sharded (each shard's store renamed into a part); the merge into one file
it used to make is now `cbir store merge`, optional. Both are timed on the same images.

    python benchmarks/bench_ray_sharded.py --work /tmp/bench-ray --copies 40 [--local sift]

The images are sceaux_castle's map photos (../shared/data, 1024 x 769), each linked
``--copies`` times under new names (hard links: regular files, the same pixels), so that
the run is long enough to time; a local Ray instance on this machine's cores runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("CBIR_SHARED", HERE.parent.parent / "shared"))


def replicated(source: Path, root: Path, copies: int) -> int:
    """A dataset at ``root`` holding every image of ``source`` ``copies`` times; its image count."""
    lines = (source / "sensors" / "records_camera.txt").read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    records = [[f.strip() for f in line.split(",")] for line in lines if line.strip() and not line.startswith("#")]
    data = root / "sensors" / "records_data"
    data.mkdir(parents=True)
    shutil.copy(source / "sensors" / "sensors.txt", root / "sensors" / "sensors.txt")
    rows = []
    for c in range(copies):
        for t, camera, name in records:
            target = data / f"copy{c:03d}" / name
            target.parent.mkdir(exist_ok=True)
            os.link(source / "sensors" / "records_data" / name, target)
            rows.append(f"{c * 100_000 + int(t)}, {camera}, copy{c:03d}/{name}")
    (root / "sensors" / "records_camera.txt").write_text("\n".join(header + rows) + "\n")
    return len(rows)


def cbir(*args: str) -> float:
    """Seconds a cbir command took (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cbir", "--quiet", *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-ray-sharded"))
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--local", default="sift")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    root = args.work / "map"
    n = replicated(SHARED / "data" / "sceaux_castle" / "mapping", root, args.copies)
    extract = cbir("extract", str(root), "--local", args.local, "--executor", "ray", "--shard-size",
                   str(args.shard_size))
    store = root / "cbir" / "local" / f"{args.local}.h5"
    parts = len(list((store.parent / f"{store.stem}.parts").glob("*.h5")))
    size = store.stat().st_size + sum(p.stat().st_size for p in (store.parent / f"{store.stem}.parts").glob("*.h5"))
    os.sync()
    merge = cbir("store", "merge", str(store))
    result = {"images": n, "parts": parts, "bytes": size, "extract_sharded_s": extract, "merge_s": merge,
              "extract_then_merge_s": extract + merge}
    print(f"{n} images ({args.local}, shards of {args.shard_size}): extraction on Ray leaving {parts} parts "
          f"{extract:.1f} s; the merge into one file ({size / 1e9:.2f} GB) {merge:.1f} s more "
          f"(with it: {extract + merge:.1f} s, {(extract + merge) / extract:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
