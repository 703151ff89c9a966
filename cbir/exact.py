"""Reproducible similarity arithmetic: dot products and L2 norms of float32 vectors whose
every bit is a function of the inputs alone, not of the CPU (AVX2 or AVX-512, Intel or
AMD), the BLAS, the thread count, the matrix shapes (chunks, shards, candidate blocks)
or the device.

A float32 dot product computed by a BLAS is rounded after each partial sum, and the order
of the sums depends on the kernel, the shape and the threads, so its last bits do too.
Here each row ``x`` is cut into two integer slices, exactly (Ozaki's error-free
splitting)::

    x = scale * (H * 2^-b + L * 2^-2b + r),   |H|, |L| < 2^b,   |r| < 2^-2b

``scale`` a power of two per row, ``b`` from the dimension ``D`` so that any sum of ``D``
products of slices is an integer below ``2^53``. Such sums are exact in float64 whatever
their order, so ``H_x . H_y`` and ``H_x . L_y + L_x . H_y`` computed by any matrix product
(torch's BLAS on any CPU, cuBLAS, batched or not) are the same numbers. They are combined
in one fixed sequence of correctly rounded operations and rounded once to float32::

    dot(x, y) = float32(scale_x scale_y 2^-2b (H_x.H_y + 2^-b (H_x.L_y + L_x.H_y + 2^-b L_x.L_y)))

For unit rows that is within ``sqrt(D) 2^(2-2b)`` of the exact dot product (2e-10 at
``D`` = 2048, 1e-8 at 32,768) before its float32 rounding, and bit-identical on every
machine. The cost is one float64 product of twice the rows on each side instead of one
float32 product, so the search finds candidates with a float32 product first and scores
only those here (``retrieval.search``).

Norms (:func:`norms`, :func:`unit_rows`) need no such care: a fixed order of float32
additions (running sums over column blocks, then pairwise) makes them the same bits
everywhere at the cost of a BLAS norm. :func:`power` is ``pow`` made reproducible the
same way: a fixed sequence of float64 operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: float64 integers are exact below 2^53
_MANTISSA = 53


def slice_bits(dim: int) -> int:
    """``b``: the bits of each slice of a ``dim``-dimensional row, the largest with every
    sum of ``2 dim`` products of slices (``|H|, |L| < 2^b``) below ``2^53``."""
    if dim < 1:
        raise ValueError(f"dimension {dim} < 1")
    return (_MANTISSA - (2 * dim - 1).bit_length()) // 2


@dataclass(frozen=True)
class Sliced:
    """Rows cut into exact integer slices (float64 tensors holding integers)."""

    high: torch.Tensor  # (..., D) |H| < 2^bits
    low: torch.Tensor  # (..., D) |L| < 2^bits
    scale: torch.Tensor  # (...,) a power of two per row, above every |x|
    bits: int

    def __getitem__(self, index: Any) -> Sliced:
        return Sliced(self.high[index], self.low[index], self.scale[index], self.bits)


def slice_rows(x: torch.Tensor) -> Sliced:
    """The slices of the finite float32 rows of ``x`` (shape ``(..., D)``); a large matrix a
    piece at a time, so that the temporaries stay small."""
    if x.dtype != torch.float32:
        raise TypeError(f"slice_rows needs float32 rows, got {x.dtype}")
    if x.ndim == 2 and x.numel() > PIECE_ELEMENTS:
        parts = [_slice(x[i:j]) for i, j in _pieces(x)]
        return Sliced(torch.cat([p.high for p in parts]), torch.cat([p.low for p in parts]),
                      torch.cat([p.scale for p in parts]), parts[0].bits)
    return _slice(x)


def _slice(x: torch.Tensor) -> Sliced:
    """:func:`slice_rows` of one piece, in float32: every step is exact (scalings by powers
    of two, integer parts, fractions), and every slice is a float32 integer."""
    bits = slice_bits(x.shape[-1])
    peak = x.abs().amax(dim=-1) if x.shape[-1] else torch.zeros(x.shape[:-1], device=x.device)
    # scale = 2^e with peak < 2^e (frexp: peak = m 2^e, 0.5 <= m < 1); a zero row keeps scale 1
    _, exponent = torch.frexp(peak)
    exponent = exponent.to(torch.int64)
    shift = bits - exponent  # t = x 2^b / scale, in two normal factors (a subnormal row needs 2^173)
    first = torch.div(shift, 2, rounding_mode="floor")
    t = x * pow2_float32(first)[..., None]
    t.mul_(pow2_float32(shift - first)[..., None])  # |t| < 2^b
    high = t.trunc()
    low = t.sub_(high).mul_(2.0 ** bits).trunc_()  # the fraction, exact
    return Sliced(high, low, pow2(exponent), bits)


def pow2(n: torch.Tensor) -> torch.Tensor:
    """float64 ``2 ** n`` of int64 ``n`` in [-1022, 1023], made from its bits: exact on every
    machine (``torch.ldexp`` multiplies by ``pow(2, n)``, a library function)."""
    return ((n + 1023) << 52).view(torch.float64)


def pow2_float32(n: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** n`` of int64 ``n`` in [-126, 127], made from its bits."""
    return ((n + 127) << 23).to(torch.int32).view(torch.float32)


def _combine(hh: torch.Tensor, cross: torch.Tensor, ll: torch.Tensor, scale: torch.Tensor,
             bits: int) -> torch.Tensor:
    """``scale 2^-2b (hh + 2^-b (cross + 2^-b ll))`` in float64, in this one order (the
    scalings are exact: powers of two; each addition is rounded once)."""
    step = 2.0 ** -bits
    return ll.mul_(step).add_(cross).mul_(step).add_(hh).mul_(scale).mul_(step * step)


def dot(a: Sliced, b: Sliced, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b.T`` of two sliced matrices ``(n, D)`` and ``(m, D)``: ``(n, m)``, rounded once
    to float32 (``dtype=torch.float64``: not rounded)."""
    if a.bits != b.bits:
        raise ValueError("slices of different dimensions")
    n, m = a.high.shape[0], b.high.shape[0]
    # one float64 product gives the four: [H_a; L_a] [H_b; L_b]^T
    p = torch.mm(_stacked(a, 0), _stacked(b, 0).t())
    cross = p[:n, m:] + p[n:, :m]  # H_a.L_b + L_a.H_b: both exact, so is the sum
    return _combine(p[:n, :m], cross, p[n:, m:].clone(), a.scale[:, None] * b.scale[None, :], a.bits).to(dtype)


def dot_batched(a: Sliced, b: Sliced) -> torch.Tensor:
    """float32 ``x . y`` of each row ``x`` of ``a`` ``(n, D)`` with each of its own rows
    ``y`` of ``b`` ``(n, k, D)``: ``(n, k)`` (the candidates of each query)."""
    if a.bits != b.bits:
        raise ValueError("slices of different dimensions")
    k = b.high.shape[1]
    # one batched product reads the candidates' slices once: [H_y; L_y] [H_x L_x]
    p = torch.bmm(_stacked(b, 1), torch.stack([a.high, a.low], dim=2).double())
    cross = p[:, :k, 1] + p[:, k:, 0]  # H_y.L_x + L_y.H_x
    return _combine(p[:, :k, 0], cross, p[:, k:, 1].clone(), a.scale[:, None] * b.scale, a.bits).float()


def _stacked(s: Sliced, dim: int) -> torch.Tensor:
    """``[H; L]`` along ``dim`` in float64 (the slices are float32 integers)."""
    shape = list(s.high.shape)
    shape[dim] *= 2
    out = torch.empty(shape, dtype=torch.float64, device=s.high.device)
    h = s.high.shape[dim]
    out.narrow(dim, 0, h).copy_(s.high)
    out.narrow(dim, h, h).copy_(s.low)
    return out


def squared_norms(x: Sliced) -> torch.Tensor:
    """float64 squared L2 norms of sliced rows (the :func:`dot` of each row with itself,
    before its float32 rounding)."""
    high, low = x.high.double(), x.low.double()
    hh = (high * high).sum(dim=-1)  # integer products and sums below 2^53: exact in any order
    cross = (high * low).sum(dim=-1).mul_(2.0)
    ll = (low * low).sum(dim=-1)
    return _combine(hh, cross, ll, x.scale * x.scale, x.bits)


def dot_rows(a: Sliced, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`dot` of sliced rows ``(n, D)`` and float32 rows ``(m, D)``, ``b`` sliced a
    piece at a time (its slices take four times its memory)."""
    pieces = [dot(a, _slice(b[i:j]), dtype) for i, j in _pieces(b)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def norms(x: torch.Tensor) -> torch.Tensor:
    """float32 L2 norms of the float32 rows of ``x`` ``(n, D)``, the same bits on every
    machine: the squares added column block by column block into :data:`LANES` running
    sums, left to right (the last block narrower), the lanes then summed pairwise
    (:func:`tree_sum`), then the square root; each step one correctly rounded float32
    operation. A NaN or infinite component gives a NaN or infinite norm. A few rows at a
    time, so that the sums stay in the cache."""
    n, dim = x.shape
    lanes = min(LANES, 1 << max(0, dim - 1).bit_length())
    rows = max(1, (1 << 16) // lanes)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, rows):
        part = x[r0:r0 + rows]
        acc = torch.zeros((len(part), lanes), dtype=torch.float32, device=x.device)
        for c0 in range(0, dim, lanes):
            block = part[:, c0:c0 + lanes]
            acc[:, :block.shape[1]].add_(block * block)
        out[r0:r0 + rows] = tree_sum(acc).sqrt_()
    return out


#: running sums of a norm: its squares are added this many columns at a time
LANES = 256


def tree_sum(v: torch.Tensor) -> torch.Tensor:
    """Sums of the last dimension of ``v`` in one fixed pairwise order, whatever the machine:
    padded with zeros to a power of two, then halves added element by element."""
    width = 1 << max(0, v.shape[-1] - 1).bit_length()
    if width != v.shape[-1]:
        v = torch.nn.functional.pad(v, (0, width - v.shape[-1]))
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]


def unit_rows(x: torch.Tensor, row_norms: torch.Tensor | None = None) -> torch.Tensor:
    """The finite float32 rows of ``x`` ``(n, D)`` divided by their :func:`norms` (given as
    ``row_norms`` when already computed): one correctly rounded division each; a zero row
    stays zero."""
    n = norms(x) if row_norms is None else row_norms
    return x / torch.where(n > 0, n, 1.0)[:, None]


#: elements of a float32 matrix sliced at once: its float64 slices and their temporaries
#: take about 40 bytes an element
PIECE_ELEMENTS = 1 << 22


def _pieces(x: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges of ``x`` ``(n, D)`` of about :data:`PIECE_ELEMENTS` elements each."""
    step = max(1, PIECE_ELEMENTS // max(1, x.shape[-1]))
    return [(i, min(len(x), i + step)) for i in range(0, len(x), step)] or [(0, 0)]


_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_LOG_TERMS = [1.0 / (2 * i + 1) for i in range(12)]  # atanh series of ln, |z| < 0.172
_EXP_TERMS = [1.0 / math.factorial(i) for i in range(18)]  # Taylor series of exp, |r| < 0.347


def power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """float32 ``x ** exponent`` (``exponent`` >= 0, as late fusion's weights are) from
    correctly rounded float64 operations in a fixed order, rounded once: the same bits
    wherever it runs. torch's and numpy's ``pow`` differ by the CPU's vector width (a vector
    kernel for most elements, the C library for the last few), so a score would depend on
    where it sits in a chunk. Within 1e-15 relative of the exact power before rounding;
    as ``pow``: ``x ** 0`` is 1, ``0 ** e`` is 0, a negative ``x`` gives NaN unless
    ``exponent`` is an integer."""
    if not exponent >= 0:
        raise ValueError(f"exponent {exponent} is negative")
    xd = x.double()
    if float(exponent).is_integer():
        return integer_power(xd, int(exponent)).float()
    positive = xd > 0
    y = _log(torch.where(positive, xd, 1.0)).mul_(float(exponent))
    out = _exp(y)
    out = torch.where(positive, out, torch.where(xd == 0, 0.0, torch.nan))
    return torch.where(torch.isinf(xd) & positive, torch.inf, out).float()


def integer_power(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x ** n`` (``n`` >= 0) by repeated squaring: rounded multiplications in a fixed order."""
    out, base = torch.ones_like(x), x.clone()
    while n:
        if n & 1:
            out.mul_(base)
        n >>= 1
        if n:
            base = base * base
    return out


def _log(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive finite float64 ``x``: ``x = m 2^e``, ``m`` in [sqrt(1/2), sqrt(2)),
    ``ln m = 2 atanh((m - 1) / (m + 1))`` by its series (Horner, no fused operations)."""
    m, e = torch.frexp(x)
    low = m < _SQRT_HALF
    m = torch.where(low, m * 2.0, m)
    e = (e - low.to(e.dtype)).double()
    z = (m - 1.0) / (m + 1.0)
    z2 = z * z
    acc = torch.full_like(z, _LOG_TERMS[-1])
    for c in reversed(_LOG_TERMS[:-1]):
        acc = acc * z2 + c  # two rounded operations: a product, then a sum
    return (z * 2.0) * acc + e * _LN2


def _exp(y: torch.Tensor) -> torch.Tensor:
    """``exp`` of finite float64 ``y``: ``y = n ln2 + r``, ``|r| <= ln2 / 2``, its Taylor series."""
    y = y.clamp(-1100.0, 710.0)  # beyond: 0 or inf, as exp gives
    n = torch.round(y / _LN2)
    r = y - n * _LN2
    acc = torch.full_like(r, _EXP_TERMS[-1])
    for c in reversed(_EXP_TERMS[:-1]):
        acc = acc * r + c
    n = n.to(torch.int64)
    half = torch.div(n, 2, rounding_mode="floor")
    return acc * pow2(half) * pow2(n - half)  # each factor a normal float64
