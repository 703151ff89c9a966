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
