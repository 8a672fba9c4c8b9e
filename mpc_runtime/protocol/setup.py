# SPDX-License-Identifier: Apache-2.0
"""Context setup derivations (DESIGN §3): context_id, transcript T, threshold floor."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from ..encoding import encode
from ..errors import ConfigError
from ..messages import PROTOCOL_VERSION, ContextAdvertEntry

__all__ = [
    "compute_context_id",
    "compute_transcript",
    "threshold_floor",
    "check_threshold",
    "utf8_sorted",
]


def utf8_sorted(ids: Iterable[str]) -> tuple[str, ...]:
    """Return ``ids`` sorted by UTF-8 bytes (DESIGN §3's one order for ids)."""
    return tuple(sorted(ids, key=lambda v: v.encode("utf-8")))


def compute_context_id(
    *,
    researcher_id: str,
    job_id: str,
    nodes: Sequence[str],
    ring_bits: int,
    bits: int,
    clipping_range: float,
    threshold: int,
    nonce: bytes,
) -> bytes:
    """Return ``context_id = SHA-256(encode("context", version, researcher id, job_id,
    sorted node ids, ring_bits, b, clipping_range, t, nonce))`` (DESIGN §3).

    ``sorted node ids`` is one list field (8-byte count, then each id);
    ``clipping_range`` is the IEEE-754 float64 big-endian field of the encoding.

    Raises
    ------
    TypeError, ValueError
        A field the encoding refuses.
    """
    return hashlib.sha256(
        encode(
            "context",
            PROTOCOL_VERSION,
            researcher_id,
            job_id,
            list(utf8_sorted(nodes)),
            ring_bits,
            bits,
            float(clipping_range),
            threshold,
            nonce,
        )
    ).digest()


def compute_transcript(
    context_id: bytes, adverts: Iterable[ContextAdvertEntry]
) -> bytes:
    """Return ``T = SHA-256(encode("transcript", context_id, then (id, E_u, signature)
    per node in id order))`` (DESIGN §3).

    The per-node triples are flattened into the field list (``id, E, sig, id, E,
    sig, ...``); the node count is fixed by ``context_id``, so this is injective.
    """
    fields: list[object] = [context_id]
    for entry in sorted(adverts, key=lambda a: a.node.encode("utf-8")):
        fields += [entry.node, entry.share_key, entry.signature]
    return hashlib.sha256(encode("transcript", *fields)).digest()


def threshold_floor(n_nodes: int, max_colluding_nodes: int = 0) -> int:
    """Return the smallest admissible threshold ``⌊(n + κ)/2⌋ + 1`` (DESIGN §3)."""
    return (n_nodes + max_colluding_nodes) // 2 + 1


def check_threshold(threshold: int, n_nodes: int, max_colluding_nodes: int = 0) -> None:
    """Check ``⌊(n + κ)/2⌋ + 1 ≤ t ≤ n``, ``n ≥ 2`` and ``κ ≤ n − 2`` (DESIGN §3).

    Raises
    ------
    ConfigError
        Any of the bounds does not hold.
    """
    if n_nodes < 2:
        raise ConfigError(f"expected at least 2 nodes, got {n_nodes}")
    if not 0 <= max_colluding_nodes <= n_nodes - 2:
        raise ConfigError(
            f"expected 0 <= max_colluding_nodes <= n - 2 = {n_nodes - 2}, "
            f"got {max_colluding_nodes}"
        )
    floor = threshold_floor(n_nodes, max_colluding_nodes)
    if not floor <= threshold <= n_nodes:
        raise ConfigError(
            f"expected threshold in [{floor}, {n_nodes}], got {threshold}"
        )
