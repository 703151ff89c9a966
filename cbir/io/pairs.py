"""Pair lists: text, one pair a line, ``query_image, map_image, score``.

The layout of kapture-localization's pairs files (``# query_image, map_image, score``),
so files pass between the two tools unchanged. ``-`` reads stdin or writes stdout.
cbir adds a comment line ``# cbir: {json}`` recording what made the pairs (retrieval
options, descriptor stores); readers of the layout skip it as any comment.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from ..errors import CbirError, FormatError
from .atomic import atomic_write_text
from .provenance import digest
from .textfile import parse_json, read_regular, read_utf8, split_lines

PAIRS_HEADER = "# query_image, map_image, score"
RECORD_PREFIX = "# cbir: "
#: the longest ``# cbir:`` record read back (those cbir writes are a few kilobytes)
MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Pair:
    query: str
    map: str
    score: float = 0.0


def parse_pairs(text: str, source: str = "<stdin>") -> list[Pair]:
    pairs = []
    for lineno, line in enumerate(split_lines(text), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 1 and " " in line:  # hloc writes "name0 name1"
            fields = line.split()
        if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
            raise FormatError("expected 'query_image, map_image[, score]'", source, lineno)
        score = 0.0
        if len(fields) == 3:
            try:
                score = float(fields[2])
            except ValueError:
                raise FormatError(f"score is not a number: {fields[2][:40]!r}", source, lineno) from None
        pairs.append(Pair(fields[0], fields[1], score))
    return pairs


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read a pairs file (kapture-localization's or hloc's layout); ``-`` is stdin."""
    if str(path) == "-":
        return parse_pairs(sys.stdin.read())
    return parse_pairs(read_utf8(path, "pairs file"), str(path))


def format_pairs(pairs: list[Pair], record: dict | None = None) -> str:
    lines = [PAIRS_HEADER] + ([RECORD_PREFIX + json.dumps(record, sort_keys=True)] if record is not None else []) + \
        [f"{p.query}, {p.map}, {p.score:.6f}" for p in pairs]
    return "\n".join(lines) + "\n"


def read_pairs_record(path: str | os.PathLike) -> dict | None:
    """The ``# cbir:`` record of a pairs file (what made it), or None: no such file, no
    record (another tool's file), or a record that does not parse or is larger than any
    cbir writes (:data:`MAX_RECORD_BYTES`: it is not copied into results)."""
    try:
        with open(read_regular(path), encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#"):
                    return None
                if line.startswith(RECORD_PREFIX):
                    if len(line) > MAX_RECORD_BYTES:
                        return None
                    record = parse_json(line[len(RECORD_PREFIX):], path)
                    return record if isinstance(record, dict) else None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, CbirError):
        return None
    return None


def pairs_digest(pairs: list[Pair]) -> str:
    """A digest of the pairs (names and order, not scores): what a localization used."""
    return digest([[p.query, p.map] for p in pairs])


def write_pairs(path: str | os.PathLike, pairs: list[Pair], record: dict | None = None) -> None:
    text = format_pairs(pairs, record)
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(path, text)


def exhaustive_pairs(queries: list[str], database: list[str] | None = None) -> list[Pair]:
    """Every (query, database image) pair; without ``database``, every unordered pair of
    ``queries`` once (map x map)."""
    if database is None:
        names = sorted(queries)
        return [Pair(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    return [Pair(q, m) for q in sorted(queries) for m in sorted(database)]
