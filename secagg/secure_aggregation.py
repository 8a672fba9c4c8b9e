# SPDX-License-Identifier: Apache-2.0
"""SecureAggregation: the researcher's side of setup and secure sums (DESIGN §1).

It owns a :class:`mpc_runtime.transport.ResearcherEndpoint` and drives one
:class:`mpc_runtime.protocol.server.Server` per context, with the monotonic clock.

Shape discovery
---------------
The researcher does not know a task's output shape in advance. Before each
secure round, :meth:`SecureAggregation.secure_sum` sends every node a *shape
query* (a driver message, see :mod:`secagg.node`): each node runs the task,
keeps the result for the round that follows, and answers with its shape only.
All answering nodes must agree, else :class:`~mpc_runtime.errors.ShapeMismatch`
names the nodes outside the largest group (all of them on a tie). A node that
does not answer within ``timeout``, or refuses the query, is left out of the
round as a dropout. The round then requests exactly that shape; a node whose
output changed in between refuses the round (``ShapeMismatch`` naming it).

What survives a researcher restart
----------------------------------
Each context's metadata is written atomically to
``home/contexts/<digest>.json`` (job_id, researcher id, nodes, context_id, setup
nonce, threshold, ring_bits, clipping_range, the transcript T, the nodes'
identity keys — all public values — and the last round number). The round
number is written *before* each round request is sent, so a restarted
researcher never reuses one. After a restart, ``setup()`` with the same job,
parties and parameters resumes that context without contacting the nodes (they
keep their own context records on disk): the file is parsed as a
:class:`~mpc_runtime.protocol.server.ServerRecord` and
:meth:`~mpc_runtime.protocol.server.Server.restore` validates it and rebuilds a
READY server (an invalid file is logged and ignored, and setup runs anew).
``secure_sum`` continues with the next round number. A round in flight at the
crash is lost (its secrets live on the nodes, which erase them);
``setup(force=True)`` always builds a new context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from mpc_runtime.errors import (
    ClippingWarning,
    ConfigError,
    PhaseTimeout,
    ShapeMismatch,
    ThresholdError,
)
from mpc_runtime.messages import (
    Message,
    RefusalReason,
    Refused,
    RoundRequest,
    StreamSpec,
    Tensor,
    check_id,
    check_name,
)
from mpc_runtime.protocol.node import Outgoing
from mpc_runtime.protocol.round import ClipTotals, RoundResult
from mpc_runtime.protocol.server import Server, ServerRecord, ServerStage
from mpc_runtime.protocol.setup import threshold_floor
from mpc_runtime.transport import ResearcherEndpoint, TransportOptions

from . import files
from ._link import ResearcherLink
from .node import DRIVER_CONTEXT

__all__ = ["SecureAggregation", "SumResult"]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT: Final = "tcp://0.0.0.0:5555"
DEFAULT_HOME: Final = "~/.secagg/researcher"
CONTEXTS_DIR: Final = "contexts"
#: The one stream of a task round.
STREAM: Final = "value"
_FORMAT: Final = 1


@dataclass(frozen=True, slots=True, eq=False)
class SumResult:
    """The outcome of one :meth:`SecureAggregation.secure_sum`.

    Attributes
    ----------
    sum, mean
        float64 arrays of the task's shape; ``mean = sum / len(contributors)``.
    contributors, dropped
        Sorted tuples of node ids: whose inputs are in the sum, and the others.
    clipping
        Totals over the contributors: ``clipped`` count, ``histogram`` of |x|/c
        over (1, 2], (2, 4], (4, 8], > 8, and ``saturated`` (a total reached
        its cap and is a lower bound).
    round
        The round number in the context.
    """

    sum: np.ndarray
    mean: np.ndarray
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    clipping: ClipTotals
    round: int = 0


def _context_key(job_id: str, nodes: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps([job_id, list(nodes)]).encode("utf-8"))
    return h.hexdigest()[:32]


def _utf8_sorted(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(ids), key=lambda v: v.encode("utf-8")))


class SecureAggregation:
    """The researcher's secure-aggregation context manager (DESIGN §1).

    Parameters
    ----------
    timeout
        Deadline of each protocol phase, in seconds (default 30).
    clipping_range
        c: node inputs are clipped to [-c, c] (default 3.0).
    endpoint
        Where to bind (default ``tcp://0.0.0.0:5555``); port ``0`` or ``*`` picks a
        free port, and :attr:`endpoint` tells the bound address.
    home
        The researcher directory (default ``~/.secagg/researcher``): keys from
        ``secagg researcher init``, enrolled nodes in ``home/nodes/``, context
        metadata in ``home/contexts/``.
    ring_bits, threshold, max_colluding_nodes
        Context parameters (DESIGN §3/§4); ``threshold`` defaults to
        ``⌊(n + κ)/2⌋ + 1``.
    logger, options
        A logger, and :class:`~mpc_runtime.transport.TransportOptions`.

    Raises
    ------
    ConfigError
        Bad parameters or key files.

    Notes
    -----
    The socket is bound on first use (``with``, :attr:`endpoint`, ``setup``)
    and released by :meth:`close` or on leaving the ``with`` block.
    See the module docstring for shape discovery and restarts.
    """

    def __init__(
        self,
        timeout: float = 30,
        clipping_range: float = 3.0,
        *,
        endpoint: str | None = None,
        home: str | Path | None = None,
        ring_bits: int = 32,
        threshold: int | None = None,
        max_colluding_nodes: int = 0,
        logger: logging.Logger | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ConfigError(f"expected timeout in seconds, got {timeout!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"expected a timeout > 0, got {timeout!r}")
        if isinstance(clipping_range, bool) or not isinstance(
            clipping_range, (int, float)
        ):
            raise ConfigError(
                f"expected a float clipping_range, got {clipping_range!r}"
            )
        if not (math.isfinite(clipping_range) and clipping_range > 0):
            raise ConfigError(
                f"expected a finite clipping_range > 0, got {clipping_range!r}"
            )
        if ring_bits not in (32, 64) or isinstance(ring_bits, bool):
            raise ConfigError(f"expected ring_bits 32 or 64, got {ring_bits!r}")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int)
        ):
            raise ConfigError(f"expected an int threshold or None, got {threshold!r}")
        if (
            isinstance(max_colluding_nodes, bool)
            or not isinstance(max_colluding_nodes, int)
            or max_colluding_nodes < 0
        ):
            raise ConfigError(
                f"expected max_colluding_nodes >= 0, got {max_colluding_nodes!r}"
            )
        self.timeout = float(timeout)
        self.clipping_range = float(clipping_range)
        self.ring_bits = ring_bits
        self.threshold = threshold
        self.max_colluding_nodes = max_colluding_nodes
        # An Experiment passes its own endpoint and home (DESIGN §1); remember which
        # were given so it can fill in the others (secagg.experiment).
        self._home_given = home is not None
        self._endpoint_given = endpoint is not None
        self.home = Path(home if home is not None else DEFAULT_HOME).expanduser()
        self._requested_endpoint = endpoint or DEFAULT_ENDPOINT
        self.log = logger or globals()["logger"]
        self._options = options
        self._link: ResearcherLink | None = None
        self._owns_link = True
        if self._home_given:
            files.load_researcher_keys(self.home)  # Fail early on bad key files.
        self._servers: dict[str, Server] = {}
        self._current: str | None = None
        self._closed = False

    # ------------------------------------------------------------- lifecycle

    def _get_link(self) -> ResearcherLink:
        if self._closed:
            raise ConfigError("this SecureAggregation is closed")
        if self._link is None:
            self._link = ResearcherLink(
                self.home,
                self._requested_endpoint,
                options=self._options,
                logger=self.log,
            )
        return self._link

    def _open(self) -> ResearcherEndpoint:
        return self._get_link().open()

    def _share_link(self, link: ResearcherLink) -> None:
        """Use ``link`` (an Experiment's socket) instead of an own one.

        Raises
        ------
        ConfigError
            This object has its own socket already, or was given an endpoint or
            home that differs from the Experiment's.
        """
        if self._link is not None or self._closed:
            raise ConfigError(
                "pass a SecureAggregation to an Experiment before using it"
            )
        if self._home_given and self.home.resolve() != link.home.resolve():
            raise ConfigError(
                f"SecureAggregation home {self.home} differs from the "
                f"Experiment's {link.home}"
            )
        if self._endpoint_given and self._requested_endpoint != (
            link.requested_endpoint
        ):
            raise ConfigError(
                f"SecureAggregation endpoint {self._requested_endpoint} differs "
                f"from the Experiment's {link.requested_endpoint}"
            )
        self.home = link.home
        self._requested_endpoint = link.requested_endpoint
        self._link = link
        self._owns_link = False

    @property
    def researcher_id(self) -> str:
        """This researcher's id (from ``researcher.key``; default "researcher")."""
        return self._get_link().researcher_id

    @property
    def endpoint(self) -> str:
        """The bound address, e.g. ``tcp://127.0.0.1:40123`` (binds if needed)."""
        return self._open().endpoint

    def close(self) -> None:
        """Release the socket. Idempotent; context metadata stays on disk.

        The socket an Experiment shares is released by the Experiment.
        """
        if self._link is not None and self._owns_link:
            self._link.close()
        self._closed = True

    def __enter__(self) -> SecureAggregation:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- setup

    def _nodes_of(self, parties: Sequence[str]) -> tuple[str, ...]:
        if isinstance(parties, str) or not isinstance(parties, Iterable):
            raise ConfigError(f"expected parties as a list of ids, got {parties!r}")
        ids = list(parties)
        for v in ids:
            try:
                check_id(v, "party id")
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e)) from None
        nodes = [v for v in ids if v != self.researcher_id]
        if len(set(nodes)) != len(nodes):
            raise ConfigError("expected distinct party ids")
        if len(nodes) < 2:
            raise ConfigError(f"expected at least 2 nodes, got {len(nodes)}")
        return _utf8_sorted(nodes)

    def _meta_path(self, key: str) -> Path:
        return self.home / CONTEXTS_DIR / f"{key}.json"

    def _save(self, key: str, server: Server) -> None:
        doc = {"format": _FORMAT, **server.record().to_dict()}
        files.ensure_dir(self.home / CONTEXTS_DIR)
        data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")
        files.atomic_write(self._meta_path(key), data)

    def _resume(self, key: str, job_id: str, nodes: tuple[str, ...]) -> Server | None:
        path = self._meta_path(key)
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text("utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ConfigError(f"expected format {_FORMAT}")
            record = ServerRecord.from_dict(doc)
        except (OSError, ValueError) as e:  # ConfigError is a ValueError.
            self.log.warning("ignoring unreadable context file %s: %s", path, e)
            return None
        t = self.threshold or threshold_floor(len(nodes), self.max_colluding_nodes)
        if (
            record.job_id != job_id
            or record.nodes != nodes
            or record.researcher_id != self.researcher_id
            or record.ring_bits != self.ring_bits
            or record.clipping_range != self.clipping_range
            or record.threshold != t
            or record.max_colluding_nodes != self.max_colluding_nodes
        ):
            # Other parameters: a new context is needed (setup() builds one).
            return None
        try:
            server = Server.restore(
                record, timeout=self.timeout, logger=self.log.getChild("server")
            )
        except ConfigError as e:
            self.log.warning("ignoring invalid context file %s: %s", path, e)
            return None
        self.log.info(
            "context=%s resumed from %s (last round %d)",
            server.context_id[:4].hex(),
            path,
            server.last_round,
        )
        return server

    def _new_server(self, job_id: str, nodes: tuple[str, ...]) -> Server:
        return Server(
            researcher_id=self.researcher_id,
            job_id=job_id,
            nodes=nodes,
            timeout=self.timeout,
            ring_bits=self.ring_bits,
            clipping_range=self.clipping_range,
            threshold=self.threshold,
            max_colluding_nodes=self.max_colluding_nodes,
            logger=self.log.getChild("server"),
        )

    def setup(self, parties: Sequence[str], job_id: str, force: bool = False) -> None:
        """Build (or reuse) the context of ``job_id`` over ``parties``.

        Parameters
        ----------
        parties
            Node ids; the researcher's own id may be included and is dropped.
        job_id
            The job; contexts are keyed by (job_id, parties).
        force
            Build a new context even if a valid one exists.

        Raises
        ------
        ConfigError
            Bad ids, fewer than 2 nodes, a bad threshold, or a closed object.
        PhaseTimeout
            A node stayed silent (``.nodes`` names it).
        PolicyRefused
            A node's policy refused (``.nodes`` names it).
        ContextMismatch
            Nodes disagree on the context.
        """
        try:
            check_name(job_id, "job_id")
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        nodes = self._nodes_of(parties)
        key = _context_key(job_id, nodes)
        self._open()
        if not force:
            server = self._servers.get(key) or self._resume(key, job_id, nodes)
            if server is not None and server.stage is ServerStage.READY:
                self._servers[key] = server
                self._current = key
                self.log.info("setup job=%s: valid context reused", job_id)
                return
        self._get_link().refresh_enrolled()
        missing = [v for v in nodes if v not in self._open().enrolled]
        if missing:
            raise ConfigError(
                f"nodes not enrolled in {self.home / files.NODES_DIR}: "
                f"{', '.join(missing)} (run 'secagg researcher enroll')"
            )
        server = self._new_server(job_id, nodes)
        self._servers.pop(key, None)
        if self._current == key:
            self._current = None
        # Nodes become routable once they have said hello (secagg.node); give
        # them up to one phase deadline to connect before the setup clock starts.
        self._get_link().wait_routable(nodes, self.timeout)
        started = time.monotonic()
        outbox = list(server.start_setup(started))
        self._get_link().pump(
            lambda: server.stage in (ServerStage.READY, ServerStage.FAILED),
            server=server,
            outbox=outbox,
            limit=3 * self.timeout + 5.0,
        )
        if server.stage is not ServerStage.READY:
            if server.setup_error is not None:
                raise server.setup_error
            raise PhaseTimeout(
                "setup did not finish", phase=server.stage.value, round=0
            )
        self._save(key, server)
        self._servers[key] = server
        self._current = key
        self.log.info(
            "setup job=%s complete n=%d t=%d in %.2fs",
            job_id,
            len(nodes),
            server.threshold,
            time.monotonic() - started,
        )

    # ------------------------------------------------------------ secure sum

    def _discover_shape(
        self, server: Server, task: str, args: Mapping[str, Any]
    ) -> tuple[tuple[int, ...], set[str]]:
        """Ask every node for its task's output shape; return it and the silent."""
        q = self._get_link().next_query()
        query = RoundRequest(
            context_id=DRIVER_CONTEXT,
            round=q,
            sender=self.researcher_id,
            kind="task",
            name=task,
            args=dict(args),
            streams=(StreamSpec("query", (1,)),),
        )
        shapes: dict[str, tuple[int, ...]] = {}
        refused: dict[str, RefusalReason] = {}

        def on_driver(sender: str, msg: Message) -> None:
            if not isinstance(msg, Refused) or msg.round != q:
                return
            if sender not in server.nodes or sender in shapes or sender in refused:
                return
            if msg.reason is RefusalReason.NOT_READY and msg.fields[:1] == ("shape",):
                try:
                    shapes[sender] = tuple(int(f[1:]) for f in msg.fields[1:])
                except ValueError:
                    refused[sender] = RefusalReason.MALFORMED
            else:
                refused[sender] = msg.reason

        outbox = [Outgoing(v, query) for v in server.nodes]
        self._get_link().pump(
            lambda: len(shapes) + len(refused) == len(server.nodes),
            server=None,
            outbox=outbox,
            on_driver=on_driver,
            limit=self.timeout,
        )
        silent = {v for v in server.nodes if v not in shapes and v not in refused}
        if len(shapes) < server.need:
            if refused and not silent:
                raise ThresholdError(
                    f"{len(shapes)} node(s) can run task {task!r}, "
                    f"{server.need} needed",
                    phase="shape",
                    round=server.last_round + 1,
                    nodes=_utf8_sorted(refused),
                )
            raise PhaseTimeout(
                f"shape query for task {task!r}: {len(shapes)} answer(s), "
                f"{server.need} needed",
                phase="shape",
                round=server.last_round + 1,
                nodes=_utf8_sorted(silent or refused),
            )
        counts = Counter(shapes.values())
        (best, n_best), *rest = counts.most_common()
        if rest:
            tie = rest[0][1] == n_best
            odd = [v for v, s in shapes.items() if tie or s != best]
            raise ShapeMismatch(
                f"nodes returned different shapes for task {task!r}",
                phase="shape",
                round=server.last_round + 1,
                nodes=_utf8_sorted(odd),
            )
        for v, reason in refused.items():
            self.log.warning("task=%s peer=%s refused (%s)", task, v, reason.name)
        return best, silent | set(refused)

    def secure_sum(self, task: str, args: Mapping[str, Any] | None = None) -> SumResult:
        """Run one secure round of ``task`` on every node and return the sum.

        Parameters
        ----------
        task
            A task name from the nodes' ``[tasks]`` tables.
        args
            JSON-serializable arguments passed to the task (``{}`` when None).

        Returns
        -------
        SumResult

        Raises
        ------
        ConfigError
            No ``setup()`` yet, or bad task or args.
        ShapeMismatch
            Nodes' outputs differ in shape (``.nodes`` names them).
        PhaseTimeout, ThresholdError, RoundAborted
            Fewer than the needed nodes took part, or a check failed.

        Warns
        -----
        ClippingWarning
            Inputs were clipped (totals and a suggested clipping range).
        """
        if self._current is None:
            raise ConfigError("secure_sum before setup(): call setup() first")
        server = self._current_server()
        args = {} if args is None else args
        if not isinstance(args, Mapping):
            raise ConfigError(f"expected args as a dict, got {type(args).__name__}")
        try:
            RoundRequest(
                context_id=DRIVER_CONTEXT,
                round=0,
                sender=self.researcher_id,
                kind="task",
                name=task,
                args=dict(args),
                streams=(StreamSpec(STREAM, (1,)),),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad task or args: {e}") from None
        started = time.monotonic()
        shape, absent = self._discover_shape(server, task, args)
        result = self._run_round(
            server,
            kind="task",
            name=task,
            args=args,
            streams=(StreamSpec(STREAM, shape),),
            absent=absent,
        )
        r = result.round
        clip = result.clipping[STREAM]
        out_sum = np.asarray(result.sums[STREAM], dtype=np.float64)
        res = SumResult(
            sum=out_sum,
            mean=np.asarray(result.means[STREAM], dtype=np.float64),
            contributors=result.contributors,
            dropped=result.dropped,
            clipping=clip,
            round=r,
        )
        self.log.info(
            "round=%d task=%s complete contributors=%d dropped=%d in %.2fs",
            r,
            task,
            len(res.contributors),
            len(res.dropped),
            time.monotonic() - started,
        )
        if res.dropped:
            self.log.warning("round=%d dropped=%s", r, ",".join(res.dropped))
        if clip.clipped:
            self._warn_clipping(r, task, clip)
        return res

    def _current_server(self) -> Server:
        if self._current is None:
            raise ConfigError("a round before setup(): call setup() first")
        return self._servers[self._current]

    def _run_round(
        self,
        server: Server,
        *,
        kind: str,
        name: str,
        args: Mapping[str, Any],
        streams: Sequence[StreamSpec],
        weights: Sequence[Tensor] = (),
        absent: Iterable[str] = (),
    ) -> RoundResult:
        """Run one secure round to its end; return its result or raise its error.

        ``absent`` nodes are dropouts from the start (they are not asked).
        """
        assert self._current is not None
        # The round number is spent (and saved) before the request leaves.
        r, out = server.start_round(
            kind=kind,
            name=name,
            args=args,
            streams=streams,
            weights=weights,
            now=time.monotonic(),
        )
        self._save(self._current, server)
        absent = set(absent)
        outbox = [o for o in out if o.to not in absent]
        now = time.monotonic()
        for v in _utf8_sorted(absent):
            # NOT_READY is the drivers' refusal: a node that did not answer the
            # shape query is a dropout of this round from the start.
            outbox.extend(
                server.handle(
                    Refused(
                        context_id=server.context_id,
                        round=r,
                        sender=v,
                        reason=RefusalReason.NOT_READY,
                    ),
                    now,
                )
            )
        self._get_link().pump(
            lambda: server.is_finished(r),
            server=server,
            outbox=outbox,
            limit=5 * self.timeout + 5.0,
        )
        if not server.is_finished(r):
            raise PhaseTimeout(
                "round did not finish", phase=server.stage.value, round=r
            )
        return server.outcome(r)

    def _warn_clipping(self, r: int, task: str, clip: ClipTotals) -> None:
        text = f"round {r} task {task!r}: {clip.describe(self.clipping_range)}"
        self.log.warning("%s", text)
        warnings.warn(text, ClippingWarning, stacklevel=3)
