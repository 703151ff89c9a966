"""Match the local features of a list of image pairs into a matches store (``cbir match``).

Pairs are ``(query image, map image)``: the query's features come from the query
dataset, the map image's from the map dataset (the same dataset for map x map pairs).
The store is written in the query dataset, ``cbir/matches/<name>.h5``. Pairs already
in the store are skipped (resume); pairs whose images lack features are reported.
Pairs go by chunks (:func:`main`): features read by a thread pool, pairs matched (on a
GPU, queued and copied back once per chunk), then verified (optional) by the same pool;
on a GPU the verification of one chunk overlaps the reading and matching of the next.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cores import MAX_WORKERS
from ..devices import Uploader, default_workers
from ..errors import CbirError, FormatError
from ..geometry.poses import Pose
from ..io.dataset import Dataset
from ..io.pairs import Pair
from ..io.provenance import differences
from ..io.store import Store, StoreWriter, open_store
from .base import Matcher, PairBatch
from .known_poses import CALIBRATED, PosedPair, has_baseline, verify_with_poses
from .nearest_neighbor import MatcherConf, MutualNearestNeighbor
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
    pairs: int = 0  # pairs asked for, each once (duplicates not counted)
    duplicates: int = 0
    verified_with_poses: int = 0  # --verify poses: pairs checked against their known geometry
    ransac_fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (pair "a b", why RANSAC)
    #: wall-clock seconds of the main thread by phase: features (reading and uploading), matching
    #: (on a GPU: waiting for its results), verification (waiting for the verification threads),
    #: writing. On a GPU, matching and verification overlap: the larger wait says which bounds the run.
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("features", "matching", "verification",
                                                                            "writing"), 0.0))
    device: str = "cpu"

    @property
    def bound_by(self) -> str:
        """The phase the run spent most of its time in (waiting for)."""
        return max(self.seconds, key=self.seconds.__getitem__)


def as_matcher(matcher: Matcher | MatcherConf) -> Matcher:
    """A matcher, or the options of the ``nn`` matcher (:class:`MatcherConf`) as one."""
    return MutualNearestNeighbor(matcher) if isinstance(matcher, MatcherConf) else matcher


#: an image's features as the matching step holds them: keypoints, what the matcher prepared,
#: the image size (None: the camera's)
Features = tuple[np.ndarray, Any, "tuple[int, int] | None"]


class FeatureCache:
    """Keypoints and the matcher's prepared features (on the matching device) of recently
    used images. Images missing from the cache are read together by a thread pool (:meth:`load`)."""

    def __init__(self, store: Store, device: torch.device, matcher: Matcher, capacity: int = 256):
        self.store, self.device, self.matcher, self.capacity = store, device, matcher, capacity
        self._items: OrderedDict[str, Features] = OrderedDict()
        self._upload = Uploader(device)
        missing = [c for c in ("keypoints", *matcher.columns) if c not in store.columns]
        if missing:
            raise CbirError(f"the {matcher.name} matcher reads the column(s) {', '.join(missing)}, which these "
                            "features do not have", store.path)

    def _read(self, name: str) -> tuple[dict[str, np.ndarray], tuple[int, int] | None]:
        cols = list(dict.fromkeys(["keypoints", *self.matcher.columns] +
                                  (["image_sizes"] if "image_sizes" in self.store.columns else [])))
        item = self.store.get(name, cols)
        for col in cols:  # an edited store must not match garbage silently
            if item[col].dtype.kind == "f" and not np.isfinite(item[col]).all():
                raise FormatError(f"the {col} of {name!r} have NaN or infinite values", self.store.path)
        size = tuple(int(v) for v in item["image_sizes"]) if "image_sizes" in item else None
        if size is not None and min(size) <= 0:
            size = None  # unknown (kapture imports without a camera): the camera's size is used
        return item, size  # type: ignore[return-value]

    def _put(self, name: str, read: tuple[dict[str, np.ndarray], tuple[int, int] | None]) -> None:
        item, size = read
        self._items[name] = (item["keypoints"], self.matcher.prepare(item, self._upload), size)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def load(self, names: list[str], pool: ThreadPoolExecutor | None = None) -> None:
        """Read the images of ``names`` not cached yet, in parallel on ``pool``."""
        todo = list(dict.fromkeys(n for n in names if n not in self._items))
        if todo:
            self.store.index(todo[0])  # build the name index before threads look names up
        reads = pool.map(self._read, todo) if pool is not None and len(todo) > 1 else map(self._read, todo)
        for name, read in zip(todo, reads, strict=True):
            self._put(name, read)

    def get(self, name: str) -> Features:
        if name not in self._items:
            self._put(name, self._read(name))
        self._items.move_to_end(name)
        return self._items[name]


#: extractor options that only choose how many keypoints are kept (the strongest first), not
#: how they are described: two stores that differ there describe the same way and are matched
#: (as hloc does, say with fewer keypoints for the queries than for the map)
BUDGET_KEYS = frozenset({"max_keypoints"})


def check_compatible(a: Store, b: Store) -> None:
    """Two local-feature stores can be matched: same descriptor dimension and extractor
    configuration, except for the keypoint budget (:data:`BUDGET_KEYS`)."""
    if a.attrs.get("descriptor_dim") != b.attrs.get("descriptor_dim"):
        raise CbirError(f"descriptor dimensions differ: {a.attrs.get('descriptor_dim')} here, "
                        f"{b.attrs.get('descriptor_dim')} in {b.path}", a.path)
    ca, cb = ({k: v for k, v in s.config.items() if k not in BUDGET_KEYS} for s in (a, b))
    if ca != cb:
        diffs = differences(cb, ca)
        raise CbirError(f"features of another extractor configuration than {b.path} (there -> here: "
                        f"{'; '.join(diffs)}): extract both datasets with the same options", a.path)


def plan_pairs(pairs: list[Pair], same_dataset: bool) -> tuple[list[tuple[str, str]], int, list[tuple[str, str]]]:
    """Unique pairs (an unordered pair once within one dataset), self-pairs dropped."""
    seen: set[tuple[str, str]] = set()
    out, self_pairs, duplicates = [], [], 0
    for p in pairs:
        key = (p.query, p.map)
        if same_dataset and p.query == p.map:
            self_pairs.append(key)
            continue
        canon = (min(key), max(key)) if same_dataset else key
        if canon in seen:
            duplicates += 1
            continue
        seen.add(canon)
        out.append(key)
    out.sort()  # consecutive pairs share their first image: it stays in the cache
    return out, duplicates, self_pairs


def unmatchable_pairs(todo: list[tuple[str, str]], query: Dataset, map_: Dataset, qstore: Store,
                      mstore: Store) -> dict[tuple[str, str], str]:
    """The pairs that cannot be matched, with why: an image that is not one of its dataset's
    (a pairs file of other datasets, or query and map swapped), or one without features."""
    qnames = set(query.sensors.image_names())
    mnames = qnames if query.root.resolve() == map_.root.resolve() else set(map_.sensors.image_names())
    out = {}
    for a, b in todo:
        missing = [f"{n} is not an image of {d.root}" for n, d, known in ((a, query, qnames), (b, map_, mnames))
                   if n not in known] or \
                  [f"{n} has no features in {s.path}" for n, s in ((a, qstore), (b, mstore)) if n not in s]
        if missing:
            out[a, b] = "; ".join(missing)
    return out


def require_matchable(todo: list[tuple[str, str]], skipped: dict[tuple[str, str], str],
                      self_pairs: list[tuple[str, str]], pairs_file: str | None) -> None:
    """Refuse a run that could match no pair: its store would be empty for a reason the
    user must fix (the pairs belong to other datasets, the features are missing)."""
    if not todo:
        what = f"only {len(self_pairs)} pairs of an image with itself" if self_pairs else "no pair"
        raise CbirError(f"{what}: nothing to match", pairs_file)
    if len(skipped) == len(todo):
        (a, b), why = next(iter(skipped.items()))
        raise CbirError(f"none of the {len(todo)} pairs can be matched (first: {a} {b}: {why}): check that the "
                        "pairs belong to --query (first image) and --map (second image), and that both datasets "
                        "have the local features", pairs_file)


def match_config(local: str, features_config: dict[str, Any], matcher: Matcher | MatcherConf,
                 verify: VerifyConf | None) -> dict[str, Any]:
    """The configuration a matches store records: the features (by name and by their
    configuration), the matcher (:meth:`Matcher.identity`), the verification (None: matches
    not verified)."""
    return {"local_features": local, "features_config": features_config,
            "matcher": as_matcher(matcher).identity(), "verify": asdict(verify) if verify else None}


def store_attributes(name: str, local: str, features_config: dict[str, Any], matcher: Matcher | MatcherConf,
                     verify: VerifyConf | None) -> dict[str, Any]:
    """The attributes (name, config, local features) of a matches store."""
    return {"name": name, "config": match_config(local, features_config, matcher, verify), "local_features": local}


def main(query: Dataset, map_: Dataset, pairs: list[Pair], local: str, *, name: str | None = None,
         matcher: Matcher | MatcherConf = MatcherConf(), verify: VerifyConf | None = None, device: str = "auto",
         overwrite: bool = False, num_workers: int | None = None,
         progress: Callable[[int, int], None] | None = None, overlap: bool | None = None,
         store_path: Path | None = None, pairs_file: str | None = None, sharded: bool | None = None) -> MatchReport:
    """Match ``pairs`` into the query dataset's matches store ``name`` (default ``local``),
    or into ``store_path`` (a cluster's shard, :mod:`cbir.distributed`).

    Pairs go by chunks: the features of a chunk are read by the worker threads, its pairs
    matched (on a GPU: queued, then copied back once), then verified by the worker threads.
    With ``overlap`` (default: on a GPU) the verification of a chunk runs while the next
    chunk is read and matched; without (the CPU's default) they alternate, since both would
    compete for the same cores. The result is the same. ``sharded``: the pairs matched now
    become a new part of the (sharded) store (None: it stays as it is).
    """
    from ..models.base import resolve_device

    dev = resolve_device(device)
    matcher = as_matcher(matcher)
    workers = default_workers() if num_workers is None else max(1, min(num_workers, MAX_WORKERS))
    name = name or local
    same = query.root.resolve() == map_.root.resolve()
    todo, duplicates, self_pairs = plan_pairs(pairs, same)
    out = store_path or query.store_path("matches", name)
    report = MatchReport(out, duplicates=duplicates, device=str(dev), pairs=len(todo) + len(self_pairs))
    report.missing_features += [(f"{a} {b}", "an image paired with itself") for a, b in self_pairs]
    with open_store(query.store_path("local", local), "local-features") as qstore, \
            (nullcontext(qstore) if same else open_store(map_.store_path("local", local), "local-features")) as mstore:
        check_compatible(qstore, mstore)
        matcher.check_features(qstore)
        skipped = unmatchable_pairs(todo, query, map_, qstore, mstore)
        if store_path is None:  # a Ray shard's pairs were checked as a whole by its driver
            require_matchable(todo, skipped, self_pairs, pairs_file)
        attrs = store_attributes(name, local, qstore.config, matcher, verify)
        qcache = FeatureCache(qstore, dev, matcher)
        mcache = qcache if same else FeatureCache(mstore, dev, matcher)
        out.parent.mkdir(parents=True, exist_ok=True)
        with_poses = verify is not None and verify.method == "poses"
        qposes = query.sensors.image_poses() if with_poses else {}
        mposes = qposes if same or not with_poses else map_.sensors.image_poses()
        with StoreWriter(out, "matches", attrs, overwrite=overwrite, sharded=sharded) as writer, \
                ThreadPoolExecutor(workers, thread_name_prefix="cbir-verify") as pool, \
                ThreadPoolExecutor(min(4, workers), thread_name_prefix="cbir-read") as read_pool:
            run = _Run(query, map_, qcache, mcache, matcher, verify, _Cameras() if verify else None,
                       (qposes, mposes), pool, read_pool, writer, report, progress, len(todo),
                       overlap=dev.type == "cuda" if overlap is None else overlap)
            chunk: list[tuple[str, str]] = []
            for a, b in todo:
                if (a, b) in skipped:
                    report.missing_features.append((f"{a} {b}", skipped[a, b]))
                    run.advance()
                    continue
                if (a, b) in writer:
                    report.already_present += 1
                    run.advance()
                    continue
                chunk.append((a, b))
                if len(chunk) >= VERIFY_CHUNK:
                    run.chunk(chunk)
                    chunk = []
            run.chunk(chunk)
            run.finish()
    return report


class _Run:
    """One `cbir match` run: chunks of pairs read, matched, verified, written.

    On a GPU three chunks are in flight: chunk N+2 is read and queued on the device while
    the host selects the matches of chunk N+1 (copied back as soon as its kernels ended)
    and the verification threads work on chunk N. On the CPU each chunk is matched and
    verified before the next (both would compete for the same cores)."""

    def __init__(self, query: Dataset, map_: Dataset, qcache: FeatureCache, mcache: FeatureCache,
                 matcher: Matcher, verify: VerifyConf | None, cameras: _Cameras | None,
                 poses: tuple[dict, dict], pool: ThreadPoolExecutor, read_pool: ThreadPoolExecutor,
                 writer: StoreWriter, report: MatchReport, progress: Callable[[int, int], None] | None, total: int,
                 overlap: bool):
        self.query, self.map, self.qcache, self.mcache = query, map_, qcache, mcache
        self.verify, self.cameras, self.poses, self.pool, self.read_pool = verify, cameras, poses, pool, read_pool
        self.writer, self.report, self.progress, self.total, self.overlap = writer, report, progress, total, overlap
        self._batches = [matcher.batch(), matcher.batch()]  # alternate: one queued while one is read back
        self._matching: tuple[list, list, PairBatch] | None = None  # a chunk queued on the device
        self._inflight: tuple[list, dict[int, Future | _Part]] | None = None  # a chunk being verified

    def advance(self) -> None:
        if self.progress:
            self.progress(1, self.total)

    def chunk(self, keys: list[tuple[str, str]]) -> None:
        if not keys:
            return
        t0 = time.perf_counter()
        self.qcache.load([a for a, _ in keys], self.read_pool)
        self.mcache.load([b for _, b in keys], self.read_pool)
        feats = [(self.qcache.get(a), self.mcache.get(b)) for a, b in keys]
        t1 = time.perf_counter()
        batch = self._batches.pop(0)
        self._batches.append(batch)
        for (_, d0, _), (_, d1, _) in feats:
            batch.add(d0, d1)
        batch.finish()
        self.report.seconds["features"] += t1 - t0
        self.report.seconds["matching"] += time.perf_counter() - t1
        previous, self._matching = self._matching, (keys, feats, batch)
        if previous is not None:
            self._verify(*previous)
        if not self.overlap:
            self.finish()

    def finish(self) -> None:
        """Every chunk still matching or verifying, written."""
        if self._matching is not None:
            previous, self._matching = self._matching, None
            self._verify(*previous)
        self._write_inflight()

    def _verify(self, keys: list[tuple[str, str]], feats: list, batch: PairBatch) -> None:
        """Take a chunk's matches from the device and hand them to the verification threads."""
        t0 = time.perf_counter()
        results = batch.results()
        self.report.seconds["matching"] += time.perf_counter() - t0
        pending = []
        for key, ((kp0, _, size0), (kp1, _, size1)), (m, s) in zip(keys, feats, results, strict=True):
            job = None
            if self.verify is not None:
                assert self.cameras is not None  # made with the verification
                cam0, cam1 = self.cameras.get(self.query, key[0], size0), self.cameras.get(self.map, key[1], size1)
                job = _VerifyJob(cam0, kp0, cam1, kp1, m, self.verify)
                if self.verify.method == "poses":
                    job.posed, why = _posed(job, self.poses[0].get(key[0]), self.poses[1].get(key[1]))
                    if job.posed is None:
                        self.report.ransac_fallbacks.append((f"{key[0]} {key[1]}", why))
            pending.append((key, m, s, job))
        self._write_inflight()  # the previous chunk, verified while this one was matched
        self._inflight = (pending, _submit(pending, self.pool))
        if not self.overlap:
            self._write_inflight()

    def _write_inflight(self) -> None:
        if self._inflight is None:
            return
        pending, futures = self._inflight
        self._inflight = None
        t0 = time.perf_counter()
        results = {i: f.result() for i, f in futures.items()}
        t1 = time.perf_counter()
        self.report.seconds["verification"] += t1 - t0
        for i, (key, m, s, job) in enumerate(pending):
            cols: dict[str, np.ndarray] = {"matches": m, "scores": s}
            v = results.get(i)
            if job is not None and job.posed is not None:
                self.report.verified_with_poses += 1
            if v is not None:
                cols.update(inliers=v.inliers, geometry_config=np.array(v.config, np.int8), F=v.F, E=v.E, H=v.H)
                self.report.inliers += int(v.inliers.sum())
            self.writer.add(key, **cols)
            self.report.matched += 1
            self.report.matches += len(m)
            self.advance()
        self.report.seconds["writing"] += time.perf_counter() - t1


def _submit(pending: list, pool: ThreadPoolExecutor) -> dict[int, Future | _Part]:
    """Verification of a chunk on the pool: RANSAC one task per pair, the known-pose check
    one vectorized task for all its pairs (its results split back per pair)."""
    jobs = [job for *_, job in pending]
    posed = [i for i, job in enumerate(jobs) if job is not None and job.posed is not None]
    futures: dict[int, Future | _Part] = {}
    if posed:
        conf = jobs[posed[0]].conf
        together = pool.submit(verify_with_poses, [jobs[i].posed for i in posed], conf.max_error, conf.min_inliers)
        for n, i in enumerate(posed):
            futures[i] = _Part(together, n)
    for i, job in enumerate(jobs):
        if job is not None and i not in futures:
            futures[i] = pool.submit(verify_pair, job.camera0, job.keypoints0, job.camera1, job.keypoints1,
                                     job.matches, job.conf)
    return futures


class _Part:
    """Pair ``n`` of a known-pose check of several pairs, as a future of its own giving the
    pair's :class:`Verified` (calibrated: E from the poses; F and H not estimated)."""

    def __init__(self, whole: Future, n: int):
        self.whole, self.n = whole, n

    def result(self) -> Verified:
        inliers, essential = self.whole.result()[self.n]
        nan = np.full((3, 3), np.nan)
        return Verified(inliers, CALIBRATED, nan, essential, nan.copy())


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
