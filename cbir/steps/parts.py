"""The parts that shards write, and their reduction into the final stores.

A shard that does not write in place writes its own stores under
``DATASET/cbir/shards/<plan>/<shard>/`` (the plan: a digest of the final stores, their
configuration and the work, so that a re-run after an interruption finds the shards it
wrote). When every shard is done the step makes them the parts of the final store
(:func:`collect_parts`: renamed into its parts' folder, after what it already held, and a
new record written atomically; formats/SPEC.md 5b), and removes the plan's folder: the
store reads as the one a local run writes, key for key and value for value in every column,
and nothing is copied. :func:`merge_into` makes one file of parts (``cbir store merge``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..io import store as store_io
from ..io.atomic import WriteLock, atomic_output
from ..io.provenance import digest
from ..io.store import SCHEMAS, CopyJob, finish_merge, open_store, plan_merge

if TYPE_CHECKING:
    from ..executor import Executor, Progress


def plan_directory(dataset_root: Path, plan: dict[str, Any]) -> Path:
    """Where the shards of ``plan`` (the final stores, their configuration, the work) write."""
    return dataset_root / "cbir" / "shards" / digest(plan)


def collect_parts(final: Path, shards: list[Path], kind: str, attrs: dict[str, Any], keep: bool,
                  progress: Callable[[int], None] | None = None) -> None:
    """The shards' stores written (in order) made parts of the sharded store ``final``
    (:func:`~cbir.io.store.sharded.commit_parts`: after what it holds with ``keep``, else
    replacing it). ``progress(1)`` per part."""
    from ..io.store.sharded import commit_parts

    written = [s for s in shards if s.exists()]
    if keep and final.exists() and not written:
        return  # nothing new: the store stays as it is
    with WriteLock(final):
        commit_parts(final, written, kind, attrs, keep, progress)


def intact(shard: Path) -> bool:
    """Whether a shard's store written by an earlier run is there and whole (it opens, and
    its columns have the checksums it records); one that is not is removed, to be redone."""
    if not shard.exists():
        return False
    try:
        with open_store(shard) as s:
            whole = not s.verify_checksums()
    except CbirError:
        whole = False
    if not whole:
        shard.unlink()
    return whole


def merge_into(final: Path, parts: list[Path], kind: str, attrs: dict[str, Any],
               executor: Executor | None = None, progress: Callable[[int], None] | None = None) -> None:
    """The final store made of ``parts`` in order (none: it stays as it is), written
    atomically. With an ``executor`` whose shards run elsewhere, each part's bytes are copied
    into the final file by a shard of its own (on a shared file system the copies add up the
    nodes' bandwidth instead of one process's); the keys, offsets and checksums are written
    here. ``progress(1)`` as each part is copied."""
    from ..executor import Work

    if not parts:
        return
    with WriteLock(final), atomic_output(final) as tmp:
        plan = plan_merge(parts, tmp, SCHEMAS[kind], attrs)
        crcs: dict[int, dict[str, int]] = {}
        if executor is None or executor.in_place or len(plan.jobs) < 2:
            copies: Iterator[tuple[int, dict[str, int]]] = ((i, store_io.copy_part(job))
                                                            for i, job in enumerate(plan.jobs))
        else:
            copies = executor.run(Work(copy_part, {i: (job,) for i, job in enumerate(plan.jobs)},
                                       [job.part.name for job in plan.jobs], [1] * len(plan.jobs), torch=False))
        for i, part_crcs in copies:
            crcs[i] = part_crcs
            if progress:
                progress(1)
        if progress and len(parts) > len(plan.jobs):
            progress(len(parts) - len(plan.jobs))  # parts without items: nothing to copy
        finish_merge(plan, [crcs[i] for i in range(len(plan.jobs))])


def copy_part(job: CopyJob, *, threads: int | None = None, progress: Progress | None = None) -> dict[str, int]:
    """A shard of a merge: one part's bytes copied into the merged file
    (:func:`cbir.io.store.copy_part`)."""
    return store_io.copy_part(job)


def merge_counter(merging: Progress | None, total: int) -> Callable[[int], None] | None:
    """``merging(advance, total)`` as a per-part callback of :func:`merge_into`."""
    return (lambda advance: merging(advance, total)) if merging else None


def count(path: Path) -> int:
    """The items of the store at ``path``."""
    with open_store(path) as store:
        return len(store)


def remove_plan(plan: Path) -> None:
    """The shards of a finished plan, and the shards' folder once empty."""
    shutil.rmtree(plan, ignore_errors=True)
    try:
        plan.parent.rmdir()
    except OSError:
        pass
