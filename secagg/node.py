# SPDX-License-Identifier: Apache-2.0
"""The node daemon (DESIGN §1): key custody, policy, tasks, and the ZeroMQ loop.

:class:`NodeDaemon` drives one :class:`mpc_runtime.protocol.node.Node` over a
:class:`mpc_runtime.transport.NodeEndpoint`: receive a message, hand it to the
machine with the monotonic clock, send its replies, and tick it. The machine does
the cryptography and keeps the durable state in a
:class:`secagg.store.FileNodeStore` in the node directory.

Driver messages
---------------
Besides the protocol, the daemon and the researcher exchange *driver* messages
under the all-zero context id :data:`DRIVER_CONTEXT`, which no real context can
have (a context id is a SHA-256 output); they never reach a protocol machine
(docs/service.md, "Driver messages"):

- **hello**: on start, after every (re)connection and every ``hello_interval``
  seconds, the node sends ``REFUSED(reason=NOT_READY, fields=("hello",))``. The
  researcher's ROUTER can route to a node only after it has heard from it
  (:mod:`mpc_runtime.transport`), and a node may start before the researcher.
- **shape query**: ``ROUND_REQUEST(kind="task", name, args, streams=(query,))``
  with round = a query number. The node runs the task (the result is kept for
  the secure round that follows, so the task runs once) and answers
  ``REFUSED(reason=NOT_READY, fields=("shape", "d<dim>", ...))``, or a refusal
  with reason ``POLICY``/``INPUT`` if it will not or cannot. The shape of a task's
  output is treated as public: the sum reveals it anyway.
- **cleartext training**: ``ROUND_REQUEST(kind="plan", ...)``. The node trains
  (as in a secure round) and answers ``CLEAR_UPDATE`` with its weights, loss and
  sample count in the clear, unless its policy is ``require`` (``POLICY``).

Training plans
--------------
A ``kind="plan"`` round request (secure or cleartext) names a plan of this node's
``[plans]`` table; the node builds the plan's model from the request's
``training_args``, loads the request's weights into it, trains on its ``[data]``
(the entry named after the plan, else ``train``) and returns the flattened
weights and its mean training loss (streams ``weights`` and ``loss``).

Fault injection (test-only)
---------------------------
The environment variable :data:`FAULT_ENV` (``SECAGG_TEST_FAULT``) is for tests
only: it makes the daemon crash at a chosen point, so tests never race a signal
against timing. :class:`NodeDaemon` reads it once, when constructed, and ignores
it (with a warning in the log) unless it parses as ``exit-before:<phase>``,
``exit-after:<phase>`` or ``delay-before:<phase>``, optionally followed by
``:<round>``. ``<phase>`` is a
step of the node (docs/protocol.md §9): ``advert-e``, ``transcript-sig``,
``advert-c`` (alias ``keys``), ``upload``, ``survivors`` or ``reveal``. When the
daemon is about to send that phase's message (in round ``<round>`` if given, in
any round otherwise), it calls ``os._exit(86)`` (:data:`FAULT_EXIT_CODE`):

- ``exit-before``: right before sending, after the step's durable commit, as a
  crash between the commit and the send would;
- ``exit-after``: right after sending; the daemon first flushes its socket (up to
  5 s) so the message really left, then exits without closing anything else;
- ``delay-before``: right before sending, the daemon blocks for
  ``SECAGG_TEST_FAULT_DELAY`` seconds (default 10), then sends and goes on: a
  node slower than the researcher's phase deadline.

Never set it in production.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import zmq

from mpc_runtime.errors import ConfigError, PolicyRefused
from mpc_runtime.messages import (
    ClearUpdate,
    Message,
    MsgType,
    RefusalReason,
    Refused,
    RoundRequest,
    SetupRequest,
    Tensor,
    canonical_args,
)
from mpc_runtime.protocol.node import Node
from mpc_runtime.transport import NodeEndpoint, TransportOptions

from . import files, tensors
from .config import NodeConfig, import_reference
from .data import load_arrays
from .plans import (
    LOSS_STREAM,
    WEIGHTS_STREAM,
    TrainingPlan,
    resolve_plan,
    run_local_update,
)
from .store import FileNodeStore

__all__ = [
    "NodeDaemon",
    "DRIVER_CONTEXT",
    "FAULT_DELAY_ENV",
    "FAULT_ENV",
    "FAULT_EXIT_CODE",
    "Fault",
    "parse_fault",
    "resolve_task",
    "shape_fields",
]

logger = logging.getLogger(__name__)

#: The context id of driver messages (hello, shape query); never a real context.
DRIVER_CONTEXT: Final = bytes(32)

#: How long a task result computed for a shape query waits for its round.
_CACHE_SECONDS: Final = 600.0
_CACHE_SIZE: Final = 8

#: Test-only fault injection (module docstring): the variable and the exit status.
FAULT_ENV: Final = "SECAGG_TEST_FAULT"
FAULT_EXIT_CODE: Final = 86
#: Seconds a ``delay-before`` fault blocks the daemon (default 10).
FAULT_DELAY_ENV: Final = "SECAGG_TEST_FAULT_DELAY"
_FAULT_ACTIONS: Final[
    Mapping[str, tuple[Literal["exit", "delay"], Literal["before", "after"]]]
] = {
    "exit-before": ("exit", "before"),
    "exit-after": ("exit", "after"),
    "delay-before": ("delay", "before"),
}
#: How long ``exit-after`` waits for the message to leave the socket (ms).
_FAULT_LINGER_MS: Final = 5000
#: The message type a node sends at each of its steps (docs/protocol.md §9).
_FAULT_PHASES: Final[Mapping[str, MsgType]] = {
    "advert-e": MsgType.CONTEXT_ADVERT,
    "transcript-sig": MsgType.TRANSCRIPT_SIG,
    "advert-c": MsgType.ROUND_ADVERT,
    "keys": MsgType.ROUND_ADVERT,
    "upload": MsgType.MASKED_INPUT,
    "survivors": MsgType.SURVIVOR_SIG,
    "reveal": MsgType.UNMASK_SHARES,
}


@dataclass(frozen=True, slots=True)
class _Update:
    """One local training update: the flattened weights, mean loss, sample count."""

    weights: np.ndarray
    loss: float
    samples: int


@dataclass(frozen=True, slots=True)
class Fault:
    """A parsed ``SECAGG_TEST_FAULT`` (test-only; see the module docstring)."""

    when: Literal["before", "after"]
    phase: str
    message: MsgType
    round: int | None = None
    #: ``exit`` (``os._exit(86)``) or ``delay`` (block :data:`FAULT_DELAY_ENV`
    #: seconds, then send: a node slower than the researcher's deadline).
    action: Literal["exit", "delay"] = "exit"

    def matches(self, msg: Message, when: str) -> bool:
        """Whether sending ``msg`` at ``when`` ("before"/"after") is the fault."""
        return (
            when == self.when
            and msg.TYPE is self.message
            and msg.context_id != DRIVER_CONTEXT
            and (self.round is None or msg.round == self.round)
        )


def parse_fault(value: str | None) -> Fault | None:
    """Parse ``exit-before|exit-after|delay-before:<phase>[:<round>]``; None unless
    it parses."""
    if not value:
        return None
    action, _, rest = value.strip().partition(":")
    phase, _, round_text = rest.partition(":")
    if action not in _FAULT_ACTIONS or phase not in _FAULT_PHASES:
        return None
    round_: int | None = None
    if round_text:
        if not round_text.isdecimal():
            return None
        round_ = int(round_text)
    what, when = _FAULT_ACTIONS[action]
    return Fault(when, phase, _FAULT_PHASES[phase], round_, what)


def shape_fields(shape: tuple[int, ...]) -> tuple[str, ...]:
    """The ``fields`` of a shape answer: ``("shape", "d<dim>", ...)``."""
    return ("shape", *(f"d{d}" for d in shape))


def resolve_task(reference: str) -> Any:
    """Import ``"module:function"`` and return the function.

    Raises
    ------
    ConfigError
        The reference is malformed, the module cannot be imported, or the
        attribute is missing or not callable.
    """
    func = import_reference(reference, "task")
    if not callable(func):
        raise ConfigError(f"{reference!r} is not callable")
    return func


class NodeDaemon:
    """A node's long-running process: answers setup, rounds and shape queries.

    Parameters
    ----------
    directory
        The node directory ``N`` (``node.toml``, keys, roster, state).
    logger
        A logger to use instead of this module's.
    options
        :class:`~mpc_runtime.transport.TransportOptions` of the endpoint.
    round_timeout
        Seconds after which the machine erases an unfinished round's secrets.
    hello_interval
        Seconds between two hellos while nothing else is sent.

    Environment
    -----------
    SECAGG_TEST_FAULT
        **Test-only** fault injection, read once here and ignored unless it
        parses: ``exit-before:<phase>`` / ``exit-after:<phase>`` (optionally
        ``:<round>``) makes :meth:`run` call ``os._exit(86)`` right before / right
        after sending that phase's message (see the module docstring).

    Raises
    ------
    ConfigError
        Missing or invalid files, or the directory is in use by another daemon.

    Notes
    -----
    ``policy = "refuse"`` refuses every setup (the researcher's ``setup()`` raises
    :class:`~mpc_runtime.errors.PolicyRefused` naming this node) and every shape
    query; ``"allow"`` and ``"require"`` take part in secure sums (they differ for
    cleartext training only). ``min_survivors`` and ``max_colluding_nodes`` go
    to the machine. Tasks resolve with the node directory first on ``sys.path``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        logger: logging.Logger | None = None,
        options: TransportOptions | None = None,
        round_timeout: float = 600.0,
        hello_interval: float = 10.0,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.log = logger or globals()["logger"]
        self.config = NodeConfig.from_toml(self.directory / files.NODE_TOML)
        self.identity = files.load_node_identity(self.directory)
        if self.identity.id != self.config.id:
            raise ConfigError(
                f"{self.directory}: node.toml id {self.config.id!r} differs from "
                f"node.key id {self.identity.id!r}"
            )
        self.researcher_key = files.load_pinned_researcher(self.directory)
        roster: dict[str, bytes] | None = None
        if self.config.peer_trust == "roster":
            roster = files.load_roster(self.directory)
        self._options = options
        self._hello_interval = hello_interval
        # Test-only (module docstring): read once, ignored unless it parses.
        raw_fault = os.environ.get(FAULT_ENV)
        self._fault = parse_fault(raw_fault)
        if raw_fault and self._fault is None:
            self.log.warning("ignoring %s=%r: it does not parse", FAULT_ENV, raw_fault)
        elif self._fault is not None:
            self.log.warning("test fault injection armed: %s=%s", FAULT_ENV, raw_fault)
        self._cache: dict[tuple[str, bytes], tuple[float, np.ndarray]] = {}
        self._datasets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # DESIGN §1: the node directory comes first on the import path for tasks.
        if str(self.directory) not in sys.path:
            sys.path.insert(0, str(self.directory))
        # Plans are resolved now, so a bad [plans] entry stops the daemon at start.
        self._plans: dict[str, type[TrainingPlan]] = {
            name: resolve_plan(ref) for name, ref in self.config.plans.items()
        }
        self.store = FileNodeStore(self.directory)
        try:
            self.node = Node(
                self.identity.id,
                self.identity.signing_key,
                store=self.store,
                inputs=self._inputs,
                roster=roster,
                peer_trust=self.config.peer_trust,  # type: ignore[arg-type]
                min_survivors=self.config.min_survivors,
                max_colluding_nodes=self.config.max_colluding_nodes,
                warn_clipping=True,
                round_timeout=round_timeout,
                logger=self.log.getChild("protocol"),
            )
        except BaseException:
            self.store.close()
            raise

    @property
    def id(self) -> str:
        """This node's id."""
        return self.identity.id

    # ------------------------------------------------------------------ tasks

    def _run_task(self, name: str, args: Mapping[str, Any]) -> np.ndarray:
        """Run task ``name``; refuse (``PolicyRefused``/``TypeError``) on bad output."""
        if self.config.policy == "refuse":
            raise PolicyRefused("this node's policy refuses secure aggregation")
        reference = self.config.tasks.get(name)
        if reference is None:
            raise PolicyRefused(f"task {name!r} is not offered by this node")
        func = resolve_task(reference)
        result = func(dict(args))
        if not isinstance(result, np.ndarray) or result.dtype.kind != "f":
            raise TypeError(
                f"task {name!r} must return a float ndarray, got "
                f"{type(result).__name__}"
                + (f" of {result.dtype}" if isinstance(result, np.ndarray) else "")
            )
        if result.dtype.type not in (np.float32, np.float64):
            return result.astype(np.float64)
        out: np.ndarray = result
        return out

    def _cached_or_run(self, name: str, args: Mapping[str, Any]) -> np.ndarray:
        key = (name, canonical_args(args))
        hit = self._cache.pop(key, None)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_SECONDS:
            return hit[1]
        return self._run_task(name, args)

    def _inputs(self, request: RoundRequest) -> dict[str, np.ndarray]:
        if request.kind == "plan":
            record = self.store.load_context(request.context_id)
            cap = getattr(record, "clipping_range", None)
            update = self._train(request)
            loss = update.loss if cap is None else min(update.loss, cap)
            return {WEIGHTS_STREAM: update.weights, LOSS_STREAM: np.array([loss])}
        if len(request.streams) != 1:
            raise PolicyRefused("a task round has exactly one stream")
        x = self._cached_or_run(request.name, request.args)
        return {request.streams[0].name: x}

    # ------------------------------------------------------------------ plans

    def _data(self, plan: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``[data]`` entry named after the plan, else ``[data] train``."""
        key = plan if plan in self.config.data else "train"
        spec = self.config.data.get(key)
        if spec is None:
            raise ConfigError(
                f"no training data: node.toml needs [data] {plan} or [data] train"
            )
        cached = self._datasets.get(key)
        if cached is None:
            cached = load_arrays(spec, self.directory)
            self._datasets[key] = cached
        return cached

    def _train(self, request: RoundRequest) -> _Update:
        """Run one local update of ``request``'s plan on this node's data.

        Raises
        ------
        PolicyRefused
            The plan is not in this node's ``[plans]``.
        ConfigError
            Bad plan, training_args, weights or data (names and shapes only).
        ValueError
            Training diverged (non-finite weights or loss).
        """
        plan_cls = self._plans.get(request.name)
        if plan_cls is None:
            raise PolicyRefused(f"plan {request.name!r} is not offered by this node")
        plan = plan_cls.from_training_args(request.args)
        try:
            global_weights = tensors.from_wire(
                request.weights, plan.model().state_dict()
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        X, y = self._data(request.name)
        started = time.monotonic()
        state, metrics = run_local_update(plan, global_weights, X, y, request.args)
        vector, _ = tensors.flatten(state)
        loss = float(metrics["loss"])
        if not (math.isfinite(loss) and np.isfinite(vector).all()):
            raise ValueError("training diverged: non-finite loss or weights")
        self.log.info(
            "round=%d plan=%s trained %d update(s) in %.2fs",
            request.round,
            request.name,
            int(metrics["num_updates"]),
            time.monotonic() - started,
        )
        return _Update(vector, loss, int(metrics["n_samples"]))

    def _clear_update(self, msg: RoundRequest) -> Message:
        """Answer a cleartext training request (``Experiment(secagg=False)``)."""
        refusal: tuple[RefusalReason, str] | None = None
        try:
            if self.config.policy == "require":
                raise PolicyRefused("this node's policy requires secure aggregation")
            update = self._train(msg)
        except PolicyRefused as e:
            refusal = (RefusalReason.POLICY, "policy")
            self.log.warning("plan=%s cleartext round refused: %s", msg.name, e)
        except ConfigError as e:
            # Our own messages: names, dtypes and shapes, never values.
            refusal = (RefusalReason.INPUT, "plan")
            self.log.error("plan=%s cannot train: %s", msg.name, e)
        except Exception as e:
            refusal = (RefusalReason.INPUT, "plan")
            self.log.error("plan=%s training failed: %s", msg.name, type(e).__name__)
        if refusal is not None:
            return Refused(
                context_id=DRIVER_CONTEXT,
                round=msg.round,
                sender=self.id,
                reason=refusal[0],
                fields=(refusal[1],),
            )
        return ClearUpdate(
            context_id=DRIVER_CONTEXT,
            round=msg.round,
            sender=self.id,
            samples=update.samples,
            tensors=(
                Tensor(name=WEIGHTS_STREAM, data=update.weights),
                Tensor(name=LOSS_STREAM, data=np.array([update.loss])),
            ),
        )

    # ---------------------------------------------------------------- driver

    def _hello(self, endpoint: NodeEndpoint) -> None:
        endpoint.send(
            Refused(
                context_id=DRIVER_CONTEXT,
                round=0,
                sender=self.id,
                reason=RefusalReason.NOT_READY,
                fields=("hello",),
            )
        )

    def _answer_query(self, msg: RoundRequest) -> Message:
        reason = RefusalReason.NOT_READY
        fields: tuple[str, ...]
        try:
            x = self._run_task(msg.name, msg.args)
            now = time.monotonic()
            key = (msg.name, canonical_args(msg.args))
            self._cache.pop(key, None)
            while len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (now, x)
            fields = shape_fields(tuple(x.shape))
            self.log.info("shape query task=%s answered ndim=%d", msg.name, x.ndim)
        except PolicyRefused as e:
            reason, fields = RefusalReason.POLICY, ("task",)
            self.log.warning("shape query task=%s refused: %s", msg.name, e)
        except Exception as e:
            # The task is the operator's code: whatever it raises becomes a refusal,
            # and only the exception's type is logged (its text may hold data).
            reason, fields = RefusalReason.INPUT, ("task",)
            self.log.error("shape query task=%s failed: %s", msg.name, type(e).__name__)
        return Refused(
            context_id=DRIVER_CONTEXT,
            round=msg.round,
            sender=self.id,
            reason=reason,
            fields=fields,
        )

    def handle(self, msg: Message, now: float) -> list[Message]:
        """Process one message from the researcher; return the replies."""
        if msg.context_id == DRIVER_CONTEXT:
            if isinstance(msg, RoundRequest) and msg.kind == "plan":
                return [self._clear_update(msg)]
            if isinstance(msg, RoundRequest):
                return [self._answer_query(msg)]
            self.log.debug("ignored driver message type=%s", msg.TYPE.name)
            return []
        if isinstance(msg, SetupRequest) and self.config.policy == "refuse":
            self.log.warning(
                "context=%s setup refused: policy is 'refuse'", msg.context_id[:4].hex()
            )
            return [
                Refused(
                    context_id=msg.context_id,
                    round=msg.round,
                    sender=self.id,
                    reason=RefusalReason.POLICY,
                    fields=("policy",),
                )
            ]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = self.node.handle(msg, now)
        for w in caught:
            # ClippingWarning carries counts and max |x| only (DESIGN §4).
            self.log.warning("%s: %s", w.category.__name__, w.message)
        return [o.message for o in out]

    # ------------------------------------------------------------------- loop

    def _fault_point(
        self, when: str, msg: Message, context: zmq.Context[Any] | None
    ) -> None:
        """Test-only: exit with ``FAULT_EXIT_CODE`` (or block, for ``delay``) if
        sending ``msg`` is the fault."""
        if self._fault is None or not self._fault.matches(msg, when):
            return
        if self._fault.action == "delay":
            seconds = float(os.environ.get(FAULT_DELAY_ENV) or 10.0)
            self.log.warning(
                "test fault: delay %.1fs before %s round=%d",
                seconds,
                self._fault.phase,
                msg.round,
            )
            time.sleep(seconds)
            return
        self.log.warning(
            "test fault: exit %s %s round=%d", when, self._fault.phase, msg.round
        )
        if context is not None:
            # Close every socket with a linger and wait until queued messages have
            # left (bounded), so "after sending" means the researcher can get it.
            context.destroy(linger=_FAULT_LINGER_MS)
        os._exit(FAULT_EXIT_CODE)

    def _preload_torch(self) -> None:
        """Import and warm up torch before connecting when this node trains plans.

        Importing torch and its first training step take seconds; done at the
        first round, they would eat that round's phase deadline. The daemon says hello only after this, so the
        researcher's wait for nodes to connect covers it.
        """
        if not self._plans:
            return
        try:
            import torch
        except ImportError:
            raise ConfigError(
                "node.toml has [plans] but torch is not installed: "
                "pip install 'secagg[train]'"
            ) from None
        torch.set_num_threads(1)  # As run_local_update does (secagg.plans).
        # torch initialises autograd and the optimisers lazily, which made the
        # first round's training take over a second more than the next ones
        # (measured: 1.37 s vs 0.02 s); one tiny step here pays that at start.
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        target = torch.zeros(1, dtype=torch.long)
        loss: Any = torch.nn.functional.cross_entropy(model(torch.zeros(1, 2)), target)
        loss.backward()
        optimizer.step()

    def run(self, stop: threading.Event, *, poll: float = 0.1) -> None:
        """Serve until ``stop`` is set; then close the endpoint and the store."""
        # Only an armed test fault needs its own context (to flush before exiting).
        context: zmq.Context[Any] | None = (
            zmq.Context() if self._fault is not None else None
        )
        try:
            self._preload_torch()
            with NodeEndpoint(
                self.config.researcher,
                self.id,
                self.identity.curve_public,
                self.identity.curve_secret,
                self.researcher_key.curve_public,
                options=self._options,
                context=context,
                logger=self.log.getChild("transport"),
            ) as endpoint:
                self.log.info(
                    "node=%s started researcher=%s policy=%s",
                    self.id,
                    self.config.researcher,
                    self.config.policy,
                )
                self._hello(endpoint)
                last_hello = time.monotonic()
                handshakes = endpoint.events["handshake_succeeded"]
                while not stop.is_set():
                    msg = endpoint.recv(poll)
                    now = time.monotonic()
                    if msg is not None:
                        for reply in self.handle(msg, now):
                            self._fault_point("before", reply, context)
                            if not endpoint.send(reply):
                                self.log.warning(
                                    "reply type=%s round=%d not sent (queue full)",
                                    reply.TYPE.name,
                                    reply.round,
                                )
                            self._fault_point("after", reply, context)
                    self.node.tick(now)
                    seen = endpoint.events["handshake_succeeded"]
                    if seen != handshakes or now - last_hello >= self._hello_interval:
                        handshakes = seen
                        self._hello(endpoint)
                        last_hello = now
        finally:
            if context is not None:
                context.term()
            self.store.close()
            self.log.info("node=%s stopped", self.id)
