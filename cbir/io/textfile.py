"""Reading the small text inputs (pairs, poses, lists, configurations, kapture text) with
one-line errors, from regular files only, and splitting them into lines as kapture does."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from ..errors import CbirError, FormatError
from .paths import refuse_links

_NEWLINE_RE = re.compile(r"\r\n|\r|\n")


def read_regular(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` when it is a regular file to read (not a FIFO or a device, not a symbolic
    link inside a dataset's ``cbir/`` folder), else a one-line :class:`CbirError`: for
    readers that stream a file themselves."""
    path = refuse_links(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CbirError(f"{what} not found", path) from None
    except OSError as e:
        raise CbirError(f"cannot read {what}: {e.strerror}", path) from None
    if not stat.S_ISREG(mode):
        raise CbirError(f"cannot read {what}: it is {_kind(mode)}, not a regular file", path)
    return path


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


def read_file_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``. Anything else (a FIFO, which would block for
    ever; a device such as ``/dev/zero``, which never ends; a directory) is refused without
    reading, and no more than the size the file had when opened is read, so the memory used
    is the file's real size. A symbolic link inside a dataset's ``cbir/`` folder is refused
    (:func:`~cbir.io.paths.refuse_links`)."""
    path = refuse_links(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    except FileNotFoundError:
        raise CbirError(f"{what} not found", path) from None
    except OSError as e:
        raise CbirError(f"cannot read {what}: {e.strerror}", path) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CbirError(f"cannot read {what}: it is {_kind(info.st_mode)}, not a regular file", path)
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise CbirError(f"cannot read {what}: {e.strerror}", path) from None
    finally:
        os.close(fd)


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (:func:`read_file_bytes`); a missing, unreadable or non-UTF-8
    file is a CbirError naming the file and what it should have been."""
    data = read_file_bytes(path, what)
    if data.startswith(b"\xef\xbb\xbf"):
        raise FormatError("starts with a UTF-8 byte-order mark (BOM): save it as UTF-8 without BOM", path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("not valid UTF-8 text", path) from None


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` split where a file's lines end ('\\n', '\\r\\n', '\\r'), as Python
    reads a text file and kapture reads its files: not at the other breaks of
    :meth:`str.splitlines` (U+2028, U+0085, form feed...), which may be part of a name."""
    lines = _NEWLINE_RE.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines


#: deepest nesting of the JSON cbir reads (records, results, configurations: a few levels);
#: deeper input is refused, so that no code that walks it can run out of stack
MAX_JSON_DEPTH = 64


def parse_json(text: str | bytes, source: str | os.PathLike | None, what: str = "JSON") -> object:
    """``json.loads(text)``, with text that is not JSON, or nested deeper than
    :data:`MAX_JSON_DEPTH` (a crafted file), a :class:`FormatError` naming ``source``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise FormatError(f"{what} is nested too deep", source) from None
    except ValueError as e:
        raise FormatError(f"{what} is not valid JSON ({str(e)[:120]})", source) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise FormatError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", source)
    return value


def json_depth(value: object) -> int:
    """How deep lists and objects nest in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """The JSON object in the regular UTF-8 file ``path``; anything else is a one-line error."""
    value = parse_json(read_utf8(path, what), path, what)
    if not isinstance(value, dict):
        raise FormatError(f"{what} must hold a JSON object, not {type(value).__name__}", path)
    return value
