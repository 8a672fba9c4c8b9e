# SPDX-License-Identifier: Apache-2.0
"""The server's protocol machine (DESIGN §3): relay, sum, unmask; no I/O, no clock."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import combinations
from typing import Any

import numpy as np

from .. import keys, masking, sharing
from ..errors import (
    AuthenticationError,
    ConfigError,
    ContextMismatch,
    MalformedMessage,
    PhaseTimeout,
    PolicyRefused,
    RoundAborted,
    SecAggError,
    ShapeMismatch,
    ThresholdError,
    UnexpectedMessage,
)
from ..messages import (
    MASK_EXTRA_WORDS,
    Abort,
    AbortReason,
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
    check_id,
    check_name,
)
from ._fields import as_float, as_int, as_str
from .node import Outgoing
from .round import ClipTotals, RoundResult, clip_cap, request_digest
from .setup import (
    check_threshold,
    compute_context_id,
    compute_transcript,
    threshold_floor,
    utf8_sorted,
)

__all__ = ["ServerStage", "Server", "ServerRecord", "SERVER_TRANSITIONS"]

logger = logging.getLogger(__name__)

#: With more than t shares of one secret, at most this many t-subsets are tried
#: (DESIGN §3) before the secret is declared unrecoverable.
MAX_SUBSETS = 64


class ServerStage(Enum):
    """Where the server's context stands."""

    NEW = "new"
    SETUP_ADVERTS = "setup.adverts"  # waiting for every node's E_u
    SETUP_SIGNATURES = "setup.signatures"  # waiting for every node's signature on T
    READY = "ready"  # between rounds
    KEYS = "round.keys"  # waiting for C_u^r and share boxes
    UPLOAD = "round.upload"  # waiting for masked vectors
    SURVIVORS = "round.survivors"  # waiting for signatures on S
    UNMASK = "round.unmask"  # waiting for shares
    FAILED = "failed"  # setup failed: the context is unusable


#: stage -> {message type accepted there -> stage once the phase completes}.
#: Anything else is unexpected in that stage and ignored (DESIGN §5: no state change).
SERVER_TRANSITIONS: Mapping[ServerStage, Mapping[MsgType, ServerStage]] = {
    ServerStage.NEW: {},
    ServerStage.SETUP_ADVERTS: {
        MsgType.CONTEXT_ADVERT: ServerStage.SETUP_SIGNATURES,
        MsgType.REFUSED: ServerStage.FAILED,
    },
    ServerStage.SETUP_SIGNATURES: {
        MsgType.TRANSCRIPT_SIG: ServerStage.READY,
        MsgType.REFUSED: ServerStage.FAILED,
    },
    ServerStage.READY: {},
    ServerStage.KEYS: {
        MsgType.ROUND_ADVERT: ServerStage.UPLOAD,
        MsgType.REFUSED: ServerStage.UPLOAD,
    },
    ServerStage.UPLOAD: {
        MsgType.MASKED_INPUT: ServerStage.SURVIVORS,
        MsgType.REFUSED: ServerStage.SURVIVORS,
    },
    ServerStage.SURVIVORS: {
        MsgType.SURVIVOR_SIG: ServerStage.UNMASK,
        MsgType.REFUSED: ServerStage.UNMASK,
    },
    ServerStage.UNMASK: {
        MsgType.UNMASK_SHARES: ServerStage.READY,
        MsgType.REFUSED: ServerStage.READY,
    },
    ServerStage.FAILED: {},
}


#: The stages in which a context's setup has completed (a round may be running).
_SET_UP: frozenset[ServerStage] = frozenset(
    {
        ServerStage.READY,
        ServerStage.KEYS,
        ServerStage.UPLOAD,
        ServerStage.SURVIVORS,
        ServerStage.UNMASK,
    }
)
#: Largest round counter a message may carry (8-byte field, DESIGN §3).
_MAX_ROUND = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """The public record of a set-up context: what a researcher keeps to resume it.

    Every field is public (the context parameters, the setup nonce, the transcript
    T, the nodes' Ed25519 identity keys and the round counter); the secrets stay on
    the nodes. :meth:`Server.record` makes one, :meth:`Server.restore` rebuilds a
    READY server from one, and :meth:`to_dict` / :meth:`from_dict` give its JSON
    form (byte strings as lowercase hex).

    Attributes
    ----------
    researcher_id, job_id, nodes
        Who runs the context and for which job; ``nodes`` sorted by UTF-8 bytes.
    ring_bits, clipping_range, threshold, max_colluding_nodes
        The context parameters (DESIGN §3/§4).
    nonce, context_id
        The 32-byte setup nonce and the context id computed from all of the above.
    transcript
        T, the 32-byte setup transcript every node signed.
    identity_keys
        ``{node: Ed25519 public key}`` for exactly the context's nodes.
    last_round
        The last round number spent (0: none yet); the next round is one more.
    """

    researcher_id: str
    job_id: str
    nodes: tuple[str, ...]
    ring_bits: int
    clipping_range: float
    threshold: int
    max_colluding_nodes: int
    nonce: bytes
    context_id: bytes
    transcript: bytes
    identity_keys: Mapping[str, bytes]
    last_round: int

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (lists, numbers, hex strings)."""
        return {
            "researcher_id": self.researcher_id,
            "job_id": self.job_id,
            "nodes": list(self.nodes),
            "ring_bits": self.ring_bits,
            "clipping_range": self.clipping_range,
            "threshold": self.threshold,
            "max_colluding_nodes": self.max_colluding_nodes,
            "nonce": self.nonce.hex(),
            "context_id": self.context_id.hex(),
            "transcript": self.transcript.hex(),
            "identity_keys": {v: k.hex() for v, k in self.identity_keys.items()},
            "last_round": self.last_round,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ServerRecord:
        """Parse :meth:`to_dict`'s output; unknown keys are ignored.

        Only the JSON shape is checked here; :meth:`Server.restore` checks the
        values against each other.

        Raises
        ------
        ConfigError
            A missing key, a value of the wrong type, or bad hex.
        """
        try:
            nodes = doc["nodes"]
            keys_ = doc["identity_keys"]
            if not isinstance(nodes, list) or not isinstance(keys_, dict):
                raise TypeError("nodes must be a list and identity_keys an object")
            return cls(
                researcher_id=as_str(doc["researcher_id"]),
                job_id=as_str(doc["job_id"]),
                nodes=tuple(as_str(v) for v in nodes),
                ring_bits=as_int(doc["ring_bits"]),
                clipping_range=as_float(doc["clipping_range"]),
                threshold=as_int(doc["threshold"]),
                max_colluding_nodes=as_int(doc["max_colluding_nodes"]),
                nonce=bytes.fromhex(as_str(doc["nonce"])),
                context_id=bytes.fromhex(as_str(doc["context_id"])),
                transcript=bytes.fromhex(as_str(doc["transcript"])),
                identity_keys={
                    as_str(v): bytes.fromhex(as_str(k)) for v, k in keys_.items()
                },
                last_round=as_int(doc["last_round"]),
            )
        except KeyError as e:
            raise ConfigError(f"context record: missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"context record: {e}") from None


def _check_record(record: ServerRecord) -> None:
    """Check the record's fields on their own (:meth:`Server.restore` does the rest).

    Raises
    ------
    ConfigError
        A field of the wrong type or size, ids out of order or repeated, identity
        keys not for exactly the nodes, or a round counter out of range.
    """
    if not isinstance(record, ServerRecord):
        raise ConfigError(f"expected a ServerRecord, got {type(record).__name__}")
    try:
        check_id(record.researcher_id, "researcher_id")
        check_name(record.job_id, "job_id")
        if not isinstance(record.nodes, tuple):
            raise TypeError("expected nodes as a tuple")
        for v in record.nodes:
            check_id(v, "node id")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"context record: {e}") from None
    if record.nodes != utf8_sorted(set(record.nodes)):
        raise ConfigError(
            "context record: expected distinct node ids sorted by UTF-8 bytes"
        )
    for name in ("ring_bits", "threshold", "max_colluding_nodes", "last_round"):
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"context record: expected an int {name}, got {value!r}")
    if not 0 <= record.last_round < _MAX_ROUND:
        raise ConfigError(
            f"context record: expected 0 <= last_round < 2^63 - 1, "
            f"got {record.last_round}"
        )
    if isinstance(record.clipping_range, bool) or not isinstance(
        record.clipping_range, (int, float)
    ):
        raise ConfigError(
            f"context record: expected a float clipping_range, "
            f"got {record.clipping_range!r}"
        )
    for name, size in (
        ("nonce", 32),
        ("context_id", keys.DIGEST_SIZE),
        ("transcript", keys.DIGEST_SIZE),
    ):
        value = getattr(record, name)
        if not isinstance(value, bytes) or len(value) != size:
            raise ConfigError(f"context record: expected {name} of {size} bytes")
    ids = record.identity_keys
    if not isinstance(ids, Mapping) or set(ids) != set(record.nodes):
        raise ConfigError(
            "context record: expected identity keys for exactly the context's nodes"
        )
    values = list(ids.values())
    if any(not isinstance(k, bytes) or len(k) != keys.PUBLIC_KEY_SIZE for k in values):
        raise ConfigError(
            f"context record: expected identity keys of {keys.PUBLIC_KEY_SIZE} bytes"
        )
    if len(set(values)) != len(values):
        raise ConfigError("context record: two nodes share an identity key")


@dataclass(slots=True)
class _Round:
    round: int
    request: RoundRequest
    digest: bytes
    started: float
    phase_started: float
    deadline: float
    adverts: dict[str, RoundAdvert] = field(default_factory=dict)
    refused: dict[str, RefusalReason] = field(default_factory=dict)
    peers_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    commitments: dict[str, bytes] = field(default_factory=dict)
    acc: dict[str, np.ndarray] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    signatures: dict[str, bytes] = field(default_factory=dict)
    b_shares: dict[str, list[sharing.Share]] = field(default_factory=dict)
    c_shares: dict[str, list[sharing.Share]] = field(default_factory=dict)
    responders: set[str] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)


class Server:
    """The researcher's machine for one context: setup, then any number of rounds.

    Parameters
    ----------
    researcher_id, job_id, nodes
        Who runs the context and for which job; ``nodes`` excludes the researcher.
    timeout
        The deadline of each phase, in the caller's clock units (seconds).
    ring_bits, clipping_range, threshold, max_colluding_nodes
        Context parameters (DESIGN §3/§4); ``threshold`` defaults to the floor
        ``⌊(n + κ)/2⌋ + 1`` and may be set higher, never lower.
    min_survivors
        The smallest survivor set the server itself accepts (at least 2).
    identity_keys
        Optional ``{node: Ed25519 public key}`` of enrolled nodes; adverts signed by
        another key are refused. Without it, the advertised keys are used.
    nonce
        The 32-byte setup nonce (fresh from ``os.urandom`` by default).
    logger
        A logger to use instead of this module's.

    Raises
    ------
    ConfigError
        Bad ids, fewer than 2 nodes, or a threshold outside ``[floor, n]``.

    Notes
    -----
    Results: :meth:`outcome` returns a round's :class:`RoundResult` or raises its
    error (:class:`~mpc_runtime.errors.RoundAborted` and subclasses naming phase,
    round and nodes, or :class:`~mpc_runtime.errors.ShapeMismatch`).

    Restarts: :meth:`record` gives a set-up context's public
    :class:`ServerRecord`, and :meth:`restore` rebuilds a READY server from it
    (rather than setting ``transcript``, ``identity_keys`` or ``last_round`` by
    hand).
    """

    def __init__(
        self,
        *,
        researcher_id: str,
        job_id: str,
        nodes: Sequence[str],
        timeout: float,
        ring_bits: int = 32,
        clipping_range: float = 3.0,
        threshold: int | None = None,
        max_colluding_nodes: int = 0,
        min_survivors: int = 2,
        identity_keys: Mapping[str, bytes] | None = None,
        nonce: bytes | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        try:
            check_id(researcher_id, "researcher_id")
            for v in nodes:
                check_id(v, "node id")
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        self.nodes = utf8_sorted(set(nodes))
        if len(self.nodes) != len(nodes) or researcher_id in self.nodes:
            raise ConfigError(
                "expected distinct node ids, not including the researcher"
            )
        n = len(self.nodes)
        t = (
            threshold
            if threshold is not None
            else threshold_floor(n, max_colluding_nodes)
        )
        check_threshold(t, n, max_colluding_nodes)
        if ring_bits not in (32, 64):
            raise ConfigError(f"expected ring_bits 32 or 64, got {ring_bits}")
        if not (math.isfinite(clipping_range) and clipping_range > 0):
            raise ConfigError(
                f"expected a finite clipping_range > 0, got {clipping_range}"
            )
        if not timeout > 0:
            raise ConfigError(f"expected a timeout > 0, got {timeout}")
        self.researcher_id = researcher_id
        self.job_id = job_id
        self.ring_bits = ring_bits
        self.bits = masking.bits_for(n, ring_bits)
        self.clipping_range = float(clipping_range)
        self.threshold = t
        self.max_colluding_nodes = max_colluding_nodes
        self.min_survivors = max(2, min_survivors)
        self.timeout = timeout
        self.nonce = nonce if nonce is not None else os.urandom(32)
        self.context_id = compute_context_id(
            researcher_id=researcher_id,
            job_id=job_id,
            nodes=self.nodes,
            ring_bits=ring_bits,
            bits=self.bits,
            clipping_range=self.clipping_range,
            threshold=t,
            nonce=self.nonce,
        )
        self._enrolled = dict(identity_keys) if identity_keys is not None else None
        self._log = logger or globals()["logger"]
        self.stage = ServerStage.NEW
        self.transcript = b""
        self.identity_keys: dict[str, bytes] = {}
        self.last_round = 0
        self.setup_error: SecAggError | None = None
        self.setup_timings: dict[str, float] = {}
        self._context_adverts: dict[str, ContextAdvert] = {}
        self._transcript_sigs: dict[str, TranscriptSig] = {}
        self._deadline = math.inf
        self._phase_started = 0.0
        self._round: _Round | None = None
        self._outcomes: dict[int, RoundResult | SecAggError] = {}
        #: Nodes whose messages failed authentication or checks, per round (0: setup).
        self.misbehaving: dict[int, set[str]] = {}

    # ----------------------------------------------------------------- public

    @classmethod
    def restore(
        cls,
        record: ServerRecord,
        *,
        timeout: float,
        min_survivors: int = 2,
        logger: logging.Logger | None = None,
    ) -> Server:
        """Rebuild a READY server for an existing context from its public record.

        This is how a restarted researcher resumes a context without a new setup:
        the nodes keep their own context records, so the server only needs the
        public values of :class:`ServerRecord` (from :meth:`record`). The next
        round is ``record.last_round + 1``; a round that was in flight when the
        record was made is not resumed.

        Parameters
        ----------
        record
            The context's public record.
        timeout, min_survivors, logger
            As for the constructor (the server's own settings, not the context's).

        Returns
        -------
        Server
            In stage :attr:`ServerStage.READY`, with the record's transcript,
            identity keys (also used as the enrolled keys) and round counter.

        Raises
        ------
        ConfigError
            The record is invalid: a field of the wrong type or size (nonce,
            context id, transcript, identity keys), ids that are malformed,
            repeated or out of order, identity keys not for exactly the nodes or
            shared by two nodes, a round counter out of range, parameters the
            constructor refuses, or a ``context_id`` that does not follow from
            the record's parameters and nonce.

        Notes
        -----
        The transcript cannot be recomputed from the record (it hashes the
        nodes' share keys and signatures, which the record does not keep); a
        wrong one shows up as nodes refusing the next round.
        """
        _check_record(record)
        server = cls(
            researcher_id=record.researcher_id,
            job_id=record.job_id,
            nodes=record.nodes,
            timeout=timeout,
            ring_bits=record.ring_bits,
            clipping_range=record.clipping_range,
            threshold=record.threshold,
            max_colluding_nodes=record.max_colluding_nodes,
            min_survivors=min_survivors,
            identity_keys=record.identity_keys,
            nonce=record.nonce,
            logger=logger,
        )
        if server.context_id != record.context_id:
            raise ConfigError(
                "context record: context_id does not follow from its parameters "
                "and nonce"
            )
        server.transcript = record.transcript
        server.identity_keys = dict(record.identity_keys)
        server.last_round = record.last_round
        server._enter(ServerStage.READY, 0.0)
        server._log.info(
            "context=%s restored (last round %d)",
            server.context_id[:4].hex(),
            server.last_round,
        )
        return server

    def record(self) -> ServerRecord:
        """The context's public record, for :meth:`restore` after a restart.

        Available once setup has completed, also while a round runs (the record
        then holds that round's number as spent).

        Raises
        ------
        UnexpectedMessage
            Setup has not completed (or failed).
        """
        if self.stage not in _SET_UP:
            raise UnexpectedMessage(
                f"no context to record in stage {self.stage.value}",
                phase=self.stage.value,
            )
        return ServerRecord(
            researcher_id=self.researcher_id,
            job_id=self.job_id,
            nodes=self.nodes,
            ring_bits=self.ring_bits,
            clipping_range=self.clipping_range,
            threshold=self.threshold,
            max_colluding_nodes=self.max_colluding_nodes,
            nonce=self.nonce,
            context_id=self.context_id,
            transcript=self.transcript,
            identity_keys=dict(self.identity_keys),
            last_round=self.last_round,
        )

    @property
    def need(self) -> int:
        """max(t, min_survivors): the fewest nodes a round may continue with."""
        return max(self.threshold, self.min_survivors)

    def outcome(self, round: int) -> RoundResult:  # noqa: A002
        """Return the result of ``round`` or raise the error that ended it.

        Raises
        ------
        RoundAborted, ThresholdError, PhaseTimeout, ShapeMismatch
            The round ended without a sum.
        KeyError
            The round has not ended (or never started).
        """
        value = self._outcomes[round]
        if isinstance(value, SecAggError):
            raise value
        return value

    def is_finished(self, round: int) -> bool:  # noqa: A002
        """Whether ``round`` has ended (with a sum or an error)."""
        return round in self._outcomes

    def start_setup(self, now: float) -> list[Outgoing]:
        """Begin context setup: a :class:`SetupRequest` for every node.

        Raises
        ------
        UnexpectedMessage
            Setup already started.
        """
        if self.stage is not ServerStage.NEW:
            raise UnexpectedMessage("setup already started", phase=self.stage.value)
        self._enter(ServerStage.SETUP_ADVERTS, now)
        request = SetupRequest(
            context_id=self.context_id,
            round=0,
            sender=self.researcher_id,
            job_id=self.job_id,
            nodes=self.nodes,
            ring_bits=self.ring_bits,
            clipping_range=self.clipping_range,
            threshold=self.threshold,
            nonce=self.nonce,
        )
        self._log.info(
            "context=%s setup started n=%d t=%d",
            self.context_id[:4].hex(),
            len(self.nodes),
            self.threshold,
        )
        return [Outgoing(v, request) for v in self.nodes]

    def start_round(
        self,
        *,
        kind: str,
        name: str,
        streams: Sequence[StreamSpec],
        now: float,
        args: Mapping[str, Any] | None = None,
        weights: Sequence[Tensor] = (),
    ) -> tuple[int, list[Outgoing]]:
        """Begin the next round: the same :class:`RoundRequest` for every node.

        Returns
        -------
        round, outgoing
            The new round counter and the requests to send.

        Raises
        ------
        UnexpectedMessage
            The context is not ready (setup unfinished or failed, or a round runs).
        """
        if self.stage is not ServerStage.READY:
            raise UnexpectedMessage(
                f"cannot start a round in stage {self.stage.value}",
                phase=self.stage.value,
            )
        r = self.last_round + 1
        request = RoundRequest(
            context_id=self.context_id,
            round=r,
            sender=self.researcher_id,
            kind=kind,
            name=name,
            args=dict(args or {}),
            weights=tuple(weights),
            streams=tuple(streams),
        )
        self.last_round = r
        self._round = _Round(
            round=r,
            request=request,
            digest=request_digest(self.transcript, request),
            started=now,
            phase_started=now,
            deadline=now + self.timeout,
        )
        self._enter(ServerStage.KEYS, now)
        self._log.info(
            "round=%d stage=keys started (%s %s, %d stream(s))",
            r,
            kind,
            name,
            len(streams),
        )
        return r, [Outgoing(v, request) for v in self.nodes]

    def handle(self, msg: Message, now: float) -> list[Outgoing]:
        """Process one message from a node (the transport authenticated ``msg.sender``).

        Unexpected, replayed or unauthenticated messages are logged and ignored;
        nothing changes. Returns what to send.
        """
        if msg.context_id != self.context_id or msg.sender not in self.nodes:
            self._log.warning(
                "ignored %s from %s: unknown context or sender",
                msg.TYPE.name,
                msg.sender,
            )
            return []
        row = SERVER_TRANSITIONS[self.stage]
        if msg.TYPE not in row:
            self._log.debug(
                "ignored %s from %s in stage %s",
                msg.TYPE.name,
                msg.sender,
                self.stage.value,
            )
            return []
        expected_round = self._round.round if self._round is not None else 0
        if msg.round != expected_round:
            self._log.debug(
                "ignored %s from %s for round %d", msg.TYPE.name, msg.sender, msg.round
            )
            return []
        handler: Callable[[Any, float], list[Outgoing]] = getattr(
            self, f"_on_{msg.TYPE.name.lower()}"
        )
        return handler(msg, now)

    def tick(self, now: float) -> list[Outgoing]:
        """Enforce the current phase's deadline, which may end the round.

        Returns what to send.
        """
        if now < self._deadline:
            return []
        stage = self.stage
        if stage in (ServerStage.SETUP_ADVERTS, ServerStage.SETUP_SIGNATURES):
            have = (
                self._context_adverts
                if stage is ServerStage.SETUP_ADVERTS
                else self._transcript_sigs
            )
            silent = [v for v in self.nodes if v not in have]
            return self._fail_setup(
                PhaseTimeout(
                    f"setup phase {stage.value} timed out",
                    phase=stage.value,
                    round=0,
                    nodes=silent,
                ),
                now,
            )
        rnd = self._round
        if rnd is None:
            return []
        if stage is ServerStage.KEYS:
            return self._finish_keys(rnd, now, timed_out=True)
        if stage is ServerStage.UPLOAD:
            return self._finish_upload(rnd, now, timed_out=True)
        if stage is ServerStage.SURVIVORS:
            return self._finish_survivors(rnd, now, timed_out=True)
        if stage is ServerStage.UNMASK:
            return self._finish_unmask(rnd, now, timed_out=True)
        return []

    # ------------------------------------------------------------------ setup

    def _enter(self, stage: ServerStage, now: float) -> None:
        if self._round is not None and self.stage in (
            ServerStage.KEYS,
            ServerStage.UPLOAD,
            ServerStage.SURVIVORS,
            ServerStage.UNMASK,
        ):
            self._round.timings[self.stage.value] = now - self._round.phase_started
            self._round.phase_started = now
        elif self.stage in (ServerStage.SETUP_ADVERTS, ServerStage.SETUP_SIGNATURES):
            self.setup_timings[self.stage.value] = now - self._phase_started
        self.stage = stage
        self._phase_started = now
        self._deadline = (
            now + self.timeout
            if stage not in (ServerStage.NEW, ServerStage.READY, ServerStage.FAILED)
            else math.inf
        )

    def _flag(self, round_: int, node: str, what: str) -> None:
        self.misbehaving.setdefault(round_, set()).add(node)
        self._log.warning("round=%d peer=%s rejected: %s", round_, node, what)

    def _fail_setup(self, error: SecAggError, now: float) -> list[Outgoing]:
        self.setup_error = error
        self._enter(ServerStage.FAILED, now)
        self._log.error("context=%s setup failed: %s", self.context_id[:4].hex(), error)
        abort = Abort(
            context_id=self.context_id,
            round=0,
            sender=self.researcher_id,
            reason=AbortReason.TIMEOUT
            if isinstance(error, PhaseTimeout)
            else AbortReason.REFUSED,
        )
        return [Outgoing(v, abort) for v in self.nodes]

    def _on_refused(self, msg: Refused, now: float) -> list[Outgoing]:
        if self.stage in (ServerStage.SETUP_ADVERTS, ServerStage.SETUP_SIGNATURES):
            cls = (
                ContextMismatch
                if msg.reason is RefusalReason.CONTEXT_MISMATCH
                else PolicyRefused
            )
            kw: dict[str, Any] = (
                {"fields": msg.fields} if cls is ContextMismatch else {}
            )
            return self._fail_setup(
                cls(
                    f"node refused setup ({msg.reason.name})",
                    phase=self.stage.value,
                    round=0,
                    nodes=[msg.sender],
                    **kw,
                ),
                now,
            )
        rnd = self._round
        assert rnd is not None
        if msg.sender in rnd.refused:
            return []
        rnd.refused[msg.sender] = msg.reason
        self._log.warning(
            "round=%d peer=%s refused (%s)", rnd.round, msg.sender, msg.reason.name
        )
        if msg.reason is RefusalReason.SHAPE:
            # DESIGN §1: every node must return the same shape, else a named error.
            return self._abort(
                rnd,
                ShapeMismatch(
                    "a node's input does not match the requested shape",
                    phase=self.stage.value,
                    round=rnd.round,
                    nodes=[msg.sender],
                ),
                AbortReason.REFUSED,
                now,
            )
        return self._maybe_finish(rnd, now)

    def _on_context_advert(self, msg: ContextAdvert, now: float) -> list[Outgoing]:
        v = msg.sender
        if v in self._context_adverts:
            return []
        if self._enrolled is not None and self._enrolled.get(v) != msg.identity_key:
            self._flag(0, v, "identity key is not the enrolled one")
            return []
        try:
            keys.verify(
                msg.identity_key,
                msg.signature,
                "advert-e",
                self.context_id,
                v,
                msg.share_key,
            )
        except AuthenticationError:
            self._flag(0, v, "bad advert signature")
            return []
        self._context_adverts[v] = msg
        if len(self._context_adverts) < len(self.nodes):
            return []
        entries = tuple(
            ContextAdvertEntry(v, a.identity_key, a.share_key, a.signature)
            for v, a in sorted(
                self._context_adverts.items(), key=lambda kv: kv[0].encode("utf-8")
            )
        )
        if len({e.share_key for e in entries}) != len(entries):
            return self._fail_setup(
                ContextMismatch(
                    "duplicate share keys",
                    fields=("share_key",),
                    phase=self.stage.value,
                    round=0,
                ),
                now,
            )
        self.identity_keys = {e.node: e.identity_key for e in entries}
        self.transcript = compute_transcript(self.context_id, entries)
        self._enter(ServerStage.SETUP_SIGNATURES, now)
        relay = ContextAdverts(
            context_id=self.context_id,
            round=0,
            sender=self.researcher_id,
            adverts=entries,
        )
        return [Outgoing(u, relay) for u in self.nodes]

    def _on_transcript_sig(self, msg: TranscriptSig, now: float) -> list[Outgoing]:
        v = msg.sender
        if v in self._transcript_sigs:
            return []
        if msg.transcript != self.transcript:
            return self._fail_setup(
                ContextMismatch(
                    "a node holds another transcript",
                    fields=("transcript",),
                    phase=self.stage.value,
                    round=0,
                    nodes=[v],
                ),
                now,
            )
        try:
            keys.verify(
                self.identity_keys[v],
                msg.signature,
                "transcript-sig",
                self.context_id,
                v,
                self.transcript,
            )
        except AuthenticationError:
            self._flag(0, v, "bad transcript signature")
            return []
        self._transcript_sigs[v] = msg
        if len(self._transcript_sigs) < len(self.nodes):
            return []
        self._enter(ServerStage.READY, now)
        self._log.info("context=%s setup complete", self.context_id[:4].hex())
        relay = TranscriptSigs(
            context_id=self.context_id,
            round=0,
            sender=self.researcher_id,
            signatures=tuple(
                TranscriptSigEntry(v, s.transcript, s.signature)
                for v, s in sorted(
                    self._transcript_sigs.items(), key=lambda kv: kv[0].encode("utf-8")
                )
            ),
        )
        return [Outgoing(u, relay) for u in self.nodes]

    # ------------------------------------------------------------------ round

    def _maybe_finish(self, rnd: _Round, now: float) -> list[Outgoing]:
        if self.stage is ServerStage.KEYS:
            return self._finish_keys(rnd, now, timed_out=False)
        if self.stage is ServerStage.UPLOAD:
            return self._finish_upload(rnd, now, timed_out=False)
        if self.stage is ServerStage.SURVIVORS:
            return self._finish_survivors(rnd, now, timed_out=False)
        if self.stage is ServerStage.UNMASK:
            return self._finish_unmask(rnd, now, timed_out=False)
        return []

    def _abort(
        self, rnd: _Round, error: SecAggError, reason: AbortReason, now: float
    ) -> list[Outgoing]:
        rnd.timings[self.stage.value] = now - rnd.phase_started
        self._outcomes[rnd.round] = error
        self._log.error(
            "round=%d aborted in stage=%s: %s (nodes=%s)",
            rnd.round,
            self.stage.value,
            error,
            ",".join(error.nodes),
        )
        self._round = None
        self.stage = ServerStage.READY
        self._deadline = math.inf
        abort = Abort(
            context_id=self.context_id,
            round=rnd.round,
            sender=self.researcher_id,
            reason=reason,
        )
        return [Outgoing(v, abort) for v in self.nodes]

    def _short(
        self,
        rnd: _Round,
        have: int,
        need: int,
        silent: list[str],
        timed_out: bool,
        now: float,
    ) -> list[Outgoing]:
        phase = self.stage.value
        if timed_out:
            error: SecAggError = PhaseTimeout(
                f"phase {phase} timed out with {have} of the {need} nodes needed",
                phase=phase,
                round=rnd.round,
                nodes=silent,
            )
            return self._abort(rnd, error, AbortReason.TIMEOUT, now)
        error = ThresholdError(
            f"{have} node(s) left in phase {phase}, {need} needed",
            phase=phase,
            round=rnd.round,
            nodes=[v for v in rnd.refused],
        )
        return self._abort(rnd, error, AbortReason.THRESHOLD, now)

    def _on_round_advert(self, msg: RoundAdvert, now: float) -> list[Outgoing]:
        rnd = self._round
        assert rnd is not None
        v = msg.sender
        if v in rnd.adverts or v in rnd.refused:
            return []
        try:
            keys.verify(
                self.identity_keys[v],
                msg.signature,
                "advert-c",
                self.transcript,
                rnd.round,
                v,
                msg.mask_key,
            )
        except AuthenticationError:
            self._flag(rnd.round, v, "bad round advert signature")
            return []
        rnd.adverts[v] = msg
        return self._finish_keys(rnd, now, timed_out=False)

    def _finish_keys(
        self, rnd: _Round, now: float, *, timed_out: bool
    ) -> list[Outgoing]:
        answered = set(rnd.adverts) | set(rnd.refused)
        if not timed_out and len(answered) < len(self.nodes):
            return []
        advertisers = utf8_sorted(rnd.adverts)
        if len(advertisers) < self.need:
            silent = [v for v in self.nodes if v not in answered]
            return self._short(rnd, len(advertisers), self.need, silent, timed_out, now)
        self._enter(ServerStage.UPLOAD, now)
        out = []
        for w in advertisers:
            entries = []
            for v in advertisers:
                boxes = rnd.adverts[v].shares.get(w)
                if v == w or boxes is None:
                    continue
                a = rnd.adverts[v]
                entries.append(
                    RoundAdvertEntry(v, a.mask_key, a.signature, boxes.c, boxes.b)
                )
            out.append(
                Outgoing(
                    w,
                    RoundAdverts(
                        context_id=self.context_id,
                        round=rnd.round,
                        sender=self.researcher_id,
                        adverts=tuple(entries),
                    ),
                )
            )
        self._log.info(
            "round=%d stage=upload advertisers=%d", rnd.round, len(advertisers)
        )
        return out

    def _on_masked_input(self, msg: MaskedInput, now: float) -> list[Outgoing]:
        rnd = self._round
        assert rnd is not None
        v = msg.sender
        if v not in rnd.adverts or v in rnd.commitments or v in rnd.refused:
            return []
        streams = rnd.request.streams
        if (
            msg.ring_bits != self.ring_bits
            or tuple(t.name for t in msg.vectors) != tuple(s.name for s in streams)
            or any(
                t.data.shape[0] != s.size + MASK_EXTRA_WORDS
                for t, s in zip(msg.vectors, streams)
            )
        ):
            # DESIGN §3: a node missing any stream is dropped for the whole round.
            self._flag(rnd.round, v, "upload does not match the request's streams")
            return []
        if not set(msg.peers) <= set(rnd.adverts) - {v}:
            self._flag(rnd.round, v, "upload names peers that did not advertise")
            return []
        # Streamed sum (DESIGN §6): memory independent of n.
        for tensor in msg.vectors:
            acc = rnd.acc.get(tensor.name)
            if acc is None:
                rnd.acc[tensor.name] = np.array(
                    tensor.data, dtype=tensor.data.dtype.newbyteorder("=")
                )
            else:
                masking.accumulate_into(acc, np.asarray(tensor.data, dtype=acc.dtype))
        rnd.commitments[v] = msg.commitment
        rnd.peers_of[v] = msg.peers
        return self._finish_upload(rnd, now, timed_out=False)

    def _finish_upload(
        self, rnd: _Round, now: float, *, timed_out: bool
    ) -> list[Outgoing]:
        answered = set(rnd.commitments) | (set(rnd.refused) & set(rnd.adverts))
        if not timed_out and len(answered) < len(rnd.adverts):
            return []
        survivors = utf8_sorted(rnd.commitments)
        if len(survivors) < self.need:
            silent = [v for v in rnd.adverts if v not in answered]
            return self._short(rnd, len(survivors), self.need, silent, timed_out, now)
        asymmetric = sorted(
            u
            for u in survivors
            for v in survivors
            if u != v and (v in rnd.peers_of[u]) != (u in rnd.peers_of[v])
        )
        if asymmetric:
            # Pair masks between two survivors cancel only if each masked with the
            # other; refuse before anyone reveals anything.
            return self._abort(
                rnd,
                RoundAborted(
                    "survivors' peer sets disagree",
                    phase=self.stage.value,
                    round=rnd.round,
                    nodes=asymmetric,
                ),
                AbortReason.CHECK_FAILED,
                now,
            )
        rnd.survivors = survivors
        self._enter(ServerStage.SURVIVORS, now)
        self._log.info(
            "round=%d stage=survivors survivors=%d dropped=%d",
            rnd.round,
            len(survivors),
            len(self.nodes) - len(survivors),
        )
        msg = Survivors(
            context_id=self.context_id,
            round=rnd.round,
            sender=self.researcher_id,
            survivors=survivors,
        )
        return [Outgoing(u, msg) for u in survivors]

    def _on_survivor_sig(self, msg: SurvivorSig, now: float) -> list[Outgoing]:
        rnd = self._round
        assert rnd is not None
        v = msg.sender
        if (
            v not in rnd.survivors
            or v in rnd.signatures
            or msg.survivors != rnd.survivors
        ):
            return []
        try:
            keys.verify(
                self.identity_keys[v],
                msg.signature,
                "survivors",
                self.transcript,
                rnd.round,
                frozenset(rnd.survivors),
            )
        except AuthenticationError:
            self._flag(rnd.round, v, "bad survivor signature")
            return []
        rnd.signatures[v] = msg.signature
        return self._finish_survivors(rnd, now, timed_out=False)

    def _finish_survivors(
        self, rnd: _Round, now: float, *, timed_out: bool
    ) -> list[Outgoing]:
        answered = set(rnd.signatures) | (set(rnd.refused) & set(rnd.survivors))
        if not timed_out and len(answered) < len(rnd.survivors):
            return []
        if len(rnd.signatures) < self.threshold:
            silent = [v for v in rnd.survivors if v not in answered]
            return self._short(
                rnd, len(rnd.signatures), self.threshold, silent, timed_out, now
            )
        self._enter(ServerStage.UNMASK, now)
        request = UnmaskRequest(
            context_id=self.context_id,
            round=rnd.round,
            sender=self.researcher_id,
            survivors=rnd.survivors,
            signatures=tuple(
                SurvivorSigEntry(v, rnd.signatures[v])
                for v in utf8_sorted(rnd.signatures)
            ),
        )
        return [Outgoing(v, request) for v in utf8_sorted(rnd.signatures)]

    def _on_unmask_shares(self, msg: UnmaskShares, now: float) -> list[Outgoing]:
        rnd = self._round
        assert rnd is not None
        v = msg.sender
        if v not in rnd.signatures or v in rnd.responders:
            return []
        members = set(rnd.survivors)
        expected_c = set(rnd.peers_of[v]) - members
        if set(msg.b_shares) != members or set(msg.c_shares) != expected_c:
            self._flag(rnd.round, v, "shares for the wrong nodes")
            return []
        x = self.nodes.index(v) + 1
        try:
            b = {u: sharing.Share.from_bytes(s) for u, s in msg.b_shares.items()}
            c = {d: sharing.Share.from_bytes(s) for d, s in msg.c_shares.items()}
        except MalformedMessage:
            self._flag(rnd.round, v, "undecodable share")
            return []
        if any(s.x != x for s in (*b.values(), *c.values())):
            self._flag(rnd.round, v, "share index is not the holder's")
            return []
        rnd.responders.add(v)
        for u, s in b.items():
            rnd.b_shares.setdefault(u, []).append(s)
        for d, s in c.items():
            rnd.c_shares.setdefault(d, []).append(s)
        return self._finish_unmask(rnd, now, timed_out=False)

    def _recover(
        self, shares: list[sharing.Share], size: int, accept: Callable[[bytes], bool]
    ) -> bytes | None:
        t = self.threshold
        for i, subset in enumerate(combinations(shares, t)):
            if i >= MAX_SUBSETS:
                break
            try:
                secret = sharing.combine(list(subset), threshold=t, secret_size=size)
            except (AuthenticationError, MalformedMessage):
                continue
            if accept(secret):
                return secret
        return None

    def _finish_unmask(
        self, rnd: _Round, now: float, *, timed_out: bool
    ) -> list[Outgoing]:
        answered = rnd.responders | (set(rnd.refused) & set(rnd.signatures))
        if not timed_out and len(answered) < len(rnd.signatures):
            return []
        if len(rnd.responders) < self.threshold:
            silent = [v for v in rnd.signatures if v not in answered]
            return self._short(
                rnd, len(rnd.responders), self.threshold, silent, timed_out, now
            )
        survivors = rnd.survivors
        members = set(survivors)
        dropouts = utf8_sorted(
            {d for u in survivors for d in rnd.peers_of[u]} - members
        )
        seeds: dict[str, bytes] = {}
        bad: list[str] = []
        for u in survivors:
            want = rnd.commitments[u]

            def seed_matches(s: bytes, u: str = u, want: bytes = want) -> bool:
                return (
                    keys.seed_commitment(
                        s, transcript=self.transcript, round=rnd.round, node=u
                    )
                    == want
                )

            seed = self._recover(rnd.b_shares.get(u, []), keys.SEED_SIZE, seed_matches)
            if seed is None:
                bad.append(u)
            else:
                seeds[u] = seed
        c_secrets: dict[str, bytes] = {}
        for d in dropouts:
            public = rnd.adverts[d].mask_key

            def key_matches(s: bytes, public: bytes = public) -> bool:
                return keys.x25519_public(s) == public

            secret = self._recover(
                rnd.c_shares.get(d, []), keys.SECRET_KEY_SIZE, key_matches
            )
            if secret is None:
                bad.append(d)
            else:
                c_secrets[d] = secret
        if bad:
            # DESIGN §3: a secret that does not match its commitment or public key
            # fails the round loudly.
            return self._abort(
                rnd,
                RoundAborted(
                    "shares did not reconstruct the committed secrets",
                    phase=self.stage.value,
                    round=rnd.round,
                    nodes=bad,
                ),
                AbortReason.CHECK_FAILED,
                now,
            )
        try:
            result = self._unmask(rnd, seeds, c_secrets, dropouts, now)
        except RoundAborted as e:
            return self._abort(rnd, e, AbortReason.CHECK_FAILED, now)
        self._outcomes[rnd.round] = result
        self._round = None
        self._enter(ServerStage.READY, now)
        self._log.info("round=%d complete contributors=%d", rnd.round, len(survivors))
        return []

    def _unmask(
        self,
        rnd: _Round,
        seeds: Mapping[str, bytes],
        c_secrets: Mapping[str, bytes],
        dropouts: Sequence[str],
        now: float,
    ) -> RoundResult:
        m = len(rnd.survivors)
        cap = clip_cap(self.ring_bits, len(self.nodes))
        integer_sums: dict[str, np.ndarray] = {}
        sums: dict[str, np.ndarray] = {}
        means: dict[str, np.ndarray] = {}
        clipping: dict[str, ClipTotals] = {}
        for spec in rnd.request.streams:
            add = [
                keys.self_key(
                    seeds[u],
                    transcript=self.transcript,
                    node=u,
                    round=rnd.round,
                    stream=spec.name,
                )
                for u in rnd.survivors
            ]
            sub: list[bytes] = []
            for u in rnd.survivors:
                mine = u.encode("utf-8")
                for d in rnd.peers_of[u]:
                    if d not in c_secrets:
                        continue
                    k = keys.mask_key(
                        c_secrets[d],
                        rnd.adverts[u].mask_key,
                        transcript=self.transcript,
                        round=rnd.round,
                        stream=spec.name,
                        request_digest=rnd.digest,
                        u=u,
                        v=d,
                    )
                    # u added PRG(k_ud) if d > u and subtracted it if d < u (DESIGN §3);
                    # unmask undoes exactly that.
                    (add if d.encode("utf-8") > mine else sub).append(k)
            total = masking.unmask(rnd.acc[spec.name], add_keys=add, sub_keys=sub)
            d_words = spec.size
            canary = int(total[d_words + 5])
            if canary != m:
                raise RoundAborted(
                    f"stream {spec.name}: canary sum is not the number of "
                    "contributors: the masks did not cancel",
                    phase=ServerStage.UNMASK.value,
                    round=rnd.round,
                    nodes=rnd.survivors,
                )
            data = total[:d_words]
            try:
                values = masking.dequantize_sum(
                    data, m, clipping_range=self.clipping_range, bits=self.bits
                )
            except ValueError as e:
                raise RoundAborted(
                    f"stream {spec.name}: {e}",
                    phase=ServerStage.UNMASK.value,
                    round=rnd.round,
                    nodes=rnd.survivors,
                ) from None
            words = [int(w) for w in total[d_words : d_words + 5]]
            integer_sums[spec.name] = data.reshape(spec.shape)
            sums[spec.name] = values.reshape(spec.shape)
            means[spec.name] = sums[spec.name] / m
            clipping[spec.name] = ClipTotals(
                clipped=words[0],
                histogram=(words[1], words[2], words[3], words[4]),
                saturated=any(w >= cap for w in words),
            )
        rnd.timings[ServerStage.UNMASK.value] = now - rnd.phase_started
        rnd.timings["total"] = now - rnd.started
        return RoundResult(
            round=rnd.round,
            contributors=rnd.survivors,
            dropped=utf8_sorted(set(self.nodes) - set(rnd.survivors)),
            integer_sums=integer_sums,
            sums=sums,
            means=means,
            clipping=clipping,
            timings=dict(rnd.timings),
        )
