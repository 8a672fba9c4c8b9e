# SPDX-License-Identifier: Apache-2.0
"""Multi-host: a secure training round across network namespaces.

Runs ``benchmarks/netns_round.py`` (its docstring has the topology: a researcher
namespace and one namespace per node, joined by veth pairs to a bridge in a
namespace of its own) as a subprocess with ``--nodes 3 --rounds 1`` and a
namespace prefix unique to the case, then checks its exit status, its final
line, the contributors in its JSON result, and that no namespace of that prefix
and no process of that run is left. Needs root and iproute2 (``ip netns add``
is probed first; otherwise the module is skipped with the reason) and torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "netns_round.py"
AREA = "Multi-host"
NODES = ["node-a", "node-b", "node-c"]
#: Bound of one run of the script (about 10-15 s here); on expiry it gets
#: SIGTERM (so it cleans up), then SIGKILL.
RUN_BOUND = 150.0


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    name = f"sa-probe{os.getpid()}"
    try:
        out = subprocess.run(
            ["ip", "netns", "add", name], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` failed: {e}"
    if out.returncode != 0:
        return f"`ip netns add` failed: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


@pytest.fixture(scope="module", autouse=True)
def _netns() -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("torch")


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
    )
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [ns for ns in names if ns.startswith(f"{prefix}-")]


def _processes(prefix: str) -> list[int]:
    """Live processes of the run: the daemons' command lines name its directory."""
    mark = f"secagg-netns-{prefix}-".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


class Run:
    """One run of the script: its output, exit status and leftovers."""

    def __init__(self, tmp_path: Path, case: str, *extra: str) -> None:
        self.prefix = f"sat{os.getpid()}{case}"
        self.out = tmp_path / f"{case}.json"
        self.cmd = [sys.executable, str(SCRIPT), "--nodes", "3", "--rounds", "1"]
        self.cmd += ["--prefix", self.prefix, "--out", str(self.out), *extra]
        self.stdout = ""
        self.stderr = ""
        self.returncode: int | None = None
        self.seconds = 0.0

    def start(self) -> subprocess.Popen[str]:
        self.t0 = time.monotonic()
        return subprocess.Popen(
            self.cmd,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, proc: subprocess.Popen[str]) -> None:
        """Wait (bounded); on expiry SIGTERM, then SIGKILL, then clean up here."""
        try:
            self.stdout, self.stderr = proc.communicate(
                timeout=max(1.0, RUN_BOUND - (time.monotonic() - self.t0))
            )
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                self.stdout, self.stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                self.stdout, self.stderr = proc.communicate()
            self.cleanup()
            pytest.fail(f"{self.cmd} ran over {RUN_BOUND:g} s:\n{self.stderr}")
        self.returncode = proc.returncode
        self.seconds = time.monotonic() - self.t0

    def run(self) -> Run:
        self.finish(self.start())
        return self

    def leftovers(self) -> tuple[list[str], list[int]]:
        return _namespaces(self.prefix), _processes(self.prefix)

    def cleanup(self) -> None:
        """What the script should have removed, if it did not (after a failure)."""
        for pid in _processes(self.prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ns in _namespaces(self.prefix):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def result(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.out.read_text())
        return doc

    def check_ok(self, netem: str) -> dict[str, Any]:
        """Exit 0, the OK line last, all 3 nodes contributed, nothing left."""
        try:
            assert self.returncode == 0, self.stdout + self.stderr
            last = self.stdout.strip().splitlines()[-1]
            assert re.fullmatch(
                rf"netns round: OK nodes=3 rounds=1 netem={netem} wall=[\d.]+s", last
            ), self.stdout
            assert "round 1: contributors node-a,node-b,node-c (dropped: none)" in (
                self.stdout
            )
            doc = self.result()
            (rnd,) = doc["rounds"]
            assert rnd["contributors"] == NODES and rnd["dropped"] == []
            assert rnd["secure"] and rnd["test"]["accuracy"] > 0.25
            assert doc["topology"]["researcher_namespace"] == f"{self.prefix}-r"
            assert len(doc["connect_ms"]) == 3
            assert self.leftovers() == ([], [])
            return doc
        finally:
            self.cleanup()


def test_secure_round_across_namespaces(tmp_path: Path, reliability: Any) -> None:
    run = Run(tmp_path, "a").run()
    doc = run.check_ok("off")
    (rnd,) = doc["rounds"]
    t = rnd["timings"]
    connect = max(doc["connect_ms"].values())
    reliability.add(
        AREA,
        "a secure round across network namespaces",
        "3 node namespaces + a researcher namespace, veth pairs to a bridge in its "
        "own namespace (10.200.0.0/24); `benchmarks/netns_round.py --nodes 3 "
        "--rounds 1`",
        1,
        f"secure round OK in {run.seconds:.0f} s wall: contributors "
        f"{','.join(rnd['contributors'])}, test accuracy "
        f"{rnd['test']['accuracy']:.3f}, setup {t['setup']:.3f} s, round "
        f"{t['total']:.2f} s; TCP connect ≤ {connect:.2f} ms; "
        "no namespace or process left",
    )


def test_secure_round_with_netem(tmp_path: Path, reliability: Any) -> None:
    run = Run(tmp_path, "b", "--delay-ms", "20", "--loss-pct", "1").run()
    applied = "tc netem applied on eth0 of every namespace" in run.stdout
    unavailable = re.search(
        r"^tc netem unavailable \((.+)\): running without added latency/loss$",
        run.stdout,
        re.MULTILINE,
    )
    assert applied != bool(unavailable), run.stdout
    doc = run.check_ok("applied" if applied else "unavailable")
    (rnd,) = doc["rounds"]
    assert doc["netem"]["state"] == ("applied" if applied else "unavailable")
    if applied:
        # 20 ms each way on both ends: a TCP connect takes at least 40 ms.
        assert min(doc["connect_ms"].values()) >= 40.0
        netem = f"netem applied (TCP connect {min(doc['connect_ms'].values()):.0f} ms)"
    else:
        assert unavailable is not None
        assert doc["netem"]["reason"] == unavailable.group(1)
        netem = f"netem unavailable: {unavailable.group(1)}"
    reliability.add(
        AREA,
        "netem delay 20 ms + loss 1% asked for",
        "as above with `--delay-ms 20 --loss-pct 1` (tc qdisc netem on every "
        "namespace's eth0)",
        1,
        f"{netem}; secure round OK in {run.seconds:.0f} s wall, contributors "
        f"{','.join(rnd['contributors'])}, round {rnd['timings']['total']:.2f} s; "
        "no namespace or process left",
    )


def test_sigterm_mid_round_cleans_up(tmp_path: Path, reliability: Any) -> None:
    run = Run(tmp_path, "c")
    proc = run.start()
    assert proc.stdout is not None
    # Guard: the readline loop below ends when the script exits, at the latest.
    guard = threading.Timer(RUN_BOUND, proc.terminate)
    guard.start()
    lines = []
    procs_running = 0
    try:
        for line in proc.stdout:
            lines.append(line)
            if "node daemons started in their namespaces and connected" in line:
                # The researcher has just been told to start round 1.
                procs_running = len(_processes(run.prefix))
                proc.send_signal(signal.SIGTERM)
                break
    finally:
        guard.cancel()
    run.finish(proc)
    run.stdout = "".join(lines) + run.stdout
    try:
        assert run.returncode == 130, run.stdout + run.stderr
        assert "netns round: interrupted; cleaning up" in run.stderr
        assert "cleanup: 5 namespaces" in run.stdout
        assert procs_running == 4  # 3 daemons and the researcher, before the signal
        assert run.leftovers() == ([], [])
    finally:
        run.cleanup()
    reliability.add(
        AREA,
        "SIGTERM while the researcher runs its round",
        "`netns_round.py` gets SIGTERM once its 3 daemons are connected",
        1,
        "exit 130; 3 daemons, the researcher, 5 namespaces with their bridge and "
        "veths all removed; no namespace or process left",
    )
