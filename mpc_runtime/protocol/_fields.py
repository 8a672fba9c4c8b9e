# SPDX-License-Identifier: Apache-2.0
"""Typed reads of decoded plain data (msgpack or JSON documents of saved state).

Each returns its value if it has the expected type (and bound), else raises
TypeError/ValueError; the caller turns that into its own ConfigError naming the
document. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def as_bytes(value: object, max_size: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    if max_size is not None and len(value) > max_size:
        raise ValueError(f"expected at most {max_size} bytes, got {len(value)}")
    return value


def as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def as_str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def as_list(value: object, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"expected a list of {length}, got {len(value)}")
    return value


def as_strs(value: object) -> tuple[str, ...]:
    return tuple(as_str(v) for v in as_list(value))


def as_map(value: object) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a map, got {type(value).__name__}")
    return value
