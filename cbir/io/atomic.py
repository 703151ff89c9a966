"""Atomic file replacement and single-writer locks.

Every output is written to ``<path>.partial`` and renamed over ``<path>`` only when
complete, so an interrupted command never leaves a half-written file under the
final name and never damages the previous version.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import CbirError, LockedError
from .paths import refuse_links

PARTIAL_SUFFIX = ".partial"
_WRITER_RE = re.compile(r"^(\d+)-[0-9a-f]{8}$")


def partial_path(path: Path) -> Path:
    """A new name to write ``path`` under before renaming it: ``<path>.<pid>-<random>.partial``,
    unique to one writer (process or thread)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def _remove_stale_partials(path: Path) -> None:
    """Remove what killed writers of ``path`` left (the partial files of processes that are
    gone); a live writer's file is left to it."""
    prefix = path.name + "."
    for tmp in path.parent.glob(glob.escape(prefix) + "*" + PARTIAL_SUFFIX):
        writer = _WRITER_RE.match(tmp.name[len(prefix):-len(PARTIAL_SUFFIX)])
        if writer and not _alive(int(writer.group(1))):
            _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    On an exception the temporary file or directory is removed and ``path`` is untouched.
    Inside a dataset's ``cbir/`` folder, a symbolic link on the way to ``path`` is refused
    (:func:`~cbir.io.paths.refuse_links`). The temporary name is unique to this process, so
    that two writers of one path never write into one file; the last to finish wins whole.
    """
    path = refuse_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    tmp = partial_path(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            # Directories cannot be renamed over a non-empty one: swap through a backup.
            backup = path.with_name(path.name + ".old")
            _remove(backup)
            os.replace(path, backup)
            os.replace(tmp, path)
            _remove(backup)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _remove(tmp)
        if is_no_space(e):
            raise CbirError("no space left on the device: free some and re-run (what was finished is kept; "
                            "stores resume)", path) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def is_no_space(error: OSError) -> bool:
    """ENOSPC, also when h5py reports it only in its message."""
    return error.errno == errno.ENOSPC or "No space left on device" in str(error) or "errno = 28" in str(error)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file written by another library (faiss, say) to the disk before it is renamed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteLock:
    """An advisory exclusive lock on ``<path>.lock`` (released by the OS if the holder dies)."""

    def __init__(self, path: str | os.PathLike):
        self.target = Path(path)
        self.lock_path = self.target.with_name(self.target.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> WriteLock:
        refuse_links(self.lock_path)
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:  # O_NOFOLLOW: a lock planted as a link is refused, its target never opened
                fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise CbirError(f"the lock file {self.lock_path.name} is a symbolic link: cbir writes no lock "
                                "through a link; remove it", self.target) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(f"another process is writing this file (lock {self.lock_path.name} is held)",
                                  self.target) from None
            # The previous holder unlinks the lock file on release: make sure we locked the
            # file that is still at that path, not an unlinked one.
            try:
                if os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()

    def __enter__(self) -> WriteLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
