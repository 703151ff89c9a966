"""Match the local features of a list of image pairs into a matches store (``cbir match``).

Pairs are ``(query image, map image)``: the query's features come from the query
dataset, the map image's from the map dataset (the same dataset for map x map pairs).
The store is written in the query dataset, ``cbir/matches/<name>.h5``. Pairs already
in the store are skipped (resume); pairs whose images lack features are reported.
Verification (optional) runs in a thread pool, by chunks of pairs that alternate with
the matching of the next chunk (overlapping both would oversubscribe the CPU).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CbirError, FormatError
from ..io.dataset import Dataset
from ..io.pairs import Pair
from ..io.store import Store, StoreWriter, open_store
from .nearest_neighbor import MatcherConf, as_unit_tensor, match_descriptors
from ..geometry.poses import Pose
from .known_poses import CALIBRATED, PosedPair, has_baseline, verify_with_poses
from .verify import Verified, VerifyConf, verification_camera, verify_pair


VERIFY_CHUNK = 64  # pairs matched, then verified together


@dataclass
class MatchReport:
    path: Path
    matched: int = 0
    already_present: int = 0
    matches: int = 0
    inliers: int = 0
    missing_features: list[tuple[str, str]] = field(default_factory=list)  # (pair "a b", reason)
    duplicates: int = 0
    verified_with_poses: int = 0  # --verify poses: pairs checked against their known geometry
    ransac_fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (pair "a b", why RANSAC)
    #: wall-clock seconds by phase: features (reading), matching, verification, writing
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("features", "matching", "verification",
                                                                            "writing"), 0.0))


class FeatureCache:
    """Keypoints and unit descriptors (on the matching device) of recently used images."""

    def __init__(self, store: Store, device: torch.device, capacity: int = 256):
        self.store, self.device, self.capacity = store, device, capacity
        self._items: OrderedDict[str, tuple[np.ndarray, torch.Tensor, tuple[int, int] | None]] = OrderedDict()

    def get(self, name: str) -> tuple[np.ndarray, torch.Tensor, tuple[int, int] | None]:
        if name in self._items:
            self._items.move_to_end(name)
            return self._items[name]
        cols = ["keypoints", "descriptors"] + (["image_sizes"] if "image_sizes" in self.store.columns else [])
        item = self.store.get(name, cols)
        for col in ("keypoints", "descriptors"):  # an edited store must not match garbage silently
            if not np.isfinite(item[col]).all():
                raise FormatError(f"the {col} of {name!r} have NaN or infinite values", self.store.path)
        size = tuple(int(v) for v in item["image_sizes"]) if "image_sizes" in item else None
        if size is not None and min(size) <= 0:
            size = None  # unknown (kapture imports without a camera): the camera's size is used
        value = (item["keypoints"], as_unit_tensor(item["descriptors"], self.device), size)
        self._items[name] = value
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value


def check_compatible(a: Store, b: Store) -> None:
    """Two local-feature stores can be matched: same extractor configuration and dimension."""
    ca, cb = a.config.get("extractor"), b.config.get("extractor")
    if a.attrs.get("descriptor_dim") != b.attrs.get("descriptor_dim"):
        raise CbirError(f"descriptor dimensions differ: {a.attrs.get('descriptor_dim')} here, "
                        f"{b.attrs.get('descriptor_dim')} in {b.path}", a.path)
    if a.config != b.config:
        raise CbirError(f"features of another extractor configuration than {b.path} "
                        f"({ca!r} vs {cb!r}): extract both datasets with the same options", a.path)


def plan_pairs(pairs: list[Pair], same_dataset: bool) -> tuple[list[tuple[str, str]], int, list[tuple[str, str]]]:
    """Unique pairs (an unordered pair once within one dataset), self-pairs dropped."""
    seen: set[tuple[str, str]] = set()
    out, self_pairs, duplicates = [], [], 0
    for p in pairs:
        key = (p.query, p.map)
        if same_dataset and p.query == p.map:
            self_pairs.append(key)
            continue
        canon = tuple(sorted(key)) if same_dataset else key
        if canon in seen:
            duplicates += 1
            continue
        seen.add(canon)
        out.append(key)
    out.sort()  # consecutive pairs share their first image: it stays in the cache
    return out, duplicates, self_pairs


def match_config(local: str, features_config: dict[str, Any], matcher: MatcherConf,
                 verify: VerifyConf | None) -> dict[str, Any]:
    """The configuration a matches store records: the features (by name and by their
    configuration), the matcher, the verification (None: matches not verified)."""
    config: dict[str, Any] = {"local_features": local, "features_config": features_config,
                              "matcher": asdict(matcher), "verify": asdict(verify) if verify else None}
    for key in ("block_rows", "block_cols"):  # speed only, not the result
        config["matcher"].pop(key)
    return config


def main(query: Dataset, map_: Dataset, pairs: list[Pair], local: str, *, name: str | None = None,
         matcher: MatcherConf = MatcherConf(), verify: VerifyConf | None = None, device: str = "auto",
         overwrite: bool = False, num_workers: int = 2,
         progress: Callable[[int, int], None] | None = None) -> MatchReport:
    from ..models.base import resolve_device

    dev = resolve_device(device)
    name = name or local
    same = query.root.resolve() == map_.root.resolve()
    todo, duplicates, self_pairs = plan_pairs(pairs, same)
    out = query.store_path("matches", name)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = MatchReport(out, duplicates=duplicates)
    report.missing_features += [(f"{a} {b}", "an image paired with itself") for a, b in self_pairs]
    with open_store(query.store_path("local", local), "local-features") as qstore, \
            (open_store(map_.store_path("local", local), "local-features") if not same else nullcontext(qstore)) as mstore:
        check_compatible(qstore, mstore)
        config = match_config(local, qstore.config, matcher, verify)
        attrs = {"name": name, "config": config, "local_features": local}
        qcache = FeatureCache(qstore, dev)
        mcache = qcache if same else FeatureCache(mstore, dev)
        cameras = _Cameras() if verify else None
        qnames = set(query.sensors.image_names())
        mnames = qnames if same else set(map_.sensors.image_names())
        with_poses = verify is not None and verify.method == "poses"
        qposes = query.sensors.image_poses() if with_poses else {}
        mposes = qposes if same or not with_poses else map_.sensors.image_poses()
        with StoreWriter(out, "matches", attrs, overwrite=overwrite) as writer, \
                ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="cbir-verify") as pool:
            # matching (torch, all cores) and verification (pycolmap, one core per worker) alternate
            # by chunks of pairs instead of overlapping: together they would oversubscribe the CPU
            pending: list[tuple[tuple[str, str], np.ndarray, np.ndarray, tuple | None]] = []
            for a, b in todo:
                if (a, b) in writer:
                    report.already_present += 1
                    if progress:
                        progress(1, len(todo))
                    continue
                missing = [f"{n} is not an image of {d.root}" for n, d, known in ((a, query, qnames), (b, map_, mnames))
                           if n not in known] or \
                          [f"{n} has no features in {s.path}" for n, s in ((a, qstore), (b, mstore)) if n not in s]
                if missing:
                    report.missing_features.append((f"{a} {b}", "; ".join(missing)))
                    if progress:
                        progress(1, len(todo))
                    continue
                t0 = time.perf_counter()
                kp0, d0, size0 = qcache.get(a)
                kp1, d1, size1 = mcache.get(b)
                t1 = time.perf_counter()
                m, s = match_descriptors(d0, d1, matcher)
                report.seconds["features"] += t1 - t0
                report.seconds["matching"] += time.perf_counter() - t1
                job = None
                if verify is not None:
                    cam0, cam1 = cameras.get(query, a, size0), cameras.get(map_, b, size1)
                    job = _VerifyJob(cam0, kp0, cam1, kp1, m, verify)
                    if with_poses:
                        job.posed, why = _posed(job, qposes.get(a), mposes.get(b))
                        if job.posed is None:
                            report.ransac_fallbacks.append((f"{a} {b}", why))
                pending.append(((a, b), m, s, job))
                if len(pending) >= VERIFY_CHUNK:
                    _drain(pending, pool, writer, report, progress, len(todo))
            _drain(pending, pool, writer, report, progress, len(todo))
    return report


@dataclass
class _VerifyJob:
    camera0: Any
    keypoints0: np.ndarray
    camera1: Any
    keypoints1: np.ndarray
    matches: np.ndarray
    conf: VerifyConf
    posed: PosedPair | None = None  # checked against the known poses, else by RANSAC


def _posed(job: _VerifyJob, pose0: Pose | None, pose1: Pose | None) -> tuple[PosedPair | None, str]:
    """The pair for the known-pose check, or None and why RANSAC verifies it instead."""
    if pose0 is None or pose1 is None:
        return None, "an image without pose"
    if not (job.camera0.has_prior_focal_length and job.camera1.has_prior_focal_length):
        return None, "a camera without known intrinsics"
    if not has_baseline(pose0, pose1):
        return None, "no baseline (the camera centres coincide)"
    return PosedPair(job.camera0, pose0, job.keypoints0, job.camera1, pose1, job.keypoints1, job.matches), ""


def _drain(pending: list, pool: ThreadPoolExecutor, writer: StoreWriter, report: MatchReport,
           progress: Callable[[int, int], None] | None, total: int) -> None:
    t0 = time.perf_counter()
    jobs = [job for *_, job in pending]
    posed = [i for i, job in enumerate(jobs) if job is not None and job.posed is not None]
    known = dict(zip(posed, verify_with_poses([jobs[i].posed for i in posed], jobs[posed[0]].conf.max_error,
                                              jobs[posed[0]].conf.min_inliers))) if posed else {}
    futures = {i: pool.submit(verify_pair, job.camera0, job.keypoints0, job.camera1, job.keypoints1, job.matches,
                              job.conf)
               for i, job in enumerate(jobs) if job is not None and i not in known}
    nan = np.full((3, 3), np.nan)
    results = {i: f.result() for i, f in futures.items()}
    t1 = time.perf_counter()
    report.seconds["verification"] += t1 - t0
    for i, (key, m, s, _) in enumerate(pending):
        cols: dict[str, np.ndarray] = {"matches": m, "scores": s}
        if i in known:
            inliers, essential = known[i]
            v = Verified(inliers, CALIBRATED, nan, essential, nan)
            report.verified_with_poses += 1
        else:
            v = results.get(i)
        if v is not None:
            cols.update(inliers=v.inliers, geometry_config=np.int8(v.config), F=v.F, E=v.E, H=v.H)
            report.inliers += int(v.inliers.sum())
        writer.add(key, **cols)
        report.matched += 1
        report.matches += len(m)
        if progress:
            progress(1, total)
    report.seconds["writing"] += time.perf_counter() - t1
    pending.clear()


class _Cameras:
    """pycolmap cameras, built once per (dataset, camera, image size)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, tuple | None], Any] = {}
        self._records: dict[str, dict] = {}

    def get(self, dataset: Dataset, image: str, size: tuple[int, int] | None):
        root = str(dataset.root)
        if root not in self._records:
            self._records[root] = dataset.sensors.record_by_name()
        camera_id = self._records[root][image].camera_id
        key = (root, camera_id, size)
        if key not in self._cache:
            cam = dataset.sensors.cameras[camera_id]
            w, h = size if size else (cam.width, cam.height)
            self._cache[key] = verification_camera(cam, w, h)
        return self._cache[key]
