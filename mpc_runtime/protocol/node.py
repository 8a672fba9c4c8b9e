# SPDX-License-Identifier: Apache-2.0
"""The node's protocol machine (DESIGN §3): setup and rounds; no I/O."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Final, Literal

import nacl.signing
import numpy as np

from .. import framing, keys, masking, sharing
from ..encoding import encode
from ..errors import (
    AuthenticationError,
    ClippingWarning,
    ConfigError,
    MalformedMessage,
    PolicyRefused,
)
from ..messages import (
    MASK_EXTRA_WORDS,
    Abort,
    ContextAdvert,
    ContextAdverts,
    MaskedInput,
    Message,
    MsgType,
    RefusalReason,
    Refused,
    RoundAdvert,
    RoundAdverts,
    RoundRequest,
    SetupRequest,
    ShareBoxes,
    Survivors,
    SurvivorSig,
    Tensor,
    TranscriptSig,
    TranscriptSigs,
    UnmaskRequest,
    UnmaskShares,
)
from ._fields import as_bytes, as_int, as_list, as_map, as_str, as_strs
from .round import extra_words, request_digest
from .setup import compute_context_id, compute_transcript, threshold_floor, utf8_sorted
from .store import NodeStore, StepAlreadyCommitted

__all__ = ["NodeStage", "Node", "Outgoing", "InputProvider", "ContextRecord"]

logger = logging.getLogger(__name__)

#: Given the round request, return one float array per stream, of the stream's shape.
InputProvider = Callable[[RoundRequest], Mapping[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message a machine wants sent, and to whom (a node id or the researcher id)."""

    to: str
    message: Message


class NodeStage(Enum):
    """Where one context stands on this node."""

    ADVERTISED = "advertised"  # sent E_u, waits for every node's advert
    TRANSCRIPT_SIGNED = "transcript_signed"  # signed T, waits for every signature on T
    READY = "ready"  # between rounds
    KEYS_SENT = "keys_sent"  # sent C_u^r and shares, waits for the peers' adverts
    UPLOADED = "uploaded"  # sent the masked vectors, waits for S
    SURVIVORS_SIGNED = (
        "survivors_signed"  # signed one S, waits for >= t signatures on it
    )
    FAILED = "failed"  # setup failed or was aborted; the context is unusable


_ROUND_STAGES = frozenset(
    {NodeStage.KEYS_SENT, NodeStage.UPLOADED, NodeStage.SURVIVORS_SIGNED}
)

#: The explicit transition table: stage -> {message type -> next stage}. A message
#: type absent from a stage's row is unexpected there (DESIGN §5: rejected, no change).
TRANSITIONS: Mapping[NodeStage, Mapping[MsgType, NodeStage]] = {
    NodeStage.ADVERTISED: {
        MsgType.CONTEXT_ADVERTS: NodeStage.TRANSCRIPT_SIGNED,
        MsgType.ABORT: NodeStage.FAILED,
    },
    NodeStage.TRANSCRIPT_SIGNED: {
        MsgType.TRANSCRIPT_SIGS: NodeStage.READY,
        MsgType.ABORT: NodeStage.FAILED,
    },
    # An abort for a round this node already closed is ignored without a reply.
    NodeStage.READY: {
        MsgType.ROUND_REQUEST: NodeStage.KEYS_SENT,
        MsgType.ABORT: NodeStage.READY,
    },
    # A newer round request supersedes an unfinished round (a retry is a new round).
    NodeStage.KEYS_SENT: {
        MsgType.ROUND_ADVERTS: NodeStage.UPLOADED,
        MsgType.ROUND_REQUEST: NodeStage.KEYS_SENT,
        MsgType.ABORT: NodeStage.READY,
    },
    NodeStage.UPLOADED: {
        MsgType.SURVIVORS: NodeStage.SURVIVORS_SIGNED,
        MsgType.ROUND_REQUEST: NodeStage.KEYS_SENT,
        MsgType.ABORT: NodeStage.READY,
    },
    NodeStage.SURVIVORS_SIGNED: {
        MsgType.UNMASK_REQUEST: NodeStage.READY,
        MsgType.ROUND_REQUEST: NodeStage.KEYS_SENT,
        MsgType.ABORT: NodeStage.READY,
    },
    NodeStage.FAILED: {},
}


class _Refusal(Exception):
    """Internal: refuse with this reason; ``erase`` ends the current round."""

    def __init__(
        self,
        reason: RefusalReason,
        text: str,
        *,
        fields: tuple[str, ...] = (),
        erase: bool = False,
    ) -> None:
        super().__init__(text)
        self.reason = reason
        self.fields = fields
        self.erase = erase


@dataclass(slots=True)
class ContextRecord:
    """A node's state of one context; saved in the store once ready (holds ``e_u``)."""

    context_id: bytes
    researcher: str
    nodes: tuple[str, ...]
    ring_bits: int
    bits: int
    clipping_range: float
    threshold: int
    e_secret: bytes
    share_key: bytes
    advert_signature: bytes
    identity_keys: dict[str, bytes] = field(default_factory=dict)
    share_keys: dict[str, bytes] = field(default_factory=dict)
    transcript: bytes = b""

    def index(self, node: str) -> int:
        """The 1-based Shamir index x of ``node`` in sorted node order (DESIGN §3)."""
        return self.nodes.index(node) + 1

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (``{field: value}`` in field order; lists for
        tuples), ready for msgpack. It holds ``e_u``: keep it as the record."""
        doc: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            doc[f.name] = value
        return doc

    @classmethod
    def from_dict(
        cls, doc: Mapping[str, Any], *, where: str = "context record"
    ) -> ContextRecord:
        """The record of :meth:`to_dict` output, every field's type checked.

        Raises
        ------
        ConfigError
            ``doc`` is not a record (``where`` names its source in the message).
        """
        values = dict(doc)
        if set(values) != _RECORD_FIELDS:
            raise ConfigError(f"{where}: corrupted context record (unexpected fields)")
        nodes = values["nodes"]
        if not isinstance(nodes, list) or not all(isinstance(v, str) for v in nodes):
            raise ConfigError(f"{where}: corrupted context record (nodes)")
        values["nodes"] = tuple(nodes)
        for name in ("identity_keys", "share_keys"):
            m = values[name]
            if not isinstance(m, dict) or not all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in m.items()
            ):
                raise ConfigError(f"{where}: corrupted context record ({name})")
            values[name] = dict(m)
        for name, kind in _RECORD_SCALARS.items():
            if not isinstance(values[name], kind) or isinstance(values[name], bool):
                raise ConfigError(f"{where}: corrupted context record ({name})")
        return cls(**values)


_RECORD_FIELDS: Final = frozenset(f.name for f in fields(ContextRecord))
_RECORD_SCALARS: Final[Mapping[str, type]] = {
    "context_id": bytes,
    "researcher": str,
    "ring_bits": int,
    "bits": int,
    "clipping_range": float,
    "threshold": int,
    "e_secret": bytes,
    "share_key": bytes,
    "advert_signature": bytes,
    "transcript": bytes,
}


@dataclass(slots=True)
class _RoundState:
    """Secrets and progress of the current round; erased when the round ends."""

    round: int
    request: RoundRequest
    digest: bytes
    inputs: dict[str, np.ndarray]
    c_secret: bytes
    mask_key: bytes
    b_seed: bytes
    own_c: sharing.Share
    own_b: sharing.Share
    peers: tuple[str, ...] = ()
    peer_mask_keys: dict[str, bytes] = field(default_factory=dict)
    held_c: dict[str, sharing.Share] = field(default_factory=dict)
    held_b: dict[str, sharing.Share] = field(default_factory=dict)
    signed_survivors: tuple[str, ...] | None = None
    started: float = 0.0

    def erase(self) -> None:
        # DESIGN §3: c_u^r, b_u^r and held shares are erased when the round closes.
        # Python cannot scrub immutable bytes; dropping every reference is the best
        # this layer can do, and the record itself is discarded by the caller.
        self.c_secret = b""
        self.b_seed = b""
        self.held_c.clear()
        self.held_b.clear()
        self.inputs.clear()
        self.peer_mask_keys.clear()


@dataclass(slots=True)
class _Context:
    record: ContextRecord
    stage: NodeStage
    round: _RoundState | None = None


_ROUND_KEYS: Final = frozenset(
    {
        "round",
        "request",
        "digest",
        "inputs",
        "c_secret",
        "mask_key",
        "b_seed",
        "own_c",
        "own_b",
        "peers",
        "peer_mask_keys",
        "held_c",
        "held_b",
        "signed_survivors",
        "started",
    }
)


def _round_to_dict(
    state: _RoundState, prefix: str, arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    # Only the streams of the request are used after the keys phase; D_r is kept
    # as computed, so the weights (the whole model) are not stored again.
    request = replace(state.request, weights=())
    for name, x in state.inputs.items():
        arrays[f"{prefix}/{name}"] = x
    return {
        "round": state.round,
        "request": bytes(framing.encode(request)[0]),
        "digest": state.digest,
        "inputs": sorted(state.inputs),
        "c_secret": state.c_secret,
        "mask_key": state.mask_key,
        "b_seed": state.b_seed,
        "own_c": state.own_c.to_bytes(),
        "own_b": state.own_b.to_bytes(),
        "peers": list(state.peers),
        "peer_mask_keys": dict(state.peer_mask_keys),
        "held_c": {v: s.to_bytes() for v, s in state.held_c.items()},
        "held_b": {v: s.to_bytes() for v, s in state.held_b.items()},
        "signed_survivors": (
            None if state.signed_survivors is None else list(state.signed_survivors)
        ),
        "started": float(state.started),
    }


def _round_from_dict(
    doc: Mapping[str, Any],
    stage: NodeStage,
    context_id: bytes,
    arrays: Mapping[str, np.ndarray],
) -> _RoundState:
    if set(doc) != _ROUND_KEYS:
        raise ValueError("unexpected round fields")
    request = framing.decode([as_bytes(doc["request"])])
    r = as_int(doc["round"])
    if not isinstance(request, RoundRequest):
        raise TypeError("expected a round request")
    if request.context_id != context_id or request.round != r:
        raise ValueError("the round request is not the round's")
    prefix = context_id.hex()
    names = [as_str(n) for n in as_list(doc["inputs"])]
    sizes = {spec.name: spec.size for spec in request.streams}
    # The inputs are held until the upload, then erased.
    if sorted(names) != (sorted(sizes) if stage is NodeStage.KEYS_SENT else []):
        raise ValueError(f"inputs differ from the request's streams in {stage.value}")
    inputs: dict[str, np.ndarray] = {}
    for name in names:
        x = arrays.get(f"{prefix}/{name}")
        if (
            not isinstance(x, np.ndarray)
            or x.dtype.type not in (np.float32, np.float64)
            or x.shape != (sizes[name],)
        ):
            raise ValueError(
                f"input {name!r} missing or not a float vector of its size"
            )
        inputs[name] = x
    signed = doc["signed_survivors"]
    started = doc["started"]
    if not isinstance(started, float):
        raise TypeError("expected a float start time")
    return _RoundState(
        round=r,
        request=request,
        digest=as_bytes(doc["digest"]),
        inputs=inputs,
        c_secret=as_bytes(doc["c_secret"]),
        mask_key=as_bytes(doc["mask_key"]),
        b_seed=as_bytes(doc["b_seed"]),
        own_c=sharing.Share.from_bytes(as_bytes(doc["own_c"])),
        own_b=sharing.Share.from_bytes(as_bytes(doc["own_b"])),
        peers=as_strs(doc["peers"]),
        peer_mask_keys={
            as_str(v): as_bytes(k) for v, k in as_map(doc["peer_mask_keys"]).items()
        },
        held_c={
            as_str(v): sharing.Share.from_bytes(as_bytes(s))
            for v, s in as_map(doc["held_c"]).items()
        },
        held_b={
            as_str(v): sharing.Share.from_bytes(as_bytes(s))
            for v, s in as_map(doc["held_b"]).items()
        },
        signed_survivors=None if signed is None else as_strs(signed),
        started=started,
    )


def _digest(label: str, *fields: object) -> bytes:
    return hashlib.sha256(encode(label, *fields)).digest()


class Node:
    """One node's protocol machine for any number of contexts.

    Parameters
    ----------
    node_id
        This node's id.
    signing_key
        Its long-term Ed25519 key.
    store
        Durable state (:class:`~mpc_runtime.protocol.store.NodeStore`).
    inputs
        Called with each accepted round request; returns ``{stream: float array}``
        of the requested shapes. May raise :class:`~mpc_runtime.errors.PolicyRefused`.
    roster
        ``{peer id: Ed25519 public key}`` from ``N/peers/``; required when
        ``peer_trust="roster"``.
    peer_trust
        ``"roster"`` (refuse setups naming anyone outside the roster) or ``"tofu"``
        (pin peers' keys on first sight; first contact is then only
        honest-but-curious, which is logged as a warning).
    min_survivors, max_colluding_nodes
        Node policy (DESIGN §3): the smallest sum it takes part in, and κ_node of
        its threshold floor.
    warn_clipping
        Raise a :class:`~mpc_runtime.errors.ClippingWarning` in the caller's thread
        when an input was clipped (DESIGN §4).
    round_timeout
        If set, :meth:`tick` erases a round's secrets once the round is older than
        this (in the caller's clock units); the caller chooses it.
    logger
        A logger to use instead of this module's.

    Notes
    -----
    :meth:`handle` never raises for what a peer or the researcher sends: a bad
    message is answered with a :class:`~mpc_runtime.messages.Refused` carrying a
    reason code (no secrets) and leaves the state unchanged, except where the
    refusal itself ends the round (too few peers). Every release is committed to
    ``store`` before the message is returned.
    """

    def __init__(
        self,
        node_id: str,
        signing_key: nacl.signing.SigningKey,
        *,
        store: NodeStore,
        inputs: InputProvider,
        roster: Mapping[str, bytes] | None = None,
        peer_trust: Literal["roster", "tofu"] = "roster",
        min_survivors: int = 2,
        max_colluding_nodes: int = 0,
        warn_clipping: bool = True,
        round_timeout: float | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if peer_trust not in ("roster", "tofu"):
            raise ValueError(
                f"expected peer_trust 'roster' or 'tofu', got {peer_trust!r}"
            )
        if peer_trust == "roster" and roster is None:
            raise ValueError("expected a roster when peer_trust='roster'")
        self.node_id = node_id
        self._signing_key = signing_key
        self.identity_key = bytes(signing_key.verify_key)
        self._store = store
        self._inputs = inputs
        self._roster = dict(roster or {})
        self._peer_trust = peer_trust
        self._min_survivors = max(2, min_survivors)
        self._kappa = max_colluding_nodes
        self._warn_clipping = warn_clipping
        self._round_timeout = round_timeout
        self._log = logger or globals()["logger"]
        self._contexts: dict[bytes, _Context] = {}
        self._now = 0.0
        #: The last refusal, for drivers and tests (reason, text); never secret.
        self.last_refusal: tuple[RefusalReason, str] | None = None
        #: The clipping statistics of the last upload, per stream (stay on the node).
        self.last_clip_stats: dict[str, masking.ClipStats] = {}

    # ----------------------------------------------------------------- public

    def stage(self, context_id: bytes) -> NodeStage | None:
        """The stage of a context on this node, or None if unknown."""
        ctx = self._context(context_id)
        return ctx.stage if ctx else None

    def current_round(self, context_id: bytes) -> int | None:
        """The round in progress in a context, if any."""
        ctx = self._context(context_id)
        return ctx.round.round if ctx and ctx.round else None

    def holds_round_secrets(self, context_id: bytes) -> bool:
        """Whether c_u^r, b_u^r or held shares exist for the context (tests erasure)."""
        ctx = self._context(context_id)
        return bool(ctx and ctx.round is not None)

    def export_contexts(self) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
        """The machine's in-flight state, for a driver whose process ends between
        messages (a Flower deployment runs one process per message).

        Exported: every context in setup (its record, with ``e_u``) and every
        ready context with a round in progress, **including the round's secrets**:
        c_u^r, b_u^r, the shares held for the peers, the peers' mask keys and the
        node's inputs. The caller then holds secrets and must keep them as it
        keeps ``e_u`` (the store's records): on the node's own machine, never
        sent. A round's secrets are exported only while the round is open; once
        it ends (reveal, abort, superseded) the next export no longer has them.
        Ready contexts without a round are left out (the store holds their
        records and the machine reloads them on demand), and so are failed ones
        (unknown and failed contexts are refused alike).

        Returns
        -------
        docs, arrays
            ``docs``: one dict per context of plain msgpack-able data (bytes, str,
            int, float, None, lists, dicts). ``arrays``: the round inputs, keyed
            ``"<context id hex>/<stream>"``. Nothing is pickled. The round request
            is kept without its weights (only its streams are used after keys).
        """
        docs: list[dict[str, Any]] = []
        arrays: dict[str, np.ndarray] = {}
        for cid, ctx in self._contexts.items():
            if ctx.stage is NodeStage.FAILED or (
                ctx.stage is NodeStage.READY and ctx.round is None
            ):
                continue
            docs.append(
                {
                    "record": ctx.record.to_dict(),
                    "stage": ctx.stage.value,
                    "round": None
                    if ctx.round is None
                    else _round_to_dict(ctx.round, cid.hex(), arrays),
                }
            )
        return docs, arrays

    def import_contexts(
        self,
        docs: Sequence[Mapping[str, Any]],
        arrays: Mapping[str, np.ndarray],
        *,
        where: str = "node snapshot",
    ) -> None:
        """Put :meth:`export_contexts` output into this (fresh) machine.

        Use it before the first :meth:`handle`, with the store the exporting
        machine used (or one rebuilt from its snapshot). A record the store also
        holds is shared with the store, as in a machine that never stopped. A
        context the machine already holds is replaced.

        Everything is checked before anything changes: each field's type, the
        stage (a round exactly in the round stages), the shares, the request
        (decoded as a message), and the inputs (until the upload, one float vector
        per requested stream, of the stream's size; none after). ``where`` names the source in errors.

        Raises
        ------
        ConfigError
            The data is not :meth:`export_contexts` output.
        """
        contexts: dict[bytes, _Context] = {}
        try:
            for doc in docs:
                if not isinstance(doc, Mapping) or set(doc) != {
                    "record",
                    "stage",
                    "round",
                }:
                    raise ValueError("unexpected fields")
                record = ContextRecord.from_dict(as_map(doc["record"]), where=where)
                saved = self._store.load_context(record.context_id)
                if isinstance(saved, ContextRecord):
                    record = saved
                stage = NodeStage(as_str(doc["stage"]))
                if stage in (NodeStage.FAILED, NodeStage.READY):
                    raise ValueError(f"unexpected stage {stage.value}")
                rnd = doc["round"]
                if (rnd is None) == (stage in _ROUND_STAGES):
                    raise ValueError(f"round state does not match {stage.value}")
                contexts[record.context_id] = _Context(
                    record=record,
                    stage=stage,
                    round=None
                    if rnd is None
                    else _round_from_dict(
                        as_map(rnd), stage, record.context_id, arrays
                    ),
                )
        except (TypeError, ValueError, KeyError, MalformedMessage) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: corrupted node snapshot ({e})") from None
        self._contexts.update(contexts)

    def handle(self, msg: Message, now: float) -> list[Outgoing]:
        """Process one message from the researcher; return what to send back.

        Parameters
        ----------
        msg
            A decoded message (:func:`mpc_runtime.framing.decode`).
        now
            The caller's clock (seconds); the node itself sets no deadlines.

        Returns
        -------
        list of Outgoing
            Zero or one message to the researcher.
        """
        self._now = now
        try:
            return self._dispatch(msg)
        except _Refusal as refusal:
            return self._refuse(msg, refusal)
        except StepAlreadyCommitted as e:
            return self._refuse(msg, _Refusal(RefusalReason.ALREADY_COMMITTED, str(e)))

    def tick(self, now: float) -> None:
        """Erase the secrets of rounds older than ``round_timeout`` (DESIGN §3: a round
        that times out on the node is over for it)."""
        if self._round_timeout is None:
            return
        for ctx in self._contexts.values():
            if ctx.round is not None and now - ctx.round.started >= self._round_timeout:
                self._log.warning(
                    "round=%d timed out on this node; secrets erased", ctx.round.round
                )
                self._end_round(ctx)

    # --------------------------------------------------------------- dispatch

    def _context(self, context_id: bytes) -> _Context | None:
        ctx = self._contexts.get(context_id)
        if ctx is None:
            # After a restart a ready context comes back from the store; round
            # secrets do not, so an interrupted round is simply over.
            record = self._store.load_context(context_id)
            if isinstance(record, ContextRecord):
                ctx = _Context(record=record, stage=NodeStage.READY)
                self._contexts[context_id] = ctx
        return ctx

    def _dispatch(self, msg: Message) -> list[Outgoing]:
        if isinstance(msg, SetupRequest):
            return self._on_setup_request(msg)
        ctx = self._context(msg.context_id)
        if ctx is None:
            raise _Refusal(RefusalReason.UNEXPECTED, "unknown context")
        if msg.sender != ctx.record.researcher:
            raise _Refusal(
                RefusalReason.UNEXPECTED, "message not from the context's researcher"
            )
        row = TRANSITIONS[ctx.stage]
        if msg.TYPE not in row:
            raise _Refusal(
                RefusalReason.UNEXPECTED, f"{msg.TYPE.name} in stage {ctx.stage.value}"
            )
        if isinstance(msg, RoundRequest):
            out = self._on_round_request(ctx, msg)
        elif isinstance(msg, Abort):
            out = self._on_abort(ctx, msg)
        elif isinstance(msg, ContextAdverts):
            out = self._on_context_adverts(ctx, msg)
        elif isinstance(msg, TranscriptSigs):
            out = self._on_transcript_sigs(ctx, msg)
        else:
            state = ctx.round
            if state is None or msg.round != state.round:
                raise _Refusal(RefusalReason.UNEXPECTED, "message for another round")
            if isinstance(msg, RoundAdverts):
                out = self._on_round_adverts(ctx, state, msg)
            elif isinstance(msg, Survivors):
                out = self._on_survivors(ctx, state, msg)
            elif isinstance(msg, UnmaskRequest):
                out = self._on_unmask_request(ctx, state, msg)
            else:  # pragma: no cover - the transition table admits nothing else
                raise _Refusal(RefusalReason.UNEXPECTED, msg.TYPE.name)
        ctx.stage = row[msg.TYPE]
        return out

    def _refuse(self, msg: Message, refusal: _Refusal) -> list[Outgoing]:
        self.last_refusal = (refusal.reason, str(refusal))
        self._log.warning(
            "refused context=%s round=%d type=%s reason=%s: %s",
            msg.context_id[:4].hex(),
            msg.round,
            msg.TYPE.name,
            refusal.reason.name,
            refusal,
        )
        ctx = self._contexts.get(msg.context_id)
        if refusal.erase and ctx is not None:
            self._end_round(ctx)
        out = Refused(
            context_id=msg.context_id,
            round=msg.round,
            sender=self.node_id,
            reason=refusal.reason,
            fields=refusal.fields,
        )
        return [Outgoing(msg.sender, out)]

    def _commit(self, ctx: _Context, round_: int, phase: str, digest: bytes) -> None:
        # DESIGN §3 durability: the step is spent once committed, before release.
        self._store.commit(ctx.record.context_id, round_, phase, digest)

    def _end_round(self, ctx: _Context) -> None:
        if ctx.round is not None:
            ctx.round.erase()
            ctx.round = None
        if ctx.stage in _ROUND_STAGES:
            ctx.stage = NodeStage.READY

    # ------------------------------------------------------------------ setup

    def _on_setup_request(self, msg: SetupRequest) -> list[Outgoing]:
        cid = msg.context_id
        if cid in self._contexts or self._store.seen_context(cid):
            # DESIGN §3: a context_id seen before is refused (replayed setup).
            raise _Refusal(RefusalReason.CONTEXT_SEEN, "context already seen")
        if self.node_id not in msg.nodes:
            raise _Refusal(
                RefusalReason.UNEXPECTED, "this node is not named", fields=("nodes",)
            )
        n = len(msg.nodes)
        floor = threshold_floor(n, self._kappa)
        if not floor <= msg.threshold <= n:
            raise _Refusal(
                RefusalReason.THRESHOLD,
                f"threshold {msg.threshold} outside [{floor}, {n}]",
                fields=("threshold",),
            )
        if n < self._min_survivors:
            raise _Refusal(
                RefusalReason.POLICY,
                "fewer nodes than min_survivors",
                fields=("nodes",),
            )
        if self._peer_trust == "roster":
            outside = [
                v for v in msg.nodes if v != self.node_id and v not in self._roster
            ]
            if outside:
                raise _Refusal(
                    RefusalReason.ROSTER,
                    f"{len(outside)} node(s) outside the roster",
                    fields=("nodes",),
                )
        try:
            bits = masking.bits_for(n, msg.ring_bits)
        except ValueError:
            raise _Refusal(
                RefusalReason.POLICY, "no bits left in the ring", fields=("ring_bits",)
            ) from None
        expected = compute_context_id(
            researcher_id=msg.sender,
            job_id=msg.job_id,
            nodes=msg.nodes,
            ring_bits=msg.ring_bits,
            bits=bits,
            clipping_range=msg.clipping_range,
            threshold=msg.threshold,
            nonce=msg.nonce,
        )
        if not hmac.compare_digest(expected, cid):
            raise _Refusal(
                RefusalReason.CONTEXT_MISMATCH,
                "context_id does not match the request",
                fields=("context_id",),
            )
        e_secret, e_public = keys.generate_x25519()
        signature = keys.sign(
            self._signing_key, "advert-e", cid, self.node_id, e_public
        )
        record = ContextRecord(
            context_id=cid,
            researcher=msg.sender,
            nodes=msg.nodes,
            ring_bits=msg.ring_bits,
            bits=bits,
            clipping_range=msg.clipping_range,
            threshold=msg.threshold,
            e_secret=e_secret,
            share_key=e_public,
            advert_signature=signature,
        )
        self._store.begin_context(cid)
        self._store.commit(cid, 0, "advert-e", _digest("step", e_public))
        self._contexts[cid] = _Context(record=record, stage=NodeStage.ADVERTISED)
        self._log.info(
            "context=%s setup: advertised (n=%d t=%d)", cid[:4].hex(), n, msg.threshold
        )
        advert = ContextAdvert(
            context_id=cid,
            round=0,
            sender=self.node_id,
            identity_key=self.identity_key,
            share_key=e_public,
            signature=signature,
        )
        return [Outgoing(msg.sender, advert)]

    def _identity_of(self, node: str, advertised: bytes) -> bytes:
        if node == self.node_id:
            return self.identity_key
        if self._peer_trust == "roster":
            return self._roster[node]
        # TOFU: the pinned key, else the advertised one; the caller pins it only once
        # every advert of the message has verified (a refused message pins nothing).
        pinned = self._store.pinned_key(node)
        return advertised if pinned is None else pinned

    def _on_context_adverts(self, ctx: _Context, msg: ContextAdverts) -> list[Outgoing]:
        rec = ctx.record
        if tuple(a.node for a in msg.adverts) != rec.nodes:
            raise _Refusal(
                RefusalReason.CONTEXT_MISMATCH,
                "adverts do not name the context's nodes",
                fields=("adverts",),
            )
        share_keys = [a.share_key for a in msg.adverts]
        if len(set(share_keys)) != len(share_keys):
            # DESIGN §3: duplicate public keys in one transcript are rejected.
            raise _Refusal(
                RefusalReason.CONTEXT_MISMATCH,
                "duplicate share keys",
                fields=("share_key",),
            )
        identities: dict[str, bytes] = {}
        for advert in msg.adverts:
            if advert.node == self.node_id:
                if (advert.share_key, advert.signature, advert.identity_key) != (
                    rec.share_key,
                    rec.advert_signature,
                    self.identity_key,
                ):
                    raise _Refusal(
                        RefusalReason.CONTEXT_MISMATCH,
                        "own advert altered",
                        fields=("share_key",),
                    )
                identities[advert.node] = self.identity_key
                continue
            identity = self._identity_of(advert.node, advert.identity_key)
            try:
                keys.verify(
                    identity,
                    advert.signature,
                    "advert-e",
                    rec.context_id,
                    advert.node,
                    advert.share_key,
                )
            except AuthenticationError:
                raise _Refusal(
                    RefusalReason.AUTHENTICATION, "bad advert signature"
                ) from None
            identities[advert.node] = identity
        if self._peer_trust == "tofu":
            for node, identity in identities.items():
                if node != self.node_id and self._store.pinned_key(node) is None:
                    self._log.warning(
                        "peer=%s pinned on first sight (TOFU): "
                        "first contact is only honest-but-curious",
                        node,
                    )
                    self._store.pin_key(node, identity)
        transcript = compute_transcript(rec.context_id, msg.adverts)
        signature = keys.sign(
            self._signing_key,
            "transcript-sig",
            rec.context_id,
            self.node_id,
            transcript,
        )
        self._commit(ctx, 0, "transcript-sig", transcript)
        rec.identity_keys = identities
        rec.share_keys = {a.node: a.share_key for a in msg.adverts}
        rec.transcript = transcript
        return [
            Outgoing(
                rec.researcher,
                TranscriptSig(
                    context_id=rec.context_id,
                    round=0,
                    sender=self.node_id,
                    transcript=transcript,
                    signature=signature,
                ),
            )
        ]

    def _on_transcript_sigs(self, ctx: _Context, msg: TranscriptSigs) -> list[Outgoing]:
        rec = ctx.record
        if tuple(s.node for s in msg.signatures) != rec.nodes:
            raise _Refusal(
                RefusalReason.CONTEXT_MISMATCH,
                "signatures do not name the context's nodes",
                fields=("signatures",),
            )
        differing = [s.node for s in msg.signatures if s.transcript != rec.transcript]
        if differing:
            # DESIGN §3: all n nodes must hold the same T before the first round.
            raise _Refusal(
                RefusalReason.CONTEXT_MISMATCH,
                f"{len(differing)} node(s) signed another transcript",
                fields=("transcript",),
            )
        for entry in msg.signatures:
            try:
                keys.verify(
                    rec.identity_keys[entry.node],
                    entry.signature,
                    "transcript-sig",
                    rec.context_id,
                    entry.node,
                    rec.transcript,
                )
            except AuthenticationError:
                raise _Refusal(
                    RefusalReason.AUTHENTICATION, "bad transcript signature"
                ) from None
        self._store.save_context(rec.context_id, rec)
        self._log.info("context=%s setup: ready", rec.context_id[:4].hex())
        return []

    def _on_abort(self, ctx: _Context, msg: Abort) -> list[Outgoing]:
        if ctx.stage is NodeStage.READY:
            return []
        if ctx.stage in _ROUND_STAGES:
            if ctx.round is None or msg.round != ctx.round.round:
                raise _Refusal(RefusalReason.UNEXPECTED, "abort for another round")
            self._log.warning(
                "round=%d aborted by the researcher (%s)", msg.round, msg.reason.name
            )
            self._end_round(ctx)
            return []
        # Setup aborted: the context is unusable; drop its e key.
        self._store.drop_context(ctx.record.context_id)
        ctx.record.e_secret = b""
        return []

    # ------------------------------------------------------------------ round

    def _on_round_request(self, ctx: _Context, msg: RoundRequest) -> list[Outgoing]:
        rec = ctx.record
        last = self._store.last_round(rec.context_id)
        current = ctx.round.round if ctx.round else 0
        if msg.round <= max(last, current):
            # DESIGN §3: one strictly increasing counter per context, across restarts.
            raise _Refusal(
                RefusalReason.UNEXPECTED,
                f"round {msg.round} not after {max(last, current)}",
                fields=("round",),
            )
        if ctx.round is not None:
            self._log.warning(
                "round=%d superseded by round=%d", ctx.round.round, msg.round
            )
            self._end_round(ctx)
        digest = request_digest(rec.transcript, msg)
        # DESIGN §3: r is spent once accepted for processing, so a round refused
        # below (shape, policy, input) can never be reused, across restarts too.
        self._commit(ctx, msg.round, "request", digest)
        inputs = self._collect_inputs(msg)
        c_secret, c_public = keys.generate_x25519()
        b_seed = os.urandom(keys.SEED_SIZE)
        xs = list(range(1, len(rec.nodes) + 1))
        c_shares = sharing.split(c_secret, threshold=rec.threshold, xs=xs)
        b_shares = sharing.split(b_seed, threshold=rec.threshold, xs=xs)
        me = self.node_id
        boxes: dict[str, ShareBoxes] = {}
        for v in rec.nodes:
            if v == me:
                continue
            x = rec.index(v)
            key = keys.share_key(
                rec.e_secret,
                rec.share_keys[v],
                transcript=rec.transcript,
                sender=me,
                receiver=v,
            )
            sealed = {}
            for kind, share in (("c", c_shares[x - 1]), ("b", b_shares[x - 1])):
                aad = keys.share_aad(
                    kind=kind,
                    transcript=rec.transcript,
                    round=msg.round,
                    sender=me,
                    receiver=v,
                    x=x,
                )
                sealed[kind] = keys.seal(key, share.to_bytes(), aad=aad)
            boxes[v] = ShareBoxes(c=sealed["c"], b=sealed["b"])
        signature = keys.sign(
            self._signing_key, "advert-c", rec.transcript, msg.round, me, c_public
        )
        own = rec.index(me) - 1
        state = _RoundState(
            round=msg.round,
            request=msg,
            digest=digest,
            inputs=inputs,
            c_secret=c_secret,
            mask_key=c_public,
            b_seed=b_seed,
            own_c=c_shares[own],
            own_b=b_shares[own],
            started=self._now,
        )
        self._commit(ctx, msg.round, "advert-c", _digest("step", c_public))
        ctx.round = state
        self._log.info(
            "round=%d stage=keys: advert sent to %d peers", msg.round, len(boxes)
        )
        return [
            Outgoing(
                rec.researcher,
                RoundAdvert(
                    context_id=rec.context_id,
                    round=msg.round,
                    sender=me,
                    mask_key=c_public,
                    signature=signature,
                    shares=boxes,
                ),
            )
        ]

    def _collect_inputs(self, msg: RoundRequest) -> dict[str, np.ndarray]:
        try:
            produced = self._inputs(msg)
        except PolicyRefused as e:
            raise _Refusal(RefusalReason.POLICY, f"policy refused: {e}") from None
        # The provider is caller code (a task or training plan): whatever it raises
        # becomes one refusal code, and its text stays in this node's log only.
        except Exception as e:
            self._log.error(
                "round=%d input provider failed: %s", msg.round, type(e).__name__
            )
            raise _Refusal(RefusalReason.INPUT, "input provider failed") from None
        inputs: dict[str, np.ndarray] = {}
        names = {s.name for s in msg.streams}
        if not isinstance(produced, Mapping) or set(produced) != names:
            # DESIGN §3: refuse without revealing what this node would have sent.
            raise _Refusal(
                RefusalReason.SHAPE,
                "streams differ from the request",
                fields=("streams",),
            )
        for spec in msg.streams:
            x = produced[spec.name]
            if not isinstance(x, np.ndarray) or x.dtype.type not in (
                np.float32,
                np.float64,
            ):
                raise _Refusal(
                    RefusalReason.SHAPE,
                    "input is not a float array",
                    fields=("streams",),
                )
            if tuple(x.shape) != spec.shape:
                raise _Refusal(
                    RefusalReason.SHAPE,
                    "input shape differs from the request",
                    fields=("streams",),
                )
            inputs[spec.name] = x.reshape(-1)
        return inputs

    def _open_share(
        self, rec: ContextRecord, r: int, sender: str, kind: str, box: bytes
    ) -> sharing.Share:
        me = self.node_id
        x = rec.index(me)
        key = keys.share_key(
            rec.e_secret,
            rec.share_keys[sender],
            transcript=rec.transcript,
            sender=sender,
            receiver=me,
        )
        # DESIGN §3: the receiver rebuilds the AAD from its own view (kind, T, r,
        # u = sender, v = itself, x = its own index), so a relabelled, reflected or
        # replayed box does not open.
        aad = keys.share_aad(
            kind=kind,
            transcript=rec.transcript,
            round=r,
            sender=sender,
            receiver=me,
            x=x,
        )
        share = sharing.Share.from_bytes(keys.open_sealed(key, box, aad=aad))
        if share.x != x:
            raise AuthenticationError("share index mismatch")
        return share

    def _on_round_adverts(
        self, ctx: _Context, state: _RoundState, msg: RoundAdverts
    ) -> list[Outgoing]:
        rec = ctx.record
        me = self.node_id
        r = state.round
        peers: list[str] = []
        for entry in msg.adverts:
            v = entry.node
            if v == me or v not in rec.share_keys:
                continue
            try:
                keys.verify(
                    rec.identity_keys[v],
                    entry.signature,
                    "advert-c",
                    rec.transcript,
                    r,
                    v,
                    entry.mask_key,
                )
                c_share = self._open_share(rec, r, v, "c", entry.c_box)
                b_share = self._open_share(rec, r, v, "b", entry.b_box)
                # A low-order C_v^r fails here, before v can be used.
                keys.x25519(state.c_secret, entry.mask_key)
            except (AuthenticationError, MalformedMessage):
                self._log.warning(
                    "round=%d peer=%s left out: advert or share did not verify", r, v
                )
                continue
            state.held_c[v] = c_share
            state.held_b[v] = b_share
            state.peer_mask_keys[v] = entry.mask_key
            peers.append(v)
        state.peers = utf8_sorted(peers)
        need = max(rec.threshold, self._min_survivors)
        if len(state.peers) + 1 < need:
            # DESIGN §3: a relay that hides peers cannot isolate this node.
            raise _Refusal(
                RefusalReason.TOO_FEW_PEERS,
                f"{len(state.peers)} peer(s) + self < {need}",
                erase=True,
            )
        vectors = []
        self.last_clip_stats = {}
        for spec in state.request.streams:
            add, sub = self._stream_keys(rec, state, spec.name)
            x = state.inputs[spec.name]
            # One buffer of d + 6 words: the kernel writes the data words in place and
            # the 6 extra words (DESIGN §3: keystream words d..d+5) follow, no copy.
            out = np.empty(
                spec.size + MASK_EXTRA_WORDS,
                dtype=np.uint32 if rec.ring_bits == 32 else np.uint64,
            )
            _, stats = masking.protect_into(
                out[: spec.size],
                x,
                clipping_range=rec.clipping_range,
                bits=rec.bits,
                ring_bits=rec.ring_bits,
                add_keys=add,
                sub_keys=sub,
            )
            words = extra_words(
                x,
                clipping_range=rec.clipping_range,
                clipped=stats.clipped,
                ring_bits=rec.ring_bits,
                n_nodes=len(rec.nodes),
            )
            out[spec.size :] = masking.mask_integers(
                words,
                offset=spec.size,
                ring_bits=rec.ring_bits,
                add_keys=add,
                sub_keys=sub,
            )
            vectors.append(Tensor(spec.name, out))
            self.last_clip_stats[spec.name] = stats
            if stats.clipped and self._warn_clipping:
                warnings.warn(
                    f"stream {spec.name}: {stats.clipped} of {stats.size} values "
                    f"({stats.fraction:.2%}) clipped to ±{rec.clipping_range}; "
                    f"max |x| = {stats.max_abs:.4g}",
                    ClippingWarning,
                    stacklevel=2,
                )
        commitment = keys.seed_commitment(
            state.b_seed, transcript=rec.transcript, round=r, node=me
        )
        upload = MaskedInput(
            context_id=rec.context_id,
            round=r,
            sender=me,
            ring_bits=rec.ring_bits,
            commitment=commitment,
            peers=state.peers,
            vectors=tuple(vectors),
        )
        self._commit(ctx, r, "upload", _digest("step", commitment, list(state.peers)))
        state.inputs.clear()
        self._log.info("round=%d stage=upload peers=%d", r, len(state.peers))
        return [Outgoing(rec.researcher, upload)]

    def _stream_keys(
        self, rec: ContextRecord, state: _RoundState, stream: str
    ) -> tuple[list[bytes], list[bytes]]:
        me = self.node_id
        add = [
            keys.self_key(
                state.b_seed,
                transcript=rec.transcript,
                node=me,
                round=state.round,
                stream=stream,
            )
        ]
        sub: list[bytes] = []
        mine = me.encode("utf-8")
        for v in state.peers:
            k = keys.mask_key(
                state.c_secret,
                state.peer_mask_keys[v],
                transcript=rec.transcript,
                round=state.round,
                stream=stream,
                request_digest=state.digest,
                u=me,
                v=v,
            )
            # DESIGN §3: + PRG(k_uv) for v > u, − PRG(k_uv) for v < u, by UTF-8 bytes.
            (add if v.encode("utf-8") > mine else sub).append(k)
        return add, sub

    def _check_survivors(
        self, rec: ContextRecord, state: _RoundState, survivors: tuple[str, ...]
    ) -> None:
        me = self.node_id
        need = max(rec.threshold, self._min_survivors)
        if me not in survivors:
            raise _Refusal(
                RefusalReason.SURVIVORS,
                "S does not contain this node",
                fields=("survivors",),
            )
        if len(survivors) < need:
            raise _Refusal(
                RefusalReason.SURVIVORS,
                f"|S| = {len(survivors)} < {need}",
                fields=("survivors",),
            )
        allowed = set(state.peers) | {me}
        if not set(survivors) <= allowed:
            raise _Refusal(
                RefusalReason.SURVIVORS,
                "S names nodes outside this node's peer set",
                fields=("survivors",),
            )

    def _on_survivors(
        self, ctx: _Context, state: _RoundState, msg: Survivors
    ) -> list[Outgoing]:
        rec = ctx.record
        self._check_survivors(rec, state, msg.survivors)
        signature = keys.sign(
            self._signing_key,
            "survivors",
            rec.transcript,
            state.round,
            frozenset(msg.survivors),
        )
        # DESIGN §3: exactly one S per round; the commit makes a second one impossible.
        self._commit(
            ctx, state.round, "survivors", _digest("step", frozenset(msg.survivors))
        )
        state.signed_survivors = msg.survivors
        return [
            Outgoing(
                rec.researcher,
                SurvivorSig(
                    context_id=rec.context_id,
                    round=state.round,
                    sender=self.node_id,
                    survivors=msg.survivors,
                    signature=signature,
                ),
            )
        ]

    def _on_unmask_request(
        self, ctx: _Context, state: _RoundState, msg: UnmaskRequest
    ) -> list[Outgoing]:
        rec = ctx.record
        if msg.survivors != state.signed_survivors:
            raise _Refusal(
                RefusalReason.SURVIVORS,
                "S differs from the one this node signed",
                fields=("survivors",),
            )
        members = set(msg.survivors)
        valid = set()
        for entry in msg.signatures:
            if entry.node not in members:
                continue
            try:
                keys.verify(
                    rec.identity_keys[entry.node],
                    entry.signature,
                    "survivors",
                    rec.transcript,
                    state.round,
                    frozenset(msg.survivors),
                )
            except AuthenticationError:
                continue
            valid.add(entry.node)
        if len(valid) < rec.threshold:
            # DESIGN §3: reveal only when shown >= t valid signatures on the same S.
            raise _Refusal(
                RefusalReason.SURVIVORS,
                f"{len(valid)} valid signature(s) < t",
                fields=("signatures",),
            )
        me = self.node_id
        held_b = dict(state.held_b, **{me: state.own_b})
        b_shares = {v: held_b[v].to_bytes() for v in msg.survivors}
        c_shares = {
            v: state.held_c[v].to_bytes() for v in state.peers if v not in members
        }
        reply = UnmaskShares(
            context_id=rec.context_id,
            round=state.round,
            sender=me,
            b_shares=b_shares,
            c_shares=c_shares,
        )
        self._commit(
            ctx,
            state.round,
            "reveal",
            _digest("step", frozenset(b_shares), frozenset(c_shares)),
        )
        self._log.info(
            "round=%d stage=unmask: revealed b=%d c=%d",
            state.round,
            len(b_shares),
            len(c_shares),
        )
        self._end_round(ctx)
        return [Outgoing(rec.researcher, reply)]
