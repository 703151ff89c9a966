"""cbir.exact: similarities, norms and powers whose bits do not depend on the shapes they are
computed in, the thread count or the BLAS, and that stay within their stated error of the
exact values. The retrieval built on them is checked in test_retrieval.py; here each
claim is checked at 1, 2 and 3 threads, and in fresh processes with OMP_NUM_THREADS and
MKL_NUM_THREADS set, so that a result that follows a reduction order fails on any machine."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from cbir import exact
from tests.conftest import REPO


def unit(rng: np.random.Generator, n: int, dim: int, tiny: bool = False) -> torch.Tensor:
    x = rng.standard_normal((n, dim))
    if tiny:  # components across many binades, some subnormal in float32
        x *= 10.0 ** rng.uniform(-40, 0, (n, dim))
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).float()


@pytest.mark.parametrize("dim", [1, 3, 128, 2048, 4096, 32768])
def test_slices_hold_the_row_to_their_stated_precision(dim):
    """``x = scale (H 2^-b + L 2^-2b + r)``, ``|H|, |L| < 2^b``, ``|r| < 2^-2b``, and any sum of
    ``2 D`` products of slices is below 2^53 (exact in float64)."""
    rng = np.random.default_rng(dim)
    x = unit(rng, 7, dim, tiny=True)
    s = exact.slice_rows(x)
    b = s.bits
    assert 2 * dim * (2 ** b - 1) ** 2 < 2 ** 53 <= 2 * dim * 2 ** (2 * b + 2)  # the largest such b
    for t in (s.high, s.low):
        assert torch.equal(t, t.trunc()) and t.abs().max() < 2 ** b
    rebuilt = s.scale[:, None] * (s.high.double() * 2.0 ** -b + s.low.double() * 2.0 ** (-2 * b))
    assert ((x.double() - rebuilt).abs() < s.scale[:, None] * 2.0 ** (-2 * b)).all()
    assert (x.double().abs().amax(dim=1) < s.scale).all() and (s.scale <= 2 * x.double().abs().amax(dim=1)).all()


def test_dot_is_within_its_bound_of_the_exact_value():
    """Against the exact rational dot product: ``sqrt(D) 2^(2-2b)`` before the float32
    rounding, so at most one float32 rounding plus that after it."""
    rng = np.random.default_rng(1)
    for dim in (16, 2048):
        a, b = unit(rng, 4, dim, tiny=True), unit(rng, 5, dim)
        got = exact.dot(exact.slice_rows(a), exact.slice_rows(b), torch.float64)
        bound = dim ** 0.5 * 2.0 ** (2 - 2 * exact.slice_bits(dim))
        for i in range(4):
            for j in range(5):
                truth = sum(Fraction(float(u)) * Fraction(float(v))
                            for u, v in zip(a[i].tolist(), b[j].tolist(), strict=True))
                assert abs(Fraction(float(got[i, j])) - truth) <= Fraction(bound)


def test_dot_bits_do_not_depend_on_the_shapes(threads):
    """The same pair scores the same bits in a whole product, cut by rows or by columns, in
    pieces, batched per query (candidates) and in float64 squared norms."""
    rng = np.random.default_rng(threads)
    q, m = unit(rng, 33, 2048), unit(rng, 301, 2048)
    sq = exact.slice_rows(q)
    whole = exact.dot(sq, exact.slice_rows(m))
    by_columns = torch.cat([exact.dot(sq, exact.slice_rows(m[i:i + 37])) for i in range(0, 301, 37)], dim=1)
    by_rows = torch.cat([exact.dot(exact.slice_rows(q[i:i + 5]), exact.slice_rows(m)) for i in range(0, 33, 5)])
    assert torch.equal(whole, by_columns) and torch.equal(whole, by_rows)
    assert torch.equal(whole, exact.dot_rows(sq, m))
    pick = torch.from_numpy(rng.integers(0, 301, (33, 9)))
    assert torch.equal(exact.dot_batched(sq, exact.slice_rows(m[pick])), whole.gather(1, pick))
    assert torch.equal(exact.squared_norms(sq).float(), exact.dot(sq, sq).diagonal())


def test_pieces_give_the_same_bits(monkeypatch):
    """Large matrices are sliced a piece at a time: the pieces do not change a bit."""
    rng = np.random.default_rng(4)
    q, m = unit(rng, 6, 256), unit(rng, 500, 256)
    whole = exact.dot_rows(exact.slice_rows(q), m)
    norms = exact.norms(m)
    monkeypatch.setattr(exact, "PIECE_ELEMENTS", 256 * 7)
    assert torch.equal(exact.dot_rows(exact.slice_rows(q), m), whole)
    assert torch.equal(exact.norms(m), norms)
    assert torch.equal(exact.slice_rows(m).high, exact._slice(m).high)


def test_unit_rows_are_unit_and_shape_free(threads):
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((50, 300)) * 7).float()
    u = exact.unit_rows(x)
    assert torch.equal(u[10:20], exact.unit_rows(x[10:20]))
    assert (exact.norms(u) - 1).abs().max() < 2 ** -22
    np.testing.assert_allclose(u.numpy(), (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).numpy(),
                               rtol=0, atol=2e-7)


@pytest.mark.parametrize("exponent", [1 / 3, 0.5, 2 / 7, 0.8, 1.0, 3.0, 0.0])
def test_power_is_correctly_rounded_but_rarely_and_shape_free(exponent):
    """Within one float32 rounding of the float64 power, equal to it in all but a handful of
    100,000 values (torch's float32 pow misses about one in ten), the same bits in any
    piece; pow's special values."""
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.uniform(0, 1, 100_003)).float()
    got = exact.power(x, exponent)
    ref = torch.from_numpy(np.power(x.double().numpy(), exponent))
    assert ((got.double() - ref).abs() <= ref.abs() * 2.0 ** -23).all()
    assert (got != ref.float()).sum() <= 5
    assert torch.equal(torch.cat([exact.power(x[i:i + 7], exponent) for i in range(0, len(x), 7)]), got)
    special = exact.power(torch.tensor([0.0, 1.0, -0.5, float("nan"), float("inf")]), exponent)
    with np.errstate(invalid="ignore"):
        expected = np.power(np.array([0.0, 1.0, -0.5, np.nan, np.inf]), exponent).astype(np.float32)
    np.testing.assert_array_equal(special.numpy(), expected)


SCRIPT = r"""
import hashlib, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from cbir import exact
from cbir.models.densevlad import vlad
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((300, 2048))).float()
u = exact.unit_rows(x)
h = hashlib.sha256()
for block in (300, 64, 7):
    h.update(exact.dot_rows(exact.slice_rows(u[:40]), u[:block]).numpy().tobytes())
h.update(exact.power(u.abs().flatten(), 1 / 3).numpy().tobytes())
h.update(vlad(np.abs(rng.standard_normal((3000, 128))).astype(np.float32),
              rng.standard_normal((16, 128)).astype(np.float32)).tobytes())
print(h.hexdigest())
"""


def test_bits_are_the_same_at_any_thread_count():
    """Fresh processes at 1, 2 and 3 OpenMP / MKL threads print the same digest of exact
    products, norms, powers and a VLAD."""
    digests = set()
    for n in (1, 2, 3):
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests
    assert all(len(d) == len(hashlib.sha256().hexdigest()) for d in digests)
