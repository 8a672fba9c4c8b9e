# SPDX-License-Identifier: Apache-2.0
"""Quantization and masking (DESIGN §4): clip, quantize and mask with AES-128-CTR.

This is hazmat: it takes explicit keys and parameters and checks only their form.
The protocol (``mpc_runtime.protocol``) decides which keys mask what.

Node side::

    y, stats = protect(x, clipping_range=3.0, bits=bits_for(n, 32),
                       add_keys=[k_self, k_uv], sub_keys=[k_wu])

Server side::

    s = sum_masked(uploads)                       # streaming, memory independent of n
    s = unmask(s, add_keys=[...], sub_keys=[...])  # remove what did not cancel
    total = dequantize_sum(s, m, clipping_range=3.0, bits=bits)

The implementation is picked once, at import, by ``SECAGG_KERNEL``: ``auto`` (the
default: the best compiled variant this CPU runs, else the numpy reference with one
``RuntimeWarning``), ``reference``, or a variant name (``vaes``, ``aesni``,
``armv8``); a named variant that cannot run here raises ``ImportError``.
``IMPLEMENTATION`` says which is in use. Callers must not mutate buffers while a call
that received them runs (the kernel releases the GIL on large inputs).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from types import ModuleType
from typing import Any, Final

import numpy as np

from . import _reference

__all__ = [
    "IMPLEMENTATION",
    "KEY_SIZE",
    "MAX_BITS",
    "ClipStats",
    "accumulate_into",
    "bits_for",
    "clip_histogram",
    "dequantize_sum",
    "mask_integers",
    "protect",
    "protect_into",
    "sum_masked",
    "unmask",
]

logger = logging.getLogger(__name__)

#: AES-128 key size in bytes (one key drives exactly one keystream).
KEY_SIZE: Final = 16
#: More bits than this exceed float64's exact integer range and buy no precision.
MAX_BITS: Final = 48
_VARIANTS: Final = ("vaes", "aesni", "armv8")
_RING_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    32: np.dtype(np.uint32),
    64: np.dtype(np.uint64),
}
# sum_masked pulls this many vectors at a time, so its memory is bounded however
# many vectors the iterable yields, while each chunk of the sum is written once
# per batch instead of once per vector.
_SUM_BATCH: Final = 8


@dataclass(frozen=True, slots=True)
class ClipStats:
    """What clipping did to one vector (DESIGN §4).

    Attributes
    ----------
    size
        Number of values.
    clipped
        Number of values with ``|x| > clipping_range``.
    max_abs
        Largest ``|x|``, taken before clipping (0.0 when empty).
    """

    size: int
    clipped: int
    max_abs: float

    @property
    def fraction(self) -> float:
        """Fraction of values clipped (0.0 when empty)."""
        return self.clipped / self.size if self.size else 0.0


def _select_implementation() -> tuple[ModuleType, str]:
    choice = os.environ.get("SECAGG_KERNEL", "auto").strip().lower() or "auto"
    if choice not in ("auto", "reference", *_VARIANTS):
        raise ImportError(
            f"SECAGG_KERNEL must be auto, reference or one of {', '.join(_VARIANTS)}; "
            f"got {choice!r}"
        )
    if choice == "reference":
        return _reference, "reference"
    try:
        from . import _native
    except ImportError as e:
        if choice != "auto":
            raise ImportError(
                f"SECAGG_KERNEL={choice}: the compiled kernel is not importable ({e})"
            ) from None
        reason = f"the compiled kernel is not importable ({e})"
    else:
        runnable = _native.available()
        if choice == "auto" and runnable:
            _native.select(runnable[0])
            return _native, runnable[0]
        if choice in runnable:
            _native.select(choice)
            return _native, choice
        if choice != "auto":
            raise ImportError(
                f"SECAGG_KERNEL={choice} cannot run on this CPU "
                f"(runnable here: {', '.join(runnable) or 'none'})"
            )
        reason = "this CPU has no AES instructions the kernel supports"
    message = f"secagg falls back to the slow numpy masking reference: {reason}"
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return _reference, "reference"


_impl, IMPLEMENTATION = _select_implementation()


# --- validation -----------------------------------------------------------------


def _check_ring(ring_bits: int) -> np.dtype:
    if isinstance(ring_bits, bool) or ring_bits not in _RING_DTYPES:
        raise ValueError(f"expected ring_bits 32 or 64, got {ring_bits!r}")
    return _RING_DTYPES[ring_bits]


def _ring_of(a: np.ndarray, name: str) -> int:
    """The ring of a uint32/uint64 array in native byte order."""
    if not isinstance(a, np.ndarray):
        raise TypeError(
            f"expected {name} to be a numpy.ndarray, got {type(a).__name__}"
        )
    for ring, dtype in _RING_DTYPES.items():
        if a.dtype == dtype:
            return ring
    raise TypeError(f"expected {name} of dtype uint32 or uint64, got {a.dtype}")


def _check_vector(a: np.ndarray, name: str) -> None:
    if a.ndim != 1:
        raise ValueError(f"expected {name} to be 1-D, got {a.ndim}-D")


def _check_clipping_range(c: float) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"expected clipping_range to be a number, got {type(c).__name__}"
        )
    c = float(c)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"expected a finite clipping_range > 0, got {c}")
    return c


def _check_bits(bits: int, ring_bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"expected bits to be an int, got {type(bits).__name__}")
    top = min(ring_bits, MAX_BITS)
    if not 1 <= bits <= top:
        raise ValueError(
            f"expected 1 <= bits <= {top} for ring_bits={ring_bits}, got {bits}"
        )
    return int(bits)


def _check_keys(
    add_keys: Iterable[bytes], sub_keys: Iterable[bytes]
) -> tuple[bytes, bytes]:
    """Concatenate the keys and their signs (0x01 add, 0xFF subtract) for the kernel."""
    keys = bytearray()
    signs = bytearray()
    for sign, group, name in ((1, add_keys, "add_keys"), (0xFF, sub_keys, "sub_keys")):
        if isinstance(group, (bytes, bytearray, str)):
            raise TypeError(
                f"expected {name} to be a sequence of keys, not one {type(group).__name__}"
            )
        for key in group:
            if not isinstance(key, (bytes, bytearray)):
                raise TypeError(
                    f"expected each key in {name} to be bytes, got {type(key).__name__}"
                )
            if len(key) != KEY_SIZE:
                raise ValueError(
                    f"expected each key in {name} to be {KEY_SIZE} bytes, got {len(key)}"
                )
            keys += key
            signs.append(sign)
    return bytes(keys), bytes(signs)


def _check_input(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"expected x to be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.type not in (np.float32, np.float64):
        raise TypeError(f"expected x of dtype float32 or float64, got {x.dtype}")
    _check_vector(x, "x")
    # Non-contiguous views and non-native byte order become one contiguous copy.
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))


def _check_output(out: np.ndarray, n: int, ring_bits: int) -> None:
    ring = _ring_of(out, "out")
    _check_vector(out, "out")
    if ring != ring_bits:
        raise ValueError(
            f"expected out of dtype {_RING_DTYPES[ring_bits]} for ring_bits={ring_bits}, got {out.dtype}"
        )
    if out.shape[0] != n:
        raise ValueError(f"expected out of length {n}, got {out.shape[0]}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("expected out to be a writable, C-contiguous array")


# --- node side ------------------------------------------------------------------


def bits_for(n_nodes: int, ring_bits: int = 32) -> int:
    """Bits per value so that the sum of ``n_nodes`` values cannot wrap (DESIGN §4).

    ``b = min(ring_bits - ceil(log2 n_nodes), 48)``; n counts the nodes in the context.

    Raises
    ------
    ValueError
        ``n_nodes < 1``, a ring other than 32 or 64, or too many nodes for the ring.
    """
    _check_ring(ring_bits)
    if (
        isinstance(n_nodes, bool)
        or not isinstance(n_nodes, (int, np.integer))
        or n_nodes < 1
    ):
        raise ValueError(f"expected n_nodes >= 1, got {n_nodes!r}")
    bits = min(ring_bits - (int(n_nodes) - 1).bit_length(), MAX_BITS)
    if bits < 1:
        raise ValueError(f"{n_nodes} nodes leave no bits in a {ring_bits}-bit ring")
    return bits


def protect_into(
    out: np.ndarray,
    x: np.ndarray,
    *,
    clipping_range: float,
    bits: int,
    ring_bits: int = 32,
    add_keys: Iterable[bytes] = (),
    sub_keys: Iterable[bytes] = (),
) -> tuple[np.ndarray, ClipStats]:
    """Clip, quantize and mask ``x`` into ``out`` (see :func:`protect`).

    ``out`` must be a writable, C-contiguous uint32 (ring 32) or uint64 (ring 64)
    array of ``len(x)`` that does not share memory with ``x``. On error its
    contents are unspecified.
    """
    x = _check_input(x)
    _check_ring(ring_bits)
    c = _check_clipping_range(clipping_range)
    bits = _check_bits(bits, ring_bits)
    keys, signs = _check_keys(add_keys, sub_keys)
    _check_output(out, x.shape[0], ring_bits)
    if np.may_share_memory(out, x):
        raise ValueError("out must not share memory with x")
    clipped, max_abs, nonfinite, first = _impl.protect_into(
        out, x, c, bits, keys, signs
    )
    if nonfinite:
        raise ValueError(
            f"x has {nonfinite} non-finite value(s) (NaN or inf); the first is at index {first}"
        )
    return out, ClipStats(
        size=int(x.shape[0]), clipped=int(clipped), max_abs=float(max_abs)
    )


def protect(
    x: np.ndarray,
    *,
    clipping_range: float,
    bits: int,
    ring_bits: int = 32,
    add_keys: Iterable[bytes] = (),
    sub_keys: Iterable[bytes] = (),
) -> tuple[np.ndarray, ClipStats]:
    """Clip ``x`` to [-c, c], quantize it to ``bits`` bits and mask it.

    ``y[i] = q[i] + sum(PRG(k)[i] for k in add_keys) - sum(PRG(k)[i] for k in sub_keys)``
    mod ``2**ring_bits``, with ``q = min(round_half_even((clip(x) + c) * s), 2**bits - 1)``
    and ``s = (2**bits - 1) / (2c)``, all in float64 (DESIGN §4). ``PRG(k)`` is
    AES-128-CTR under ``k`` from a zero counter block, read as little-endian words.

    Parameters
    ----------
    x
        1-D float32 or float64 array (any length, any strides).
    clipping_range
        c, finite and > 0.
    bits
        Bits per value, ``1 <= bits <= min(ring_bits, 48)``; see :func:`bits_for`.
    ring_bits
        32 (``y`` is uint32) or 64 (``y`` is uint64).
    add_keys, sub_keys
        16-byte AES keys whose keystreams are added or subtracted.

    Returns
    -------
    y, stats
        The masked vector and a :class:`ClipStats`.

    Raises
    ------
    TypeError
        ``x`` not a float32/float64 ndarray, or a key not bytes.
    ValueError
        ``x`` not 1-D; NaN or inf in ``x`` (with their count and first index); a
        key not 16 bytes; a bad ``clipping_range``, ``bits`` or ``ring_bits``.
    """
    ring_dtype = _check_ring(ring_bits)
    n = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 1 else 0
    return protect_into(
        np.empty(n, dtype=ring_dtype),
        x,
        clipping_range=clipping_range,
        bits=bits,
        ring_bits=ring_bits,
        add_keys=add_keys,
        sub_keys=sub_keys,
    )


def mask_integers(
    w: np.ndarray,
    *,
    offset: int,
    ring_bits: int = 32,
    add_keys: Iterable[bytes] = (),
    sub_keys: Iterable[bytes] = (),
) -> np.ndarray:
    """Mask raw ring words with keystream words ``offset .. offset+len(w)``.

    Nodes use it for the clip and canary words that follow a stream's ``d`` data
    words (``offset=d``). Returns a new array of the ring's dtype.

    Raises
    ------
    TypeError
        ``w`` not an integer ndarray, or a key not bytes.
    ValueError
        ``w`` not 1-D or with values outside [0, 2**ring_bits); a negative offset;
        a key not 16 bytes.
    """
    ring_dtype = _check_ring(ring_bits)
    if not isinstance(w, np.ndarray):
        raise TypeError(f"expected w to be a numpy.ndarray, got {type(w).__name__}")
    if w.dtype.kind not in "ui":
        raise TypeError(f"expected w of an integer dtype, got {w.dtype}")
    _check_vector(w, "w")
    if (
        isinstance(offset, bool)
        or not isinstance(offset, (int, np.integer))
        or offset < 0
    ):
        raise ValueError(f"expected an integer offset >= 0, got {offset!r}")
    if w.size and (int(w.min()) < 0 or int(w.max()) >= 1 << ring_bits):
        raise ValueError(f"expected words in [0, 2**{ring_bits})")
    keys, signs = _check_keys(add_keys, sub_keys)
    out = np.array(w, dtype=ring_dtype, order="C", copy=True)
    _impl.mask_into(out, int(offset), keys, signs)
    return out


# --- server side ----------------------------------------------------------------


def unmask(
    s: np.ndarray,
    *,
    add_keys: Iterable[bytes] = (),
    sub_keys: Iterable[bytes] = (),
    ring_bits: int | None = None,
) -> np.ndarray:
    """Undo ``protect(..., add_keys=A, sub_keys=B)``: subtract A's keystreams, add B's.

    Works on a single masked vector or on a sum (the server's dropout recovery:
    remove the self masks of the survivors and the pair masks of the dropouts).
    The ring is ``s``'s dtype; ``ring_bits``, if given, must agree. Returns a new
    array.

    Raises
    ------
    TypeError
        ``s`` not a uint32/uint64 ndarray, or a key not bytes.
    ValueError
        ``s`` not 1-D, ``ring_bits`` disagreeing with ``s``, a key not 16 bytes.
    """
    ring = _ring_of(s, "s")
    _check_vector(s, "s")
    if ring_bits is not None and _check_ring(ring_bits) != s.dtype:
        raise ValueError(
            f"expected s of dtype {_RING_DTYPES[ring_bits]} for ring_bits={ring_bits}, got {s.dtype}"
        )
    # Undoing means swapping roles: what was added is subtracted and vice versa.
    keys, signs = _check_keys(sub_keys, add_keys)
    out = np.array(s, dtype=_RING_DTYPES[ring], order="C", copy=True)
    _impl.mask_into(out, 0, keys, signs)
    return out


def accumulate_into(acc: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``acc += v`` mod the ring of ``acc.dtype`` (uint32 or uint64), in place.

    For masked vectors that arrive one by one. Returns ``acc``.

    Raises
    ------
    TypeError
        ``acc`` or ``v`` not a uint32/uint64 ndarray, or of different dtypes.
    ValueError
        Not 1-D, different lengths, ``acc`` not writable and C-contiguous, or
        ``acc`` and ``v`` sharing memory.
    """
    ring = _ring_of(acc, "acc")
    _check_vector(acc, "acc")
    _check_output(acc, acc.shape[0], ring)
    _impl.sum_into(acc, [_check_addend(v, acc)])
    return acc


def _check_addend(v: np.ndarray, acc: np.ndarray) -> np.ndarray:
    if _ring_of(v, "each vector") != _ring_of(acc, "acc"):
        raise TypeError(f"expected vectors of dtype {acc.dtype}, got {v.dtype}")
    _check_vector(v, "each vector")
    if v.shape != acc.shape:
        raise ValueError(f"expected vectors of length {acc.shape[0]}, got {v.shape[0]}")
    if np.may_share_memory(v, acc):
        raise ValueError("a vector must not share memory with the accumulator")
    return np.ascontiguousarray(v)


def sum_masked(vectors: Iterable[np.ndarray], ring_bits: int = 32) -> np.ndarray:
    """The sum of masked vectors mod ``2**ring_bits``, as a new array.

    Streams: it holds at most a few vectors at a time, so any iterable (a
    generator reading uploads from disk or the network) works in memory
    independent of how many it yields.

    Raises
    ------
    TypeError
        A vector not an ndarray of the ring's dtype (uint32 or uint64).
    ValueError
        No vectors, a vector not 1-D, or vectors of different lengths.
    """
    ring_dtype = _check_ring(ring_bits)
    it = iter(vectors)
    first = next(it, None)
    if first is None:
        raise ValueError("sum_masked needs at least one vector")
    if _ring_of(first, "each vector") != ring_bits:
        raise TypeError(f"expected vectors of dtype {ring_dtype}, got {first.dtype}")
    _check_vector(first, "each vector")
    acc = np.array(first, dtype=ring_dtype, order="C", copy=True)
    while batch := [_check_addend(v, acc) for v in islice(it, _SUM_BATCH)]:
        _impl.sum_into(acc, batch)
    return acc


def dequantize_sum(
    s: np.ndarray, n: int, *, clipping_range: float, bits: int
) -> np.ndarray:
    """The float64 sum of ``n`` original vectors from their exact quantized sum.

    ``((s * 2c) / (2**bits - 1)) - n * c`` in float64 (DESIGN §4); the error per
    element is at most ``n * c / (2**bits - 1)`` plus clipping. ``n`` counts the
    contributors and ``bits`` is the value :func:`bits_for` gave for the context.

    Raises
    ------
    ValueError
        A word above ``n * (2**bits - 1)``: the masks did not cancel, so the sum
        is garbage and is never returned. Also a bad ``n``, ``bits`` or range.
    TypeError
        ``s`` not a uint32/uint64 ndarray.
    """
    ring = _ring_of(s, "s")
    c = _check_clipping_range(clipping_range)
    bits = _check_bits(bits, ring)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"expected n >= 1 contributors, got {n!r}")
    _check_vector(s, "s")
    top = 2**bits - 1
    out = np.empty(s.shape[0], dtype=np.float64)
    bound = min(int(n) * top, 2**ring - 1)
    over = _impl.dequantize_into(
        out, np.ascontiguousarray(s), 2.0 * c, float(top), float(n) * c, bound
    )
    if over:
        raise ValueError(
            f"{over} summed word(s) exceed n*(2**bits - 1) for n={n}, bits={bits}: "
            "the masks did not cancel"
        )
    return out


def clip_histogram(
    x: np.ndarray, *, clipping_range: float
) -> tuple[int, int, int, int]:
    """Counts of ``|x|/c`` in (1, 2], (2, 4], (4, 8] and above 8 (DESIGN §4).

    The four counts add up to ``ClipStats.clipped``. Bounds are compared as
    ``|x| > k*c``, exact for these powers of two, so they agree with the clip test.
    """
    c = _check_clipping_range(clipping_range)
    a = np.abs(_check_input(x))
    # One float64 comparison over x (a strong float64 scalar keeps numpy from rounding
    # c to float32), then the bins over the few clipped values only.
    beyond = a[a > np.float64(c)].astype(np.float64)
    over = [int(beyond.size)] + [
        int(np.count_nonzero(beyond > k * c)) for k in (2.0, 4.0, 8.0)
    ]
    return (over[0] - over[1], over[1] - over[2], over[2] - over[3], over[3])
