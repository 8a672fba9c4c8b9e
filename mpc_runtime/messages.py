# SPDX-License-Identifier: Apache-2.0
"""Protocol messages (DESIGN §3): one frozen dataclass per type, checked when built.

Every message carries the common header fields ``context_id`` (32 bytes; for a
:class:`SetupRequest` the id the researcher computed, which each node recomputes),
``round`` (0 during context setup, then the strictly increasing round counter) and
``sender`` (the id of the party that sent this hop: the researcher for what it
relays, the node for what a node sends). What a node relays through the researcher
is signed or AEAD-encrypted; this module only checks shapes, types and bounds, never
signatures (that is :mod:`mpc_runtime.protocol`'s job).

Construction checks every field's type, length and range and raises ``TypeError`` or
``ValueError`` ("expected X, got Y"); :func:`mpc_runtime.framing.decode` turns those
into :class:`~mpc_runtime.errors.MalformedMessage`. Collections of ids are tuples
sorted by UTF-8 bytes without duplicates, so every message has exactly one encoding.

=====================  ============================================================
type                   fields (besides context_id, round, sender)
=====================  ============================================================
SETUP_REQUEST      1   job_id, nodes, ring_bits, clipping_range, threshold, nonce
CONTEXT_ADVERT     2   identity_key (Ed25519), share_key (E_u), signature
CONTEXT_ADVERTS    3   adverts: ContextAdvertEntry per node
TRANSCRIPT_SIG     4   transcript (T), signature
TRANSCRIPT_SIGS    5   signatures: TranscriptSigEntry per node
ROUND_REQUEST     10   kind ("task"|"plan"), name, args, weights (Tensor...), streams
ROUND_ADVERT      11   mask_key (C_u^r), signature, shares: peer -> ShareBoxes(c, b)
ROUND_ADVERTS     12   adverts: RoundAdvertEntry per sender (only the boxes for you)
MASKED_INPUT      13   ring_bits, commitment, peers (P_u^r), vectors (Tensor...)
SURVIVORS         14   survivors (S)
SURVIVOR_SIG      15   survivors (S, echoed), signature
UNMASK_REQUEST    16   survivors (S), signatures: SurvivorSigEntry (>= t)
UNMASK_SHARES     17   b_shares: id in S -> share, c_shares: id in P_u^r \\ S -> share
CLEAR_UPDATE      20   samples, tensors (Tensor..., float32/float64; cleartext only)
REFUSED           30   reason (RefusalReason), fields (names only, never values)
ABORT             31   reason (AbortReason)
=====================  ============================================================
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Final, Union

import numpy as np
import rfc8785

# PROTOCOL_VERSION lives with the encoding it versions; the sizes with the keys.
from .encoding import PROTOCOL_VERSION
from .keys import DIGEST_SIZE, PUBLIC_KEY_SIZE, SIGNATURE_SIZE

__all__ = [
    "PROTOCOL_VERSION",
    "MsgType",
    "RefusalReason",
    "AbortReason",
    "KEY_SIZE",
    "SIGNATURE_SIZE",
    "DIGEST_SIZE",
    "NONCE_SIZE",
    "MAX_NODES",
    "MAX_STREAMS",
    "MAX_TENSORS",
    "MAX_DIMS",
    "MAX_WORDS",
    "MAX_ARGS_BYTES",
    "MAX_FIELD_BYTES",
    "MAX_BOX_SIZE",
    "MAX_SHARE_SIZE",
    "MASK_EXTRA_WORDS",
    "TENSOR_DTYPES",
    "check_id",
    "check_name",
    "Tensor",
    "StreamSpec",
    "ShareBoxes",
    "ContextAdvertEntry",
    "TranscriptSigEntry",
    "RoundAdvertEntry",
    "SurvivorSigEntry",
    "Message",
    "SetupRequest",
    "ContextAdvert",
    "ContextAdverts",
    "TranscriptSig",
    "TranscriptSigs",
    "RoundRequest",
    "RoundAdvert",
    "RoundAdverts",
    "MaskedInput",
    "Survivors",
    "SurvivorSig",
    "UnmaskRequest",
    "UnmaskShares",
    "ClearUpdate",
    "Refused",
    "Abort",
    "MESSAGE_CLASSES",
    "AnyMessage",
    "canonical_args",
    "parse_args",
]

#: X25519 and Ed25519 public keys.
KEY_SIZE: Final = PUBLIC_KEY_SIZE
#: The researcher's setup nonce.
NONCE_SIZE: Final = 32

#: Bounds that keep decoding cheap whatever a peer sends (msgpack's bounded decoding).
MAX_NODES: Final = 1024
MAX_STREAMS: Final = 4096
MAX_TENSORS: Final = 4096
MAX_DIMS: Final = 8
#: Words per vector frame (data words plus the 6 extra words of a masked vector).
MAX_WORDS: Final = 1 << 31
MAX_ARGS_BYTES: Final = 1 << 16
#: Largest byte length of a weights tensor or byte string: DESIGN §3's encoding gives
#: it a 4-byte length prefix (the weights hash encodes every tensor's bytes that way).
#: Byte strings are bounded far below (keys, boxes, shares, args); tensors are checked.
MAX_FIELD_BYTES: Final = (1 << 32) - 1
#: An AEAD box: 24-byte nonce + a Shamir share (< 128 bytes) + 16-byte tag.
MAX_BOX_SIZE: Final = 256
MAX_SHARE_SIZE: Final = 128
#: DESIGN §3/§4: 5 clip words (clipped count and 4 histogram bins) + 1 canary word.
MASK_EXTRA_WORDS: Final = 6
_MAX_FIELDS: Final = 16
_MAX_FIELD_NAME: Final = 32

#: dtypes a weights tensor may have, by ``numpy.dtype.name``; frames are little-endian.
TENSOR_DTYPES: Final = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
_RING_DTYPES: Final = {32: "uint32", 64: "uint64"}
#: dtypes of a cleartext update's tensors.
_CLEAR_DTYPES: Final = frozenset({"float32", "float64"})

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
# Stream, tensor, task and plan names: the id alphabet plus "/" and ":" (torch
# state_dict keys such as "layer1.0.conv1.weight"), up to 255 characters.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/:-]{0,254}", re.ASCII)
_FIELD_RE = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)


class MsgType(IntEnum):
    """The message types; the set follows DESIGN §3's phases."""

    SETUP_REQUEST = 1
    CONTEXT_ADVERT = 2
    CONTEXT_ADVERTS = 3
    TRANSCRIPT_SIG = 4
    TRANSCRIPT_SIGS = 5
    ROUND_REQUEST = 10
    ROUND_ADVERT = 11
    ROUND_ADVERTS = 12
    MASKED_INPUT = 13
    SURVIVORS = 14
    SURVIVOR_SIG = 15
    UNMASK_REQUEST = 16
    UNMASK_SHARES = 17
    CLEAR_UPDATE = 20
    REFUSED = 30
    ABORT = 31


class RefusalReason(IntEnum):
    """Why a node refused; a code only, so a refusal reveals no secret."""

    MALFORMED = 1
    UNEXPECTED = 2
    CONTEXT_SEEN = 3
    CONTEXT_MISMATCH = 4
    AUTHENTICATION = 5
    THRESHOLD = 6
    ROSTER = 7
    POLICY = 8
    SHAPE = 9
    TOO_FEW_PEERS = 10
    SURVIVORS = 11
    INPUT = 12
    ALREADY_COMMITTED = 13
    NOT_READY = 14


class AbortReason(IntEnum):
    """Why the server aborted a round."""

    TIMEOUT = 1
    THRESHOLD = 2
    REFUSED = 3
    CHECK_FAILED = 4
    CANCELLED = 5


# --------------------------------------------------------------------------- checks


def _type_name(value: object) -> str:
    return type(value).__name__


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid node or researcher id.

    Raises
    ------
    TypeError
        ``value`` is not a ``str``.
    ValueError
        It does not match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``.
    """
    if not isinstance(value, str):
        raise TypeError(f"expected {what} of type str, got {_type_name(value)}")
    if _ID_RE.fullmatch(value) is None:
        raise ValueError(
            f"expected {what} matching {_ID_RE.pattern}, got {value[:80]!r}"
        )
    return value


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a valid stream, tensor, task or plan name.

    Raises
    ------
    TypeError
        ``value`` is not a ``str``.
    ValueError
        It does not match ``^[A-Za-z0-9_][A-Za-z0-9._/:-]{0,254}$``.
    """
    if not isinstance(value, str):
        raise TypeError(f"expected {what} of type str, got {_type_name(value)}")
    if _NAME_RE.fullmatch(value) is None:
        raise ValueError(
            f"expected {what} matching {_NAME_RE.pattern}, got {value[:80]!r}"
        )
    return value


def _check_bytes(
    value: object, what: str, size: int | None = None, max_size: int = 0
) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected {what} of type bytes, got {_type_name(value)}")
    if size is not None and len(value) != size:
        raise ValueError(f"expected {what} of {size} bytes, got {len(value)}")
    if max_size and len(value) > max_size:
        raise ValueError(
            f"expected {what} of at most {max_size} bytes, got {len(value)}"
        )
    return value


def _check_int(value: object, what: str, lo: int, hi: int) -> int:
    # bool is an int in Python but a different msgpack type: refuse it.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {what} of type int, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"expected {what} in [{lo}, {hi}], got {value}")
    return value


def _utf8(value: str) -> bytes:
    return value.encode("utf-8")


def _check_sorted_ids(
    value: object, what: str, *, min_len: int = 0, max_len: int = MAX_NODES
) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise TypeError(f"expected {what} as a tuple, got {_type_name(value)}")
    if not min_len <= len(value) <= max_len:
        raise ValueError(f"expected {min_len} to {max_len} {what}, got {len(value)}")
    for item in value:
        check_id(item, what)
    _check_strictly_sorted([_utf8(v) for v in value], what)
    return value


def _check_strictly_sorted(keys: list[bytes], what: str) -> None:
    # DESIGN §3: sets are sorted by UTF-8 bytes; one order gives one encoding.
    for a, b in zip(keys, keys[1:]):
        if not a < b:
            raise ValueError(
                f"expected {what} sorted by UTF-8 bytes without duplicates"
            )


def _check_shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple):
        raise TypeError(f"expected {what} shape as a tuple, got {_type_name(value)}")
    if len(value) > MAX_DIMS:
        raise ValueError(
            f"expected {what} shape of at most {MAX_DIMS} dims, got {len(value)}"
        )
    size = 1
    for dim in value:
        _check_int(dim, f"{what} dimension", 0, MAX_WORDS)
        size *= dim
    if size > MAX_WORDS:
        raise ValueError(f"expected {what} of at most {MAX_WORDS} elements, got {size}")
    return value


def _is_little_endian(dtype: np.dtype[Any]) -> bool:
    order = dtype.byteorder
    return order in ("<", "|") or (order == "=" and sys.byteorder == "little")


def _check_str_mapping(
    value: object, what: str, check_value: Any, *, max_len: int = MAX_NODES
) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected {what} as a mapping, got {_type_name(value)}")
    if len(value) > max_len:
        raise ValueError(f"expected at most {max_len} {what}, got {len(value)}")
    for key, item in value.items():
        check_id(key, f"{what} key")
        check_value(item)


def _check_args(value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected args as a mapping, got {_type_name(value)}")
    canonical = canonical_args(value)
    if len(canonical) > MAX_ARGS_BYTES:
        raise ValueError(
            f"expected args of at most {MAX_ARGS_BYTES} bytes, got {len(canonical)}"
        )


def canonical_args(args: Mapping[str, Any]) -> bytes:
    """Return the RFC 8785 canonical JSON of ``args`` (DESIGN §3, part of ``D_r``).

    Raises
    ------
    TypeError, ValueError
        ``args`` is not JSON (non-str keys, NaN, integers beyond 2**53, ...).
    """
    try:
        return rfc8785.dumps(dict(args))
    except rfc8785.CanonicalizationError as e:
        raise ValueError(f"expected JSON-serializable args, got {e}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"expected JSON without {name}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in pairs:
        if key in out:
            raise ValueError("expected JSON objects without duplicate keys")
        out[key] = item
    return out


def _parse_int(text: str) -> int | float:
    # RFC 8785 numbers are IEEE-754 doubles: an integral literal beyond 2**53 - 1 is
    # a float that happens to print without a fraction (e.g. 2.0**53).
    value = int(text)
    return value if abs(value) <= (1 << 53) - 1 else float(value)


def parse_args(raw: bytes) -> dict[str, Any]:
    """Parse wire args: a JSON object in RFC 8785 canonical form, and only that.

    Raises
    ------
    ValueError
        Not UTF-8 JSON, not an object, duplicate keys, NaN, or not canonical.
    """
    text = raw.decode("utf-8")
    value = json.loads(
        text,
        object_pairs_hook=_unique_object,
        parse_constant=_reject_constant,
        parse_int=_parse_int,
    )
    if not isinstance(value, dict):
        raise ValueError(f"expected args as a JSON object, got {_type_name(value)}")
    # One request has one encoding: a non-canonical rendering is refused rather
    # than silently re-canonicalized, so D_r covers exactly the bytes received.
    if canonical_args(value) != raw:
        raise ValueError("expected args in RFC 8785 canonical form")
    return value


# --------------------------------------------------------------------- components


@dataclass(frozen=True, slots=True, eq=False)
class Tensor:
    """A named array that travels as one raw little-endian frame.

    ``data`` is kept as given (a read-only view after decoding); equality compares
    name, dtype, shape and contents.
    """

    name: str
    data: np.ndarray[Any, Any]

    def __post_init__(self) -> None:
        check_name(self.name, "tensor name")
        if not isinstance(self.data, np.ndarray):
            raise TypeError(
                f"expected tensor data as numpy.ndarray, got {_type_name(self.data)}"
            )
        if self.data.dtype.name not in TENSOR_DTYPES:
            raise TypeError(
                f"expected a tensor dtype in {sorted(TENSOR_DTYPES)}, "
                f"got {self.data.dtype}"
            )
        if not _is_little_endian(self.data.dtype):
            raise ValueError(
                f"expected a little-endian tensor, got {self.data.dtype.str}"
            )
        _check_shape(self.data.shape, "tensor")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (
            self.name == other.name
            and self.data.dtype == other.data.dtype
            and self.data.shape == other.data.shape
            # Messages are equal when their bytes are: NaN payloads compare equal
            # to themselves, and -0.0 differs from 0.0.
            and self.data.tobytes() == other.data.tobytes()
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A stream the round aggregates: its name and the shape every node must send."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        check_name(self.name, "stream name")
        _check_shape(self.shape, "stream")
        if math.prod(self.shape) + MASK_EXTRA_WORDS > MAX_WORDS:
            raise ValueError(
                f"expected a stream of at most {MAX_WORDS - MASK_EXTRA_WORDS} elements"
            )

    @property
    def size(self) -> int:
        """Number of data words d."""
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class ShareBoxes:
    """The two AEAD boxes u sends v in a round: v's shares of c_u^r and of b_u^r."""

    c: bytes
    b: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.c, "c-share box", max_size=MAX_BOX_SIZE)
        _check_bytes(self.b, "b-share box", max_size=MAX_BOX_SIZE)


@dataclass(frozen=True, slots=True)
class ContextAdvertEntry:
    """A relayed context advert: node, its Ed25519 key, E_u and the signature."""

    node: str
    identity_key: bytes
    share_key: bytes
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.node, "node id")
        _check_bytes(self.identity_key, "identity key", KEY_SIZE)
        _check_bytes(self.share_key, "share key", KEY_SIZE)
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True)
class TranscriptSigEntry:
    """A relayed transcript signature: node, the T it signed, the signature."""

    node: str
    transcript: bytes
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.node, "node id")
        _check_bytes(self.transcript, "transcript", DIGEST_SIZE)
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True)
class RoundAdvertEntry:
    """A relayed round advert: sender, C_u^r, signature, and the recipient's boxes."""

    node: str
    mask_key: bytes
    signature: bytes
    c_box: bytes
    b_box: bytes

    def __post_init__(self) -> None:
        check_id(self.node, "node id")
        _check_bytes(self.mask_key, "mask key", KEY_SIZE)
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)
        _check_bytes(self.c_box, "c-share box", max_size=MAX_BOX_SIZE)
        _check_bytes(self.b_box, "b-share box", max_size=MAX_BOX_SIZE)


@dataclass(frozen=True, slots=True)
class SurvivorSigEntry:
    """A relayed survivor signature on S."""

    node: str
    signature: bytes

    def __post_init__(self) -> None:
        check_id(self.node, "node id")
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)


def _check_entries(value: object, cls: type, what: str, *, min_len: int = 0) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"expected {what} as a tuple, got {_type_name(value)}")
    if not min_len <= len(value) <= MAX_NODES:
        raise ValueError(f"expected {min_len} to {MAX_NODES} {what}, got {len(value)}")
    for item in value:
        if not isinstance(item, cls):
            raise TypeError(
                f"expected {what} of type {cls.__name__}, got {_type_name(item)}"
            )
    _check_strictly_sorted([_utf8(item.node) for item in value], what)


def _check_tensors(value: object, what: str, max_len: int) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"expected {what} as a tuple, got {_type_name(value)}")
    if len(value) > max_len:
        raise ValueError(f"expected at most {max_len} {what}, got {len(value)}")
    names = set()
    for item in value:
        if not isinstance(item, Tensor):
            raise TypeError(f"expected {what} of type Tensor, got {_type_name(item)}")
        names.add(item.name)
    if len(names) != len(value):
        raise ValueError(f"expected {what} with distinct names")


def _check_tensor_bytes(value: tuple[Tensor, ...], what: str) -> None:
    for tensor in value:
        if tensor.data.nbytes > MAX_FIELD_BYTES:
            raise ValueError(
                f"expected {what} tensors of at most {MAX_FIELD_BYTES} bytes, "
                f"got {tensor.data.nbytes}"
            )


# ------------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Fields every message carries in its header (DESIGN §3, STYLE §6)."""

    TYPE: ClassVar[MsgType]

    context_id: bytes
    round: int
    sender: str

    def __post_init__(self) -> None:
        _check_bytes(self.context_id, "context_id", DIGEST_SIZE)
        _check_int(self.round, "round", 0, (1 << 63) - 1)
        check_id(self.sender, "sender")
        self._check()

    def _check(self) -> None:
        """Check the type-specific fields (overridden per message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SetupRequest(Message):
    """Researcher -> node: build a context (DESIGN §3, ``setup()``)."""

    TYPE: ClassVar[MsgType] = MsgType.SETUP_REQUEST
    job_id: str
    nodes: tuple[str, ...]
    ring_bits: int
    clipping_range: float
    threshold: int
    nonce: bytes

    def _check(self) -> None:
        check_name(self.job_id, "job_id")
        _check_sorted_ids(self.nodes, "nodes", min_len=2)
        if self.ring_bits not in (32, 64) or isinstance(self.ring_bits, bool):
            raise ValueError(f"expected ring_bits 32 or 64, got {self.ring_bits!r}")
        if not isinstance(self.clipping_range, float):
            raise TypeError(
                "expected clipping_range of type float, "
                f"got {_type_name(self.clipping_range)}"
            )
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise ValueError(
                f"expected a finite clipping_range > 0, got {self.clipping_range}"
            )
        _check_int(self.threshold, "threshold", 1, MAX_NODES)
        _check_bytes(self.nonce, "nonce", NONCE_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextAdvert(Message):
    """Node -> researcher: E_u signed ("advert-e", context_id, u, E_u)."""

    TYPE: ClassVar[MsgType] = MsgType.CONTEXT_ADVERT
    identity_key: bytes
    share_key: bytes
    signature: bytes

    def _check(self) -> None:
        _check_bytes(self.identity_key, "identity key", KEY_SIZE)
        _check_bytes(self.share_key, "share key", KEY_SIZE)
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextAdverts(Message):
    """Researcher -> node: every node's context advert, sorted by id."""

    TYPE: ClassVar[MsgType] = MsgType.CONTEXT_ADVERTS
    adverts: tuple[ContextAdvertEntry, ...]

    def _check(self) -> None:
        _check_entries(self.adverts, ContextAdvertEntry, "context adverts")


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptSig(Message):
    """Node -> researcher: the node's signature on T."""

    TYPE: ClassVar[MsgType] = MsgType.TRANSCRIPT_SIG
    transcript: bytes
    signature: bytes

    def _check(self) -> None:
        _check_bytes(self.transcript, "transcript", DIGEST_SIZE)
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class TranscriptSigs(Message):
    """Researcher -> node: every node's transcript signature, sorted by id."""

    TYPE: ClassVar[MsgType] = MsgType.TRANSCRIPT_SIGS
    signatures: tuple[TranscriptSigEntry, ...]

    def _check(self) -> None:
        _check_entries(self.signatures, TranscriptSigEntry, "transcript signatures")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRequest(Message):
    """Researcher -> node: run a task or plan and aggregate its streams in round r."""

    TYPE: ClassVar[MsgType] = MsgType.ROUND_REQUEST
    kind: str
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    weights: tuple[Tensor, ...] = ()
    streams: tuple[StreamSpec, ...]

    def _check(self) -> None:
        if self.kind not in ("task", "plan"):
            raise ValueError(f"expected kind 'task' or 'plan', got {self.kind!r}")
        check_name(self.name, "task or plan name")
        _check_args(self.args)
        _check_tensors(self.weights, "weights", MAX_TENSORS)
        # The weights hash (part of D_r) prefixes each tensor's bytes with a 4-byte
        # length: a larger tensor cannot be hashed.
        _check_tensor_bytes(self.weights, "weights")
        if not isinstance(self.streams, tuple):
            raise TypeError(
                f"expected streams as a tuple, got {_type_name(self.streams)}"
            )
        if not 1 <= len(self.streams) <= MAX_STREAMS:
            raise ValueError(
                f"expected 1 to {MAX_STREAMS} streams, got {len(self.streams)}"
            )
        for spec in self.streams:
            if not isinstance(spec, StreamSpec):
                raise TypeError(
                    f"expected streams of type StreamSpec, got {_type_name(spec)}"
                )
        if len({s.name for s in self.streams}) != len(self.streams):
            raise ValueError("expected streams with distinct names")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundAdvert(Message):
    """Node -> researcher: C_u^r, its signature and per-peer share boxes.

    The signature is over ("advert-c", T, r, u, C_u^r).
    """

    TYPE: ClassVar[MsgType] = MsgType.ROUND_ADVERT
    mask_key: bytes
    signature: bytes
    shares: Mapping[str, ShareBoxes]

    def _check(self) -> None:
        _check_bytes(self.mask_key, "mask key", KEY_SIZE)
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)

        def boxes(item: object) -> None:
            if not isinstance(item, ShareBoxes):
                raise TypeError(f"expected ShareBoxes, got {_type_name(item)}")

        _check_str_mapping(self.shares, "shares", boxes)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundAdverts(Message):
    """Researcher -> node v: each peer's round advert with the boxes addressed to v."""

    TYPE: ClassVar[MsgType] = MsgType.ROUND_ADVERTS
    adverts: tuple[RoundAdvertEntry, ...]

    def _check(self) -> None:
        _check_entries(self.adverts, RoundAdvertEntry, "round adverts")


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskedInput(Message):
    """Node -> researcher: the masked vectors and the seed commitment.

    One masked vector per stream, of d + 6 ring words.
    """

    TYPE: ClassVar[MsgType] = MsgType.MASKED_INPUT
    ring_bits: int
    commitment: bytes
    peers: tuple[str, ...]
    vectors: tuple[Tensor, ...]

    def _check(self) -> None:
        if self.ring_bits not in (32, 64) or isinstance(self.ring_bits, bool):
            raise ValueError(f"expected ring_bits 32 or 64, got {self.ring_bits!r}")
        _check_bytes(self.commitment, "commitment", DIGEST_SIZE)
        _check_sorted_ids(self.peers, "peers")
        _check_tensors(self.vectors, "vectors", MAX_STREAMS)
        if not self.vectors:
            raise ValueError("expected at least one vector")
        want = _RING_DTYPES[self.ring_bits]
        for vec in self.vectors:
            if vec.data.dtype.name != want or vec.data.ndim != 1:
                raise TypeError(
                    f"expected 1-D {want} masked vectors, "
                    f"got {vec.data.ndim}-D {vec.data.dtype}"
                )
            if vec.data.shape[0] < MASK_EXTRA_WORDS:
                raise ValueError(
                    f"expected at least {MASK_EXTRA_WORDS} words per vector, "
                    f"got {vec.data.shape[0]}"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class Survivors(Message):
    """Researcher -> survivor: the survivor set S it must sign."""

    TYPE: ClassVar[MsgType] = MsgType.SURVIVORS
    survivors: tuple[str, ...]

    def _check(self) -> None:
        _check_sorted_ids(self.survivors, "survivors", min_len=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SurvivorSig(Message):
    """Survivor -> researcher: its signature ("survivors", T, r, S)."""

    TYPE: ClassVar[MsgType] = MsgType.SURVIVOR_SIG
    survivors: tuple[str, ...]
    signature: bytes

    def _check(self) -> None:
        _check_sorted_ids(self.survivors, "survivors", min_len=1)
        _check_bytes(self.signature, "signature", SIGNATURE_SIZE)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskRequest(Message):
    """Researcher -> survivor: S and the survivors' signatures on it."""

    TYPE: ClassVar[MsgType] = MsgType.UNMASK_REQUEST
    survivors: tuple[str, ...]
    signatures: tuple[SurvivorSigEntry, ...]

    def _check(self) -> None:
        _check_sorted_ids(self.survivors, "survivors", min_len=1)
        _check_entries(self.signatures, SurvivorSigEntry, "survivor signatures")


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskShares(Message):
    """Survivor -> researcher: b-shares for S, c-shares for P_u^r outside S.

    The shares are plaintext Shamir shares.
    """

    TYPE: ClassVar[MsgType] = MsgType.UNMASK_SHARES
    b_shares: Mapping[str, bytes]
    c_shares: Mapping[str, bytes]

    def _check(self) -> None:
        def share(item: object) -> None:
            _check_bytes(item, "share", max_size=MAX_SHARE_SIZE)

        _check_str_mapping(self.b_shares, "b-shares", share)
        _check_str_mapping(self.c_shares, "c-shares", share)
        if set(self.b_shares) & set(self.c_shares):
            # DESIGN §3: never both shares of one node, or its mask would be exposed.
            raise ValueError("expected b-shares and c-shares for disjoint nodes")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearUpdate(Message):
    """Node -> researcher: trained weights in the clear and the sample count.

    Cleartext training only (``Experiment(secagg=False)``): it travels under the
    drivers' all-zero context id and no protocol machine ever accepts it. Values
    are not checked for finiteness here (the receiver checks them).
    """

    TYPE: ClassVar[MsgType] = MsgType.CLEAR_UPDATE
    samples: int
    tensors: tuple[Tensor, ...]

    def _check(self) -> None:
        _check_int(self.samples, "samples", 0, (1 << 63) - 1)
        _check_tensors(self.tensors, "tensors", MAX_STREAMS)
        if not self.tensors:
            raise ValueError(f"expected 1 to {MAX_STREAMS} tensors, got 0")
        for tensor in self.tensors:
            if tensor.data.dtype.name not in _CLEAR_DTYPES:
                raise TypeError(
                    f"expected float32 or float64 tensors, got {tensor.data.dtype.name}"
                )
        # Same bound as ROUND_REQUEST's weights, which these tensors come back as.
        _check_tensor_bytes(self.tensors, "tensors")


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused(Message):
    """Node -> researcher: a refusal, its reason code, the names of what differed."""

    TYPE: ClassVar[MsgType] = MsgType.REFUSED
    reason: RefusalReason
    fields: tuple[str, ...] = ()

    def _check(self) -> None:
        if not isinstance(self.reason, RefusalReason):
            raise TypeError(
                f"expected reason of type RefusalReason, got {_type_name(self.reason)}"
            )
        if not isinstance(self.fields, tuple):
            raise TypeError(
                f"expected fields as a tuple, got {_type_name(self.fields)}"
            )
        if len(self.fields) > _MAX_FIELDS:
            raise ValueError(
                f"expected at most {_MAX_FIELDS} field names, got {len(self.fields)}"
            )
        for name in self.fields:
            if not isinstance(name, str) or _FIELD_RE.fullmatch(name) is None:
                raise ValueError(f"expected field names matching {_FIELD_RE.pattern}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort(Message):
    """Researcher -> node: the round (or setup, round 0) is over without a sum."""

    TYPE: ClassVar[MsgType] = MsgType.ABORT
    reason: AbortReason

    def _check(self) -> None:
        if not isinstance(self.reason, AbortReason):
            raise TypeError(
                f"expected reason of type AbortReason, got {_type_name(self.reason)}"
            )


AnyMessage = Union[
    SetupRequest,
    ContextAdvert,
    ContextAdverts,
    TranscriptSig,
    TranscriptSigs,
    RoundRequest,
    RoundAdvert,
    RoundAdverts,
    MaskedInput,
    Survivors,
    SurvivorSig,
    UnmaskRequest,
    UnmaskShares,
    ClearUpdate,
    Refused,
    Abort,
]

#: MsgType -> class; every type has exactly one class.
MESSAGE_CLASSES: Final[Mapping[MsgType, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        SetupRequest,
        ContextAdvert,
        ContextAdverts,
        TranscriptSig,
        TranscriptSigs,
        RoundRequest,
        RoundAdvert,
        RoundAdverts,
        MaskedInput,
        Survivors,
        SurvivorSig,
        UnmaskRequest,
        UnmaskShares,
        ClearUpdate,
        Refused,
        Abort,
    )
}
assert set(MESSAGE_CLASSES) == set(MsgType)
