"""Localization under changing conditions (issue 28): which local feature holds up.

    python benchmarks/bench_conditions.py --work /tmp/bench-conditions \\
        [--datasets sceaux_castle,strecha_fountain_p11,virtual_gallery_tutorial] [--features sift,rootsift,r2d2,aliked]

The posed datasets of ../shared/data (their map, their queries and the queries' ground truth;
the virtual gallery tutorial's ground truth is its query's trajectories, its query is the
same images without them; its images are renders, a rig of two cameras maps it)
are localized by ``cbir pipeline`` (DenseVLAD retrieval, top 5, mutual nearest neighbours,
config1) with each local feature, once with the queries as photographed and once per
condition below, in which the *query* photos are rendered anew. Every condition is
SYNTHETIC, made here from the real photos, and labelled so:

- ``night``: exposure x0.25, gamma 1.6, a sodium-lamp colour cast (R, G, B x 1, 0.72, 0.38),
  sensor noise (Gaussian, 2% of full scale);
- ``motion_blur``: a horizontal box blur of 1/40 of the width;
- ``occluders``: rectangles cut from photos of the *other* dataset pasted over the query until
  30-50% of it is covered;
- ``low_resolution``: down-sampled 4x (area) and back up (bilinear): a quarter of the detail,
  the same camera;
- ``jpeg``: re-encoded at JPEG quality 8;
- ``rotation_90``: turned 90 degrees clockwise, with the camera (width and height swapped,
  principal point moved) and the ground-truth pose (rotated about the optical axis) made to
  match.

Reported per condition and feature: the share of queries within (0.25 m, 2 deg), (0.5 m,
5 deg) and (5 m, 10 deg) of the ground truth, over every dataset's queries together, and the
time per query of a pipeline run (the map is built once per feature, by the ``original``
run, whose time includes it; the other conditions reuse it).
R2D2 and ALIKED load the official weights of ../shared/weights. DISK and XFeat have no
published weights here; LightGlue neither, so the only matcher is mutual nearest neighbours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("CBIR_SHARED", HERE.parent.parent / "shared"))
CONDITIONS = ("original", "night", "motion_blur", "occluders", "low_resolution", "jpeg", "rotation_90")
FEATURES = {"sift": {}, "rootsift": {},
            "r2d2": {"weights": str(SHARED / "weights" / "r2d2"), "local_conf": {"max_keypoints": 5000}},
            "aliked": {"weights": str(SHARED / "weights" / "aliked")}}
THRESHOLDS = [[0.25, 2.0], [0.5, 5.0], [5.0, 10.0]]


# ------------------------------------------------------------------------ the conditions
def night(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = (rgb.astype(np.float32) / 255 * 0.25) ** 1.6 * np.array([1.0, 0.72, 0.38], np.float32)
    x = x + rng.normal(0, 0.02, x.shape).astype(np.float32)
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def motion_blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    length = max(3, rgb.shape[1] // 40)
    return cv2.filter2D(rgb, -1, np.full((1, length), 1.0 / length, np.float32), borderType=cv2.BORDER_REFLECT)


def occluded(rgb: np.ndarray, rng: np.random.Generator, sources: list[np.ndarray]) -> np.ndarray:
    out = rgb.copy()
    covered = np.zeros(rgb.shape[:2], bool)
    h, w = covered.shape
    while covered.mean() < 0.3:
        src = sources[int(rng.integers(len(sources)))]
        ph, pw = int(h * rng.uniform(0.2, 0.4)), int(w * rng.uniform(0.2, 0.4))
        sy, sx = int(rng.integers(0, src.shape[0] - ph)), int(rng.integers(0, src.shape[1] - pw))
        y, x = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        trial = covered.copy()
        trial[y:y + ph, x:x + pw] = True
        if trial.mean() > 0.5:
            continue
        out[y:y + ph, x:x + pw] = src[sy:sy + ph, sx:sx + pw]
        covered = trial
    return out


def low_resolution(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 8])
    assert ok
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def rotated_camera(fields: list[str]) -> list[str]:
    """A sensors.txt camera line's fields for the image turned 90 degrees clockwise:
    ``u' = H - v``, ``v' = u`` (COLMAP's pixel-centre convention)."""
    model, w, h, params = fields[3], fields[4], fields[5], [float(p) for p in fields[6:]]
    height = float(h)
    if model in ("SIMPLE_RADIAL", "SIMPLE_PINHOLE", "RADIAL"):
        f, cx, cy, *rest = params
        params = [f, height - cy, cx, *rest]
    elif model == "PINHOLE":
        fx, fy, cx, cy = params
        params = [fy, fx, height - cy, cx]
    else:
        raise SystemExit(f"rotation_90: camera model {model} not handled")
    return fields[:4] + [h, w] + [repr(p) for p in params]


def rotated_pose(fields: list[str]) -> list[str]:
    """A trajectories.txt line's fields, the camera turned 90 degrees about its optical axis:
    ``R' = Rz R``, ``t' = Rz t`` with ``Rz (x, y, z) = (-y, x, z)``."""
    qw, qx, qy, qz, tx, ty, tz = (float(v) for v in fields[2:9])
    c = s = math.sqrt(0.5)  # Rz as a quaternion: (cos 45, 0, 0, sin 45)
    q = (c * qw - s * qz, c * qx - s * qy, c * qy + s * qx, c * qz + s * qw)
    return fields[:2] + [repr(v) for v in (*q, -ty, tx, tz)]


def render(dataset: Path, condition: str, out: Path, sources: list[np.ndarray]) -> None:
    """``dataset``'s query and query_gt folders, their photos rendered under ``condition``."""
    rng = np.random.default_rng(zlib.crc32(f"{dataset.name}/{condition}".encode()))
    transforms = {"night": night, "motion_blur": motion_blur, "low_resolution": low_resolution, "jpeg": jpeg,
                  "occluders": lambda x, r: occluded(x, r, sources), "rotation_90": lambda x, r: np.rot90(x, -1),
                  "original": lambda x, r: x}
    for part in ("query", "query_gt"):
        # the virtual gallery's ground truth is its query's trajectories: the query is that without them
        source = dataset / (part if (dataset / "query_gt").is_dir() else "query")
        shutil.copytree(source / "sensors", out / part / "sensors", ignore=shutil.ignore_patterns("records_data"))
        for p in (out / part / "sensors").rglob("*"):
            p.chmod(p.stat().st_mode | 0o200)
        if part == "query":
            (out / part / "sensors" / "trajectories.txt").unlink(missing_ok=True)
        src, dst = source / "sensors" / "records_data", out / part / "sensors" / "records_data"
        for image in sorted(src.rglob("*.jpg")) + sorted(src.rglob("*.png")):
            target = dst / image.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if condition == "original":
                shutil.copyfile(image, target)
                continue
            rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
            made = np.ascontiguousarray(transforms[condition](rgb, np.random.default_rng(rng.integers(2**32))))
            # written at JPEG quality 100 under the original name (the jpeg condition decoded first)
            cv2.imwrite(str(target), cv2.cvtColor(made, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
        if condition == "rotation_90":
            _rewrite(out / part / "sensors" / "sensors.txt", rotated_camera, lambda f: f[2].strip() == "camera")
            if (out / part / "sensors" / "trajectories.txt").exists():
                _rewrite(out / part / "sensors" / "trajectories.txt", rotated_pose, lambda f: len(f) == 9)


def _rewrite(path: Path, change, applies) -> None:  # noqa: ANN001
    lines = []
    for line in path.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        lines.append(", ".join(change(fields)) if not line.startswith("#") and applies(fields) else line)
    path.write_text("\n".join(lines) + "\n")


def photos(dataset: Path) -> list[np.ndarray]:
    folder = dataset / "mapping" / "sensors" / "records_data"
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(folder.rglob("*.jpg"))[:4]]


# ------------------------------------------------------------------------ the runs
def pipeline(map_: Path, query: Path, query_gt: Path, feature: str, config: Path) -> dict:
    extra = FEATURES[feature]
    sets = [f"datasets.map='{map_}'", f"datasets.query='{query}'", f"datasets.query_gt='{query_gt}'",
            f"extract.local='{feature}'"]
    if "weights" in extra:
        sets.append(f"extract.weights='{extra['weights']}'")
    if "local_conf" in extra:
        sets.append("extract.local_conf={" + ", ".join(f"{k} = {v}" for k, v in extra["local_conf"].items()) + "}")
    args = [sys.executable, "-m", "cbir", "--quiet", "pipeline", str(config), "--json"]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300]}
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-conditions"))
    ap.add_argument("--datasets", default="sceaux_castle,strecha_fountain_p11,virtual_gallery_tutorial")
    ap.add_argument("--features", default=",".join(FEATURES))
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    datasets = [SHARED / "data" / d for d in args.datasets.split(",")]
    features, conditions = args.features.split(","), args.conditions.split(",")
    shutil.rmtree(args.work, ignore_errors=True)
    config = args.work / "pipeline.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[extract]\nglobal = ["densevlad"]\n[retrieve]\ntopk = 5\nmap_pairs = 0\n'
                      '[localize]\nconfig = "config1"\n[evaluate]\nthresholds = ' + json.dumps(THRESHOLDS) +
                      '\n[report]\nwrite = false\n')
    # occluders: real photos of another dataset (the virtual gallery's renders are not photos)
    real = {"sceaux_castle": "strecha_fountain_p11", "strecha_fountain_p11": "sceaux_castle"}
    others = {d.name: photos(SHARED / "data" / real.get(d.name, "sceaux_castle")) for d in datasets}
    results: dict = {}
    for dataset in datasets:
        for condition in conditions:
            render(dataset, condition, args.work / dataset.name / condition, others[dataset.name])
        for feature in features:
            map_ = args.work / dataset.name / f"map-{feature}"
            shutil.copytree(dataset / "mapping", map_)
            for p in [map_, *map_.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
            for condition in conditions:
                base = args.work / dataset.name / condition
                query, query_gt = base / f"query-{feature}", base / "query_gt"
                if not query.exists():
                    shutil.copytree(base / "query", query)
                t0 = time.perf_counter()
                out = pipeline(map_, query, query_gt, feature, config)
                seconds = time.perf_counter() - t0
                key = f"{dataset.name}/{condition}/{feature}"
                results[key] = {**out, "wall_seconds": seconds}
                summary = (out.get("evaluation") or {}).get("all", {})
                print(f"{key}: {summary.get('within', out.get('error'))} in {seconds:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    table(results, datasets, features, conditions)


def table(results: dict, datasets: list[Path], features: list[str], conditions: list[str]) -> None:
    """Per condition and feature: the share within each threshold over every dataset's
    queries, the queries, and the seconds per query of the query-side steps."""
    print("\n| condition (synthetic but original) | feature | " +
          " | ".join(f"({t} m, {r} deg)" for t, r in THRESHOLDS) + " | queries | s / query |")
    print("|---|---|" + "---:|" * (len(THRESHOLDS) + 2))
    for condition in conditions:
        for feature in features:
            runs = [results[f"{d.name}/{condition}/{feature}"] for d in datasets]
            n = sum((r.get("evaluation") or {}).get("all", {}).get("queries", 0) for r in runs)
            if not n:
                print(f"| {condition} | {feature} | failed: {runs[0].get('error', '?')} |")
                continue
            shares = [sum(r["evaluation"]["all"]["within"][k] * r["evaluation"]["all"]["queries"]
                          for r in runs if r.get("evaluation")) / n for k in range(len(THRESHOLDS))]
            seconds = sum(r["wall_seconds"] for r in runs) / n
            print(f"| {condition} | {feature} | " + " | ".join(f"{100 * s:.0f}%" for s in shares) +
                  f" | {n} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
