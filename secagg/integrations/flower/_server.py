# SPDX-License-Identifier: Apache-2.0
# flwr is an optional extra: the type check also runs where it is not installed.
# mypy: disable-error-code="import-not-found"
"""The server side: a Flower fit workflow driving secagg's server machine."""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp.grid import Grid

from mpc_runtime import keys
from mpc_runtime.errors import (
    ClippingWarning,
    ConfigError,
    MalformedMessage,
    PhaseTimeout,
    PolicyRefused,
    SecAggError,
)
from mpc_runtime.messages import (
    Message as ProtocolMessage,
)
from mpc_runtime.messages import (
    RefusalReason,
    Refused,
    RoundRequest,
    check_id,
    check_name,
)
from mpc_runtime.protocol.node import Outgoing
from mpc_runtime.protocol.round import ClipTotals, RoundResult
from mpc_runtime.protocol.server import Server, ServerStage
from mpc_runtime.protocol.setup import utf8_sorted

from . import _wire
from ._params import (
    PLAN,
    STREAM,
    request_args,
    stream_spec,
    unflatten,
    weights_tensors,
)

__all__ = ["SecureAggregationWorkflow", "FlowerRoundResult"]

logger = logging.getLogger(__name__)

#: Server contexts kept for reuse (one per distinct set of sampled clients).
MAX_CONTEXTS: Final = 8
#: Iterations of one exchange loop: a phase ends each time (message or deadline).
_MAX_STEPS: Final = 64


@dataclass(frozen=True, slots=True, eq=False)
class FlowerRoundResult:
    """What one secure Flower round computed (kept in ``workflow.results``).

    Attributes
    ----------
    server_round
        Flower's round number.
    protocol_round
        The round counter of the secagg context.
    sum, mean
        float64 arrays of the model's shapes: the exact unweighted sum of the
        contributors' parameters (within DESIGN §4's quantization bound) and
        ``sum / len(contributors)``.
    contributors, dropped
        Flower node ids whose parameters are in the sum, and the other sampled ones.
    clipping
        Totals over the contributors (clipped count, |x|/c histogram).
    timings
        Seconds per protocol phase (``"setup"`` when a context was set up).
    """

    server_round: int
    protocol_round: int
    sum: list[np.ndarray]
    mean: list[np.ndarray]
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]
    clipping: ClipTotals
    timings: Mapping[str, float] = field(default_factory=dict)


class SecureAggregationWorkflow:
    """A Flower fit workflow that aggregates with secagg (DESIGN §3/§4).

    Use it where Flower's ``SecAggPlusWorkflow`` goes::

        DefaultWorkflow(fit_workflow=SecureAggregationWorkflow(timeout=30))(
            grid, LegacyContext(context, config=..., strategy=FedAvg(...))
        )

    with :data:`secure_aggregation_mod` in the clients' ``ClientApp(mods=[...])``.
    Each round: the strategy's ``configure_fit`` picks the clients and their fit
    instructions; the workflow sets up (once per set of clients) a secagg context,
    runs one secure round in which every client trains and masks its parameters,
    and hands the strategy's ``aggregate_fit`` the **unweighted mean** of the
    contributors' parameters as every contributor's result (so FedAvg and any
    averaging strategy return that mean; client metrics pass through).

    Parameters
    ----------
    timeout
        Deadline of each protocol phase in seconds (DESIGN §1): also the Flower
        ``send_and_receive`` timeout of each exchange. The keys phase includes the
        clients' local training, so it must cover it.
    clipping_range
        c of DESIGN §4: parameters are clipped to [-c, c] before quantization
        (clients warn with ``ClippingWarning``; so does the server with totals).
    ring_bits, threshold, max_colluding_nodes, min_survivors
        As :class:`secagg.SecureAggregation` (threshold: default
        ``⌊(n + κ)/2⌋ + 1`` for the n clients of each context).
    researcher_id, job_id
        The server's protocol id, and the job of its contexts (default
        ``flwr-run-<run id>``).
    chunk_bytes
        Largest piece of a masked vector in one Flower ``Array`` (default 2 MiB).
    on_abort
        ``"raise"`` (default: an aborted round raises its error, ending the run)
        or ``"skip"`` (log it, keep the model, go on with the next round).
    result_dtype
        What the strategy gets: ``"model"`` (default: each floating-point layer
        of the mean in the dtype the model had, so a float32 model stays
        float32) or ``"float64"`` (the decoded mean as is). ``results`` always
        keeps float64.

    Raises
    ------
    ConfigError
        Invalid arguments.

    Notes
    -----
    Errors of a round (``on_abort="raise"``): :class:`~secagg.PhaseTimeout`,
    :class:`~secagg.ThresholdError`, :class:`~secagg.RoundAborted`,
    :class:`~secagg.ShapeMismatch`; of a setup that cannot go on without the
    clients that failed it: those and :class:`~secagg.ContextMismatch`.
    """

    def __init__(
        self,
        timeout: float = 30.0,
        clipping_range: float = 3.0,
        *,
        ring_bits: int = 32,
        threshold: int | None = None,
        max_colluding_nodes: int = 0,
        min_survivors: int = 2,
        researcher_id: str = "researcher",
        job_id: str | None = None,
        chunk_bytes: int = _wire.DEFAULT_CHUNK_BYTES,
        on_abort: Literal["raise", "skip"] = "raise",
        result_dtype: Literal["model", "float64"] = "model",
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ConfigError(f"expected a number timeout, got {timeout!r}")
        if not timeout > 0:
            raise ConfigError(f"expected a timeout > 0, got {timeout}")
        try:
            check_id(researcher_id, "researcher_id")
            if job_id is not None:
                check_name(job_id, "job_id")
            _wire.check_chunk_bytes(chunk_bytes)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if on_abort not in ("raise", "skip"):
            raise ConfigError(f"expected on_abort 'raise' or 'skip', got {on_abort!r}")
        if result_dtype not in ("model", "float64"):
            raise ConfigError(
                f"expected result_dtype 'model' or 'float64', got {result_dtype!r}"
            )
        # The machine checks ring_bits, clipping_range and the thresholds; build a
        # throw-away one now so a bad argument fails here, not in round 1.
        Server(
            researcher_id=researcher_id,
            job_id="check",
            nodes=["a", "b"],
            timeout=float(timeout),
            ring_bits=ring_bits,
            clipping_range=clipping_range,
            max_colluding_nodes=0,
            min_survivors=min_survivors,
        )
        self.timeout = float(timeout)
        self.clipping_range = float(clipping_range)
        self.ring_bits = ring_bits
        self.threshold = threshold
        self.max_colluding_nodes = max_colluding_nodes
        self.min_survivors = min_survivors
        self.researcher_id = researcher_id
        self.job_id = job_id
        self.chunk_bytes = chunk_bytes
        self.on_abort = on_abort
        self.result_dtype = result_dtype
        #: Results of completed secure rounds, by Flower round.
        self.results: dict[int, FlowerRoundResult] = {}
        #: Errors of aborted rounds (or setups), by Flower round.
        self.errors: dict[int, SecAggError] = {}
        self._skew = 0.0
        # Flower node id <-> protocol id and identity key (from the clients' hello).
        self._ids: dict[int, tuple[str, bytes]] = {}
        self._flower: dict[str, int] = {}
        self._contexts: OrderedDict[tuple[str, ...], Server] = OrderedDict()
        self._stale: set[tuple[str, ...]] = set()

    # ----------------------------------------------------------------- clock

    def _now(self) -> float:
        # The machine's clock: monotonic time plus the deadlines already forced
        # (an exchange that returns short of replies has waited its timeout).
        return time.monotonic() + self._skew

    # ------------------------------------------------------------- exchanges

    def _send(
        self, grid: Grid, messages: list[Message], timeout: float | None = None
    ) -> list[Message]:
        if not messages:
            return []
        return list(
            grid.send_and_receive(
                messages, timeout=self.timeout if timeout is None else timeout
            )
        )

    def _introduce(self, grid: Grid, node_ids: Sequence[int], group_id: str) -> None:
        """Learn the protocol id and identity key of clients not met before."""
        unknown = [nid for nid in node_ids if nid not in self._ids]
        if not unknown:
            return
        out = [
            Message(
                RecordDict(
                    {
                        _wire.RECORD: ConfigRecord(
                            {
                                "v": _wire.WIRE_VERSION,
                                "kind": _wire.KIND_HELLO,
                                "stage": "hello",
                            }
                        )
                    }
                ),
                nid,
                MessageType.TRAIN,
                group_id=group_id,
                ttl=self.timeout,
            )
            for nid in unknown
        ]
        for reply in self._send(grid, out):
            nid = reply.metadata.src_node_id
            if nid not in unknown or nid in self._ids:
                continue
            if reply.has_error():
                logger.warning(
                    "client=%d did not introduce itself: %s", nid, reply.error.reason
                )
                continue
            record = reply.content.config_records.get(_wire.RECORD)
            pid = record.get("id") if record is not None else None
            key = record.get("identity_key") if record is not None else None
            try:
                check_id(pid, "client id")
            except (TypeError, ValueError):
                logger.warning("client=%d sent a malformed introduction", nid)
                continue
            assert isinstance(pid, str)
            if not isinstance(key, bytes) or len(key) != keys.PUBLIC_KEY_SIZE:
                logger.warning("client=%d sent a malformed identity key", nid)
                continue
            if pid in self._flower or pid == self.researcher_id:
                logger.warning("client=%d claims the id %s of another party", nid, pid)
                continue
            self._ids[nid] = (pid, key)
            self._flower[pid] = nid
            logger.info("client=%d is %s", nid, pid)

    def _exchange(
        self,
        grid: Grid,
        batch: Mapping[str, list[ProtocolMessage]],
        group_id: str,
        fit: Callable[[], RecordDict] | None,
        on_reply: Callable[[str, Message], None] | None,
    ) -> list[ProtocolMessage]:
        out: list[Message] = []
        for pid, msgs in batch.items():
            has_request = any(isinstance(m, RoundRequest) for m in msgs)
            content = fit() if has_request and fit is not None else RecordDict()
            _wire.pack(
                content,
                msgs,
                stage=_wire.stage_of(msgs),
                chunk_bytes=self.chunk_bytes,
                weights_from_fit=has_request,
            )
            out.append(
                Message(
                    content,
                    self._flower[pid],
                    MessageType.TRAIN,
                    group_id=group_id,
                    # A message not answered within its phase is of no use later.
                    ttl=self.timeout,
                )
            )
        received: list[ProtocolMessage] = []
        for reply in self._send(grid, out):
            nid = reply.metadata.src_node_id
            pid = self._ids.get(nid, ("", b""))[0]
            if pid not in batch:
                continue
            if reply.has_error():
                # A client whose ClientApp failed is silent for the machine: a
                # dropout (the phase ends at its deadline without it).
                logger.warning(
                    "client=%d (%s) replied with an error: %s",
                    nid,
                    pid,
                    reply.error.reason,
                )
                continue
            try:
                msgs, _ = _wire.unpack(reply.content)
            except MalformedMessage as e:
                logger.warning("client=%d (%s) sent a malformed reply: %s", nid, pid, e)
                continue
            if on_reply is not None:
                on_reply(pid, reply)
            for m in msgs:
                if m.sender != pid:
                    logger.warning("client=%d spoke as %s; ignored", nid, m.sender)
                    continue
                received.append(m)
        return received

    def _pump(
        self,
        grid: Grid,
        server: Server,
        pending: list[Outgoing],
        until: Callable[[], bool],
        group_id: str,
        *,
        fit: Callable[[], RecordDict] | None = None,
        on_reply: Callable[[str, Message], None] | None = None,
        on_message: Callable[[ProtocolMessage], None] | None = None,
    ) -> list[Outgoing]:
        """Carry the machine's messages until ``until()``; return what is left.

        What is left is sent with the next exchange (the transcript signatures go
        with the first round request) or, for aborts, by :meth:`_flush`.
        """
        for _ in range(_MAX_STEPS):
            if until():
                return pending
            if not pending:
                # Every message of the phase was answered or timed out and the
                # machine still waits: its deadline has passed.
                self._skew += server.timeout
                pending = server.tick(self._now())
                continue
            batch: dict[str, list[ProtocolMessage]] = {}
            for item in pending:
                batch.setdefault(item.to, []).append(item.message)
            pending = []
            for msg in self._exchange(grid, batch, group_id, fit, on_reply):
                if on_message is not None:
                    on_message(msg)
                pending.extend(server.handle(msg, self._now()))
        raise RuntimeError("secure aggregation exchange did not terminate")

    def _flush(self, grid: Grid, pending: list[Outgoing], group_id: str) -> None:
        """Push aborts without waiting: nodes then erase the round's secrets.

        Best effort (a node that misses one erases them at its next request), and
        nobody waits on the silent clients that usually caused the abort.
        """
        batch: dict[str, list[ProtocolMessage]] = {}
        for item in pending:
            batch.setdefault(item.to, []).append(item.message)
        out = []
        for pid, msgs in batch.items():
            content = RecordDict()
            _wire.pack(
                content,
                msgs,
                stage=_wire.stage_of(msgs),
                chunk_bytes=self.chunk_bytes,
            )
            out.append(
                Message(
                    content,
                    self._flower[pid],
                    MessageType.TRAIN,
                    group_id=group_id,
                    ttl=self.timeout,
                )
            )
        if out:
            grid.push_messages(out)

    # ----------------------------------------------------------------- setup

    def _context(
        self, grid: Grid, pids: tuple[str, ...], job_id: str, group_id: str
    ) -> tuple[Server, list[Outgoing], float]:
        """A ready context over ``pids`` (or fewer, if some fail setup).

        Returns the server, what is left to send (the transcript signatures), and
        the seconds setup took (0 for a cached context).

        Raises
        ------
        PhaseTimeout, PolicyRefused, ContextMismatch, ConfigError
            Setup cannot complete with the clients left.
        """
        if pids in self._contexts and pids not in self._stale:
            self._contexts.move_to_end(pids)
            return self._contexts[pids], [], 0.0
        self._contexts.pop(pids, None)
        self._stale.discard(pids)
        started = time.monotonic()
        members = pids
        while True:
            server = Server(
                researcher_id=self.researcher_id,
                job_id=job_id,
                nodes=members,
                timeout=self.timeout,
                ring_bits=self.ring_bits,
                clipping_range=self.clipping_range,
                threshold=self.threshold,
                max_colluding_nodes=self.max_colluding_nodes,
                min_survivors=self.min_survivors,
                identity_keys={pid: self._ids[self._flower[pid]][1] for pid in members},
                logger=logger,
            )
            pending = self._pump(
                grid,
                server,
                server.start_setup(self._now()),
                lambda: server.stage in (ServerStage.READY, ServerStage.FAILED),
                group_id,
            )
            if server.stage is ServerStage.READY:
                # A context without some sampled clients is kept under its own
                # members only: the next round that samples them all tries again.
                self._contexts[members] = server
                while len(self._contexts) > MAX_CONTEXTS:
                    self._contexts.popitem(last=False)
                return server, pending, time.monotonic() - started
            self._flush(grid, pending, group_id)
            error = server.setup_error
            assert error is not None
            left = tuple(v for v in members if v not in error.nodes)
            # A client that is silent or refuses at setup is a dropout: set up
            # again without it, while enough clients are left (DESIGN §1 needs
            # every party of *a* context, and the context is ours to choose).
            if (
                isinstance(error, (PhaseTimeout, PolicyRefused))
                and error.nodes
                and len(left) >= max(2, self.min_survivors)
                and left != members
            ):
                logger.warning(
                    "setup without %s: %s", ",".join(error.nodes), type(error).__name__
                )
                members = left
                continue
            raise error

    # ----------------------------------------------------------------- round

    def __call__(self, grid: Grid, context: Context) -> None:
        """Run one secure fit round (a Flower ``fit_workflow``).

        Raises
        ------
        TypeError
            ``context`` is not a ``LegacyContext``.
        ConfigError
            The strategy sent clients different fit instructions, or the model is
            empty or of a type that cannot be aggregated.
        SecAggError
            The round (or its setup) aborted, with ``on_abort="raise"``.
        """
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        current_round = cast(int, cfg[WorkflowKey.CURRENT_ROUND])
        group_id = str(current_round)
        parameters = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        instructions = context.strategy.configure_fit(
            server_round=current_round,
            parameters=parameters,
            client_manager=context.client_manager,
        )
        if not instructions:
            logger.info("configure_fit: no clients selected, cancel")
            return
        proxies = {proxy.node_id: proxy for proxy, _ in instructions}
        fitins = _same_instructions([ins for _, ins in instructions])
        arrays = parameters_to_ndarrays(fitins.parameters)
        shapes = [a.shape for a in arrays]
        dtypes = [a.dtype for a in arrays]
        weights = weights_tensors(arrays)
        spec = stream_spec(arrays)
        args = request_args(fitins.config)
        logger.info(
            "round=%d secure fit: %d clients sampled, %d parameters",
            current_round,
            len(proxies),
            spec.size,
        )
        self._introduce(grid, sorted(proxies), group_id)
        pids = utf8_sorted(self._ids[nid][0] for nid in proxies if nid in self._ids)
        job_id = self.job_id or f"flwr-run-{context.run_id}"
        try:
            if len(pids) < 2:
                raise PhaseTimeout(
                    f"{len(pids)} client(s) answered, at least 2 needed",
                    phase="hello",
                    nodes=[str(nid) for nid in proxies if nid not in self._ids],
                )
            server, pending, setup_seconds = self._context(grid, pids, job_id, group_id)
        except SecAggError as e:
            self._fail(current_round, e)
            return
        fit_results: dict[str, FitRes] = {}

        def fit_content() -> RecordDict:
            return compat.fitins_to_recorddict(fitins, keep_input=True)

        def on_reply(pid: str, reply: Message) -> None:
            if "fitres.status" in reply.content.config_records or (
                "fitres.num_examples" in reply.content.metric_records
            ):
                try:
                    fit_results[pid] = compat.recorddict_to_fitres(
                        reply.content, keep_input=True
                    )
                except (KeyError, TypeError, ValueError):
                    logger.warning("client %s sent malformed fit metadata", pid)

        stale = False

        def on_message(msg: ProtocolMessage) -> None:
            nonlocal stale
            # A client that lost its context state (or missed the end of setup)
            # refuses every round of it: set the context up again next round.
            if (
                isinstance(msg, Refused)
                and msg.reason is RefusalReason.UNEXPECTED
                and server.stage is ServerStage.KEYS
            ):
                stale = True

        r, out = server.start_round(
            kind="plan",
            name=PLAN,
            args=args,
            weights=weights,
            streams=[spec],
            now=self._now(),
        )
        left = self._pump(
            grid,
            server,
            pending + out,
            lambda: server.is_finished(r),
            group_id,
            fit=fit_content,
            on_reply=on_reply,
            on_message=on_message,
        )
        self._flush(grid, left, group_id)
        if stale:
            self._stale.add(tuple(server.nodes))
        try:
            result = server.outcome(r)
        except SecAggError as e:
            self._fail(current_round, e)
            return
        self._finish(
            context,
            current_round,
            result,
            proxies,
            shapes,
            dtypes,
            fit_results,
            setup_seconds,
        )

    def _fail(self, current_round: int, error: SecAggError) -> None:
        self.errors[current_round] = error
        logger.error(
            "round=%d secure aggregation aborted: %s: %s (nodes=%s)",
            current_round,
            type(error).__name__,
            error,
            ",".join(error.nodes),
        )
        if self.on_abort == "raise":
            raise error

    def _finish(
        self,
        context: LegacyContext,
        current_round: int,
        result: RoundResult,
        proxies: Mapping[int, ClientProxy],
        shapes: Sequence[tuple[int, ...]],
        dtypes: Sequence[np.dtype[Any]],
        fit_results: Mapping[str, FitRes],
        setup_seconds: float,
    ) -> None:
        mean = unflatten(np.asarray(result.means[STREAM]), shapes)
        total = unflatten(np.asarray(result.sums[STREAM]), shapes)
        contributors = tuple(self._flower[pid] for pid in result.contributors)
        dropped = tuple(sorted(set(proxies) - set(contributors)))
        clip = result.clipping[STREAM]
        timings = dict(result.timings)
        if setup_seconds:
            timings["setup"] = setup_seconds
        self.results[current_round] = FlowerRoundResult(
            server_round=current_round,
            protocol_round=result.round,
            sum=total,
            mean=mean,
            contributors=contributors,
            dropped=dropped,
            clipping=clip,
            timings=timings,
        )
        logger.info(
            "round=%d secure aggregation complete: contributors=%d dropped=%d",
            current_round,
            len(contributors),
            len(dropped),
        )
        if dropped:
            logger.warning("round=%d dropped=%s", current_round, dropped)
        if clip.clipped:
            self._warn_clipping(current_round, clip)
        # The strategy sees the mean as every contributor's parameters, so an
        # averaging strategy returns it whatever the weights (as SecAgg+ does).
        handed = [
            m.astype(dt)
            if self.result_dtype == "model" and np.issubdtype(dt, np.floating)
            else m
            for m, dt in zip(mean, dtypes)
        ]
        aggregated = ndarrays_to_parameters(handed)
        results: list[tuple[ClientProxy, FitRes]] = []
        for pid, nid in zip(result.contributors, contributors):
            res = fit_results.get(pid) or FitRes(Status(Code.OK, ""), aggregated, 1, {})
            res.parameters = aggregated
            results.append((proxies[nid], res))
        failures: list[tuple[ClientProxy, FitRes] | BaseException] = [
            Exception(f"client {nid} dropped out of secure aggregation")
            for nid in dropped
        ]
        parameters_aggregated, metrics_aggregated = context.strategy.aggregate_fit(
            current_round, results, failures
        )
        if parameters_aggregated:
            context.state.array_records[MAIN_PARAMS_RECORD] = (
                compat.parameters_to_arrayrecord(parameters_aggregated, True)
            )
            context.history.add_metrics_distributed_fit(
                server_round=current_round, metrics=metrics_aggregated
            )

    def _warn_clipping(self, current_round: int, clip: ClipTotals) -> None:
        text = (
            f"round {current_round}: "
            f"{clip.describe(self.clipping_range, 'parameter(s)')}"
        )
        logger.warning("%s", text)
        warnings.warn(text, ClippingWarning, stacklevel=3)


def _same_instructions(instructions: Sequence[FitIns]) -> FitIns:
    """The one FitIns every client gets (a secure sum needs one request).

    Raises
    ------
    ConfigError
        The strategy sent different parameters or configs to different clients.
    """
    first = instructions[0]
    for other in instructions[1:]:
        if other is first:
            continue
        if (
            other.config != first.config
            or other.parameters.tensor_type != first.parameters.tensor_type
            or other.parameters.tensors != first.parameters.tensors
        ):
            raise ConfigError(
                "secure aggregation needs the same fit instructions for every "
                "sampled client; the strategy's configure_fit sent different ones"
            )
    return first
