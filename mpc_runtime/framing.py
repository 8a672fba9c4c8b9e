# SPDX-License-Identifier: Apache-2.0
"""Frames <-> messages; :func:`decode` raises only MalformedMessage.

Wire format (STYLE §6): a ZeroMQ multipart message ``[header, *payloads]``.
``header`` is a msgpack **array** ``[version, type, context_id, round, sender,
*fields]`` packed with ``use_bin_type=True``; ids and names are msgpack str,
keys/signatures/boxes msgpack bin, floats float64. Vectors (the weights of a
:class:`~mpc_runtime.messages.RoundRequest`, the masked vectors of a
:class:`~mpc_runtime.messages.MaskedInput`, the tensors of a
:class:`~mpc_runtime.messages.ClearUpdate`) never travel inside msgpack: each is
one payload frame holding the array's little-endian bytes, in the order the
header lists them, sent as a ``memoryview`` without copying.

Per-type fields after the common five:

=================  ===================================================================
SETUP_REQUEST      job_id, [node...], ring_bits, clipping_range, threshold, nonce
CONTEXT_ADVERT     identity_key, share_key, signature
CONTEXT_ADVERTS    [[node, identity_key, share_key, signature]...]
TRANSCRIPT_SIG     transcript, signature
TRANSCRIPT_SIGS    [[node, transcript, signature]...]
ROUND_REQUEST      kind, name, args (RFC 8785 JSON as bin),
                   [[tensor, dtype, [dim...]]...], [[stream, [dim...]]...];
                   one frame per weights tensor
ROUND_ADVERT       mask_key, signature, {peer: [c_box, b_box]}
ROUND_ADVERTS      [[node, mask_key, signature, c_box, b_box]...]
MASKED_INPUT       ring_bits, commitment, [peer...], [[stream, words]...];
                   one frame per stream
SURVIVORS          [node...]
SURVIVOR_SIG       [node...], signature
UNMASK_REQUEST     [node...], [[node, signature]...]
UNMASK_SHARES      {node: share}, {node: share}   (b-shares, then c-shares)
CLEAR_UPDATE       samples, [[tensor, dtype, [dim...]]...];
                   one frame per tensor
REFUSED            reason, [field...]
ABORT              reason
=================  ===================================================================

Maps are written with keys sorted by UTF-8 bytes and must arrive that way, so a
message has exactly one encoding (the golden-bytes tests pin it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import msgpack
import numpy as np

from .errors import MalformedMessage, VersionMismatch
from .messages import (
    MASK_EXTRA_WORDS,
    MAX_ARGS_BYTES,
    MAX_FIELD_BYTES,
    MAX_NODES,
    MAX_STREAMS,
    MAX_TENSORS,
    MAX_WORDS,
    PROTOCOL_VERSION,
    TENSOR_DTYPES,
    Abort,
    AbortReason,
    ClearUpdate,
    ContextAdvert,
    ContextAdvertEntry,
    ContextAdverts,
    MaskedInput,
    Message,
    MsgType,
    RefusalReason,
    Refused,
    RoundAdvert,
    RoundAdvertEntry,
    RoundAdverts,
    RoundRequest,
    SetupRequest,
    ShareBoxes,
    StreamSpec,
    Survivors,
    SurvivorSig,
    SurvivorSigEntry,
    Tensor,
    TranscriptSig,
    TranscriptSigEntry,
    TranscriptSigs,
    UnmaskRequest,
    UnmaskShares,
    canonical_args,
    parse_args,
)

if TYPE_CHECKING:
    # collections.abc.Buffer needs Python 3.12; typeshed ships this stub.
    from typing_extensions import Buffer

__all__ = ["encode", "decode", "Frame", "MAX_HEADER_BYTES", "MAX_FRAMES"]

logger = logging.getLogger(__name__)

#: A frame as handed to or received from the transport.
Frame = bytes | bytearray | memoryview

#: Largest header accepted before msgpack even looks at it (1024 nodes' boxes fit).
MAX_HEADER_BYTES: Final = 8 << 20
#: Header plus at most one payload frame per stream or tensor.
MAX_FRAMES: Final = 1 + max(MAX_STREAMS, MAX_TENSORS)

# msgpack's bounded decoding: every container and string is capped explicitly.
_UNPACK_LIMITS: Final = dict(
    max_bin_len=MAX_ARGS_BYTES,
    max_str_len=1024,
    max_array_len=max(MAX_NODES, MAX_STREAMS, MAX_TENSORS) + 8,
    max_map_len=MAX_NODES,
    max_ext_len=0,
)

_LE_DTYPES: Final = {name: np.dtype(name).newbyteorder("<") for name in TENSOR_DTYPES}
_RING_DTYPE: Final[dict[int, np.dtype[Any]]] = {
    32: np.dtype("<u4"),
    64: np.dtype("<u8"),
}


# ------------------------------------------------------------------------ encode


def _raw_frame(data: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> memoryview:
    # No copy when the array is already C-contiguous little-endian (the normal case).
    arr = np.ascontiguousarray(data, dtype=dtype)
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12.
    return memoryview(cast("Buffer", arr)).cast("B") if arr.size else memoryview(b"")


def _sorted_items(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(mapping.items(), key=lambda kv: kv[0].encode("utf-8"))


def _tensor_specs(tensors: Sequence[Tensor]) -> list[list[Any]]:
    """Header entries ``[[tensor, dtype, [dim...]]...]`` (read by :func:`_tensors`)."""
    return [[t.name, t.data.dtype.name, list(t.data.shape)] for t in tensors]


def _tensor_frames(tensors: Sequence[Tensor]) -> list[memoryview]:
    return [_raw_frame(t.data, _LE_DTYPES[t.data.dtype.name]) for t in tensors]


def _fields_of(msg: Message) -> tuple[list[Any], list[memoryview]]:
    """Return the type-specific header fields and payload frames of ``msg``."""
    if isinstance(msg, SetupRequest):
        return [
            msg.job_id,
            list(msg.nodes),
            msg.ring_bits,
            float(msg.clipping_range),
            msg.threshold,
            msg.nonce,
        ], []
    if isinstance(msg, ContextAdvert):
        return [msg.identity_key, msg.share_key, msg.signature], []
    if isinstance(msg, ContextAdverts):
        return [
            [[a.node, a.identity_key, a.share_key, a.signature] for a in msg.adverts]
        ], []
    if isinstance(msg, TranscriptSig):
        return [msg.transcript, msg.signature], []
    if isinstance(msg, TranscriptSigs):
        return [[[s.node, s.transcript, s.signature] for s in msg.signatures]], []
    if isinstance(msg, RoundRequest):
        return [
            msg.kind,
            msg.name,
            canonical_args(msg.args),
            _tensor_specs(msg.weights),
            [[s.name, list(s.shape)] for s in msg.streams],
        ], _tensor_frames(msg.weights)
    if isinstance(msg, RoundAdvert):
        return [
            msg.mask_key,
            msg.signature,
            {k: [v.c, v.b] for k, v in _sorted_items(msg.shares)},
        ], []
    if isinstance(msg, RoundAdverts):
        return [
            [[a.node, a.mask_key, a.signature, a.c_box, a.b_box] for a in msg.adverts]
        ], []
    if isinstance(msg, MaskedInput):
        dtype = _RING_DTYPE[msg.ring_bits]
        frames = [_raw_frame(v.data, dtype) for v in msg.vectors]
        return [
            msg.ring_bits,
            msg.commitment,
            list(msg.peers),
            [[v.name, int(v.data.shape[0])] for v in msg.vectors],
        ], frames
    if isinstance(msg, Survivors):
        return [list(msg.survivors)], []
    if isinstance(msg, SurvivorSig):
        return [list(msg.survivors), msg.signature], []
    if isinstance(msg, UnmaskRequest):
        return [
            list(msg.survivors),
            [[s.node, s.signature] for s in msg.signatures],
        ], []
    if isinstance(msg, UnmaskShares):
        return [
            dict(_sorted_items(msg.b_shares)),
            dict(_sorted_items(msg.c_shares)),
        ], []
    if isinstance(msg, ClearUpdate):
        return [msg.samples, _tensor_specs(msg.tensors)], _tensor_frames(msg.tensors)
    if isinstance(msg, Refused):
        return [int(msg.reason), list(msg.fields)], []
    if isinstance(msg, Abort):
        return [int(msg.reason)], []
    raise TypeError(f"expected a protocol message, got {type(msg).__name__}")


def encode(msg: Message) -> list[bytes | memoryview]:
    """Encode ``msg`` as ZeroMQ frames ``[header, *payloads]``.

    Payload frames are ``memoryview``s of the message's arrays (no copy for
    C-contiguous little-endian data); do not mutate those arrays until sent.

    Raises
    ------
    TypeError
        ``msg`` is not a protocol message.
    """
    fields, frames = _fields_of(msg)
    header = msgpack.packb(
        [
            PROTOCOL_VERSION,
            int(msg.TYPE),
            msg.context_id,
            msg.round,
            msg.sender,
            *fields,
        ],
        use_bin_type=True,
    )
    return [header, *frames]


def _header_items(msg: Message) -> list[Any]:
    fields, _ = _fields_of(msg)
    return [
        PROTOCOL_VERSION,
        int(msg.TYPE),
        msg.context_id,
        msg.round,
        msg.sender,
        *fields,
    ]


# ------------------------------------------------------------------------ decode


class _Reader:
    """Typed accessors over one decoded header; failures raise ValueError/TypeError."""

    def __init__(self, items: list[Any], start: int) -> None:
        self._items = items
        self._pos = start

    def take(self) -> Any:
        if self._pos >= len(self._items):
            raise ValueError("expected more header fields")
        item = self._items[self._pos]
        self._pos += 1
        return item

    def done(self) -> None:
        if self._pos != len(self._items):
            raise ValueError(
                f"expected {self._pos} header fields, got {len(self._items)}"
            )


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"expected {what} as an int in [{lo}, {hi}]")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected {what} as str, got {type(value).__name__}")
    return value


def _bin(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected {what} as bin, got {type(value).__name__}")
    return value


def _array(value: Any, what: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected {what} as an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"expected {what} of {length} items, got {len(value)}")
    return value


def _map(value: Any, what: str) -> list[tuple[Any, Any]]:
    # Maps are decoded as pair lists (object_pairs_hook=list) so duplicate keys,
    # which a dict would silently merge, are detected; keys must arrive sorted.
    if not isinstance(value, list) or not all(isinstance(p, tuple) for p in value):
        raise TypeError(f"expected {what} as a map")
    keys = [_str(k, f"{what} key").encode("utf-8") for k, _ in value]
    if any(not a < b for a, b in zip(keys, keys[1:])):
        raise ValueError(f"expected {what} keys sorted without duplicates")
    return value


def _ids(value: Any, what: str) -> tuple[str, ...]:
    return tuple(_str(v, what) for v in _array(value, what))


def _shape(value: Any, what: str) -> tuple[int, ...]:
    return tuple(
        _int(d, 0, MAX_WORDS, f"{what} dimension") for d in _array(value, what)
    )


def _payload(frame: Any, nbytes: int, what: str) -> memoryview:
    view = memoryview(frame)
    if view.nbytes != nbytes:
        raise ValueError(f"expected {what} frame of {nbytes} bytes, got {view.nbytes}")
    if not view.c_contiguous:
        raise ValueError(f"expected a contiguous {what} frame")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _tensors(
    specs: list[Any], payloads: Sequence[Any], what: str
) -> tuple[Tensor, ...]:
    """Decode ``[[tensor, dtype, [dim...]]...]`` and one raw frame per tensor.

    Each tensor's element count and byte length are checked from the header's
    dtype and shape before its frame is looked at; the frame must then be exactly
    that long.
    """
    if len(specs) != len(payloads):
        raise ValueError(f"expected {len(specs)} {what} frames, got {len(payloads)}")
    tensors = []
    for item, frame in zip(specs, payloads):
        tname, dtype_name, shape_raw = _array(item, "tensor", 3)
        dtype_name = _str(dtype_name, "dtype")
        if dtype_name not in _LE_DTYPES:
            raise ValueError("expected a known tensor dtype")
        dtype = _LE_DTYPES[dtype_name]
        shape = _shape(shape_raw, "tensor")
        count = math.prod(shape)
        if count > MAX_WORDS:
            raise ValueError("expected a tensor of at most MAX_WORDS elements")
        nbytes = count * dtype.itemsize
        if nbytes > MAX_FIELD_BYTES:
            # DESIGN §3 gives a tensor's bytes a 4-byte length prefix (weights hash).
            raise ValueError(
                f"expected a tensor of at most {MAX_FIELD_BYTES} bytes, got {nbytes}"
            )
        view = _payload(frame, nbytes, "tensor")
        data = np.frombuffer(view, dtype=dtype, count=count).reshape(shape)
        tensors.append(Tensor(name=_str(tname, "tensor name"), data=data))
    return tuple(tensors)


def _decode_setup_request(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    job_id = _str(r.take(), "job_id")
    nodes = _ids(r.take(), "nodes")
    ring_bits = _int(r.take(), 0, 1 << 16, "ring_bits")
    clipping_range = r.take()
    if not isinstance(clipping_range, float):
        raise TypeError("expected clipping_range as a float64")
    threshold = _int(r.take(), 0, 1 << 32, "threshold")
    nonce = _bin(r.take(), "nonce")
    r.done()
    return SetupRequest(
        **h,
        job_id=job_id,
        nodes=nodes,
        ring_bits=ring_bits,
        clipping_range=clipping_range,
        threshold=threshold,
        nonce=nonce,
    )


def _decode_context_advert(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    ik, sk, sig = (
        _bin(r.take(), "identity key"),
        _bin(r.take(), "share key"),
        _bin(r.take(), "signature"),
    )
    r.done()
    return ContextAdvert(**h, identity_key=ik, share_key=sk, signature=sig)


def _decode_context_adverts(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    entries = []
    for item in _array(r.take(), "adverts"):
        node, ik, sk, sig = _array(item, "advert", 4)
        entries.append(
            ContextAdvertEntry(
                node=_str(node, "node"),
                identity_key=_bin(ik, "identity key"),
                share_key=_bin(sk, "share key"),
                signature=_bin(sig, "signature"),
            )
        )
    r.done()
    return ContextAdverts(**h, adverts=tuple(entries))


def _decode_transcript_sig(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    transcript, sig = _bin(r.take(), "transcript"), _bin(r.take(), "signature")
    r.done()
    return TranscriptSig(**h, transcript=transcript, signature=sig)


def _decode_transcript_sigs(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    entries = []
    for item in _array(r.take(), "signatures"):
        node, transcript, sig = _array(item, "signature entry", 3)
        entries.append(
            TranscriptSigEntry(
                node=_str(node, "node"),
                transcript=_bin(transcript, "transcript"),
                signature=_bin(sig, "signature"),
            )
        )
    r.done()
    return TranscriptSigs(**h, signatures=tuple(entries))


def _decode_round_request(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    kind = _str(r.take(), "kind")
    name = _str(r.take(), "name")
    args = parse_args(_bin(r.take(), "args"))
    specs = _array(r.take(), "weights")
    streams = tuple(
        StreamSpec(name=_str(s, "stream"), shape=_shape(shape, "stream"))
        for s, shape in (
            _array(item, "stream", 2) for item in _array(r.take(), "streams")
        )
    )
    r.done()
    weights = _tensors(specs, payloads, "weights")
    return RoundRequest(
        **h, kind=kind, name=name, args=args, weights=weights, streams=streams
    )


def _decode_round_advert(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    mask_key, sig = _bin(r.take(), "mask key"), _bin(r.take(), "signature")
    shares = {}
    for peer, boxes in _map(r.take(), "shares"):
        c_box, b_box = _array(boxes, "share boxes", 2)
        shares[peer] = ShareBoxes(c=_bin(c_box, "c box"), b=_bin(b_box, "b box"))
    r.done()
    return RoundAdvert(**h, mask_key=mask_key, signature=sig, shares=shares)


def _decode_round_adverts(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    entries = []
    for item in _array(r.take(), "adverts"):
        node, mask_key, sig, c_box, b_box = _array(item, "advert", 5)
        entries.append(
            RoundAdvertEntry(
                node=_str(node, "node"),
                mask_key=_bin(mask_key, "mask key"),
                signature=_bin(sig, "signature"),
                c_box=_bin(c_box, "c box"),
                b_box=_bin(b_box, "b box"),
            )
        )
    r.done()
    return RoundAdverts(**h, adverts=tuple(entries))


def _decode_masked_input(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    ring_bits = _int(r.take(), 0, 1 << 16, "ring_bits")
    if ring_bits not in _RING_DTYPE:
        raise ValueError("expected ring_bits 32 or 64")
    dtype = _RING_DTYPE[ring_bits]
    commitment = _bin(r.take(), "commitment")
    peers = _ids(r.take(), "peers")
    specs = _array(r.take(), "vectors")
    r.done()
    if len(specs) != len(payloads):
        raise ValueError(f"expected {len(specs)} vector frames, got {len(payloads)}")
    vectors = []
    for item, frame in zip(specs, payloads):
        name, words = _array(item, "vector", 2)
        words = _int(words, MASK_EXTRA_WORDS, MAX_WORDS, "vector words")
        view = _payload(frame, words * dtype.itemsize, "vector")
        vectors.append(
            Tensor(
                name=_str(name, "stream"),
                data=np.frombuffer(view, dtype=dtype, count=words),
            )
        )
    return MaskedInput(
        **h,
        ring_bits=ring_bits,
        commitment=commitment,
        peers=peers,
        vectors=tuple(vectors),
    )


def _decode_survivors(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    survivors = _ids(r.take(), "survivors")
    r.done()
    return Survivors(**h, survivors=survivors)


def _decode_survivor_sig(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    survivors = _ids(r.take(), "survivors")
    sig = _bin(r.take(), "signature")
    r.done()
    return SurvivorSig(**h, survivors=survivors, signature=sig)


def _decode_unmask_request(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    survivors = _ids(r.take(), "survivors")
    sigs = tuple(
        SurvivorSigEntry(node=_str(node, "node"), signature=_bin(sig, "signature"))
        for node, sig in (
            _array(item, "signature entry", 2)
            for item in _array(r.take(), "signatures")
        )
    )
    r.done()
    return UnmaskRequest(**h, survivors=survivors, signatures=sigs)


def _decode_unmask_shares(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    b = {k: _bin(v, "b-share") for k, v in _map(r.take(), "b-shares")}
    c = {k: _bin(v, "c-share") for k, v in _map(r.take(), "c-shares")}
    r.done()
    return UnmaskShares(**h, b_shares=b, c_shares=c)


def _decode_clear_update(
    r: _Reader, h: dict[str, Any], payloads: Sequence[Any]
) -> Message:
    samples = _int(r.take(), 0, (1 << 63) - 1, "samples")
    specs = _array(r.take(), "tensors")
    r.done()
    return ClearUpdate(
        **h, samples=samples, tensors=_tensors(specs, payloads, "tensor")
    )


def _decode_refused(r: _Reader, h: dict[str, Any], payloads: Sequence[Any]) -> Message:
    reason = RefusalReason(_int(r.take(), 0, 255, "reason"))
    fields = tuple(_str(f, "field") for f in _array(r.take(), "fields"))
    r.done()
    return Refused(**h, reason=reason, fields=fields)


def _decode_abort(r: _Reader, h: dict[str, Any], payloads: Sequence[Any]) -> Message:
    reason = AbortReason(_int(r.take(), 0, 255, "reason"))
    r.done()
    return Abort(**h, reason=reason)


_Decoder = Callable[[_Reader, dict[str, Any], Sequence[Any]], Message]

#: Types whose messages carry payload frames; all others must arrive as one frame.
_WITH_PAYLOADS: Final = frozenset(
    {MsgType.ROUND_REQUEST, MsgType.MASKED_INPUT, MsgType.CLEAR_UPDATE}
)

_DECODERS: Final[dict[MsgType, _Decoder]] = {
    MsgType.SETUP_REQUEST: _decode_setup_request,
    MsgType.CONTEXT_ADVERT: _decode_context_advert,
    MsgType.CONTEXT_ADVERTS: _decode_context_adverts,
    MsgType.TRANSCRIPT_SIG: _decode_transcript_sig,
    MsgType.TRANSCRIPT_SIGS: _decode_transcript_sigs,
    MsgType.ROUND_REQUEST: _decode_round_request,
    MsgType.ROUND_ADVERT: _decode_round_advert,
    MsgType.ROUND_ADVERTS: _decode_round_adverts,
    MsgType.MASKED_INPUT: _decode_masked_input,
    MsgType.SURVIVORS: _decode_survivors,
    MsgType.SURVIVOR_SIG: _decode_survivor_sig,
    MsgType.UNMASK_REQUEST: _decode_unmask_request,
    MsgType.UNMASK_SHARES: _decode_unmask_shares,
    MsgType.CLEAR_UPDATE: _decode_clear_update,
    MsgType.REFUSED: _decode_refused,
    MsgType.ABORT: _decode_abort,
}
assert set(_DECODERS) == set(MsgType)


def _decode(frames: Sequence[Any]) -> Message:
    if isinstance(frames, (bytes, bytearray, memoryview, str)):
        raise TypeError("expected a sequence of frames, got a single buffer")
    frames = (
        list(frames[: MAX_FRAMES + 1]) if isinstance(frames, Sequence) else list(frames)
    )
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise ValueError(f"expected 1 to {MAX_FRAMES} frames, got {len(frames)}")
    header_view = memoryview(frames[0])
    if header_view.nbytes > MAX_HEADER_BYTES:
        raise ValueError(f"expected a header of at most {MAX_HEADER_BYTES} bytes")
    items = msgpack.unpackb(
        header_view,
        raw=False,
        strict_map_key=True,
        use_list=True,
        object_pairs_hook=list,
        **_UNPACK_LIMITS,
    )
    if not isinstance(items, list) or not items:
        raise ValueError("expected the header to be a msgpack array")
    # STYLE §6: the version is checked first, before anything else is interpreted.
    version = items[0]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError("expected an integer protocol version")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"expected protocol version {PROTOCOL_VERSION}, got {version}"
        )
    if len(items) < 5:
        raise ValueError(f"expected at least 5 header items, got {len(items)}")
    raw_type = _int(items[1], 0, 255, "type")
    try:
        msg_type = MsgType(raw_type)
    except ValueError:
        raise ValueError(f"unknown message type {raw_type}") from None
    payloads = frames[1:]
    if payloads and msg_type not in _WITH_PAYLOADS:
        raise ValueError(f"expected no payload frames for {msg_type.name}")
    header = {
        "context_id": _bin(items[2], "context_id"),
        "round": _int(items[3], 0, (1 << 63) - 1, "round"),
        "sender": _str(items[4], "sender"),
    }
    msg = _DECODERS[msg_type](_Reader(items, 5), header, payloads)
    # One message, one encoding: a header that is valid msgpack but not the bytes
    # we would write (non-minimal ints, float32, an array for an empty map, ...) is
    # refused, so signatures and golden tests never see two spellings of one message.
    if msgpack.packb(_header_items(msg), use_bin_type=True) != header_view:
        raise ValueError("expected the canonical encoding of the header")
    return msg


def decode(frames: Sequence[Frame]) -> Message:
    """Decode ZeroMQ frames ``[header, *payloads]`` into a message.

    Decoding is bounded (header size, string, bin, array and map lengths, frame
    count), checks the protocol version first, then the type, then every
    field's type, length and range, and each payload frame's byte length
    against the shape and dtype the header declares. Vectors are zero-copy
    read-only views of the payload frames. Nothing is authenticated here.

    Raises
    ------
    VersionMismatch
        The header names another protocol version.
    MalformedMessage
        Anything else that is not a well-formed message of this version.
    """
    try:
        return _decode(frames)
    except MalformedMessage:
        raise
    # This is the decode boundary (STYLE §5): msgpack documents that exceptions
    # other than its own can escape on hostile input, and field checks raise
    # TypeError/ValueError; every one of them becomes MalformedMessage here.
    except Exception as e:
        logger.debug("malformed message: %s", type(e).__name__)
        raise MalformedMessage(f"malformed message: {e}"[:300]) from e
