"""Names that come from data and become paths: the one place that confines them.

Image names (records_camera.txt, store keys, COLMAP images.txt, hloc groups, kapture
feature files) become paths below ``records_data/`` or below an export directory;
feature type names (kapture's keypoints/descriptors types, a store's name) become one
directory or file name. Every such name is checked here before it is joined to a root,
so that no input, however hostile, makes cbir read or write outside its target.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from ..errors import CbirError

#: longest file name component most file systems accept (ext4, XFS, APFS: 255 bytes)
MAX_COMPONENT_BYTES = 255
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def _component_problem(part: str, name: str) -> str | None:
    if "\0" in part:
        return f"{name!r} contains a NUL byte"
    if any(ord(c) < 32 for c in part):
        return f"{name!r} contains a control character"
    if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        return f"{name[:40]!r}... has a path component over {MAX_COMPONENT_BYTES} bytes"
    return None


def check_relative_name(name: str, what: str = "image path", base: str = "records_data/") -> str | None:
    """Why ``name`` (a '/'-separated path relative to ``base``) cannot be used, or None.

    Refused: empty, absolute (POSIX or a drive letter), ``..`` components, backslashes,
    empty or ``.`` components (not normalized), NUL or control characters, components over
    255 bytes.
    """
    if not isinstance(name, str):
        return f"{what} {name!r} is not a string"
    if not name:
        return f"empty {what}"
    if "\\" in name:
        return f"{what} {name!r} contains a backslash: use '/'"
    if PurePosixPath(name).is_absolute() or _DRIVE_RE.match(name):
        return f"{what} {name!r} is absolute: it must be relative to {base}"
    parts = name.split("/")
    if ".." in parts:
        return f"{what} {name!r} escapes {base} with '..'"
    if any(part in ("", ".") for part in parts):
        return f"{what} {name!r} is not normalized"
    for part in parts:
        problem = _component_problem(part, name)
        if problem:
            return f"{what} {problem}"
    return None


def check_type_name(name: str, what: str = "type name") -> str | None:
    """Why ``name`` cannot be one file or directory name (a kapture feature type, a store
    name written into an export), or None."""
    if not isinstance(name, str) or not name:
        return f"empty {what}" if name == "" else f"{what} {name!r} is not a string"
    if "/" in name or "\\" in name or name in (".", ".."):
        return f"{what} {name!r} is not a single file name (no '/', '\\', '.' or '..')"
    problem = _component_problem(name, name)
    return f"{what} {problem}" if problem else None


def confined(root: str | os.PathLike, name: str, *, what: str = "image path",
             source: str | os.PathLike | None = None, line: int | None = None) -> Path:
    """``root / name`` for a checked relative ``name``, also refusing a result that symbolic
    links already on disk would lead out of ``root``. Errors name ``source`` (the file the
    name came from) when given."""
    problem = check_relative_name(name, what, base=f"{Path(root).name}/")
    if problem:
        raise CbirError(problem, source, line)
    root = Path(root)
    path = root / name
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise CbirError(f"{what} {name!r} leads out of {root} through a symbolic link (to {real})",
                        source, line)
    return path


def require_type_name(name: str, what: str = "type name", source: str | os.PathLike | None = None,
                      line: int | None = None) -> str:
    """``name`` if :func:`check_type_name` accepts it, else a :class:`CbirError`."""
    problem = check_type_name(name, what)
    if problem:
        raise CbirError(problem, source, line)
    return name


# ============================================================ links inside a dataset's cbir/ tree

#: set to 1 (or pass ``cbir --trust-links``) to read and write through symbolic links inside a
#: dataset's ``cbir/`` folder and to read HDF5 data that lives in other files
TRUST_LINKS_ENV = "CBIR_TRUST_LINKS"
TRUST_LINKS_HINT = f"pass cbir --trust-links (or set {TRUST_LINKS_ENV}=1) if you made it"


def trust_links() -> bool:
    """Whether the user asked to follow links inside ``cbir/`` trees and HDF5 references."""
    return os.environ.get(TRUST_LINKS_ENV, "") not in ("", "0")


def _cbir_tree_root(path: Path) -> Path | None:
    """The dataset's ``cbir/`` folder ``path`` is in (or is), found by name: a folder named
    ``cbir`` beside a ``sensors`` entry."""
    for candidate in (path, *path.parents):
        if candidate.name == "cbir" and os.path.lexists(candidate.parent / "sensors"):
            return candidate
    return None


def link_in_cbir_tree(path: str | os.PathLike) -> Path | None:
    """The first component of ``path``, from its dataset's ``cbir/`` folder down to ``path``
    itself, that is a symbolic link (None when there is none or ``path`` is not in a
    ``cbir/`` tree). Components that do not exist yet are not links."""
    path = Path(os.path.abspath(path))
    top = _cbir_tree_root(path)
    if top is None:
        return None
    for part in (*reversed(path.relative_to(top).parents), path.relative_to(top)):
        candidate = top / part
        if os.path.islink(candidate):
            return candidate
    return None


def refuse_links(path: str | os.PathLike) -> Path:
    """``path`` if no component of it inside its dataset's ``cbir/`` folder is a symbolic link,
    else a :class:`CbirError`: cbir makes no links there, so one was planted by whoever gave
    the dataset, and following it would read or write a file outside the dataset."""
    link = link_in_cbir_tree(path)
    if link is not None and not trust_links():
        raise CbirError(f"is a symbolic link (to {os.readlink(link)}): cbir does not read or write through "
                        f"links inside a dataset's cbir/ folder; remove it, or {TRUST_LINKS_HINT}", link)
    return Path(path)
