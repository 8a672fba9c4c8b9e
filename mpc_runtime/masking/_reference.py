# SPDX-License-Identifier: Apache-2.0
"""The numpy reference of the masking kernel: the test oracle and the fallback.

It draws keystreams from ``cryptography``'s AES-128-CTR (OpenSSL, an implementation
independent of ours) and does the arithmetic in numpy. It is obviously correct and
never clever; speed lives in ``_native``. Its functions take the same already
validated arguments as ``_native``'s (see ``mpc_runtime.masking``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_BLOCK = 16


def available() -> tuple[str, ...]:
    return ("reference",)


def keystream(key: bytes, iv: bytes, nbytes: int) -> bytes:
    """Raw AES-128-CTR keystream from the initial counter block ``iv``."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()


def _words(key: bytes, offset: int, n: int, dtype: np.dtype) -> np.ndarray:
    """Keystream words ``offset .. offset+n`` of ``key`` (DESIGN §3: little-endian)."""
    size = dtype.itemsize
    first_byte = offset * size
    block, skip = divmod(first_byte, _BLOCK)
    # SP 800-38A §6.5: counter block j is the initial block plus j, so starting at
    # block `block` is the same as starting from an initial block equal to `block`.
    iv = block.to_bytes(_BLOCK, "big")
    raw = keystream(key, iv, skip + n * size)[skip:]
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def mask_into(w: np.ndarray, offset: int, keys: bytes, signs: bytes) -> None:
    n = w.shape[0]
    for j, sign in enumerate(signs):
        ks = _words(keys[16 * j : 16 * j + 16], offset, n, w.dtype)
        if sign == 1:
            np.add(w, ks, out=w)
        else:
            np.subtract(w, ks, out=w)


def protect_into(
    out: np.ndarray, x: np.ndarray, c: float, bits: int, keys: bytes, signs: bytes
) -> tuple[int, float, int, int]:
    # DESIGN §4, all in float64 and in exactly this order.
    x64 = x.astype(np.float64)
    finite = np.isfinite(x64)
    nonfinite = int(x64.size - np.count_nonzero(finite))
    if nonfinite:
        return 0, 0.0, nonfinite, int(np.argmin(finite))
    absx = np.abs(x64)
    clipped = int(np.count_nonzero(absx > c))
    max_abs = float(absx.max()) if absx.size else 0.0
    top = float(2**bits - 1)
    scale = top / (2.0 * c)
    q = np.rint((np.minimum(np.maximum(x64, -c), c) + c) * scale)
    np.minimum(q, top, out=q)
    out[...] = q.astype(out.dtype)
    mask_into(out, 0, keys, signs)
    return clipped, max_abs, 0, 0


def sum_into(acc: np.ndarray, vectors: Sequence[np.ndarray]) -> None:
    for v in vectors:
        np.add(acc, v, out=acc)


def dequantize_into(
    out: np.ndarray, s: np.ndarray, two_c: float, top: float, nc: float, bound: int
) -> int:
    # DESIGN §4: ((S * 2c) / (2^b - 1)) - m*c in float64, in exactly that order.
    over = int(np.count_nonzero(s > bound))
    np.multiply(s, two_c, out=out)
    np.divide(out, top, out=out)
    np.subtract(out, nc, out=out)
    return over
