# SPDX-License-Identifier: Apache-2.0
"""``secagg demo``: a researcher and N node daemons on loopback, trained twice.

What it does, in a fresh temporary directory:

1. ``researcher init``, then for each node ``node init`` (policy ``allow``), a
   ``[plans] mlp`` entry and a ``[data] train`` entry of synthetic, label-skewed
   data (:func:`secagg.data.synthetic_classification`, node i of N), enrolment,
   and every node trusting every other (the rosters an operator would install).
2. Starts each node daemon as its own process (``python -m secagg node start``,
   ``OMP_NUM_THREADS=1``), logging to a file in that directory.
3. Trains the ``mlp`` plan for ``--rounds`` rounds with secure aggregation
   (:class:`secagg.Experiment` with a :class:`secagg.SecureAggregation`), then
   the same from the same initial model with cleartext FedAvg, unweighted (so
   both compute the same mean, one without seeing any node's weights). The
   researcher evaluates each round's global model on held-out data drawn from
   the same problem.
4. Prints per-round loss and accuracy of both, the time of each phase and the
   bytes on the wire, and writes a plot of accuracy per round to
   ``OUT/secagg-demo.png``.

Every process it started is stopped (SIGTERM, then SIGKILL after a bound) on the
way out, also on Ctrl-C or SIGTERM, and the temporary directory is removed
(``--keep`` keeps it, with the daemons' logs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from mpc_runtime import masking
from mpc_runtime.errors import ConfigError, SecAggError

from . import files
from .config import NodeConfig
from .data import synthetic_classification
from .experiment import Experiment, RoundRecord
from .plans import MLPPlan
from .secure_aggregation import SecureAggregation

__all__ = ["PLOT_NAME", "LocalDeployment", "add_arguments", "run"]

PLOT_NAME: Final = "secagg-demo.png"
#: Bound of every wait on a daemon to stop.
_STOP_WAIT: Final = 10.0
_SEED: Final = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalDeployment:
    """A researcher directory and N node directories, and their daemons.

    Parameters
    ----------
    root
        An empty directory to create everything in.
    n_nodes, samples
        How many nodes, and rows of synthetic training data per node.
    endpoint
        Where the nodes reach the researcher (written to each ``node.toml``);
        default: a free ``tcp://127.0.0.1`` port.
    """

    def __init__(
        self, root: Path, n_nodes: int, samples: int, *, endpoint: str | None = None
    ) -> None:
        self.root = root
        self.endpoint = endpoint or f"tcp://127.0.0.1:{_free_port()}"
        self.home = root / "researcher"
        self.ids = [f"node-{chr(ord('a') + i)}" for i in range(n_nodes)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        files.init_researcher(self.home)
        dirs = []
        for i, v in enumerate(self.ids):
            d = root / v
            files.init_node(d, v, self.endpoint, self.home / files.RESEARCHER_PUB)
            cfg = NodeConfig.from_toml(d / files.NODE_TOML)
            data = {
                "train": {
                    "kind": "synthetic",
                    "node_index": i,
                    "n_nodes": n_nodes,
                    "n_samples": samples,
                    "seed": _SEED,
                }
            }
            plans = {"mlp": "secagg.plans:MLPPlan"}
            cfg = dataclasses.replace(cfg, plans=plans, data=data)
            files.atomic_write(d / files.NODE_TOML, cfg.to_toml().encode("utf-8"))
            dirs.append(d)
        pubs = [d / files.NODE_PUB for d in dirs]
        for pub in pubs:
            files.enroll_node(self.home, pub)
        for d in dirs:
            files.trust_peers(d, pubs)

    def log_path(self, node: str) -> Path:
        return self.root / f"{node}.log"

    def start(self, wrap: Mapping[str, Sequence[str]] | None = None) -> None:
        """Start every node daemon as a subprocess.

        ``wrap`` maps a node id to a command its daemon's command line is
        prefixed with (for example ``["ip", "netns", "exec", "ns1"]``); the
        prefix must ``exec`` the daemon, so that stopping the process stops it.
        """
        env = dict(os.environ, OMP_NUM_THREADS="1")
        # The daemons import the same secagg as this process, installed or not.
        source = str(Path(__file__).resolve().parents[1])
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = source if not path else f"{source}{os.pathsep}{path}"
        for v in self.ids:
            with open(self.log_path(v), "wb") as log:
                self.procs[v] = subprocess.Popen(
                    [*(wrap or {}).get(v, ())]
                    + [sys.executable, "-m", "secagg", "-v", "node", "start"]
                    + ["--dir", str(self.root / v)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env=env,
                    # Own process group: a Ctrl-C in the terminal reaches the demo,
                    # which then stops the daemons itself, in order.
                    start_new_session=True,
                )

    def dead(self) -> list[str]:
        """Nodes whose daemon has exited."""
        return [v for v, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        """SIGTERM every daemon, then SIGKILL what is left after a bound."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + _STOP_WAIT
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so both clean up the same way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``secagg demo`` options."""
    p.add_argument("--nodes", type=int, default=3, help="node daemons (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument(
        "--size", type=int, default=600, help="training rows per node (default 600)"
    )
    p.add_argument(
        "--updates", type=int, default=50, help="local SGD steps per round (50)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="phase deadline, s (30)")
    p.add_argument("--out", default=".", help=f"where to write {PLOT_NAME} (.)")
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory and logs"
    )


def _check(args: argparse.Namespace) -> None:
    if not 2 <= args.nodes <= 26:
        raise ConfigError(f"expected --nodes between 2 and 26, got {args.nodes}")
    for name in ("rounds", "size", "updates"):
        if getattr(args, name) < 1:
            raise ConfigError(f"expected --{name} >= 1, got {getattr(args, name)}")
    if not args.timeout > 0:
        raise ConfigError(f"expected --timeout > 0, got {args.timeout}")
    out = Path(args.out)
    if not out.is_dir():
        raise ConfigError(f"--out {out}: not a directory")


def _require_extras() -> None:
    missing = []
    for module in ("torch", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(
            f"the demo needs {' and '.join(missing)}: pip install 'secagg[demo]'"
        )


def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit status (0 on success, 130 on Ctrl-C)."""
    _check(args)
    _require_extras()
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="secagg-demo-"))
    deployment: LocalDeployment | None = None
    try:
        with _sigterm_as_interrupt():
            deployment = LocalDeployment(tmp, args.nodes, args.size)
            deployment.start()
            runs = _train_both(deployment, args)
        _print_report(runs)
        plot = out / PLOT_NAME
        _plot(runs.secure, runs.clear, plot)
        print(f"plot: {plot}")
        return 0
    except KeyboardInterrupt:
        print("\nsecagg demo: interrupted; stopping the node daemons", file=sys.stderr)
        return 130
    except SecAggError:
        if deployment is not None:
            _print_dead(deployment)
        raise
    finally:
        if deployment is not None:
            deployment.stop()
        if args.keep:
            print(f"kept {tmp} (daemon logs: {tmp}/node-*.log)", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass(frozen=True, slots=True)
class _Runs:
    secure: list[RoundRecord]
    clear: list[RoundRecord]
    #: max |w_secure - w_clear| over every weight of the final global models.
    max_weight_diff: float


def _train_both(deployment: LocalDeployment, args: argparse.Namespace) -> _Runs:
    n = args.nodes
    X_test, y_test = synthetic_classification(
        n, n + 1, n_samples=2000, seed=_SEED, skew=0.0
    )
    training_args = {"num_updates": args.updates, "lr": 0.1, "batch_size": 32}
    common: dict[str, Any] = dict(
        endpoint=deployment.endpoint,
        training_plan="mlp",
        training_args=training_args,
        rounds=args.rounds,
        nodes=deployment.ids,
        home=deployment.home,
        test_data=(X_test, y_test),
        timeout=args.timeout,
    )
    print(
        f"secagg demo: {n} node daemons on {deployment.endpoint}, plan mlp "
        f"({_parameters()} parameters), {args.rounds} rounds x {args.updates} "
        f"local updates, {args.size} non-IID synthetic rows per node; "
        f"masking kernel: {masking.IMPLEMENTATION}"
    )
    print("training with secure aggregation ...", flush=True)
    sa = SecureAggregation(timeout=args.timeout, clipping_range=3.0)
    with Experiment(**common, secagg=sa) as exp:
        secure = exp.run()
        secure_weights = exp.state_dict()
    print("training with cleartext FedAvg (unweighted) ...", flush=True)
    with Experiment(**common, secagg=False, weighted=False) as exp:
        clear = exp.run()
        clear_weights = exp.state_dict()
    diff = max(
        float((secure_weights[k].double() - clear_weights[k].double()).abs().max())
        for k in secure_weights
    )
    return _Runs(secure, clear, diff)


def _parameters() -> int:
    model = MLPPlan().model()
    return sum(p.numel() for p in model.parameters())


def _median(records: Sequence[RoundRecord], key: str) -> float:
    values = sorted(r.timings[key] for r in records if key in r.timings)
    if not values:
        return 0.0
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _print_report(runs: _Runs) -> None:
    secure, clear = runs.secure, runs.clear
    print()
    print("round | secure: train loss  test acc | cleartext: train loss  test acc")
    for s, c in zip(secure, clear, strict=True):
        assert s.test is not None and c.test is not None
        print(
            f"{s.round:5d} | {s.train_loss:18.4f} {s.test['accuracy']:9.4f} | "
            f"{c.train_loss:21.4f} {c.test['accuracy']:9.4f}"
        )
    print()
    print("time per round (median over rounds, seconds):")
    phases = ["round.keys", "round.upload", "round.survivors", "round.unmask"]
    print(
        "  secure:    "
        + ", ".join(f"{p} {_median(secure, p):.3f}" for p in phases)
        + f", aggregate {_median(secure, 'aggregate'):.3f}"
        + f", total {_median(secure, 'total'):.3f}"
    )
    setup = _median(secure, "setup")
    print("             (round.keys includes the nodes' local training)")
    print(f"             setup, once, waiting for the daemons to start: {setup:.3f}")
    print(
        f"  cleartext: train+upload {_median(clear, 'train+upload'):.3f}, "
        f"aggregate {_median(clear, 'aggregate'):.3f}, "
        f"total {_median(clear, 'total'):.3f}"
    )
    print()
    print("bytes on the wire per round (researcher socket, mean):")
    for name, recs in (("secure", secure), ("cleartext", clear)):
        sent = sum(r.bytes_sent for r in recs) / len(recs)
        received = sum(r.bytes_received for r in recs) / len(recs)
        print(
            f"  {name + ':':10s} sent {sent / 1000:8.1f} kB, "
            f"received {received / 1000:8.1f} kB"
        )
    s_acc = secure[-1].test["accuracy"] if secure[-1].test else 0.0
    c_acc = clear[-1].test["accuracy"] if clear[-1].test else 0.0
    print()
    print(
        f"final test accuracy: secure {s_acc:.4f}, cleartext {c_acc:.4f} "
        f"(difference {abs(s_acc - c_acc) * 100:.2f} points)"
    )
    print(
        "largest difference between the two final models' weights: "
        f"{runs.max_weight_diff:.3g} (quantization, DESIGN §4)"
    )


def _print_dead(deployment: LocalDeployment) -> None:
    for v in deployment.dead():
        tail = deployment.log_path(v).read_text(errors="replace").splitlines()[-5:]
        print(f"secagg demo: daemon {v} exited; its log ends:", file=sys.stderr)
        for line in tail:
            print(f"  {line}", file=sys.stderr)


def _plot(
    secure: Sequence[RoundRecord], clear: Sequence[RoundRecord], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for recs, label, style in (
        (secure, "secure aggregation", "o-"),
        (clear, "cleartext FedAvg (unweighted)", "s--"),
    ):
        rounds = [r.round for r in recs]
        acc_ax.plot(
            rounds,
            [r.test["accuracy"] if r.test else 0.0 for r in recs],
            style,
            label=label,
        )
        loss_ax.plot(rounds, [r.train_loss for r in recs], style, label=label)
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="Global model accuracy")
    loss_ax.set(xlabel="round", ylabel="mean train loss", title="Nodes' training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks([r.round for r in secure])
    acc_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
