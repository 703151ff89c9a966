"""CRC-32 arithmetic of the stores' checksums: combining the CRCs of consecutive byte runs."""

from __future__ import annotations

import json
from collections.abc import Iterator

_POLY = 0xEDB88320  # CRC-32 (zlib), reflected


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC-32 polynomial (reflected bit order)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc1`` of ``a``, ``crc2`` of ``b`` and ``len(b)``
    (zlib's ``crc32_combine``, which Python's zlib does not offer): ``crc1`` shifted by
    ``len2`` zero bytes, that is multiplied by x^(8 len2), plus ``crc2``."""
    p, n, k = 1 << 31, len2, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


#: attribute holding the CRC-32 of the keys and of every column (format 1.2, optional)


def _checksums_json(keys_crc: int, columns: dict[str, int]) -> str:
    """The ``checksums`` attribute (formats/SPEC.md 5)."""
    return json.dumps({"algorithm": "crc32", "keys": f"{keys_crc:08x}",
                       "columns": {k: f"{v:08x}" for k, v in sorted(columns.items())}}, sort_keys=True)


_COPY_BLOCK_BYTES = 64 << 20


def _row_blocks(total: int, row_bytes: int) -> Iterator[slice]:
    """Consecutive row ranges of at most :data:`_COPY_BLOCK_BYTES` (one row at least)
    covering ``total`` rows."""
    step = max(1, _COPY_BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))
