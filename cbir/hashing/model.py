"""A trained hash function and the packed codes it writes.

Codes are computed in float64 (``(x - mean) @ W`` against ``thresholds``), so that one
model gives the same bits on every CPU and thread count except where a projection lies
within float64 rounding of its threshold. Bits are packed eight a byte, most significant
first (``numpy.packbits``); a code of ``B`` bits takes ``ceil(B / 8)`` bytes, its padding
bits zero (they never change a Hamming distance).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CbirError, FormatError
from ..io.atomic import atomic_write_bytes

MIN_BITS, MAX_BITS = 8, 1024
MODEL_FORMAT = "cbir-hash-model 1"


#: the ``extractor`` of stores whose binary descriptors are codes with a ``code_bits`` header:
#: code stores, and Region-DH's instance stores
CODE_EXTRACTORS = ("hash", "region-dh")


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise CbirError(f"code length must be {MIN_BITS} to {MAX_BITS} bits, got {bits!r}")
    return bits


def code_bytes(bits: int) -> int:
    return (bits + 7) // 8


def pack(bits: np.ndarray) -> np.ndarray:
    """N x B booleans -> N x ceil(B/8) uint8, most significant bit first, padding zero."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1)


def unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack`: N x B booleans."""
    return np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=bits).astype(bool)


def code_store_problem(config: dict[str, Any], dtype: np.dtype, width: int) -> str | None:
    """What is wrong with a code store's ``config`` for descriptors of ``dtype`` and
    ``width`` columns (formats/SPEC.md 7a), or None."""
    bits = config.get("code_bits")
    if config.get("metric_type") != "Hamming":
        return "a code store's metric_type must be 'Hamming'"
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        return f"code_bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}"
    if dtype != np.uint8 or width != code_bytes(bits):
        return f"codes of {width} {dtype} columns for {bits} bits (expected {code_bytes(bits)} uint8)"
    return None


def code_store_config(bits: int, identity: dict[str, Any], extractor: str = "hash") -> dict[str, Any]:
    """The ``config`` of a store of codes of ``bits`` bits written by the hash model of
    ``identity`` (formats/SPEC.md 7a): a code store, or (``extractor = "region-dh"``) a
    Region-DH instance store."""
    assert extractor in CODE_EXTRACTORS
    return {"extractor": extractor, "metric_type": "Hamming", "code_bits": bits, "hash": identity}


def is_code_store(store: Any) -> bool:
    """Whether a global store holds binary descriptors (``metric_type`` Hamming)."""
    return store.config.get("metric_type") == "Hamming"


def code_bits(store: Any) -> int:
    """A code store's code length, its header checked (formats/SPEC.md 7a); a binary store
    of another origin (imported from kapture) uses every bit of its bytes."""
    codes = store.dataset("descriptors")
    if store.config.get("extractor") not in CODE_EXTRACTORS:
        if codes.dtype != np.uint8:
            raise CbirError(f"binary descriptors must be uint8, not {codes.dtype}", store.path)
        return int(codes.shape[1]) * 8
    problem = code_store_problem(dict(store.config), codes.dtype, int(codes.shape[1]))
    if problem:
        raise CbirError(problem, store.path)
    return int(store.config["code_bits"])


def signs(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes as float32 vectors of +1 (bit set) and -1: their cosine is ``1 - 2 d / B``
    (``d`` the Hamming distance), so that float retrieval ranks them as Hamming search does."""
    return unpack(codes, bits).astype(np.float32) * 2.0 - 1.0


def store_code_bits(store: Any) -> int:
    """The code length of a store that must hold binary codes (a one-line error otherwise)."""
    if not is_code_store(store):
        raise CbirError("not binary codes (metric_type is not Hamming): make them with cbir hash encode", store.path)
    return code_bits(store)


def checked_codes(store: Any, rows: np.ndarray | None, bits: int) -> np.ndarray:
    """The packed codes of a code store's ``rows`` (None: all), their padding bits checked."""
    if rows is None:
        codes = np.asarray(store.read_all("descriptors"), dtype=np.uint8)
    elif len(rows):
        codes = np.asarray(store.read_rows("descriptors", rows), dtype=np.uint8)
    else:
        codes = np.zeros((0, store.dataset("descriptors").shape[1]), np.uint8)
    if not padding_is_zero(codes, bits):
        raise CbirError("padding bits past code_bits are not zero", store.path)
    return codes


def check_same_model(query_store: Any, map_store: Any) -> None:
    """Query and map codes must be bits of one hash model (and of one length)."""
    if code_bits(query_store) != code_bits(map_store) or \
            query_store.config.get("hash", {}).get("model") != map_store.config.get("hash", {}).get("model"):
        raise CbirError(f"the query codes were written by another hash model than {map_store.path}'s: their bits "
                        "mean different things; encode both with the same model", query_store.path)


def padding_is_zero(codes: np.ndarray, bits: int) -> bool:
    """Whether the bits past ``bits`` in the last byte of every code are zero."""
    if bits % 8 == 0 or not len(codes):
        return True
    mask = np.uint8((1 << (8 - bits % 8)) - 1)
    return not np.any(np.asarray(codes)[:, -1] & mask)


def fingerprint(x: np.ndarray) -> str:
    """The first 16 hex digits of the SHA-256 of a float32 matrix's shape and bytes: which
    data a model was trained on."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclass
class HashModel:
    """``bits = (x - mean) @ projection > thresholds``, or, with ``frequencies`` (spectral
    hashing), ``cos(pi t) > 0`` for ``t = ((x - mean) @ projection - thresholds) * frequencies``;
    ``method`` and ``conf`` say how it was trained, ``trained_on`` the fingerprint of the
    training descriptors (and labels)."""

    method: str
    conf: dict[str, Any]
    mean: np.ndarray  # (D,) float64
    projection: np.ndarray  # (D, B) float64
    thresholds: np.ndarray  # (B,) float64
    trained_on: str
    extra: dict[str, Any] = field(default_factory=dict)
    frequencies: np.ndarray | None = None  # (B,) float64: periodic bits

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def bits(self) -> int:
        return int(self.projection.shape[1])

    def identity(self) -> dict[str, Any]:
        """What a code store records of the model that wrote it."""
        return {"method": self.method, "conf": self.conf, "bits": self.bits, "trained_on": self.trained_on,
                "model": self.digest()}

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.projection, self.thresholds) + (() if self.frequencies is None else
                                                                 (self.frequencies,)):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def bits_of(self, x: np.ndarray, names: list[str] | None = None, source: Any = None) -> np.ndarray:
        """N x B booleans of descriptors ``x`` (N x D). A non-finite descriptor is an error
        (NaN compares below every threshold: its code would be zeros), naming its image when
        ``names`` are given, and ``source`` (the store)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise CbirError(f"descriptors of shape {x.shape}: this hash model takes {self.dim} dimensions")
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            which = f" for image {names[int(bad[0])]!r}" if names is not None else f" in row {int(bad[0])}"
            raise CbirError(f"non-finite descriptors have no code: the first{which} ({len(bad)} such)", source)
        u = (x.astype(np.float64) - self.mean) @ self.projection
        if self.frequencies is None:
            return u > self.thresholds
        # the sign of cos(pi t) by floor arithmetic (exactly rounded everywhere), not by cos
        t = (u - self.thresholds) * self.frequencies
        r = t - 2.0 * np.floor(t / 2.0)
        return (r < 0.5) | (r > 1.5)

    def encode(self, x: np.ndarray, names: list[str] | None = None, source: Any = None) -> np.ndarray:
        """Packed codes (N x ceil(B/8) uint8) of descriptors ``x`` (:meth:`bits_of`)."""
        return pack(self.bits_of(x, names, source))

    def save(self, path: str | os.PathLike) -> None:
        """One ``.npz``: the arrays and a JSON header (method, configuration, fingerprint)."""
        import io

        header = {"format": MODEL_FORMAT, "method": self.method, "conf": self.conf, "trained_on": self.trained_on,
                  "extra": self.extra}
        buf = io.BytesIO()
        arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header, sort_keys=True)), "mean": self.mean,
                                         "projection": self.projection, "thresholds": self.thresholds}
        if self.frequencies is not None:
            arrays["frequencies"] = self.frequencies
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashModel:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                header = json.loads(str(f["header"]))
                mean, projection, thresholds = (np.asarray(f[k], dtype=np.float64)
                                                for k in ("mean", "projection", "thresholds"))
                frequencies = np.asarray(f["frequencies"], dtype=np.float64) if "frequencies" in f.files else None
        except FileNotFoundError:
            raise CbirError("hash model not found", path) from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise FormatError(f"not a cbir hash model ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                              path) from None
        found = header.get("format") if isinstance(header, dict) else header
        if found != MODEL_FORMAT:
            raise FormatError(f"not a cbir hash model (format {found!r})", path)
        if projection.ndim != 2 or mean.shape != (projection.shape[0],) or thresholds.shape != (projection.shape[1],):
            raise FormatError(f"inconsistent arrays: mean {mean.shape}, projection {projection.shape}, thresholds "
                              f"{thresholds.shape}", path)
        if frequencies is not None and frequencies.shape != thresholds.shape:
            raise FormatError(f"inconsistent arrays: thresholds {thresholds.shape}, frequencies {frequencies.shape}",
                              path)
        arrays = (mean, projection, thresholds) + (() if frequencies is None else (frequencies,))
        if not all(np.isfinite(a).all() for a in arrays):
            raise FormatError("non-finite values in the model", path)
        check_bits(int(projection.shape[1]))
        return cls(str(header["method"]), dict(header.get("conf") or {}), mean, projection, thresholds,
                   str(header.get("trained_on", "")), dict(header.get("extra") or {}), frequencies)
