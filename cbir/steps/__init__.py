"""The steps of the localization pipeline, in the order they run (``cbir pipeline --from``),
and the definitions of those that cut into shards, run by an executor
(:mod:`cbir.executor`): :mod:`.extract`, :mod:`.match`, :mod:`.retrieve` (with index
building), :mod:`.localize`; :mod:`.parts` reduces the parts of the stores they write.

Each step module defines the step once: how it plans and cuts its work into shards (the
images, pairs, map rows or queries still to do, in the order a local run takes them), what
a worker sets up once, the shard's task (the local code on its share), and how the shards'
results are reduced. An executor that runs shards in this process (``in_place``) gets one
shard writing the final outputs; one whose shards run elsewhere gets shards that write
parts of their own, reduced by the step after.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..executor import Executor
    from ..io.dataset import Dataset

STEPS = ("extract", "retrieve", "match", "map", "localize", "evaluate")


def cut(items: list, size: int) -> list[list]:
    """``items`` in runs of ``size`` (the deterministic shards: a re-run cuts them the same)."""
    return [items[m0:m1] for m0, m1 in ranges(len(items), size)]


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of ``size`` of ``n`` items."""
    return [(m0, min(n, m0 + size)) for m0 in range(0, n, size)]


def portable(dataset: Dataset, executor: Executor) -> Dataset | str:
    """``dataset`` as a shard receives it: itself in this process, else its root (a worker
    reads its records from the shared file system)."""
    return dataset if executor.in_place else str(dataset.root)


def opened(dataset: Dataset | str) -> Dataset:
    """The dataset a shard received (:func:`portable`)."""
    from ..io.dataset import Dataset

    return dataset if isinstance(dataset, Dataset) else Dataset(Path(dataset))


def wants_gpu(device: object) -> bool:
    """Whether work on ``device`` (``cpu``, ``cuda[:N]``, ``auto``) should get a GPU of a cluster."""
    return str(device) == "auto" or str(device).startswith("cuda")
