# SPDX-License-Identifier: Apache-2.0
"""Official and custom test vectors, and the one reader for them."""

from __future__ import annotations

from pathlib import Path

VECTORS_DIR = Path(__file__).parent


def load_kv(name: str) -> list[dict[str, str]]:
    """Read ``KEY = value`` records separated by blank lines (PyNaCl's
    ``read_kv_test_vectors`` style). Lines starting with ``#`` are comments;
    values are stripped and kept as text (hex stays hex)."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in (VECTORS_DIR / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if not line:
            if current:
                records.append(current)
                current = {}
            continue
        key, _, value = line.partition("=")
        current[key.strip()] = value.strip()
    if current:
        records.append(current)
    return records
