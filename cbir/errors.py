"""Errors that reach the user as one line: the file (and line) and the problem."""

from __future__ import annotations

from os import PathLike


class CbirError(Exception):
    """A user-facing error: bad input, missing file, refused operation.

    The command line prints ``str(error)`` on one line and exits with code 1;
    everything else (a bug) keeps its traceback.
    """

    def __init__(self, message: str, path: str | PathLike | None = None, line: int | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        if self.path is None:
            return self.message
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


class FormatError(CbirError):
    """A file does not follow its format (kapture text, cbir HDF5, COLMAP, hloc)."""


class VersionError(FormatError):
    """A file was written by a newer, incompatible version of the format."""


class LockedError(CbirError):
    """Another process is writing the same output."""
