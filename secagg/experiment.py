# SPDX-License-Identifier: Apache-2.0
"""Experiment: federated training of a torch model across node daemons (DESIGN §1).

Each round the researcher sends its global model and the ``training_args`` to
every node; each node loads them into its copy of the training plan, trains on
its local data (:func:`secagg.plans.run_local_update`) and sends back its
weights, and the researcher replaces the global model by their aggregate:

- **secure** (``secagg=True`` or a :class:`~secagg.SecureAggregation`): one
  secure round of the context ``(job().id, [researcher_id] + job().nodes)``,
  whose request carries the plan, the arguments and the global weights. Each
  node masks two streams: ``weights`` (the flattened ``state_dict``,
  :func:`secagg.tensors.flatten`) and ``loss`` (its mean training loss, capped
  at ``clipping_range`` so that the metric never clips). The new global model is
  the **unweighted** mean of the contributors' weights: a sample-weighted mean
  would need each node's sample count, which secure aggregation hides. Nodes
  that drop out are left out while at least t remain (DESIGN §3). Weights
  outside ``[-c, c]`` are clipped, and the round raises a ``ClippingWarning``.
- **cleartext** (``secagg=False``): the same request under the drivers' context;
  each node answers a ``CLEAR_UPDATE`` with its weights, loss and sample count in
  the clear (docs/protocol.md §5), and the researcher computes FedAvg weighted by
  sample count, or the plain mean with ``weighted=False``. A node whose policy is
  ``require`` refuses (``PolicyRefused`` naming it); a silent or failing node is
  left out of that round with a warning.

Per round, :attr:`Experiment.history` gets a :class:`RoundRecord` (contributors,
dropped, mean training loss, the researcher's own evaluation on ``test_data`` if
given, the time of each phase, bytes on the wire), each round is logged at INFO,
and a one-line progress bar is drawn on stderr when it is a terminal.
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import numpy as np

from mpc_runtime.errors import ConfigError, PhaseTimeout, PolicyRefused
from mpc_runtime.messages import (
    ClearUpdate,
    Message,
    RefusalReason,
    Refused,
    RoundRequest,
    StreamSpec,
    check_id,
    check_name,
)
from mpc_runtime.protocol.node import Outgoing
from mpc_runtime.transport import TransportOptions

from . import files, tensors
from ._link import ResearcherLink
from .node import DRIVER_CONTEXT
from .plans import LOSS_STREAM, WEIGHTS_STREAM, TrainingPlan, get_plan
from .secure_aggregation import DEFAULT_ENDPOINT, DEFAULT_HOME, SecureAggregation

if TYPE_CHECKING:
    import torch

__all__ = ["Experiment", "Job", "RoundRecord"]

logger = logging.getLogger(__name__)

_BAR_WIDTH: Final = 24


@dataclass(frozen=True, slots=True)
class Job:
    """The job of an Experiment: its id and its nodes (fixed at construction)."""

    id: str
    nodes: list[str]


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What one training round did.

    Attributes
    ----------
    round
        1-based index of the round in the experiment.
    secure
        Whether the round used secure aggregation.
    contributors, dropped
        Sorted node ids whose weights are in the aggregate, and the others.
    train_loss
        The unweighted mean over the contributors of their mean local training
        loss (secure rounds: each capped at ``clipping_range``).
    test
        The researcher's evaluation of the new global model on ``test_data``
        (``loss``, ``accuracy``, ``n_samples``), or None.
    timings
        Seconds per phase: secure rounds have ``setup`` (only in a round that
        built or resumed the context), ``round.keys`` (nodes train, then
        send their round keys), ``round.upload``, ``round.survivors``,
        ``round.unmask``; cleartext rounds ``train+upload``. Both have
        ``aggregate`` (the researcher's own update and evaluation of the model)
        and ``total`` (the whole round, ``setup`` excluded).
    bytes_sent, bytes_received
        Bytes the researcher's socket sent and received in the round (transport
        frames; see :class:`mpc_runtime.transport.ResearcherEndpoint`).
    clipped
        Weights clipped to ``[-c, c]`` in total (secure rounds; 0 otherwise).
    protocol_round
        The round number in the secure context (0 for cleartext rounds).
    """

    round: int
    secure: bool
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    train_loss: float
    test: Mapping[str, float] | None
    timings: Mapping[str, float]
    bytes_sent: int
    bytes_received: int
    clipped: int = 0
    protocol_round: int = 0


@dataclass(slots=True)
class _Clear:
    """Answers of one cleartext round."""

    updates: dict[str, ClearUpdate] = field(default_factory=dict)
    refused: dict[str, RefusalReason] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)


class Experiment:
    """Federated training across node daemons, securely aggregated or not.

    Parameters
    ----------
    endpoint
        Where the researcher binds (default ``tcp://0.0.0.0:5555``; port 0 picks
        a free one).
    training_plan
        A plan name registered on both sides (``"mlp"``) or a
        :class:`~secagg.plans.TrainingPlan` subclass; each node runs it only if
        its ``[plans]`` table names it.
    training_args
        ``num_updates`` (recommended with secure aggregation) or ``epochs``,
        ``batch_size``, ``lr``, ``seed`` and the plan's model keys
        (:meth:`~secagg.plans.TrainingPlan.check_training_args`).
    rounds
        How many rounds :meth:`run` runs.
    secagg
        ``False`` (cleartext FedAvg), ``True`` (a :class:`SecureAggregation` with
        its defaults and this ``timeout``) or a :class:`SecureAggregation`, which
        then shares this Experiment's endpoint, home and socket (it must not
        have been used yet, and an endpoint or home it was given must be this
        Experiment's).
    nodes
        Node ids; default: every node enrolled in ``home/nodes/``.
    home
        The researcher directory (default ``~/.secagg/researcher``).
    weighted
        Cleartext rounds only: FedAvg weighted by sample count (default) or the
        plain mean.
    job_id
        Default: ``<plan>-<8 random hex digits>``.
    timeout
        Cleartext rounds: seconds to wait for the nodes' updates; also the phase
        deadline of the :class:`SecureAggregation` made for ``secagg=True``.
    test_data
        ``(X, y)`` on which the researcher evaluates the global model after each
        round (optional; nodes' data never leaves them).
    progress
        Draw a progress bar on stderr: None (default) when it is a terminal.
    logger, options
        A logger, and :class:`~mpc_runtime.transport.TransportOptions`.

    Raises
    ------
    ConfigError
        Bad arguments, an unknown plan, bad key files, or fewer than 2 nodes.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        training_plan: str | type[TrainingPlan] = "mlp",
        training_args: Mapping[str, Any] | None = None,
        rounds: int = 1,
        secagg: bool | SecureAggregation = False,
        nodes: Sequence[str] | None = None,
        home: str | Path | None = None,
        weighted: bool = True,
        *,
        job_id: str | None = None,
        timeout: float = 30.0,
        test_data: tuple[np.ndarray, np.ndarray] | None = None,
        progress: bool | None = None,
        logger: logging.Logger | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        self.log = logger or globals()["logger"]
        if isinstance(training_plan, str):
            plan_cls = get_plan(training_plan)
        elif isinstance(training_plan, type) and issubclass(
            training_plan, TrainingPlan
        ):
            plan_cls = training_plan
        else:
            raise ConfigError(
                f"expected a plan name or TrainingPlan subclass, got {training_plan!r}"
            )
        self.training_args = plan_cls.check_training_args(training_args)
        self.plan = plan_cls.from_training_args(self.training_args)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"expected rounds an integer >= 1, got {rounds!r}")
        self.rounds = rounds
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ConfigError(f"expected timeout in seconds, got {timeout!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"expected a timeout > 0, got {timeout!r}")
        self.timeout = float(timeout)
        if not isinstance(weighted, bool):
            raise ConfigError(f"expected weighted True or False, got {weighted!r}")
        self.weighted = weighted
        self.home = Path(home if home is not None else DEFAULT_HOME).expanduser()
        self._link = ResearcherLink(
            self.home,
            endpoint or DEFAULT_ENDPOINT,
            options=options,
            logger=self.log,
        )
        self.researcher_id: str = self._link.researcher_id
        self._job = Job(
            id=self._job_id(job_id, self.plan.name),
            nodes=self._node_ids(nodes),
        )
        self.secagg: SecureAggregation | None
        if secagg is True:
            self.secagg = SecureAggregation(timeout=self.timeout, logger=self.log)
        elif secagg is False:
            self.secagg = None
        elif isinstance(secagg, SecureAggregation):
            self.secagg = secagg
        else:
            raise ConfigError(
                f"expected secagg True, False or a SecureAggregation, got {secagg!r}"
            )
        if self.secagg is not None:
            self.secagg._share_link(self._link)
        self.test_data = test_data
        self._progress = sys.stderr.isatty() if progress is None else progress
        self.model = self.plan.model(seed=int(self.training_args["seed"]))
        #: One :class:`RoundRecord` per finished round.
        self.history: list[RoundRecord] = []

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _job_id(job_id: str | None, plan: str) -> str:
        if job_id is None:
            return f"{plan}-{secrets.token_hex(4)}"
        try:
            return check_name(job_id, "job_id")
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    def _node_ids(self, nodes: Sequence[str] | None) -> list[str]:
        if nodes is None:
            ids = sorted(files.load_enrolled(self.home))
        elif isinstance(nodes, str):
            raise ConfigError(f"expected nodes as a list of ids, got {nodes!r}")
        else:
            ids = list(nodes)
        for v in ids:
            try:
                check_id(v, "node id")
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e)) from None
        if len(set(ids)) != len(ids) or self.researcher_id in ids:
            raise ConfigError(f"expected distinct node ids, got {ids}")
        if len(ids) < 2:
            raise ConfigError(
                f"expected at least 2 nodes, got {len(ids)} (enroll nodes in "
                f"{self.home / files.NODES_DIR} or pass nodes=)"
            )
        return sorted(ids, key=lambda v: v.encode("utf-8"))

    def job(self) -> Job:
        """The job: ``.id`` and ``.nodes`` (a list), fixed at construction."""
        return Job(self._job.id, list(self._job.nodes))

    @property
    def endpoint(self) -> str:
        """The bound address (binds if needed)."""
        return self._link.endpoint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the global model's ``state_dict``."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the socket (shared with :attr:`secagg`). Idempotent."""
        if self.secagg is not None:
            self.secagg.close()
        self._link.close()

    def __enter__(self) -> Experiment:
        self._link.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- run

    def training_args_for(self, round: int) -> dict[str, int | float]:  # noqa: A002
        """The ``training_args`` sent in round ``round`` (1-based): the checked
        ``training_args`` with ``seed`` advanced by ``round - 1``, so each round
        draws a new mini-batch order."""
        args = dict(self.training_args)
        args["seed"] = int(self.training_args["seed"]) + round - 1
        return args

    def run(self, rounds: int | None = None) -> list[RoundRecord]:
        """Run ``rounds`` more rounds (default: the ``rounds`` given at construction).

        Returns
        -------
        list of RoundRecord
            :attr:`history`, all rounds so far.

        Raises
        ------
        PolicyRefused
            A node's policy refused (``.nodes`` names it): secure aggregation
            refused at setup, or cleartext training refused by a ``require`` node.
        PhaseTimeout, ThresholdError, RoundAborted
            Too few nodes answered.

        Warns
        -----
        ClippingWarning
            Secure rounds whose weights were clipped.
        """
        todo = self.rounds if rounds is None else rounds
        if isinstance(todo, bool) or not isinstance(todo, int) or todo < 1:
            raise ConfigError(f"expected rounds an integer >= 1, got {todo!r}")
        for _ in range(todo):
            self.run_round()
        self._end_progress()
        return list(self.history)

    def run_round(self) -> RoundRecord:
        """Run one round; append its :class:`RoundRecord` to :attr:`history`."""
        index = len(self.history) + 1
        traffic = self._link.open().traffic
        sent, received = traffic["sent_bytes"], traffic["received_bytes"]
        started = time.monotonic()
        global_sd = self.state_dict()
        vector, layout = tensors.flatten(global_sd)
        args = self.training_args_for(index)
        weights = tensors.to_wire(global_sd)
        streams = (
            StreamSpec(WEIGHTS_STREAM, (vector.shape[0],)),
            StreamSpec(LOSS_STREAM, (1,)),
        )
        if self.secagg is not None:
            mean, record = self._secure_round(index, args, weights, streams)
        else:
            mean, record = self._clear_round(index, args, weights, streams)
        t0 = time.monotonic()
        new = tensors.unflatten(mean, layout, like=global_sd)
        self.model.load_state_dict(new)
        test = None
        if self.test_data is not None:
            test = self.plan.evaluate(self.model, *self.test_data)
        timings = dict(record.timings)
        timings["aggregate"] = time.monotonic() - t0
        # The round itself: a setup() that ran first is reported on its own.
        timings["total"] = time.monotonic() - started - timings.get("setup", 0.0)
        traffic = self._link.open().traffic
        record = RoundRecord(
            round=index,
            secure=record.secure,
            contributors=record.contributors,
            dropped=record.dropped,
            train_loss=record.train_loss,
            test=test,
            timings=timings,
            bytes_sent=traffic["sent_bytes"] - sent,
            bytes_received=traffic["received_bytes"] - received,
            clipped=record.clipped,
            protocol_round=record.protocol_round,
        )
        self.history.append(record)
        self._report(record)
        return record

    def _secure_round(
        self,
        index: int,
        args: Mapping[str, Any],
        weights: Sequence[Any],
        streams: tuple[StreamSpec, ...],
    ) -> tuple[np.ndarray, RoundRecord]:
        sa = self.secagg
        assert sa is not None
        job = self._job
        # A no-op while this job's context is valid (DESIGN §1).
        before = sa._servers.get(sa._current) if sa._current else None
        t0 = time.monotonic()
        sa.setup([self.researcher_id, *job.nodes], job_id=job.id)
        setup = time.monotonic() - t0
        server = sa._current_server()
        built = server is not before
        result = sa._run_round(
            server,
            kind="plan",
            name=self.plan.name,
            args=args,
            streams=streams,
            weights=weights,
        )
        clip = result.clipping[WEIGHTS_STREAM]
        if clip.clipped:
            sa._warn_clipping(result.round, self.plan.name, clip)
        return np.asarray(result.means[WEIGHTS_STREAM]), RoundRecord(
            round=index,
            secure=True,
            contributors=result.contributors,
            dropped=result.dropped,
            train_loss=float(result.means[LOSS_STREAM][0]),
            test=None,
            timings={
                **({"setup": setup} if built else {}),
                **{k: v for k, v in result.timings.items() if k != "total"},
            },
            bytes_sent=0,
            bytes_received=0,
            clipped=clip.clipped,
            protocol_round=result.round,
        )

    def _clear_round(
        self,
        index: int,
        args: Mapping[str, Any],
        weights: Sequence[Any],
        streams: tuple[StreamSpec, ...],
    ) -> tuple[np.ndarray, RoundRecord]:
        nodes = self._job.nodes
        self._link.refresh_enrolled()
        self._link.wait_routable(nodes, self.timeout)
        q = self._link.next_query()
        request = RoundRequest(
            context_id=DRIVER_CONTEXT,
            round=q,
            sender=self.researcher_id,
            kind="plan",
            name=self.plan.name,
            args=dict(args),
            weights=tuple(weights),
            streams=streams,
        )
        d = streams[0].shape[0]
        got = _Clear()

        def on_driver(sender: str, msg: Message) -> None:
            if msg.round != q or sender not in nodes:
                return
            if sender in got.updates or sender in got.refused or sender in got.invalid:
                return
            if isinstance(msg, Refused):
                got.refused[sender] = msg.reason
            elif isinstance(msg, ClearUpdate):
                if _valid_update(msg, d, self.weighted):
                    got.updates[sender] = msg
                else:
                    got.invalid.add(sender)
                    self.log.warning(
                        "round=%d node=%s sent an invalid update; left out",
                        index,
                        sender,
                    )

        started = time.monotonic()
        outbox = [Outgoing(v, request) for v in nodes]
        self._link.pump(
            lambda: (
                len(got.updates) + len(got.refused) + len(got.invalid) == len(nodes)
            ),
            server=None,
            outbox=outbox,
            on_driver=on_driver,
            limit=self.timeout,
        )
        elapsed = time.monotonic() - started
        policy = sorted(v for v, r in got.refused.items() if r is RefusalReason.POLICY)
        if policy:
            raise PolicyRefused(
                f"node(s) refused cleartext training of plan {self.plan.name!r} "
                "(policy 'require' or the plan is not offered)",
                phase="train",
                round=index,
                nodes=tuple(policy),
            )
        contributors = sorted(got.updates, key=lambda v: v.encode("utf-8"))
        dropped = tuple(v for v in nodes if v not in got.updates)
        if not contributors:
            raise PhaseTimeout(
                f"no node sent an update within {self.timeout:g}s",
                phase="train",
                round=index,
                nodes=dropped,
            )
        for v in dropped:
            reason = got.refused.get(v)
            why = reason.name if reason is not None else "no valid answer"
            self.log.warning("round=%d node=%s left out (%s)", index, v, why)
        mean, loss = _fedavg(
            [got.updates[v] for v in contributors], weighted=self.weighted
        )
        return mean, RoundRecord(
            round=index,
            secure=False,
            contributors=tuple(contributors),
            dropped=dropped,
            train_loss=loss,
            test=None,
            timings={"train+upload": elapsed},
            bytes_sent=0,
            bytes_received=0,
        )

    # ------------------------------------------------------------- reporting

    def _report(self, rec: RoundRecord) -> None:
        test = ""
        if rec.test is not None:
            test = (
                f" test_loss={rec.test['loss']:.4f}"
                f" test_accuracy={rec.test['accuracy']:.4f}"
            )
        phases = " ".join(
            f"{k}={v:.3f}s" for k, v in rec.timings.items() if k != "total"
        )
        self.log.info(
            "round %d/%d %s contributors=%d dropped=%d train_loss=%.4f%s "
            "%s total=%.3fs sent=%dB received=%dB",
            rec.round,
            max(self.rounds, rec.round),
            "secure" if rec.secure else "cleartext",
            len(rec.contributors),
            len(rec.dropped),
            rec.train_loss,
            test,
            phases,
            rec.timings["total"],
            rec.bytes_sent,
            rec.bytes_received,
        )
        if self._progress:
            self._draw(rec, sys.stderr)

    def _draw(self, rec: RoundRecord, out: TextIO) -> None:
        total = max(self.rounds, rec.round)
        done = round(_BAR_WIDTH * rec.round / total)
        acc = "" if rec.test is None else f" acc {rec.test['accuracy']:.3f}"
        out.write(
            f"\r[{'#' * done}{'.' * (_BAR_WIDTH - done)}] round {rec.round}/{total}"
            f" loss {rec.train_loss:.4f}{acc} {rec.timings['total']:.2f}s "
        )
        out.flush()

    def _end_progress(self) -> None:
        if self._progress and self.history:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _valid_update(msg: ClearUpdate, d: int, weighted: bool) -> bool:
    """A cleartext update is used only if it has exactly the requested streams,
    shapes and finite values (and a sample count when weighting by it)."""
    by_name = {t.name: t.data for t in msg.tensors}
    if set(by_name) != {WEIGHTS_STREAM, LOSS_STREAM}:
        return False
    w, loss = by_name[WEIGHTS_STREAM], by_name[LOSS_STREAM]
    if w.shape != (d,) or loss.shape != (1,):
        return False
    if weighted and msg.samples < 1:
        return False
    return bool(np.isfinite(w).all() and np.isfinite(loss).all())


def _fedavg(
    updates: Sequence[ClearUpdate], *, weighted: bool
) -> tuple[np.ndarray, float]:
    """FedAvg in float64: weighted by sample count, or the plain mean."""
    if weighted:
        total = float(sum(u.samples for u in updates))
        factors = [u.samples / total for u in updates]
    else:
        factors = [1.0 / len(updates)] * len(updates)
    mean: np.ndarray | None = None
    loss = 0.0
    for u, f in zip(updates, factors, strict=True):
        by_name = {t.name: t.data for t in u.tensors}
        w = by_name[WEIGHTS_STREAM].astype(np.float64) * f
        mean = w if mean is None else mean + w
        loss += float(by_name[LOSS_STREAM][0]) * f
    assert mean is not None
    return mean, loss
