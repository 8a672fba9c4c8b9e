# SPDX-License-Identifier: Apache-2.0
"""In-memory driver: a server and n nodes in one process, with dropout and attack hooks.

It owns the clock and the message queue that :mod:`mpc_runtime.protocol` leaves to
drivers. By default every message goes through :func:`mpc_runtime.framing.encode`
and :func:`~mpc_runtime.framing.decode`, as it would over ZeroMQ. Time is the
caller's clock plus a skew: when nothing is in flight and the server still waits,
the driver jumps the skew past the phase deadline and calls ``tick`` — so timeouts
cost no real time, and phase timings stay real.

Hooks for tests and benchmarks:

- ``drop={node: Phase}`` per round: the node goes silent from that phase on.
- ``tamper(to, msg) -> msg | None``: the researcher rewrites (or withholds) what it
  sends a node: lie about S, relabel or reflect share boxes, replay old adverts,
  send one node a different request.
- :meth:`MemoryNetwork.deliver` injects any message to one node, and
  :attr:`MemoryNetwork.seen` records everything the researcher received, so a test
  can play the attacker with exactly the researcher's view.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from . import framing, keys
from .messages import Message, MsgType, RoundRequest, StreamSpec, Tensor
from .protocol.node import Node, Outgoing
from .protocol.round import RoundResult
from .protocol.server import Server, ServerStage
from .protocol.store import MemoryNodeStore

__all__ = ["Phase", "MemoryNetwork", "Seen"]

logger = logging.getLogger(__name__)


class Phase(Enum):
    """The phase from which a dropped node stays silent."""

    SETUP = 0
    KEYS = 1  # never sends its round advert
    UPLOAD = 2  # advertised, never uploads
    SURVIVORS = 3  # uploaded, never signs S
    UNMASK = 4  # signed S, never reveals


_PHASE_OF: Mapping[MsgType, Phase] = {
    MsgType.SETUP_REQUEST: Phase.SETUP,
    MsgType.CONTEXT_ADVERTS: Phase.SETUP,
    MsgType.TRANSCRIPT_SIGS: Phase.SETUP,
    MsgType.ROUND_REQUEST: Phase.KEYS,
    MsgType.ROUND_ADVERTS: Phase.UPLOAD,
    MsgType.SURVIVORS: Phase.SURVIVORS,
    MsgType.UNMASK_REQUEST: Phase.UNMASK,
}

Tamper = Callable[[str, Message], "Message | None"]
Inputs = Callable[[str, RoundRequest], Mapping[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class Seen:
    """One message as the researcher saw it.

    ``direction`` is "in" (from ``peer``) or "out" (to ``peer``).
    """

    direction: str
    peer: str
    message: Message


def _zeros(node: str, request: RoundRequest) -> Mapping[str, np.ndarray]:
    return {s.name: np.zeros(s.shape, dtype=np.float32) for s in request.streams}


@dataclass(slots=True)
class _Counters:
    messages: int = 0
    bytes: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)


class MemoryNetwork:
    """A researcher and ``len(node_ids)`` nodes exchanging messages through a queue.

    Parameters
    ----------
    node_ids
        The nodes' ids.
    inputs
        ``inputs(node, request) -> {stream: array}``; zeros by default.
    timeout
        The phase deadline passed to the server.
    wire
        Encode and decode every message (default True).
    clock
        The real clock (``time.perf_counter``); timeouts add a skew to it.
    researcher_id, threshold, ring_bits, clipping_range
        Passed to :class:`~mpc_runtime.protocol.server.Server`.
    max_colluding_nodes, min_survivors
        Passed to :class:`~mpc_runtime.protocol.server.Server` and to every node.
    peer_trust
        ``"roster"`` (every node gets the others' keys) or ``"tofu"``.
    node_options
        Extra keyword arguments for every :class:`~mpc_runtime.protocol.node.Node`.
    """

    def __init__(
        self,
        node_ids: Sequence[str],
        *,
        inputs: Inputs = _zeros,
        timeout: float = 30.0,
        wire: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        researcher_id: str = "researcher",
        threshold: int | None = None,
        ring_bits: int = 32,
        clipping_range: float = 3.0,
        max_colluding_nodes: int = 0,
        min_survivors: int = 2,
        peer_trust: str = "roster",
        node_options: Mapping[str, Any] | None = None,
        job_id: str = "job",
    ) -> None:
        self.researcher_id = researcher_id
        self._inputs = inputs
        self._wire = wire
        self._clock = clock
        self._skew = 0.0
        self.timeout = timeout
        self.signing_keys = {v: keys.generate_signing_key() for v in node_ids}
        self.public_keys = {
            v: bytes(k.verify_key) for v, k in self.signing_keys.items()
        }
        self.stores = {v: MemoryNodeStore() for v in node_ids}
        self._peer_trust = peer_trust
        self._node_options = dict(node_options or {})
        self._node_options.setdefault("min_survivors", min_survivors)
        self._node_options.setdefault("max_colluding_nodes", max_colluding_nodes)
        self.nodes: dict[str, Node] = {v: self._make_node(v) for v in node_ids}
        self.server = Server(
            researcher_id=researcher_id,
            job_id=job_id,
            nodes=list(node_ids),
            timeout=timeout,
            ring_bits=ring_bits,
            clipping_range=clipping_range,
            threshold=threshold,
            max_colluding_nodes=max_colluding_nodes,
            min_survivors=min_survivors,
        )
        #: Everything the researcher received and sent, in order.
        self.seen: list[Seen] = []
        #: Every refusal a node sent: (node, round, reason).
        self.refusals: list[tuple[str, int, Any]] = []
        self.counters = _Counters()
        self._drop: dict[str, Phase] = {}
        self._tamper: Tamper | None = None
        self._queue: deque[tuple[str, str, Any]] = deque()

    # ---------------------------------------------------------------- nodes

    def _make_node(self, v: str) -> Node:
        roster = {u: k for u, k in self.public_keys.items() if u != v}

        def inputs(request: RoundRequest) -> Mapping[str, np.ndarray]:
            return self._inputs(v, request)

        return Node(
            v,
            self.signing_keys[v],
            store=self.stores[v],
            inputs=inputs,
            roster=roster if self._peer_trust == "roster" else None,
            peer_trust=self._peer_trust,  # type: ignore[arg-type]
            **self._node_options,
        )

    def restart_node(self, v: str) -> Node:
        """Replace node ``v`` by a fresh machine on the same store and key.

        This plays a crash and restart.
        """
        self.nodes[v] = self._make_node(v)
        return self.nodes[v]

    def now(self) -> float:
        """The driver's time: the real clock plus the skew of simulated timeouts."""
        return self._clock() + self._skew

    # -------------------------------------------------------------- delivery

    def _carry(self, msg: Message) -> Message:
        if not self._wire:
            return msg
        frames = framing.encode(msg)
        self.counters.messages += 1
        self.counters.bytes += sum(memoryview(f).nbytes for f in frames)
        return framing.decode(frames)

    def deliver(self, to: str, msg: Message) -> list[Outgoing]:
        """Hand ``msg`` to node ``to`` as the researcher would, without drop or tamper.

        Returns the node's replies (they are *not* forwarded to the server).
        """
        self.seen.append(Seen("out", to, msg))
        replies = self.nodes[to].handle(self._carry(msg), self.now())
        for reply in replies:
            self._record_in(reply.message)
        return replies

    def _record_in(self, msg: Message) -> None:
        self.seen.append(Seen("in", msg.sender, msg))
        if msg.TYPE is MsgType.REFUSED:
            self.refusals.append((msg.sender, msg.round, getattr(msg, "reason", None)))

    def _post(self, outgoing: list[Outgoing]) -> None:
        for item in outgoing:
            self._queue.append(("node", item.to, item.message))

    def _run(self, until: Callable[[], bool]) -> None:
        stage = self.server.stage
        mark = self._clock()
        for _ in range(1_000_000):  # bounded: every phase ends by deadline
            if until():
                break
            if not self._queue:
                # Nothing in flight: let the deadline pass (simulated, costs no time).
                self._skew += self.timeout + 1.0
                self._post(self.server.tick(self.now()))
            else:
                kind, to, msg = self._queue.popleft()
                if kind == "node":
                    self._to_node(to, msg)
                else:
                    self._record_in(msg)
                    self._post(self.server.handle(self._carry(msg), self.now()))
            if self.server.stage is not stage:
                now = self._clock()
                self.counters.phase_seconds[stage.value] = (
                    self.counters.phase_seconds.get(stage.value, 0.0) + now - mark
                )
                stage, mark = self.server.stage, now
        else:  # pragma: no cover - a protocol bug, not a test outcome
            raise RuntimeError("the in-memory run did not terminate")

    def _to_node(self, to: str, msg: Message) -> None:
        if self._tamper is not None:
            tampered = self._tamper(to, msg)
            if tampered is None:
                return
            msg = tampered
        self.seen.append(Seen("out", to, msg))
        phase = _PHASE_OF.get(msg.TYPE)
        dropped = self._drop.get(to)
        if dropped is not None and phase is not None and phase.value >= dropped.value:
            return
        if dropped is not None and msg.TYPE is MsgType.ABORT:
            return
        carried = self._carry(msg)
        for reply in self.nodes[to].handle(carried, self.now()):
            self._queue.append(("server", reply.to, reply.message))

    # ------------------------------------------------------------------- API

    def setup(
        self, *, drop: Mapping[str, Phase] | None = None, tamper: Tamper | None = None
    ) -> None:
        """Run context setup to completion.

        Raises
        ------
        PhaseTimeout, ContextMismatch, PolicyRefused
            Setup failed (the server's ``setup_error``).
        """
        self._drop = dict(drop or {})
        self._tamper = tamper
        self.counters.phase_seconds.clear()
        self._post(self.server.start_setup(self.now()))
        self._run(
            lambda: (
                self.server.stage in (ServerStage.READY, ServerStage.FAILED)
                and not self._queue
            )
        )
        self._drop, self._tamper = {}, None
        if self.server.setup_error is not None:
            raise self.server.setup_error

    def run_round(
        self,
        *,
        streams: Sequence[StreamSpec],
        kind: str = "task",
        name: str = "sum",
        args: Mapping[str, Any] | None = None,
        weights: Sequence[Tensor] = (),
        drop: Mapping[str, Phase] | None = None,
        tamper: Tamper | None = None,
    ) -> RoundResult:
        """Run one round to its end and return its result.

        Raises
        ------
        RoundAborted, ThresholdError, PhaseTimeout, ShapeMismatch
            The round ended without a sum (the server's outcome).
        """
        self._drop = dict(drop or {})
        self._tamper = tamper
        self.counters.phase_seconds.clear()
        r, out = self.server.start_round(
            kind=kind,
            name=name,
            args=args,
            weights=weights,
            streams=streams,
            now=self.now(),
        )
        self.last_round = r
        self._post(out)
        self._run(lambda: self.server.is_finished(r) and not self._queue)
        self._drop, self._tamper = {}, None
        return self.server.outcome(r)
