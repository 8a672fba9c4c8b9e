# SPDX-License-Identifier: Apache-2.0
"""Benchmark: secure training rounds across network namespaces (one "host" each).

Topology (all of it made by this script, and removed on the way out)::

    namespace PREFIX-r            namespace PREFIX-br          namespace PREFIX-n1
    researcher                    bridge br0                   node-a daemon
    eth0 10.200.0.1/24 ---veth--- vr  vn1 ---veth--- eth0 10.200.0.11/24
                                       vn2 ---veth--- eth0 10.200.0.12/24  (PREFIX-n2)
                                       ...

One namespace for the researcher (``PREFIX-r``), one per node (``PREFIX-n1`` ..
``PREFIX-nN``) and one holding the Linux bridge (``PREFIX-br``). Each veth pair
is created inside the bridge namespace with its other end moved straight into the
host's namespace as ``eth0``, so nothing is ever created in the root namespace:
no interface names can clash with the machine's or another run's, the host's
firewall and ``br_netfilter`` never see the traffic, and deleting the namespaces
removes every bridge and veth. Addresses are on the private 10.200.0.0/24 of
that isolated bridge, so parallel runs (different prefixes) do not clash either.
``PREFIX`` defaults to ``sa<pid>``. Loopback is up in every namespace.

Before any secagg process starts, a TCP connect from every node namespace to the
researcher's address checks the links (5 connects per node; the median connect
time, about one round trip, is reported).

``--delay-ms``/``--loss-pct`` add ``tc qdisc add dev eth0 root netem delay D ms
loss L%`` on the ``eth0`` of the researcher's and of every node's namespace, so a
researcher-node round trip gets 2 x D of added delay and each direction loses L%.
Where the kernel has no netem (``sch_netem`` missing), ``tc`` fails; the script
prints ``tc netem unavailable (<tc's error>): running without added
latency/loss`` and runs anyway. The final line and the JSON always say whether
netem was applied (``netem=applied``), unavailable (``netem=unavailable``) or not
asked for (``netem=off``).

Then it writes a researcher directory and N node directories with the ``mlp``
plan and non-IID synthetic data (:class:`secagg.demo.LocalDeployment`, with the
researcher's endpoint ``tcp://10.200.0.1:5555``) and starts the researcher, this
script re-executed as ``ip netns exec PREFIX-r python netns_round.py
--researcher-child CONFIG`` (an :class:`secagg.Experiment` with a
:class:`secagg.SecureAggregation`, which binds and then waits for a ``go`` on its
stdin), and each node daemon inside its namespace (``ip netns exec PREFIX-nI
python -m secagg node start --dir ...``). Every process gets ``OMP_NUM_THREADS=1``.
Once every daemon has loaded torch and logged its connection to the researcher,
the researcher is told to go and runs ``--rounds`` rounds, evaluating each
round's model on held-out data; so the first round's ``setup`` does not include
any process's start-up.

Measured and printed per round: contributors, test accuracy, the time of each
phase (``setup`` in the first round only; ``round.keys`` includes the nodes'
local training), and the bytes the researcher's socket sent and received. The
last line is ``netns round: OK nodes=N rounds=R netem=applied|unavailable|off
wall=S`` (exit 0). Exit 1 on a failure (the message says what failed, with the
end of a dead daemon's log), 2 when it cannot run here (not root, no ``ip
netns``, no torch, bad options, namespaces of the prefix already exist), 130
when interrupted. Every process, namespace, bridge and veth it made is removed
in all cases, also on Ctrl-C and SIGTERM (only SIGKILL of the script itself
leaves them: ``ip netns list``, then ``ip netns pids``/``ip netns del``);
``--keep`` keeps only the temporary directory (keys, ``node.toml`` files, the
daemons' logs).

Run, as root, from the repository root::

    .venv/bin/python benchmarks/netns_round.py --nodes 3 --rounds 2 \\
        [--delay-ms 20 --loss-pct 1] [--prefix sa1] [--keep]

It writes ``benchmarks/results/netns_round.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS: Final = REPO / "benchmarks" / "results" / "netns_round.json"
SUBNET: Final = "10.200.0"
RESEARCHER_ADDR: Final = f"{SUBNET}.1"
PORT: Final = 5555
PROBE_PORT: Final = 5554
PROBE_CONNECTS: Final = 5
BRIDGE: Final = "br0"
#: Bound of the wait for the daemons to load torch and start.
START_WAIT: Final = 120.0
#: Bound of every wait on a helper process to stop.
STOP_WAIT: Final = 10.0
SEED: Final = 0
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_]{1,24}")


def node_address(i: int) -> str:
    """The address of node ``i`` (1-based)."""
    return f"{SUBNET}.{10 + i}"


class TopologyError(RuntimeError):
    """A command that builds or checks the topology failed.

    ``reason`` is the failing command's own message (its stderr).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class NetnsUnavailable(TopologyError):
    """``ip netns add`` itself failed: this machine cannot run the benchmark."""


def _run(cmd: list[str], timeout: float = 30.0) -> str:
    """Run ``cmd``; return its stdout, or raise TopologyError with its stderr."""
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TopologyError(f"{' '.join(cmd)}: {e}", str(e)) from None
    if out.returncode != 0:
        lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
        reason = "; ".join(lines) or f"exit status {out.returncode}"
        raise TopologyError(f"{' '.join(cmd)}: {reason}", reason)
    return out.stdout


def list_namespaces() -> list[str]:
    """Names of the network namespaces ``ip netns list`` shows."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines()]


@dataclasses.dataclass(slots=True)
class Netem:
    """What was asked of ``tc netem`` and what happened."""

    delay_ms: float
    loss_pct: float
    applied: bool = False
    reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.delay_ms > 0 or self.loss_pct > 0

    @property
    def state(self) -> str:
        if not self.requested:
            return "off"
        return "applied" if self.applied else "unavailable"


# A TCP listener in the researcher's namespace and a client in each node's: the
# connectivity check before any secagg process starts.
_PROBE_SERVER: Final = """
import socket, sys
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_server((addr, port)) as s:
    s.settimeout(30)
    print("listening", flush=True)
    for _ in range(total):
        s.accept()[0].close()
"""
_PROBE_CLIENT: Final = """
import json, socket, sys, time
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + 15
ms = []
while len(ms) < count:
    t0 = time.perf_counter()
    try:
        socket.create_connection((addr, port), timeout=5).close()
    except OSError:
        if time.monotonic() > end:
            raise
        time.sleep(0.05)
        continue
    ms.append((time.perf_counter() - t0) * 1000)
print(json.dumps(ms))
"""


class Topology:
    """The namespaces, bridge and veth pairs of one run, and their removal."""

    def __init__(self, prefix: str, n_nodes: int) -> None:
        self.prefix = prefix
        self.bridge_ns = f"{prefix}-br"
        self.researcher_ns = f"{prefix}-r"
        self.node_ns = [f"{prefix}-n{i}" for i in range(1, n_nodes + 1)]
        #: Namespaces made so far, in order: exactly what destroy() removes.
        self.created: list[str] = []

    @property
    def hosts(self) -> list[tuple[str, str, str]]:
        """(namespace, bridge port name, address) of the researcher and nodes."""
        return [(self.researcher_ns, "vr", RESEARCHER_ADDR)] + [
            (ns, f"vn{i}", node_address(i))
            for i, ns in enumerate(self.node_ns, start=1)
        ]

    def _add_ns(self, name: str) -> None:
        try:
            _run(["ip", "netns", "add", name])
        except TopologyError as e:
            if not self.created:
                raise NetnsUnavailable(str(e), e.reason) from None
            raise
        self.created.append(name)

    def create(self) -> None:
        """Namespaces, the bridge, a veth pair per host, addresses, links up."""
        br = self.bridge_ns
        self._add_ns(br)
        _run(["ip", "-n", br, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", BRIDGE, "up"])
        for ns, port, addr in self.hosts:
            self._add_ns(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(
                ["ip", "-n", br, "link", "add", port, "type", "veth"]
                + ["peer", "name", "eth0", "netns", ns]
            )
            _run(["ip", "-n", br, "link", "set", port, "master", BRIDGE])
            _run(["ip", "-n", br, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def check_connectivity(self) -> dict[str, float]:
        """TCP connects from every node namespace to the researcher's address.

        Returns the median connect time in ms per node namespace; raises
        TopologyError when a node cannot connect.
        """
        total = PROBE_CONNECTS * len(self.node_ns)
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.researcher_ns, sys.executable, "-c"]
            + [_PROBE_SERVER, RESEARCHER_ADDR, str(PROBE_PORT), str(total)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        clients: dict[str, subprocess.Popen[str]] = {}
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "listening":
                server.wait(STOP_WAIT)
                raise TopologyError(
                    f"probe listener in {self.researcher_ns} did not start: "
                    + (server.stderr.read().strip() if server.stderr else "")
                )
            for ns in self.node_ns:
                clients[ns] = subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE_CLIENT]
                    + [RESEARCHER_ADDR, str(PROBE_PORT), str(PROBE_CONNECTS)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            medians = {}
            for ns, client in clients.items():
                out, err = client.communicate(timeout=60)
                if client.returncode != 0:
                    last = err.strip().splitlines()[-1:] or ["no output"]
                    raise TopologyError(
                        f"no TCP connection from {ns} to "
                        f"{RESEARCHER_ADDR}:{PROBE_PORT}: {last[0]}"
                    )
                medians[ns] = statistics.median(json.loads(out))
            server.wait(STOP_WAIT)
            return medians
        except subprocess.TimeoutExpired as e:
            raise TopologyError(f"connectivity check timed out: {e}") from None
        finally:
            for proc in [server, *clients.values()]:
                _stop(proc)

    def apply_netem(self, netem: Netem) -> None:
        """Add a netem qdisc on every host's eth0; on failure, remove them all."""
        spec = []
        if netem.delay_ms > 0:
            spec += ["delay", f"{netem.delay_ms:g}ms"]
        if netem.loss_pct > 0:
            spec += ["loss", f"{netem.loss_pct:g}%"]
        done: list[str] = []
        try:
            for ns, _, _ in self.hosts:
                _run(
                    ["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "netem"]
                    + spec
                )
                done.append(ns)
        except TopologyError as e:
            netem.reason = e.reason  # tc's own message
            for ns in done:
                try:
                    _run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"])
                except TopologyError:
                    pass
            return
        netem.applied = True

    def destroy(self) -> list[str]:
        """Kill what still runs in the run's namespaces, delete them all.

        Returns the namespaces of this run's prefix still listed afterwards.
        Namespaces of the prefix that ``ip netns list`` shows are removed too (the
        prefix was unused at the start, so they are this run's: one whose ``ip
        netns add`` was cut short by a signal is not in :attr:`created`).
        """
        try:
            listed = [
                ns for ns in list_namespaces() if ns.startswith(f"{self.prefix}-")
            ]
        except TopologyError:
            listed = []
        for ns in reversed(self.created + sorted(set(listed) - set(self.created))):
            try:
                pids = [int(p) for p in _run(["ip", "netns", "pids", ns]).split()]
            except (TopologyError, ValueError):
                pids = []
            for pid in pids:  # Only this run's processes live in its namespaces.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + STOP_WAIT
            while any(Path(f"/proc/{p}").exists() for p in pids):
                if time.monotonic() > end:
                    break
                time.sleep(0.02)
            try:
                _run(["ip", "netns", "del", ns])
            except TopologyError as e:
                print(f"netns round: cleanup: {e}", file=sys.stderr)
        self.created = []
        try:
            return [ns for ns in list_namespaces() if ns.startswith(f"{self.prefix}-")]
        except TopologyError:
            return []


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after a bound; reap."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# ------------------------------------------------------------- the researcher


def researcher_child(config_path: Path) -> int:
    """Inside the researcher's namespace: run the Experiment, write its history."""
    logging.basicConfig(
        level=logging.WARNING, format="researcher %(levelname)s %(name)s: %(message)s"
    )
    from mpc_runtime.errors import SecAggError
    from secagg import Experiment, SecureAggregation
    from secagg.data import synthetic_classification

    cfg = json.loads(config_path.read_text())
    ids: list[str] = cfg["nodes"]
    n = len(ids)
    X_test, y_test = synthetic_classification(
        n, n + 1, n_samples=2000, seed=SEED, skew=0.0
    )
    records = []
    try:
        sa = SecureAggregation(timeout=cfg["timeout"], clipping_range=3.0)
        with Experiment(
            endpoint=cfg["endpoint"],
            training_plan="mlp",
            training_args={"num_updates": cfg["updates"], "lr": 0.1, "batch_size": 32},
            rounds=cfg["rounds"],
            nodes=ids,
            home=cfg["home"],
            test_data=(X_test, y_test),
            timeout=cfg["timeout"],
            secagg=sa,
            progress=False,
        ) as exp:
            # Bound now; the rounds start when the parent has seen every daemon
            # connect (so the first round's setup does not time their start-up).
            print(f"researcher bound on {exp.endpoint}", flush=True)
            if sys.stdin.readline().strip() != "go":
                return 1
            for _ in range(cfg["rounds"]):
                rec = exp.run_round()
                doc = dataclasses.asdict(rec)
                records.append(doc)
                print(_round_line(doc), flush=True)
    except SecAggError as e:
        print(
            f"netns round: researcher failed in round {len(records) + 1}: "
            f"{type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1
    Path(cfg["history"]).write_text(json.dumps(records))
    return 0


def _round_line(rec: dict[str, Any]) -> str:
    t = rec["timings"]
    phases = ["setup", "round.keys", "round.upload", "round.survivors"]
    phases += ["round.unmask", "aggregate", "total"]
    acc = rec["test"]["accuracy"] if rec["test"] else float("nan")
    return (
        f"round {rec['round']}: contributors {','.join(rec['contributors'])}"
        f" (dropped: {','.join(rec['dropped']) or 'none'}), "
        f"train loss {rec['train_loss']:.4f}, test accuracy {acc:.4f}\n"
        "  seconds: "
        + ", ".join(f"{p} {t[p]:.3f}" for p in phases if p in t)
        + f"\n  researcher socket: sent {rec['bytes_sent'] / 1000:.1f} kB, "
        f"received {rec['bytes_received'] / 1000:.1f} kB"
    )


# ---------------------------------------------------------------- the parent


def _preflight(args: argparse.Namespace) -> str | None:
    """Why this cannot run here, or None."""
    if not 2 <= args.nodes <= 26:
        return f"expected --nodes between 2 and 26, got {args.nodes}"
    for name in ("rounds", "size", "updates"):
        if getattr(args, name) < 1:
            return f"expected --{name.replace('_', '-')} >= 1"
    if not args.timeout > 0:
        return f"expected --timeout > 0, got {args.timeout}"
    if not args.delay_ms >= 0 or not 0 <= args.loss_pct <= 100:
        return "expected --delay-ms >= 0 and --loss-pct between 0 and 100"
    if not _PREFIX_RE.fullmatch(args.prefix):
        return f"expected --prefix of 1-24 letters, digits or _, got {args.prefix!r}"
    if os.geteuid() != 0:
        return "needs root (network namespaces need CAP_SYS_ADMIN); run it with sudo"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (ip netns), which is not on PATH"
    try:
        existing = list_namespaces()
    except TopologyError as e:
        return f"`ip netns` is unavailable: {e}"
    clash = [ns for ns in existing if ns.startswith(f"{args.prefix}-")]
    if clash:
        return f"namespaces {clash} exist; pick another --prefix"
    if importlib.util.find_spec("torch") is None:
        return "the mlp plan needs torch: pip install 'secagg[train]'"
    return None


class _Failed(Exception):
    """The run failed; the message says why."""


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_connected(deployment: Any, researcher: subprocess.Popen[bytes]) -> None:
    """Wait until every daemon has loaded torch and connected to the researcher."""
    end = time.monotonic() + START_WAIT
    pending = list(deployment.ids)
    while pending:
        dead = deployment.dead()
        if dead:
            raise _Failed(f"node daemon {dead[0]} exited at start")
        if researcher.poll() is not None:
            raise _Failed(f"the researcher exited with status {researcher.returncode}")
        pending = [
            v
            for v in pending
            if "connected to researcher"
            not in deployment.log_path(v).read_text(errors="replace")
        ]
        if time.monotonic() > end:
            raise _Failed(f"daemons {pending} not connected within {START_WAIT:g} s")
        time.sleep(0.05)


def _print_dead(deployment: Any) -> None:
    for v in deployment.dead():
        tail = deployment.log_path(v).read_text(errors="replace").splitlines()[-5:]
        print(f"netns round: daemon {v} exited; its log ends:", file=sys.stderr)
        for line in tail:
            print(f"  {line}", file=sys.stderr)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from mpc_runtime import masking
    from secagg.demo import LocalDeployment

    topo = Topology(args.prefix, args.nodes)
    netem = Netem(args.delay_ms, args.loss_pct)
    tmp: Path | None = None
    deployment: LocalDeployment | None = None
    child: subprocess.Popen[bytes] | None = None
    status = 1
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"secagg-netns-{args.prefix}-"))
        topo.create()
        print(
            f"netns round: namespaces {topo.researcher_ns} (researcher "
            f"{RESEARCHER_ADDR}), {topo.node_ns[0]}..{topo.node_ns[-1]} (nodes "
            f"{node_address(1)}..{node_address(args.nodes)}), bridge {BRIDGE} in "
            f"{topo.bridge_ns}; veth pairs, {SUBNET}.0/24",
            flush=True,
        )
        connect_ms = topo.check_connectivity()
        print(
            "connectivity: TCP connect node -> researcher, median of "
            f"{PROBE_CONNECTS} (ms): "
            + ", ".join(f"{ns} {ms:.2f}" for ns, ms in connect_ms.items()),
            flush=True,
        )
        if netem.requested:
            topo.apply_netem(netem)
            if netem.applied:
                print(
                    f"tc netem applied on eth0 of every namespace: delay "
                    f"{netem.delay_ms:g} ms, loss {netem.loss_pct:g}%",
                    flush=True,
                )
                connect_ms = topo.check_connectivity()
                print(
                    "connectivity with netem (ms): "
                    + ", ".join(f"{ns} {ms:.2f}" for ns, ms in connect_ms.items()),
                    flush=True,
                )
            else:
                print(
                    f"tc netem unavailable ({netem.reason}): running without "
                    "added latency/loss",
                    flush=True,
                )
        else:
            print("tc netem: not requested (no added latency/loss)", flush=True)
        endpoint = f"tcp://{RESEARCHER_ADDR}:{PORT}"
        deployment = LocalDeployment(tmp, args.nodes, args.size, endpoint=endpoint)
        history = tmp / "history.json"
        config = tmp / "researcher.json"
        config.write_text(
            json.dumps(
                {
                    "endpoint": endpoint,
                    "home": str(deployment.home),
                    "nodes": deployment.ids,
                    "rounds": args.rounds,
                    "updates": args.updates,
                    "timeout": args.timeout,
                    "history": str(history),
                }
            )
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO) if not path else f"{REPO}{os.pathsep}{path}"
        t0 = time.monotonic()
        child = subprocess.Popen(
            ["ip", "netns", "exec", topo.researcher_ns, sys.executable]
            + [str(Path(__file__).resolve()), "--researcher-child", str(config)],
            stdin=subprocess.PIPE,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        deployment.start(
            wrap={
                v: ["ip", "netns", "exec", ns]
                for v, ns in zip(deployment.ids, topo.node_ns, strict=True)
            }
        )
        _wait_connected(deployment, child)
        start_seconds = time.monotonic() - t0
        print(
            f"researcher and {args.nodes} node daemons started in their namespaces "
            f"and connected in {start_seconds:.1f} s (torch loaded); plan mlp, "
            f"{args.rounds} rounds x {args.updates} local updates, {args.size} "
            f"rows per node, masking kernel {masking.IMPLEMENTATION}",
            flush=True,
        )
        assert child.stdin is not None
        t0 = time.monotonic()
        child.stdin.write(b"go\n")
        child.stdin.close()
        bound = args.timeout * (5 * args.rounds + 5) + 60
        try:
            rc = child.wait(bound)
        except subprocess.TimeoutExpired:
            raise _Failed(f"the researcher did not finish within {bound:g} s") from None
        rounds_seconds = time.monotonic() - t0
        if rc != 0:
            raise _Failed(f"the researcher exited with status {rc} (see above)")
        rounds = json.loads(history.read_text())
        incomplete = [r["round"] for r in rounds if r["dropped"]]
        doc = {
            "benchmark": "netns_round",
            "command": " ".join(["python", "benchmarks/netns_round.py", *argv]),
            "date": datetime.date.today().isoformat(),
            "implementation": masking.IMPLEMENTATION,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "topology": {
                "researcher_namespace": topo.researcher_ns,
                "node_namespaces": topo.node_ns,
                "bridge_namespace": topo.bridge_ns,
                "researcher_address": RESEARCHER_ADDR,
                "node_addresses": [node_address(i) for i in range(1, args.nodes + 1)],
                "endpoint": endpoint,
            },
            "netem": {
                "delay_ms": netem.delay_ms,
                "loss_pct": netem.loss_pct,
                "state": netem.state,
                "reason": netem.reason,
            },
            "connect_ms": connect_ms,
            "start_seconds": start_seconds,
            "rounds_seconds": rounds_seconds,
            "nodes": args.nodes,
            "rounds_requested": args.rounds,
            "updates": args.updates,
            "size": args.size,
            "rounds": rounds,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(
            f"{args.rounds} rounds in {rounds_seconds:.2f} s (setup included); "
            f"wrote {args.out}"
        )
        if incomplete:
            print(f"rounds with dropped nodes: {incomplete}")
        status = 0
    except KeyboardInterrupt:
        print("\nnetns round: interrupted; cleaning up", file=sys.stderr)
        status = 130
    except NetnsUnavailable as e:
        print(f"netns round: refused: `ip netns add` failed: {e}", file=sys.stderr)
        status = 2
    except (TopologyError, _Failed, OSError) as e:
        print(f"netns round: FAILED: {e}", file=sys.stderr)
        if deployment is not None:
            _print_dead(deployment)
        status = 1
    except Exception as e:  # a SecAggError from the deployment, or a bug
        print(f"netns round: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        status = 1
    finally:
        # Cleanup runs to the end: a second Ctrl-C or SIGTERM cannot cut it short.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if child is not None:
                _stop(child)
            if deployment is not None:
                deployment.stop()
            n_made = len(topo.created)
            left = topo.destroy()
            if left:
                print(f"netns round: namespaces left behind: {left}", file=sys.stderr)
                status = status or 1
            else:
                print(
                    f"cleanup: {n_made} namespaces (with their bridge and veths) "
                    "and every process removed",
                    flush=True,
                )
            if tmp is not None and args.keep:
                print(f"kept {tmp} (daemon logs: {tmp}/node-*.log)", file=sys.stderr)
            elif tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, previous)
    if status == 0:
        print(
            f"netns round: OK nodes={args.nodes} rounds={args.rounds} "
            f"netem={netem.state} wall={time.monotonic() - started:.1f}s"
        )
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="node namespaces (3)")
    parser.add_argument("--rounds", type=int, default=2, help="secure rounds (2)")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="netem delay per direction (0)"
    )
    parser.add_argument(
        "--loss-pct", type=float, default=0.0, help="netem loss per direction (0)"
    )
    parser.add_argument("--size", type=int, default=600, help="rows per node (600)")
    parser.add_argument("--updates", type=int, default=50, help="local steps (50)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="phase deadline, s (30)"
    )
    parser.add_argument(
        "--prefix",
        default=f"sa{os.getpid()}",
        help="namespace name prefix (default sa<pid>): PREFIX-r, PREFIX-nI, PREFIX-br",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON result file")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory and logs"
    )
    parser.add_argument("--researcher-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.researcher_child is not None:
        return researcher_child(args.researcher_child)
    try:
        problem = _preflight(args)
        if problem is not None:
            print(f"netns round: refused: {problem}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # Nothing made yet.
        return 130
    return run(args, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
