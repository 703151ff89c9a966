"""The peak memory a benchmark phase reports, shared by the benchmarks that run each phase
in a process of its own."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program, in MiB: Linux's
    ``VmHWM``. ``ru_maxrss`` is not that: it keeps the peak of the process a subprocess was
    started from (bench_index.py printed its parent's 2.5 GB for every phase)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not on Linux
