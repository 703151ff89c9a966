"""Reading the small text inputs (pairs, poses, lists, configurations) with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CbirError, FormatError


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is a CbirError
    naming the file and what it should have been."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            raise FormatError("starts with a UTF-8 byte-order mark (BOM): save it as UTF-8 without BOM", path)
        return data.decode("utf-8")
    except FileNotFoundError:
        raise CbirError(f"{what} not found", path) from None
    except UnicodeDecodeError:
        raise FormatError("not valid UTF-8 text", path) from None
    except OSError as e:
        raise CbirError(f"cannot read {what}: {e.strerror}", path) from None
