# SPDX-License-Identifier: Apache-2.0
"""The one injective byte encoding of DESIGN §3 for KDF info, signed payloads and AEAD data.

``encode(label, *fields)`` is ``b"secagg/v1/" + label + b"\\0"`` followed by each field,
length-prefixed so that no two different field lists give the same bytes:

============================  ===============================================
Python value                  bytes
============================  ===============================================
``int`` (0 ≤ i < 2**64)        8-byte big-endian
``float``                     IEEE-754 binary64, big-endian
``str`` (an id, a stream)     4-byte big-endian length, then UTF-8
``bytes``/``bytearray``       4-byte big-endian length, then the bytes
``list``/``tuple``            8-byte big-endian count, then each item
``set``/``frozenset``         as a list, sorted by the items' UTF-8 bytes
============================  ===============================================

``bool`` and negative integers are refused: they would make two meanings share bytes.
No other concatenation is used anywhere in the protocol.

The encoding is injective for a fixed field layout, not across layouts (``"a"`` and
``b"a"`` encode alike): each label has one layout, and no peer chooses a field's type.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

__all__ = ["DOMAIN", "PROTOCOL_VERSION", "encode", "encode_fields"]

#: One integer for the whole protocol (re-exported by :mod:`mpc_runtime.messages`).
#: It is bound into every signature, KDF info and AEAD data through :data:`DOMAIN`,
#: so there is no downgrade; any change to encoded bytes bumps it.
PROTOCOL_VERSION: Final = 1
#: The prefix of every encoding, derived from the version so the two cannot drift.
DOMAIN: Final = b"secagg/v%d/" % PROTOCOL_VERSION

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


def _field(value: object, out: bytearray) -> None:
    if isinstance(value, bool):
        raise TypeError("expected int, got bool (ambiguous in the encoding)")
    if isinstance(value, int):
        if not 0 <= value < 1 << 64:
            raise ValueError(f"expected an integer in [0, 2**64), got {value}")
        out += _U64.pack(value)
    elif isinstance(value, float):
        out += _F64.pack(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out += _U32.pack(len(raw)) + raw
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) >= 1 << 32:
            raise ValueError("byte string too long for a 4-byte length prefix")
        out += _U32.pack(len(raw)) + raw
    elif isinstance(value, (list, tuple)):
        out += _U64.pack(len(value))
        for item in value:
            _field(item, out)
    elif isinstance(value, (set, frozenset)):
        # DESIGN §3: sets are sorted by the UTF-8 bytes of their items (ids).
        out += _U64.pack(len(value))
        for item in sorted(value, key=_sort_key):
            _field(item, out)
    else:
        raise TypeError(
            f"expected int, float, str, bytes, list or set, got {type(value).__name__}"
        )


def _sort_key(item: object) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    raise TypeError(
        f"expected a set of str or bytes, got an item of type {type(item).__name__}"
    )


def encode_fields(fields: Iterable[object]) -> bytes:
    """Encode fields without the domain prefix (used for nested values)."""
    out = bytearray()
    for value in fields:
        _field(value, out)
    return bytes(out)


def encode(label: str, *fields: object) -> bytes:
    """Return ``b"secagg/v1/" + label + b"\\0"`` followed by the encoded fields.

    Raises
    ------
    TypeError
        A field of a type the encoding does not define.
    ValueError
        An integer outside [0, 2**64) or a label containing NUL.
    """
    raw = label.encode("ascii")
    if b"\0" in raw:
        raise ValueError("label must not contain NUL")
    return DOMAIN + raw + b"\0" + encode_fields(fields)
