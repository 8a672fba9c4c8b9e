# SPDX-License-Identifier: Apache-2.0
"""Typed stub of ``mpc_runtime.masking._native``, the compiled masking kernel.

Hazmat: use ``mpc_runtime.masking``. Arrays travel through the buffer protocol;
``collections.abc.Buffer`` needs Python 3.12 (or ``typing_extensions``, not a
dependency), so the accepted buffer types are spelled out. Errors are only
``TypeError``, ``ValueError``, ``BufferError`` and ``MemoryError``.
"""

import array
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

_ReadBuffer: TypeAlias = (
    bytes
    | bytearray
    | memoryview
    | array.array[int]
    | array.array[float]
    | npt.NDArray[np.generic]
)
_WriteBuffer: TypeAlias = (
    bytearray | memoryview | array.array[int] | npt.NDArray[np.generic]
)

def available() -> tuple[str, ...]:
    """Kernel variants this CPU runs, best first (may be empty)."""

def select(name: str, /) -> None:
    """Use that variant; ``ValueError`` if unknown or not runnable here."""

def selected() -> str | None:
    """The variant in use, ``None`` if this CPU runs none."""

def protect_into(
    out: _WriteBuffer,
    x: _ReadBuffer,
    c: float,
    bits: int,
    keys: _ReadBuffer,
    signs: _ReadBuffer,
) -> tuple[int, float, int, int]:
    """Quantize ``x`` (float32/float64) into ``out`` (uint32/uint64) and mask it.

    ``keys`` holds 16 bytes per key, ``signs`` one byte per key (0x01 adds that
    key's AES-128-CTR keystream, 0xff subtracts it). Returns ``(clipped, max_abs,
    nonfinite, first_nonfinite)``; with ``nonfinite > 0`` the content of ``out`` is
    unspecified.
    """

def mask_into(
    w: _WriteBuffer, offset: int, keys: _ReadBuffer, signs: _ReadBuffer
) -> None:
    """In place: ``w[i] += sum_j sign_j * keystream_j word (offset + i)``."""

def sum_into(acc: _WriteBuffer, vectors: Sequence[_ReadBuffer]) -> None:
    """In place: ``acc += sum(vectors)`` mod 2^32 or 2^64 (a list or tuple)."""

def keystream(key: _ReadBuffer, iv: _ReadBuffer, nbytes: int) -> bytes:
    """Test hook: raw AES-128-CTR keystream from the initial counter block ``iv``."""
