# SPDX-License-Identifier: Apache-2.0
"""Round derivations (DESIGN §3/§4): D_r, the clip and canary words, results."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .. import masking
from ..encoding import encode, encode_fields
from ..messages import (
    MASK_EXTRA_WORDS,
    RoundRequest,
    StreamSpec,
    Tensor,
    canonical_args,
)

if TYPE_CHECKING:
    # collections.abc.Buffer needs Python 3.12; typeshed ships this stub.
    from typing_extensions import Buffer

__all__ = [
    "weights_hash",
    "request_digest",
    "clip_cap",
    "extra_words",
    "ClipTotals",
    "RoundResult",
]

_U32 = struct.Struct(">I")


def weights_hash(weights: Sequence[Tensor]) -> bytes:
    """Return the weights hash of DESIGN §3, without copying the tensors.

    It is ``SHA-256(encode("weights", count, then name, dtype, shape, little-endian
    bytes per tensor in order))``: dtype is the numpy name (``"float32"``), shape a
    list of integers, the bytes a byte-string field. The hash is fed incrementally
    with exactly those bytes, so a 10^6-parameter model is never concatenated.
    """
    h = hashlib.sha256(encode("weights", len(weights)))
    for tensor in weights:
        data = np.ascontiguousarray(
            tensor.data, dtype=tensor.data.dtype.newbyteorder("<")
        )
        h.update(encode_fields([tensor.name, data.dtype.name, list(data.shape)]))
        h.update(_U32.pack(data.nbytes))
        # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12.
        h.update(memoryview(cast("Buffer", data)).cast("B") if data.size else b"")
    return h.digest()


def request_digest(transcript: bytes, request: RoundRequest) -> bytes:
    """Return ``D_r`` as this node computes it from the request it received (DESIGN §3).

    ``SHA-256(encode("request", T, r, kind, name, args as RFC 8785 JSON bytes,
    weights hash, [[stream, [dim...]]...]))``. ``kind`` ("task" or "plan") is its own
    field so that a task and a plan of the same name never share a digest.
    """
    streams = [[s.name, list(s.shape)] for s in request.streams]
    return hashlib.sha256(
        encode(
            "request",
            transcript,
            request.round,
            request.kind,
            request.name,
            canonical_args(request.args),
            weights_hash(request.weights),
            streams,
        )
    ).digest()


def clip_cap(ring_bits: int, n_nodes: int) -> int:
    """Each clip word saturates at ``⌊(2^ring − 1)/n⌋`` (DESIGN §4).

    So the total over n nodes cannot wrap.
    """
    return ((1 << ring_bits) - 1) // n_nodes


def extra_words(
    x: np.ndarray[Any, Any],
    *,
    clipping_range: float,
    clipped: int,
    ring_bits: int,
    n_nodes: int,
) -> np.ndarray[Any, Any]:
    """The 6 words after a stream's data (DESIGN §3/§4).

    Clipped count, |x|/c histogram (1,2], (2,4], (4,8], >8, each saturating at
    :func:`clip_cap`, then the canary word 1.
    """
    cap = clip_cap(ring_bits, n_nodes)
    # Nothing beyond ±c means an all-zero histogram: skip the pass over x.
    hist = (
        masking.clip_histogram(x, clipping_range=clipping_range)
        if clipped
        else (0, 0, 0, 0)
    )
    words = [min(clipped, cap), *(min(h, cap) for h in hist), 1]
    assert len(words) == MASK_EXTRA_WORDS
    return np.array(words, dtype=np.uint32 if ring_bits == 32 else np.uint64)


@dataclass(frozen=True, slots=True)
class ClipTotals:
    """Clipping totals over the contributors of one stream (DESIGN §4).

    ``saturated`` means at least one word reached its cap, so the figures are lower
    bounds.
    """

    clipped: int
    histogram: tuple[int, int, int, int]
    saturated: bool

    def suggested_range(self, clipping_range: float) -> float:
        """A clipping range that would have clipped nothing: the upper edge of the
        highest non-empty |x|/c bin (``> 8`` gets 16·c, a lower bound)."""
        for count, edge in zip(reversed(self.histogram), (16.0, 8.0, 4.0, 2.0)):
            if count:
                return clipping_range * edge
        return clipping_range

    def describe(self, clipping_range: float, noun: str = "value(s)") -> str:
        """The researcher's clipping report: totals, histogram, suggested range."""
        bound = "at least " if self.saturated else ""
        c = clipping_range
        h = self.histogram
        return (
            f"{bound}{self.clipped} {noun} clipped to [-{c:g}, {c:g}]; |x|/c "
            f"histogram (1,2]={h[0]} (2,4]={h[1]} (4,8]={h[2]} >8={h[3]}; "
            f"suggested clipping_range={bound}{self.suggested_range(c):g}"
        )


@dataclass(frozen=True, slots=True, eq=False)
class RoundResult:
    """The outcome of a successful round: exact and dequantized sums per stream."""

    round: int
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    integer_sums: Mapping[str, np.ndarray[Any, Any]]
    sums: Mapping[str, np.ndarray[Any, Any]]
    means: Mapping[str, np.ndarray[Any, Any]]
    clipping: Mapping[str, ClipTotals]
    timings: Mapping[str, float] = field(default_factory=dict)


def stream_sizes(streams: Sequence[StreamSpec]) -> dict[str, int]:
    """Stream name -> number of data words d."""
    return {s.name: s.size for s in streams}
