"""How many cores this process may use (its CPU affinity, not the machine's count): the
one place that worker pools size themselves from. Imports neither torch nor numpy."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_workers(limit: int = 16) -> int:
    """Worker threads for decoding, reading and verification: the cores this process may
    use, at most ``limit``."""
    return max(1, min(limit, usable_cores()))


#: pose estimation's processes at most by default (each holds a query's data and pycolmap's state)
LOCALIZE_WORKERS = 4


#: most workers a command accepts (``--num-workers``, ``num_workers``): far above any
#: machine's useful count, a bound on what a typo or a crafted configuration can start
MAX_WORKERS = 256


def pool_size(requested: int, tasks: int) -> int:
    """Workers to start for ``tasks`` tasks when ``requested``: never more than the tasks
    (3 queries get at most 3 processes) nor :data:`MAX_WORKERS`, and at least one."""
    return max(1, min(requested, tasks, MAX_WORKERS))
