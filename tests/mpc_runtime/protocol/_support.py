# SPDX-License-Identifier: Apache-2.0
"""Test support: an independent numpy quantizer; what the researcher can rebuild."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations

import numpy as np

from mpc_runtime import keys, sharing
from mpc_runtime.errors import AuthenticationError, MalformedMessage
from mpc_runtime.memory import Seen
from mpc_runtime.messages import MaskedInput, RoundAdvert, UnmaskShares


def reference_bits(n: int, ring_bits: int) -> int:
    """b = min(ring − ⌈log2 n⌉, 48), computed here without mpc_runtime (DESIGN §4)."""
    return min(ring_bits - (n - 1).bit_length(), 48)


def reference_quantize(
    x: np.ndarray, *, clipping_range: float, bits: int
) -> np.ndarray:
    """q = min(round_half_even((clip(x) + c)·s), 2^b − 1), in float64.

    With s = (2^b − 1)/(2c).
    """
    c = float(clipping_range)
    top = float(2**bits - 1)
    s = top / (2.0 * c)
    q = np.rint((np.clip(x.astype(np.float64).ravel(), -c, c) + c) * s)
    return np.minimum(q, top).astype(np.uint64)


def expected_integer_sum(
    inputs: Iterable[np.ndarray], *, clipping_range: float, bits: int, ring_bits: int
) -> np.ndarray:
    total = None
    for x in inputs:
        q = reference_quantize(x, clipping_range=clipping_range, bits=bits).astype(
            object
        )
        total = q if total is None else total + q
    assert total is not None
    return (total % (1 << ring_bits)).astype(np.uint64)


def _recoverable(
    shares: list[sharing.Share], t: int, size: int, accept
) -> bytes | None:
    """Try every t-subset (small in tests) the way a researcher would."""
    by_x = {s.x: s for s in shares}
    for subset in combinations(by_x.values(), t):
        try:
            secret = sharing.combine(list(subset), threshold=t, secret_size=size)
        except (AuthenticationError, MalformedMessage):
            continue
        if accept(secret):
            return secret
    return None


def attacker_secrets(
    seen: list[Seen], *, round: int, threshold: int, transcript: bytes
):  # noqa: A002
    """Everything the researcher can reconstruct for ``round`` from what it saw.

    Returns ``(uploads, seeds, c_secrets)``: the masked uploads it received, the
    self seeds b_u it can rebuild (checked against the commitment) and the round
    keys c_u it can rebuild (checked against C_u).
    """
    uploads: dict[str, MaskedInput] = {}
    adverts: dict[str, RoundAdvert] = {}
    b: dict[str, list[sharing.Share]] = {}
    c: dict[str, list[sharing.Share]] = {}
    for item in seen:
        msg = item.message
        if item.direction != "in" or msg.round != round:
            continue
        if isinstance(msg, MaskedInput):
            uploads[msg.sender] = msg
        elif isinstance(msg, RoundAdvert):
            adverts[msg.sender] = msg
        elif isinstance(msg, UnmaskShares):
            for u, raw in msg.b_shares.items():
                b.setdefault(u, []).append(sharing.Share.from_bytes(raw))
            for u, raw in msg.c_shares.items():
                c.setdefault(u, []).append(sharing.Share.from_bytes(raw))
    seeds = {}
    for u, shares in b.items():
        if u in uploads:
            want = uploads[u].commitment
            seed = _recoverable(
                shares,
                threshold,
                keys.SEED_SIZE,
                lambda s, u=u, want=want: (
                    keys.seed_commitment(s, transcript=transcript, round=round, node=u)
                    == want
                ),
            )
            if seed is not None:
                seeds[u] = seed
    c_secrets = {}
    for u, shares in c.items():
        if u in adverts:
            public = adverts[u].mask_key
            secret = _recoverable(
                shares,
                threshold,
                keys.SECRET_KEY_SIZE,
                lambda s, public=public: keys.x25519_public(s) == public,
            )
            if secret is not None:
                c_secrets[u] = secret
    return uploads, seeds, c_secrets


def attacker_can_unmask(
    seen: list[Seen],
    node: str,
    *,
    round: int,
    threshold: int,  # noqa: A002
    transcript: bytes,
) -> bool:
    """Whether the researcher's view lets it strip every mask off ``node``'s upload.

    It needs the upload, ``b_node`` (self mask) and, for the pair masks, either
    ``c_node`` or ``c_v`` of every peer in the upload's peer set.
    """
    uploads, seeds, c_secrets = attacker_secrets(
        seen, round=round, threshold=threshold, transcript=transcript
    )
    if node not in uploads or node not in seeds:
        return False
    peers = uploads[node].peers
    return node in c_secrets or all(v in c_secrets for v in peers)


def revealed_counts(
    seen: list[Seen], *, round: int
) -> tuple[dict[str, int], dict[str, int]]:  # noqa: A002
    """How many b- and c-shares of each node the researcher received in ``round``."""
    b: dict[str, int] = {}
    c: dict[str, int] = {}
    for item in seen:
        msg = item.message
        if (
            item.direction == "in"
            and msg.round == round
            and isinstance(msg, UnmaskShares)
        ):
            for u in msg.b_shares:
                b[u] = b.get(u, 0) + 1
            for u in msg.c_shares:
                c[u] = c.get(u, 0) + 1
    return b, c
