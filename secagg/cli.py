# SPDX-License-Identifier: Apache-2.0
"""The ``secagg`` command line (DESIGN §1); the only place that configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn, TextIO

from mpc_runtime.errors import ConfigError

from . import files
from .config import PEER_TRUST, POLICIES

__all__ = ["main"]

logger = logging.getLogger(__name__)

_EXIT_ERROR = 1
_EXIT_USAGE = 2


class _UsageError(Exception):
    """A usage error, raised instead of argparse's print-and-exit."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits; we want one line and the exit code from
    # main(), so that main() stays callable in-process (tests, the demo).
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _researcher_init(args: argparse.Namespace) -> int:
    keys = files.init_researcher(args.dir, args.id, force=args.force)
    print(
        f"researcher {keys.id}: wrote {args.dir}/{files.RESEARCHER_PUB} and "
        f"{args.dir}/{files.RESEARCHER_KEY}"
    )
    return 0


def _researcher_enroll(args: argparse.Namespace) -> int:
    for pub in args.pub:
        dest = files.enroll_node(args.dir, pub, force=args.force)
        print(f"enrolled {dest.stem}: {dest}")
    return 0


def _node_init(args: argparse.Namespace) -> int:
    identity = files.init_node(
        args.dir,
        args.id,
        args.researcher,
        args.researcher_key,
        policy=args.policy,
        peer_trust=args.peer_trust,
        force=args.force,
    )
    print(
        f"node {identity.id}: wrote {args.dir}/{files.NODE_PUB}, "
        f"{args.dir}/{files.NODE_KEY}, {args.dir}/{files.NODE_TOML} and "
        f"{args.dir}/{files.RESEARCHER_PUB}"
    )
    return 0


def _node_trust(args: argparse.Namespace) -> int:
    for dest in files.trust_peers(args.dir, args.pub, force=args.force):
        print(f"trusted {dest.stem}: {dest}")
    return 0


def _node_start(args: argparse.Namespace) -> int:
    # Pin math libraries loaded from now on (torch, BLAS of task modules) to one
    # thread: a node shares its machine, and the kernel is single-threaded anyway.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .node import NodeDaemon

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    # Handlers first, so a signal during start-up also ends the daemon with 0.
    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        NodeDaemon(args.dir).run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _parser() -> argparse.ArgumentParser:
    from mpc_runtime import __version__

    p = _Parser(
        prog="secagg",
        description="Secure aggregation for federated learning: the researcher "
        "learns only the sum.",
    )
    p.add_argument("--version", action="version", version=f"secagg {__version__}")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv)"
    )
    roles = p.add_subparsers(dest="role", metavar="{researcher,node,demo}")
    roles.required = True

    r = roles.add_parser("researcher", help="researcher keys and enrolment")
    rsub = r.add_subparsers(dest="command", metavar="{init,enroll}")
    rsub.required = True
    ri = rsub.add_parser("init", help="create the CurveZMQ server keys")
    ri.add_argument("--dir", required=True, help="researcher directory R")
    ri.add_argument("--id", default="researcher", help="researcher id")
    ri.add_argument("--force", action="store_true", help="replace existing keys")
    ri.set_defaults(run=_researcher_init)
    re_ = rsub.add_parser("enroll", help="admit nodes: copy node.pub to R/nodes/")
    re_.add_argument("--dir", required=True, help="researcher directory R")
    re_.add_argument("pub", nargs="+", help="a node's node.pub")
    re_.add_argument("--force", action="store_true", help="replace changed keys")
    re_.set_defaults(run=_researcher_enroll)

    n = roles.add_parser("node", help="node identity, roster and daemon")
    nsub = n.add_subparsers(dest="command", metavar="{init,trust,start}")
    nsub.required = True
    ni = nsub.add_parser("init", help="create the node identity and node.toml")
    ni.add_argument("--id", required=True, help="node id")
    ni.add_argument("--dir", required=True, help="node directory N")
    ni.add_argument(
        "--researcher", required=True, help="researcher endpoint, tcp://HOST:PORT"
    )
    ni.add_argument(
        "--researcher-key", required=True, help="the researcher's researcher.pub"
    )
    ni.add_argument("--policy", choices=POLICIES, default="allow")
    ni.add_argument("--peer-trust", choices=PEER_TRUST, default="roster")
    ni.add_argument("--force", action="store_true", help="replace the identity")
    ni.set_defaults(run=_node_init)
    nt = nsub.add_parser("trust", help="add peers' node.pub to N/peers/")
    nt.add_argument("--dir", required=True, help="node directory N")
    nt.add_argument("pub", nargs="+", help="a peer's node.pub")
    nt.add_argument("--force", action="store_true", help="replace changed keys")
    nt.set_defaults(run=_node_trust)
    ns = nsub.add_parser("start", help="run the node daemon (foreground)")
    ns.add_argument("--dir", required=True, help="node directory N")
    ns.set_defaults(run=_node_start)

    from . import demo

    d = roles.add_parser(
        "demo",
        help="researcher + node daemons on loopback: secure vs cleartext training",
    )
    demo.add_arguments(d)
    d.set_defaults(run=demo.run)
    return p


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (like ``logging.lastResort``).

    So calling :func:`main` in-process, where ``sys.stderr`` may be swapped between
    calls (tests, the demo), never writes to a stale stream.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO
    if verbosity >= 2:
        level = logging.DEBUG
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``secagg`` command line; return the exit status.

    0 on success, 1 on a :class:`~mpc_runtime.errors.ConfigError` or an OS error,
    2 on a usage error. Errors print one line, ``secagg: error: ...``, on stderr.
    """
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help and --version exit 0 through argparse.
            return e.code if isinstance(e.code, int) else 0
        _configure_logging(args.verbose)
        return int(args.run(args))
    except _UsageError as e:
        print(f"secagg: error: {e} (see secagg --help)", file=sys.stderr)
        return _EXIT_USAGE
    except ConfigError as e:
        print(f"secagg: error: {e}", file=sys.stderr)
        return _EXIT_ERROR
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"secagg: error: {e.strerror or e}{where}", file=sys.stderr)
        return _EXIT_ERROR
