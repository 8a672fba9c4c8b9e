# SPDX-License-Identifier: Apache-2.0
# flwr is an optional extra: the type check also runs where it is not installed.
# mypy: disable-error-code="import-not-found"
"""Protocol messages inside Flower messages: one ConfigRecord, raw chunked vectors.

A Flower message of this integration carries, in its ``RecordDict``:

- ``config_records["secagg"]``: ``v`` (this layout's version, 1), ``kind``
  (``"hello"`` or ``"protocol"``), ``stage`` (for logs and test hooks only), and
  for ``"protocol"`` a ``msgs`` field: a msgpack array of ``[header, [frame
  lengths...], weights_from_fit]`` per protocol message, where ``header`` is the
  :func:`mpc_runtime.framing.encode` header frame and the lengths are those of its
  payload frames; ``chunk`` is the largest chunk in bytes.
- ``array_records["secagg.chunks"]``: the payload frames (masked vectors), each
  cut into ``Array`` objects of at most ``chunk`` bytes, ``stype="secagg.raw"``,
  keyed ``"<message>/<frame>/<chunk>"``. A masked vector is its raw little-endian
  ring words: 4 bytes per parameter at ``ring_bits=32``.

A ``ROUND_REQUEST``'s weights frames are never sent twice: they are the global
model the same Flower message carries as its fit instructions, so the request is
sent as its header only (``weights_from_fit``) and the client rebuilds the frames
from the fit instructions it actually received. The request digest ``D_r`` then
binds exactly the model the client trains on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgpack
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from mpc_runtime import framing
from mpc_runtime.errors import MalformedMessage
from mpc_runtime.messages import Message, MsgType, RoundRequest

__all__ = [
    "RECORD",
    "CHUNKS",
    "WIRE_VERSION",
    "KIND_HELLO",
    "KIND_PROTOCOL",
    "DEFAULT_CHUNK_BYTES",
    "stage_of",
    "record_kind",
    "pack",
    "unpack",
    "check_chunk_bytes",
]

#: The ConfigRecord of this integration in a Flower message's content.
RECORD: Final = "secagg"
#: The ArrayRecord holding payload chunks.
CHUNKS: Final = "secagg.chunks"
#: Version of this record layout (the protocol's own version is in every header).
WIRE_VERSION: Final = 1
KIND_HELLO: Final = "hello"
KIND_PROTOCOL: Final = "protocol"
CHUNK_STYPE: Final = "secagg.raw"
#: 2 MiB: below gRPC's default 4 MiB receive limit and Flower's 5 MB object
#: chunks, so every chunk travels as one gRPC message whatever the channel.
DEFAULT_CHUNK_BYTES: Final = 2 << 20
MIN_CHUNK_BYTES: Final = 1 << 12
MAX_CHUNK_BYTES: Final = 256 << 20
#: Protocol messages per Flower message (a relay plus the next request at most).
MAX_MESSAGES: Final = 4

_STAGES: Final = {
    MsgType.SETUP_REQUEST: "setup",
    MsgType.CONTEXT_ADVERTS: "setup.transcript",
    MsgType.TRANSCRIPT_SIGS: "setup.ready",
    MsgType.ROUND_REQUEST: "keys",
    MsgType.ROUND_ADVERTS: "upload",
    MsgType.SURVIVORS: "survivors",
    MsgType.UNMASK_REQUEST: "unmask",
    MsgType.ABORT: "abort",
}


def check_chunk_bytes(value: object) -> int:
    """Return ``value`` if it is a valid chunk size, else raise ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES
    ):
        raise ValueError(
            f"expected chunk_bytes an int in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], "
            f"got {value!r}"
        )
    return value


def stage_of(msgs: Sequence[Message]) -> str:
    """The stage a server-to-client batch opens: named by its last message."""
    if not msgs:
        return "none"
    return _STAGES.get(msgs[-1].TYPE, msgs[-1].TYPE.name.lower())


def pack(
    content: RecordDict,
    msgs: Sequence[Message],
    *,
    stage: str,
    chunk_bytes: int,
    weights_from_fit: bool = False,
) -> int:
    """Add ``msgs`` to ``content``; return the payload bytes added.

    With ``weights_from_fit``, a :class:`RoundRequest` is sent as its header only
    (its weights are the fit instructions carried by the same Flower message).
    """
    if len(msgs) > MAX_MESSAGES:
        raise ValueError(f"expected at most {MAX_MESSAGES} messages, got {len(msgs)}")
    entries: list[list[Any]] = []
    chunks: dict[str, Array] = {}
    total = 0
    for i, msg in enumerate(msgs):
        frames = framing.encode(msg)
        header = bytes(frames[0])
        from_fit = weights_from_fit and isinstance(msg, RoundRequest)
        payloads = [] if from_fit else [memoryview(f).cast("B") for f in frames[1:]]
        entries.append([header, [p.nbytes for p in payloads], from_fit])
        for j, view in enumerate(payloads):
            for k, start in enumerate(range(0, view.nbytes, chunk_bytes)):
                piece = bytes(view[start : start + chunk_bytes])
                chunks[f"{i}/{j}/{k}"] = Array(
                    dtype="uint8", shape=(len(piece),), stype=CHUNK_STYPE, data=piece
                )
                total += len(piece)
    content.config_records[RECORD] = ConfigRecord(
        {
            "v": WIRE_VERSION,
            "kind": KIND_PROTOCOL,
            "stage": stage,
            "chunk": chunk_bytes,
            "msgs": msgpack.packb(entries, use_bin_type=True),
        }
    )
    if chunks:
        content.array_records[CHUNKS] = ArrayRecord(chunks)
    return total


def _field(record: ConfigRecord, name: str, kind: type) -> Any:
    value = record.get(name)
    if isinstance(value, bool) and kind is not bool:
        value = None
    if not isinstance(value, kind):
        raise MalformedMessage(f"secagg record: expected {name} of {kind.__name__}")
    return value


def record_kind(content: RecordDict) -> str | None:
    """The ``kind`` of this integration's record in ``content``, or None if absent.

    Raises
    ------
    MalformedMessage
        The record exists but has another layout version or no kind.
    """
    record = content.config_records.get(RECORD)
    if record is None:
        return None
    if _field(record, "v", int) != WIRE_VERSION:
        raise MalformedMessage(f"secagg record: expected layout v{WIRE_VERSION}")
    kind: str = _field(record, "kind", str)
    return kind


def unpack(
    content: RecordDict,
    *,
    fit_weights: Callable[[], list[memoryview]] | None = None,
) -> tuple[list[Message], int]:
    """Decode the protocol messages in ``content``; also return the chunk size.

    ``fit_weights()`` gives the weights frames of a request sent header-only
    (client side); without it such a request is malformed (server side).

    Raises
    ------
    MalformedMessage
        Anything that is not a well-formed record of this layout, or a message
        :func:`mpc_runtime.framing.decode` refuses. Nothing else escapes.
    """
    record = content.config_records.get(RECORD)
    if record is None or record_kind(content) != KIND_PROTOCOL:
        raise MalformedMessage("secagg record: expected a protocol record")
    chunk = _field(record, "chunk", int)
    try:
        check_chunk_bytes(chunk)
    except ValueError as e:
        raise MalformedMessage(f"secagg record: {e}") from None
    raw = _field(record, "msgs", bytes)
    try:
        entries = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=framing.MAX_HEADER_BYTES,
            max_str_len=0,
            max_array_len=max(framing.MAX_FRAMES, MAX_MESSAGES),
            max_map_len=0,
            max_ext_len=0,
        )
    # msgpack documents that exceptions other than its own can escape unpackb on
    # malformed input, so this boundary catches broadly (STYLE §5).
    except Exception:
        raise MalformedMessage("secagg record: msgs is not msgpack") from None
    if not isinstance(entries, list) or len(entries) > MAX_MESSAGES:
        raise MalformedMessage("secagg record: expected at most 4 messages")
    chunks = content.array_records.get(CHUNKS, ArrayRecord())
    used = 0
    out: list[Message] = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], bytes)
            or not isinstance(entry[1], list)
            or not isinstance(entry[2], bool)
        ):
            raise MalformedMessage("secagg record: bad message entry")
        header, lengths, from_fit = entry
        frames: list[bytes | memoryview] = [header]
        for j, length in enumerate(lengths):
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise MalformedMessage("secagg record: bad frame length")
            pieces = []
            for k in range(math.ceil(length / chunk)):
                array = chunks.get(f"{i}/{j}/{k}")
                if array is None or array.stype != CHUNK_STYPE:
                    raise MalformedMessage("secagg record: missing chunk")
                pieces.append(array.data)
            if sum(len(p) for p in pieces) != length:
                raise MalformedMessage("secagg record: chunks do not add up")
            used += len(pieces)
            # One chunk is used in place; several are joined once.
            frames.append(
                memoryview(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
            )
        if from_fit:
            if lengths or fit_weights is None:
                raise MalformedMessage("secagg record: unexpected header-only request")
            frames.extend(fit_weights())
        msg = framing.decode(frames)
        if from_fit and not isinstance(msg, RoundRequest):
            raise MalformedMessage("secagg record: header-only message not a request")
        out.append(msg)
    if used != len(chunks):
        raise MalformedMessage("secagg record: unexpected chunks")
    return out, chunk
