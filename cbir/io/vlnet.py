"""The visuallocalization.net submission format: ``name qw qx qy qz tx ty tz`` per line,
world-to-camera, one line per localized image."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError
from ..geometry.poses import Pose, validate_pose
from .atomic import atomic_write_text
from .textfile import read_utf8, split_lines


def read_vlnet(path: str | os.PathLike) -> dict[str, Pose]:
    path = Path(path)
    text = read_utf8(path)
    poses: dict[str, Pose] = {}
    for lineno, line in enumerate(split_lines(text), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 8:
            raise FormatError(f"expected 8 fields (name qw qx qy qz tx ty tz), got {len(fields)}", path, lineno)
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise FormatError("pose values must be numbers", path, lineno) from None
        problem = validate_pose(values[:4], values[4:])
        if problem:
            raise FormatError(problem, path, lineno)
        if fields[0] in poses:
            raise FormatError(f"duplicate image {fields[0]!r}", path, lineno)
        poses[fields[0]] = Pose(tuple(values[:4]), tuple(values[4:]))  # type: ignore[arg-type]
    return poses


def format_vlnet(poses: dict[str, Pose]) -> str:
    return "".join(f"{name} " + " ".join(repr(float(v)) for v in (*p.qvec, *p.tvec)) + "\n"
                   for name, p in poses.items())


def write_vlnet(path: str | os.PathLike, poses: dict[str, Pose]) -> None:
    atomic_write_text(path, format_vlnet(poses))
