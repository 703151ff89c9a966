"""Running a reader of untrusted input in a forked child, bounded in time and memory.

libhdf5 can loop forever on a corrupt file, holding the GIL; faiss and pycolmap allocate
what a file's header claims before reading it. Such reads run in a child that is killed
after a time limit and may not allocate more than a budget (``RLIMIT_DATA``), so that a
crafted file costs the parent a one-line error, not a hang or the machine's memory.
"""

from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import time
from collections.abc import Callable
from typing import Any


def _limit_memory(budget: int) -> None:
    """Allow this process ``budget`` more bytes of data segment and anonymous mappings than it
    uses now (what it inherited counts: the budget is what the read may add)."""
    used = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    used = int(line.split()[1]) * 1024
    except OSError:
        pass
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = used + budget
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def in_child(func: Callable[..., Any], args: tuple, limit: float, memory: int | None = None) -> tuple[str, Any]:
    """Run ``func(*args)`` in a forked child: ('ok', result), ('timeout', None) when it does
    not answer within ``limit`` seconds (it is killed), ('oserror', message), ('error',
    message), or ('memory', message) when it would allocate more than ``memory`` bytes
    beyond what it inherited."""
    read_fd, write_fd = os.pipe()
    _widen(write_fd)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_fd)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            quiet = os.open(os.devnull, os.O_WRONLY)  # libraries' own messages: the pipe says what happened
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            if memory is not None:
                _limit_memory(memory)
            try:
                result: tuple[str, Any] = ("ok", func(*args))
            except MemoryError as e:
                result = ("memory", f"{type(e).__name__}: {e}".splitlines()[0][:300])
            except OSError as e:
                result = ("oserror", str(e).splitlines()[0] if str(e) else type(e).__name__)
            except Exception as e:  # any decoding problem of a corrupt file
                message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                result = ("memory" if memory is not None and "bad_alloc" in message else "error", message)
            data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view):]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + limit
    poller = select.poll()  # not select.select(): it refuses descriptors from 1024 on, which a process may reach
    poller.register(read_fd, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):  # milliseconds, rounded up
                os.kill(pid, signal.SIGKILL)
                return "timeout", None
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(read_fd)
        _reap(pid)
    if not chunks:
        return "error", "the reading process died"
    return pickle.loads(b"".join(chunks))


def _widen(fd: int) -> None:
    """The pipe's buffer made as large as the system allows a process (Linux: 1 MiB by default,
    instead of 64 KiB): a large answer (a million image names) crosses in fewer round trips."""
    try:
        import fcntl

        with open("/proc/sys/fs/pipe-max-size") as f:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, int(f.read()))
    except (ImportError, AttributeError, OSError, ValueError):
        pass  # another system, or a limit: the default buffer works, more slowly


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
