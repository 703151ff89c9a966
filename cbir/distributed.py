"""Extraction on a Ray cluster (``cbir extract --executor ray``).

The images still to extract are cut into deterministic shards (runs of ``shard_size``
names in order). Each shard is a Ray task: it builds the extractors from their
configuration, extracts its images with the local code and writes its own stores,
atomically, under ``DATASET/cbir/shards/<plan>/<shard>/``; a shard whose stores exist is
done. When every shard is done the driver merges them, in order, after what the final
stores already held, into the final stores (atomically), and removes the shards. The
result is the store a local run writes, key for key and byte for byte in every column.

A worker that dies (killed, out of memory, its node lost) has its task run again by Ray
(``max_retries``); the shard's stores resume from the batches it had written. A re-run
after an interruption skips the shards already written. The dataset must be on a file
system every node sees at the same path (NFS, a cluster file system). Ray is imported here
only: the local executor never needs it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import CbirError
from .io.atomic import WriteLock, atomic_output
from .io.dataset import Dataset
from .io.provenance import digest
from .io.store import SCHEMAS, merge_stores, open_store
from .validate import check_integer

#: (kind, registered name, configuration) of one extractor, as workers rebuild it
ExtractorSpec = tuple[str, str, dict[str, Any]]


@dataclass(frozen=True)
class RayConf:
    """``address``: the cluster (None: ``$RAY_ADDRESS``, else a local instance);
    ``shard_size``: images a task; ``num_gpus``: GPUs a task (None: 1 where the cluster has
    GPUs and the extractors run on a GPU or ``auto``, else 0); ``cpus``: CPUs a task;
    ``max_retries``: runs of a task after its worker died."""

    address: str | None = None
    shard_size: int = 64
    num_gpus: float | None = None
    cpus: int = 1
    max_retries: int = 3

    def __post_init__(self) -> None:
        check_integer("shard_size", self.shard_size, 1)
        check_integer("cpus", self.cpus, 1)
        check_integer("max_retries", self.max_retries, 0)


def extract_on_ray(specs: list[ExtractorSpec], dataset: Dataset, *, store_names: list[str | None],
                   images: list[str] | None = None, overwrite: bool = False, image_options: Any = None,
                   conf: RayConf = RayConf(), progress: Callable[[int, int], None] | None = None) -> list:
    """What :func:`cbir.extract.extract_all` does, on a Ray cluster; one report a store."""
    import ray

    from . import extract as extract_mod

    image_options = image_options or extract_mod.ImageOptions()
    # built here too (on the CPU): every option, weight file and name is checked before the cluster works
    local = [extract_mod.build_extractor(name, {**c, "device": "cpu"} if "device" in c else c, kind)
             for kind, name, c in specs]
    for e in local:
        if e.conf.get("learn"):
            raise CbirError(f"{e.name} learns its model on one machine: run `cbir extract DATASET --global {e.name} "
                            "--learn` without --executor ray first, then give --model")
    names = [n or e.default_store_name() for e, n in zip(local, store_names)]
    finals = [dataset.store_path(extract_mod.store_kind(e), n) for e, n in zip(local, names)]
    attrs = [extract_mod.store_attributes(e, n, image_options) for e, n in zip(local, names)]
    present = [_present(final, a, overwrite) for final, a in zip(finals, attrs)]
    wanted = images if images is not None else sorted(dataset.sensors.image_names())
    todo = [n for n in wanted if any(n not in p for p in present)]
    shards = [todo[i:i + conf.shard_size] for i in range(0, len(todo), conf.shard_size)]
    plan = dataset.root / "cbir" / "shards" / digest({"stores": [str(f) for f in finals], "config": attrs,
                                                      "images": todo})
    shard_dirs = [plan / f"{i:06d}" for i in range(len(shards))]
    outputs = [[d / extract_mod.store_kind(e) / f"{n}.h5" for e, n in zip(local, names)] for d in shard_dirs]
    reports = [extract_mod.ExtractReport(final, already_present=len([n for n in wanted if n in p]))
               for final, p in zip(finals, present)]
    total = len(wanted)
    if progress:
        progress(total - len(todo), total)
    run = [i for i, outs in enumerate(outputs) if not all(o.exists() for o in outs)]
    if run:
        if not ray.is_initialized():
            ray.init(address=conf.address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=False)
        gpus = conf.num_gpus
        if gpus is None:
            on_gpu = any(str(c.get("device", "cpu")) in ("auto",) or str(c.get("device", "")).startswith("cuda")
                         for _, _, c in specs)
            gpus = 1 if on_gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(_run_shard).options(num_cpus=conf.cpus, num_gpus=gpus, max_retries=conf.max_retries,
                                              retry_exceptions=False)
        futures = {task.remote(specs, str(dataset.root), names, shards[i], str(shard_dirs[i]), image_options,
                               conf.cpus): i for i in run}
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = futures[done[0]]
            try:
                shard_reports = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
                if isinstance(cause, CbirError):
                    raise cause from None
                raise CbirError(f"shard {i} (from {shards[i][0]}) failed: {type(cause).__name__}: {cause}") from None
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
                raise CbirError(f"shard {i} (from {shards[i][0]}) failed: its worker died {conf.max_retries + 1} "
                                f"times ({type(e).__name__}); run the command again to resume") from None
            for report, r in zip(reports, shard_reports):
                _add(report, r)
            if progress:
                progress(len(shards[i]), total)
    for j, (final, a) in enumerate(zip(finals, attrs)):
        parts = ([final] if final.exists() and present[j] is not _NOTHING else []) + [o[j] for o in outputs]
        with WriteLock(final), atomic_output(final) as tmp:
            merge_stores(parts, tmp, SCHEMAS[f"{extract_mod.store_kind(local[j])}-features"], a)
    for j, report in enumerate(reports):  # images of shards written by an earlier run count as extracted now
        report.extracted = _count(finals[j]) - report.already_present
    shutil.rmtree(plan, ignore_errors=True)
    _remove_if_empty(plan.parent)
    return reports


_NOTHING: frozenset = frozenset()


def _present(final: Path, attrs: dict[str, Any], overwrite: bool) -> frozenset:
    """The images the final store holds; refused when it was made with another configuration."""
    if not final.exists() or overwrite:
        return _NOTHING
    with open_store(final) as store:
        if store.config != attrs["config"]:
            raise CbirError("extracted with another configuration: pass --overwrite to replace the store, or --name "
                            "to write another one", final)
        return frozenset(store.names)


def _count(path: Path) -> int:
    with open_store(path) as store:
        return len(store)


def _add(report: Any, shard: Any) -> None:
    report.keypoints += shard.keypoints
    report.failed += shard.failed
    report.empty += shard.empty
    for key, value in shard.seconds.items():
        report.seconds[key] = report.seconds.get(key, 0.0) + value


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _run_shard(specs: list[ExtractorSpec], root: str, store_names: list[str], images: list[str], shard_dir: str,
               image_options: Any, threads: int) -> list:
    """One shard, in a Ray worker: the local extraction, into the shard's own stores."""
    import torch

    from . import extract as extract_mod

    torch.set_num_threads(threads)
    extractors = [extract_mod.build_extractor(name, conf, kind) for kind, name, conf in specs]
    return extract_mod.extract_all(extractors, Dataset(Path(root)), store_names=store_names, images=images,
                                   num_workers=threads, image_options=image_options, store_dir=Path(shard_dir))
