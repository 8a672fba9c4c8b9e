# SPDX-License-Identifier: Apache-2.0
"""Benchmark: the networked service (node daemons as subprocesses on loopback).

Two tables, printed side by side in one run (DESIGN §6):

1. ``setup()`` time of a :class:`secagg.SecureAggregation` for n = 2, 5, 10 and
   20 node daemons (``--quick``: 2 and 5). The clock starts once every daemon has
   connected (the daemons' start-up, Python imports included, is not timed).
2. For d = 10^6 float32 and 5 nodes: a secure round (``secure_sum`` of a task
   returning a float32 array of d) against the same round in cleartext through
   the same transport. The cleartext round uses the same ``ResearcherEndpoint``
   / ``NodeEndpoint`` pair (CURVE, ZAP, chunking, same options and keys), one
   request per node and one plain message back: a ``ROUND_REQUEST`` carrying
   the node's float32 vector as a ``Tensor`` frame (no wire change; no protocol
   machine is involved). The researcher sums the vectors in float64. Secure and
   cleartext rounds are interleaved so a shared machine's load hits both.

Bytes on the wire: every node process counts what it sends, per message, as the
transport's frames: the chunk envelope (8 + 12 per logical frame) plus the
logical frames of :func:`mpc_runtime.framing.encode` (ZMTP and CURVE framing,
a few dozen bytes per frame, are not counted). Reported per parameter: the
masked upload alone (target ≤ 4.01 B/param at ring 32) and everything the nodes
send in a round (shape answer, round advert with its share boxes, upload,
survivor signature, unmask shares), against the cleartext upload.

Targets (DESIGN §6): secure round ≤ 3× the cleartext round; masked upload
≤ 4.01 B/param.

Run: ``python benchmarks/service_round.py [--quick] [--dim 1000000] [--repeats 3]``
(from the repository root; writes ``benchmarks/results/service_round.json``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpc_runtime import framing, masking  # noqa: E402
from mpc_runtime.messages import (  # noqa: E402
    Message,
    RefusalReason,
    Refused,
    RoundRequest,
    StreamSpec,
    Tensor,
)
from mpc_runtime.transport import NodeEndpoint, ResearcherEndpoint  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "service_round.json"
WAIT = 120.0  # Bound of every wait on the daemons.
ROUND_NODES = 5

TASKS = """\
import numpy as np


def vector(args):
    rng = np.random.default_rng(args.get("seed", 0) + {index})
    return rng.uniform(-1.0, 1.0, size=int(args["d"])).astype(np.float32)
"""


# ------------------------------------------------------------- byte counting


def wire_bytes(msg: Message) -> int:
    """Bytes of the transport frames of ``msg``: envelope + logical frames."""
    frames = framing.encode(msg)
    return 8 + 12 * len(frames) + sum(memoryview(f).nbytes for f in frames)


def label(msg: Message) -> str:
    """A message's kind: its type, or ``hello``/``shape`` for driver refusals."""
    if isinstance(msg, Refused) and msg.context_id == bytes(32) and msg.fields:
        return msg.fields[0]
    return msg.TYPE.name


class Counter:
    """Bytes sent per message kind, written as JSON to ``path`` on ``dump()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes: collections.Counter[str] = collections.Counter()
        self.count: collections.Counter[str] = collections.Counter()

    def add(self, msg: Message) -> None:
        kind = label(msg)
        self.bytes[kind] += wire_bytes(msg)
        self.count[kind] += 1

    def dump(self) -> None:
        doc = {"bytes": dict(self.bytes), "count": dict(self.count)}
        self.path.write_text(json.dumps(doc))


def _until_signal() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


# ----------------------------------------------------------- node processes


def serve_secure(directory: Path, counts: Path) -> int:
    """A node daemon (as ``secagg node start``) that counts the bytes it sends."""
    import secagg.node

    counter = Counter(counts)

    class CountingEndpoint(NodeEndpoint):
        def send(self, msg: Message) -> bool:
            counter.add(msg)
            return super().send(msg)

    secagg.node.NodeEndpoint = CountingEndpoint  # type: ignore[misc]
    stop = _until_signal()
    try:
        secagg.node.NodeDaemon(directory).run(stop)
    finally:
        counter.dump()
    return 0


def serve_clear(directory: Path, endpoint: str, counts: Path) -> int:
    """A cleartext node: answers each request with its task's float32 vector."""
    from secagg import files
    from secagg.config import NodeConfig
    from secagg.node import resolve_task

    config = NodeConfig.from_toml(directory / files.NODE_TOML)
    identity = files.load_node_identity(directory)
    researcher = files.load_pinned_researcher(directory)
    sys.path.insert(0, str(directory))
    task = resolve_task(config.tasks["vector"])
    counter = Counter(counts)
    stop = _until_signal()
    with NodeEndpoint(
        endpoint,
        identity.id,
        identity.curve_public,
        identity.curve_secret,
        researcher.curve_public,
    ) as ep:
        hello = Refused(
            context_id=bytes(32),
            round=0,
            sender=identity.id,
            reason=RefusalReason.NOT_READY,
            fields=("hello",),
        )
        ep.send(hello)
        counter.add(hello)
        try:
            while not stop.is_set():
                req = ep.recv(0.1)
                if not isinstance(req, RoundRequest):
                    continue
                x = task(dict(req.args))
                reply = RoundRequest(
                    context_id=req.context_id,
                    round=req.round,
                    sender=identity.id,
                    kind="task",
                    name=req.name,
                    weights=(Tensor("value", x),),
                    streams=req.streams,
                )
                counter.add(reply)
                ep.send(reply)
        finally:
            counter.dump()
    return 0


# --------------------------------------------------------------- deployment


class Deployment:
    """A researcher directory and node directories made by the CLI."""

    def __init__(self, root: Path, n: int, d: int) -> None:
        from secagg.cli import main
        from secagg.config import NodeConfig

        self.root = root
        self.home = root / "R"
        self.port = _free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.ids = [f"node-{i:02d}" for i in range(n)]
        self.dirs = {v: root / v for v in self.ids}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.counts: dict[str, Path] = {}
        quiet = ["researcher", "init", "--dir", str(self.home)]
        _cli(main, quiet)
        for i, v in enumerate(self.ids):
            argv = ["node", "init", "--id", v, "--dir", str(self.dirs[v])]
            argv += ["--researcher", self.endpoint]
            argv += ["--researcher-key", str(self.home / "researcher.pub")]
            _cli(main, argv)
            (self.dirs[v] / "bench_tasks.py").write_text(TASKS.format(index=i))
            path = self.dirs[v] / "node.toml"
            cfg = NodeConfig.from_toml(path)
            cfg = dataclasses.replace(cfg, tasks={"vector": "bench_tasks:vector"})
            path.write_text(cfg.to_toml())
        pubs = [str(self.dirs[v] / "node.pub") for v in self.ids]
        _cli(main, ["researcher", "enroll", "--dir", str(self.home), *pubs])
        for v in self.ids:
            _cli(main, ["node", "trust", "--dir", str(self.dirs[v]), *pubs])
        self.d = d

    def _spawn(self, v: str, mode: str, *extra: str) -> None:
        counts = self.root / f"{v}.{mode}.json"
        log = open(self.root / f"{v}.{mode}.log", "wb")  # noqa: SIM115
        self.procs.append(
            subprocess.Popen(
                [sys.executable, __file__, f"--serve-{mode}", str(self.dirs[v])]
                + ["--counts", str(counts), *extra],
                cwd=REPO,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
        log.close()
        self.counts[f"{v}.{mode}"] = counts

    def start_secure(self) -> None:
        for v in self.ids:
            self._spawn(v, "secure")

    def start_clear(self, endpoint: str) -> None:
        for v in self.ids:
            self._spawn(v, "clear", "--endpoint", endpoint)

    def wait_connected(self, mode: str) -> None:
        end = time.monotonic() + WAIT
        for v in self.ids:
            log = self.root / f"{v}.{mode}.log"
            while "connected to researcher" not in log.read_text(errors="replace"):
                if time.monotonic() > end or any(p.poll() for p in self.procs):
                    raise RuntimeError(f"{v} did not connect: {log.read_text()}")
                time.sleep(0.02)

    def stop(self) -> dict[str, dict[str, dict[str, int]]]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(WAIT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(WAIT)
        self.procs = []
        out = {}
        for key, path in self.counts.items():
            if path.is_file():
                out[key] = json.loads(path.read_text())
        return out


def _cli(main: Any, argv: list[str]) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        if main(argv) != 0:
            raise RuntimeError(f"secagg {' '.join(argv)} failed")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------- measurements


def measure_setup(n: int) -> float:
    from secagg import SecureAggregation

    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        dep = Deployment(Path(tmp), n, d=1)
        dep.start_secure()
        try:
            with SecureAggregation(
                timeout=60, home=dep.home, endpoint=dep.endpoint
            ) as sa:
                dep.wait_connected("secure")
                t0 = time.perf_counter()
                sa.setup(dep.ids, job_id="bench")
                return time.perf_counter() - t0
        finally:
            dep.stop()


def clear_round(
    ep: ResearcherEndpoint, ids: list[str], r: int, d: int
) -> tuple[float, np.ndarray]:
    """One cleartext round: request, receive every float32 vector, sum in float64."""
    t0 = time.perf_counter()
    request = RoundRequest(
        context_id=bytes(32),
        round=r,
        sender="researcher",
        kind="task",
        name="vector",
        args={"d": d},
        streams=(StreamSpec("value", (d,)),),
    )
    for v in ids:
        if not ep.send(v, request):
            raise RuntimeError(f"cleartext request to {v} not sent")
    acc = np.zeros(d, dtype=np.float64)
    got: set[str] = set()
    end = time.monotonic() + WAIT
    while len(got) < len(ids):
        item = ep.recv(max(0.0, end - time.monotonic()))
        if item is None:
            raise RuntimeError(f"cleartext round {r}: {sorted(got)} answered")
        sender, msg = item
        if isinstance(msg, RoundRequest) and msg.round == r and sender not in got:
            acc += msg.weights[0].data
            got.add(sender)
    return time.perf_counter() - t0, acc


def measure_round(d: int, repeats: int) -> dict[str, Any]:
    from secagg import SecureAggregation, files

    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        dep = Deployment(Path(tmp), ROUND_NODES, d=d)
        clear_endpoint = f"tcp://127.0.0.1:{_free_port()}"
        dep.start_secure()
        dep.start_clear(clear_endpoint)
        keys = files.load_researcher_keys(dep.home)
        secure_times: list[float] = []
        clear_times: list[float] = []
        try:
            with (
                SecureAggregation(
                    timeout=60, home=dep.home, endpoint=dep.endpoint
                ) as sa,
                ResearcherEndpoint(
                    clear_endpoint,
                    keys.curve_public,
                    keys.curve_secret,
                    enrolled=files.load_enrolled(dep.home),
                ) as ep,
            ):
                dep.wait_connected("secure")
                dep.wait_connected("clear")
                end = time.monotonic() + WAIT
                while not all(ep.is_routable(v) for v in dep.ids):
                    ep.recv(0.05)  # the clear nodes' hellos
                    if time.monotonic() > end:
                        raise RuntimeError("cleartext nodes not routable")
                sa.setup(dep.ids, job_id="bench-round")
                want = sum(
                    np.random.default_rng(i)
                    .uniform(-1.0, 1.0, size=d)
                    .astype(np.float32)
                    .astype(np.float64)
                    for i in range(ROUND_NODES)
                )
                for r in range(1, repeats + 1):
                    t0 = time.perf_counter()
                    res = sa.secure_sum("vector", args={"d": d})
                    secure_times.append(time.perf_counter() - t0)
                    assert res.contributors == tuple(dep.ids)
                    error = float(np.max(np.abs(res.sum - want)))
                    bits = masking.bits_for(ROUND_NODES, 32)
                    assert error <= ROUND_NODES * 3.0 / (2**bits - 1) + 1e-9, error
                    seconds, acc = clear_round(ep, dep.ids, r, d)
                    clear_times.append(seconds)
                    assert np.array_equal(acc, want)
        finally:
            counts = dep.stop()
    secure_bytes: collections.Counter[str] = collections.Counter()
    clear_bytes: collections.Counter[str] = collections.Counter()
    for key, doc in counts.items():
        (secure_bytes if key.endswith(".secure") else clear_bytes).update(doc["bytes"])
    per_round = ROUND_NODES * repeats * d
    round_kinds = (
        "shape",
        "ROUND_ADVERT",
        "MASKED_INPUT",
        "SURVIVOR_SIG",
        "UNMASK_SHARES",
    )
    return {
        "nodes": ROUND_NODES,
        "d": d,
        "repeats": repeats,
        "secure_seconds": secure_times,
        "clear_seconds": clear_times,
        "secure_best": min(secure_times),
        "clear_best": min(clear_times),
        "ratio": min(secure_times) / min(clear_times),
        "upload_bytes_per_param": secure_bytes["MASKED_INPUT"] / per_round,
        "secure_round_bytes_per_param": sum(secure_bytes[k] for k in round_kinds)
        / per_round,
        "clear_bytes_per_param": clear_bytes["ROUND_REQUEST"] / per_round,
        "secure_bytes_by_kind": dict(secure_bytes),
        "clear_bytes_by_kind": dict(clear_bytes),
    }


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="setup for n = 2, 5")
    parser.add_argument("--nodes", type=int, nargs="*", default=None)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve-secure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-clear", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--counts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_secure or args.serve_clear:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        if args.serve_secure:
            return serve_secure(args.serve_secure, args.counts)
        return serve_clear(args.serve_clear, args.endpoint, args.counts)
    logging.basicConfig(level=logging.ERROR)
    nodes = args.nodes or ([2, 5] if args.quick else [2, 5, 10, 20])
    print(
        "# secagg service benchmark: node daemons as subprocesses on loopback, "
        f"masking IMPLEMENTATION={masking.IMPLEMENTATION}"
    )
    print(
        f"# machine: {platform.machine()} {platform.processor() or ''} "
        f"cpus={os.cpu_count()} python={sys.version.split()[0]}"
    )
    setup = {}
    for n in nodes:
        setup[n] = measure_setup(n)
    rnd = measure_round(args.dim, args.repeats)
    print()
    print("setup() time (s)" + " " * 14 + f"| round: d = {args.dim}, n = 5, ring 32")
    rows_left = [f"  n = {n:>2}: {s:8.3f}" for n, s in setup.items()]
    rows_right = [
        f"secure round   {rnd['secure_best']:8.3f} s (best of {args.repeats})",
        f"cleartext      {rnd['clear_best']:8.3f} s (same transport)",
        f"ratio          {rnd['ratio']:8.2f} x    (target <= 3)",
        f"masked upload  {rnd['upload_bytes_per_param']:8.4f} B/param (target <= 4.01)",
        f"secure round   {rnd['secure_round_bytes_per_param']:8.4f} B/param "
        "(all node messages)",
        f"cleartext      {rnd['clear_bytes_per_param']:8.4f} B/param",
    ]
    for i in range(max(len(rows_left), len(rows_right))):
        left = rows_left[i] if i < len(rows_left) else ""
        right = rows_right[i] if i < len(rows_right) else ""
        print(f"{left:<30}| {right}")
    doc = {
        "benchmark": "service_round",
        "command": " ".join(
            ["python", "benchmarks/service_round.py"]
            + (argv if argv is not None else sys.argv[1:])
        ),
        "implementation": masking.IMPLEMENTATION,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "cleartext_path": "ResearcherEndpoint/NodeEndpoint, ROUND_REQUEST with a "
        "float32 Tensor frame",
        "setup_seconds": {str(n): s for n, s in setup.items()},
        "round": rnd,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
