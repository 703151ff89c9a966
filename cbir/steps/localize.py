"""The pose estimation step: shards of queries, workers that read the map once.

Each worker opens the map (its keypoint-to-point lookup), the query matches and features
once (:class:`cbir.localize.TaskMaker`), then makes each query's 2D-3D correspondences and
estimates its pose, shard after shard; the results come back in the queries' order. In
place (the local executor) the map is the one :func:`cbir.localize.main` opened, and the
poses are estimated on ``num_workers`` processes of this machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..executor import Work
from . import cut

if TYPE_CHECKING:
    from ..executor import Executor, Progress
    from ..localize import QueryResult, TaskMaker, TaskSource

#: ``estimate(source, queries, by_query, progress, opened=None, num_workers=1)``: the results
#: in the queries' order, and the seconds spent making correspondences and estimating poses
Estimate = Callable[..., tuple[list["QueryResult"], dict[str, float]]]


def estimator(executor: Executor) -> Estimate:
    """The ``estimate`` of :func:`cbir.localize.main` by ``executor``. In place, ``opened()``
    gives the map that :func:`~cbir.localize.main` has open (else it is opened from
    ``source``) and the poses are estimated on ``num_workers`` processes."""

    def estimate(source: TaskSource, queries: list[str], by_query: dict[str, list[str]],
                 progress: Progress | None, opened: Callable[[], TaskMaker] | None = None,
                 num_workers: int = 1) -> tuple[list[QueryResult], dict[str, float]]:
        t0 = time.perf_counter()
        if executor.in_place:
            maker = opened() if opened is not None else open_tasks(source)
            work = Work(localize_shard, {0: (queries, by_query)}, [queries[0] if queries else ""], [len(queries)],
                        len(queries), state=maker, threads=num_workers, progress=progress)
        else:
            shards = cut(queries, executor.sizes.queries)
            work = Work(localize_shard, {i: (names, {q: by_query[q] for q in names if q in by_query})
                                         for i, names in enumerate(shards)},
                        [s[0] for s in shards], [len(s) for s in shards], len(queries),
                        setup=(open_tasks, (source,)), progress=progress, role="localization", torch=False)
        parts = dict(executor.run(work))
        seconds = {"correspondences": time.perf_counter() - t0, "pose": 0.0}
        for _, part_seconds in parts.values():
            for key, value in part_seconds.items():
                seconds[key] += value
        return [r for i in sorted(parts) for r in parts[i][0]], seconds

    return estimate


def open_tasks(source: TaskSource) -> TaskMaker:
    """A worker's state: the map and the query stores of ``source``, open once."""
    from ..localize import TaskMaker

    return TaskMaker(source)


def localize_shard(maker: TaskMaker, queries: list[str], by_query: dict[str, list[str]], *,
                   threads: int | None = None,
                   progress: Progress | None = None) -> tuple[list[QueryResult], dict[str, float]]:
    """One shard of queries: their tasks, then their poses (on ``threads`` processes), in
    order, and the seconds of each."""
    from ..localize import estimate_locally

    t0 = time.perf_counter()
    tasks = maker.tasks(queries, by_query)
    t1 = time.perf_counter()
    results = estimate_locally(tasks, threads or 1, progress)
    return results, {"correspondences": t1 - t0, "pose": time.perf_counter() - t1}
