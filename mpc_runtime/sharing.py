# SPDX-License-Identifier: Apache-2.0
"""Shamir t-of-n secret sharing over GF(2**521 - 1) (DESIGN §3); hazmat.

A secret is a short byte string (a 32-byte X25519 scalar ``c_u^r`` or a 16-byte seed
``b_u^r``) read as a big-endian integer below the Mersenne prime ``p = 2**521 - 1``.
:func:`split` hides it in the constant term of a random polynomial of degree t − 1
whose other coefficients come from :func:`secrets.randbelow`, and gives the holder
with 1-based index x (its position in the sorted node order) the point (x, f(x)).
Any t points determine f and so f(0) (:func:`combine`); any t − 1 points are
consistent with every secret, so they reveal nothing (perfect secrecy).

.. warning::
   The field arithmetic uses CPython integers, which are **not constant time**:
   the time of a multiplication or inversion depends on the operands' sizes. This
   is a known limitation, accepted because shares are made for one round and never
   reused, the shared secrets are erased when the round closes, and an attacker
   observes at most a handful of operations per secret. Do not reuse this module
   for long-lived secrets.

Share values never appear in a repr, message or log: ``Share.y`` is excluded from
the dataclass repr and errors name lengths and indices only.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, TypeGuard

from mpc_runtime.errors import AuthenticationError, MalformedMessage, ThresholdError

__all__ = [
    "PRIME",
    "X_SIZE",
    "Y_SIZE",
    "SHARE_SIZE",
    "MAX_SECRET_SIZE",
    "Share",
    "split",
    "combine",
]

#: The field modulus, the Mersenne prime 2**521 - 1 (DESIGN §3).
PRIME: Final = 2**521 - 1
#: Bytes of the index x in :meth:`Share.to_bytes` (big-endian).
X_SIZE: Final = 8
#: Bytes of the value y in :meth:`Share.to_bytes`: ⌈521 / 8⌉ = 66 (big-endian).
Y_SIZE: Final = (PRIME.bit_length() + 7) // 8
#: Length of a serialized share.
SHARE_SIZE: Final = X_SIZE + Y_SIZE
#: The longest secret: every 65-byte integer is below 2**520 < p, so it is a field
#: element and decodes back to itself.
MAX_SECRET_SIZE: Final = (PRIME.bit_length() - 1) // 8
_X_LIMIT: Final = 1 << (8 * X_SIZE)


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, but True as an index is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Share:
    """One point (x, y) of a sharing polynomial.

    Parameters
    ----------
    x
        The holder's 1-based index in sorted node order, 1 ≤ x < 2**64.
    y
        f(x), a field element 0 ≤ y < :data:`PRIME`. Secret: not in the repr.

    Raises
    ------
    TypeError
        x or y is not an int.
    ValueError
        x or y is out of range.
    """

    x: int
    y: int = field(repr=False)

    def __post_init__(self) -> None:
        if not _is_int(self.x) or not _is_int(self.y):
            raise TypeError("expected int x and y")
        if not 1 <= self.x < _X_LIMIT:
            raise ValueError(f"expected 1 <= x < 2**64, got x={self.x}")
        if not 0 <= self.y < PRIME:
            # The value itself is a share, so the message does not show it.
            raise ValueError("expected 0 <= y < PRIME")

    def to_bytes(self) -> bytes:
        """Return 8-byte big-endian x then 66-byte big-endian y (74 bytes)."""
        return self.x.to_bytes(X_SIZE, "big") + self.y.to_bytes(Y_SIZE, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Decode :meth:`to_bytes` output, as received from a peer.

        Parameters
        ----------
        data
            Exactly :data:`SHARE_SIZE` (74) bytes.

        Returns
        -------
        Share

        Raises
        ------
        MalformedMessage
            Not bytes, a wrong length, x = 0 or y ≥ p.
        """
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise MalformedMessage(f"share: expected bytes, got {type(data).__name__}")
        if len(data) != SHARE_SIZE:
            raise MalformedMessage(
                f"share: expected {SHARE_SIZE} bytes, got {len(data)}"
            )
        x = int.from_bytes(data[:X_SIZE], "big")
        y = int.from_bytes(data[X_SIZE:], "big")
        if x == 0:
            raise MalformedMessage("share: x must be >= 1")
        if y >= PRIME:
            raise MalformedMessage("share: y is not a field element")
        return cls(x, y)


def _check_secret_size(secret_size: object) -> int:
    if not _is_int(secret_size):
        raise TypeError(f"secret_size: expected int, got {type(secret_size).__name__}")
    if not 1 <= secret_size <= MAX_SECRET_SIZE:
        raise ValueError(
            f"secret_size: expected 1..{MAX_SECRET_SIZE} bytes, got {secret_size}"
        )
    return secret_size


def _check_threshold(threshold: object) -> int:
    if not _is_int(threshold):
        raise TypeError(f"threshold: expected int, got {type(threshold).__name__}")
    if threshold < 1:
        raise ValueError(f"threshold: expected >= 1, got {threshold}")
    return threshold


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Split ``secret`` into one share per index in ``xs``, any ``threshold`` of
    which reconstruct it.

    Parameters
    ----------
    secret
        1 to 65 bytes (16 or 32 in the protocol), read as a big-endian integer.
    threshold
        t, with 1 ≤ t ≤ len(xs). t = 1 gives every holder the secret itself.
    xs
        Distinct indices 1 ≤ x < 2**64: the holders' 1-based positions in sorted
        node order.

    Returns
    -------
    list of Share
        ``Share(x, f(x))`` for each x in ``xs``, in the same order.

    Raises
    ------
    TypeError
        Arguments of the wrong type.
    ValueError
        A secret of the wrong length, t out of range, or indices out of range or
        repeated.

    Notes
    -----
    The t − 1 non-constant coefficients are independent and uniform in GF(p), drawn
    with :func:`secrets.randbelow` (DESIGN §3: the OS CSPRNG, never ``random``);
    uniform coefficients, zero included, are what makes t − 1 shares independent of
    the secret. The secret's length is not hidden: the caller fixes it.
    """
    if isinstance(secret, (bytearray, memoryview)):
        secret = bytes(secret)
    if not isinstance(secret, bytes):
        raise TypeError(f"secret: expected bytes, got {type(secret).__name__}")
    if not 1 <= len(secret) <= MAX_SECRET_SIZE:
        raise ValueError(
            f"secret: expected 1..{MAX_SECRET_SIZE} bytes, got {len(secret)}"
        )
    threshold = _check_threshold(threshold)
    indices = list(xs)
    for x in indices:
        if not _is_int(x):
            raise TypeError(f"xs: expected int indices, got {type(x).__name__}")
        if not 1 <= x < _X_LIMIT:
            raise ValueError(f"xs: expected 1 <= x < 2**64, got {x}")
    if len(set(indices)) != len(indices):
        raise ValueError("xs: indices must be distinct")
    if threshold > len(indices):
        raise ValueError(
            f"threshold: expected <= len(xs) = {len(indices)}, got {threshold}"
        )

    # f(X) = s + a_1 X + ... + a_{t-1} X^{t-1}; stored highest degree first for Horner.
    coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    coefficients.reverse()
    coefficients.append(int.from_bytes(secret, "big"))
    shares: list[Share] = []
    for x in indices:
        y = 0
        for a in coefficients:
            y = (y * x + a) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share], *, threshold: int, secret_size: int) -> bytes:
    """Reconstruct a secret from the first ``threshold`` of ``shares``.

    Lagrange interpolation at 0: ``f(0) = Σ_i y_i · Π_{j≠i} x_j / (x_j − x_i)``.
    Exactly ``shares[:threshold]`` are used; to try other t-subsets (DESIGN §3: with
    more than t shares, a bad one is worked around), the caller reorders.

    Parameters
    ----------
    shares
        At least ``threshold`` shares with distinct x.
    threshold
        t, the degree of the polynomial plus one.
    secret_size
        The secret's fixed length in bytes (1 to 65).

    Returns
    -------
    bytes
        The secret, big-endian, exactly ``secret_size`` bytes.

    Raises
    ------
    ThresholdError
        Fewer than ``threshold`` shares.
    MalformedMessage
        Two shares with the same x, or an item that is not a :class:`Share`.
    AuthenticationError
        The interpolated value does not fit in ``secret_size`` bytes, so at least one
        share was tampered with or belongs to another secret. A tampered share may
        also yield a different in-range value; the protocol catches that later (the
        seed commitment, or ``X25519_base(c) == C``).
    TypeError, ValueError
        ``threshold`` or ``secret_size`` of the wrong type or out of range.
    """
    threshold = _check_threshold(threshold)
    secret_size = _check_secret_size(secret_size)
    points = list(shares)
    for share in points:
        if not isinstance(share, Share):
            raise MalformedMessage(f"expected Share, got {type(share).__name__}")
    if len(points) < threshold:
        raise ThresholdError(f"need {threshold} shares, got {len(points)}")
    seen: set[int] = set()
    for share in points:
        if share.x in seen:
            # DESIGN §3: duplicate x values are rejected; interpolation would divide
            # by zero, and two holders claiming one index is a protocol violation.
            raise MalformedMessage(f"duplicate share index x={share.x}")
        seen.add(share.x)

    used = points[:threshold]
    value = 0
    for i, share_i in enumerate(used):
        numerator = 1
        denominator = 1
        for j, share_j in enumerate(used):
            if i != j:
                numerator = numerator * share_j.x % PRIME
                denominator = denominator * (share_j.x - share_i.x) % PRIME
        # p is prime and the x are distinct and below p, so the denominator is a
        # unit; pow(d, -1, p) is its inverse (Python ≥ 3.8).
        value = (value + share_i.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if value >= 1 << (8 * secret_size):
        raise AuthenticationError("shares are inconsistent") from None
    return value.to_bytes(secret_size, "big")
