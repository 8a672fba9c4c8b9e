# SPDX-License-Identifier: Apache-2.0
"""Deployments of real node daemons for the service tests (moved from
``test_service.py``, shared with ``test_service_faults.py``).

Every deployment is made by the CLI in a temporary directory; the researcher
binds tcp://127.0.0.1 on a free port; every daemon is a subprocess
(``python -m secagg node start``) that the ``deploy`` fixture terminates (and
kills after a bound) at the end. ``tests/secagg/conftest.py`` registers the
fixtures ``deploy`` and ``daemon_factory``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from secagg import SecureAggregation, SumResult
from secagg.cli import main
from secagg.config import NodeConfig
from secagg.node import FAULT_ENV, NodeDaemon

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 2.0  # The protocol's phase deadline in these tests.
WAIT = 20.0  # Upper bound of every wait on a subprocess.
C = 3.0

TASKS_MODULE = """\
import numpy as np

SCALE = {scale!r}


def vector(args):
    shape = tuple(args.get("shape", [2, 3]))
    base = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    return (base * 0.1 - 0.4) * SCALE + args.get("offset", 0.0)


def wrong_shape(args):
    return np.zeros({wrong!r})


def not_an_array(args):
    return [1.0, 2.0]
"""


def clear_vector(scale: float, shape=(2, 3), offset=0.0) -> np.ndarray:
    base = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    return (base * 0.1 - 0.4) * scale + offset


def bound(m: int, n: int, ring_bits: int = 32) -> float:
    """DESIGN §4: |error| <= m·c/(2^b − 1) per element, b = ring_bits − ⌈log2 n⌉."""
    bits = min(ring_bits - (n - 1).bit_length(), 48)
    return m * C / (2**bits - 1) * 1.000001


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """A researcher directory and node directories made by the CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.home = root / "R"
        self.dirs: dict[str, Path] = {}
        self.scales: dict[str, float] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        assert main(["researcher", "init", "--dir", str(self.home)]) == 0

    def add_nodes(self, ids: list[str], *, policy: dict[str, str] | None = None):
        policy = policy or {}
        for i, v in enumerate(ids):
            d = self.root / v
            argv = ["node", "init", "--id", v, "--dir", str(d)]
            argv += ["--researcher", self.endpoint]
            argv += ["--researcher-key", str(self.home / "researcher.pub")]
            argv += ["--policy", policy.get(v, "allow")]
            assert main(argv) == 0
            scale = 1.0 + i
            wrong = [4] if i == len(ids) - 1 else [2, 3]
            (d / "svc_tasks.py").write_text(
                TASKS_MODULE.format(scale=scale, wrong=wrong)
            )
            cfg = NodeConfig.from_toml(d / "node.toml")
            tasks = {
                "vector": "svc_tasks:vector",
                "wrong_shape": "svc_tasks:wrong_shape",
                "not_an_array": "svc_tasks:not_an_array",
            }
            cfg = dataclasses.replace(cfg, tasks=tasks)
            (d / "node.toml").write_text(cfg.to_toml())
            self.dirs[v], self.scales[v] = d, scale
        pubs = [str(self.dirs[v] / "node.pub") for v in ids]
        assert main(["researcher", "enroll", "--dir", str(self.home), *pubs]) == 0
        for v in ids:
            assert main(["node", "trust", "--dir", str(self.dirs[v]), *pubs]) == 0

    def start(self, *ids: str, fault: str | None = None) -> None:
        """Start daemons; ``fault`` arms ``SECAGG_TEST_FAULT`` (test-only) in them."""
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop(FAULT_ENV, None)
        if fault is not None:
            env[FAULT_ENV] = fault
        for v in ids:
            log = open(self.root / f"{v}.log", "wb")  # noqa: SIM115 - closed below
            self.procs[v] = subprocess.Popen(
                [sys.executable, "-m", "secagg", "-v", "node", "start"]
                + ["--dir", str(self.dirs[v])],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            log.close()

    def secagg(self, **kw: object) -> SecureAggregation:
        kw.setdefault("timeout", TIMEOUT)
        kw.setdefault("clipping_range", C)
        kw.setdefault("endpoint", self.endpoint)
        return SecureAggregation(home=self.home, **kw)  # type: ignore[arg-type]

    def clear_sum(self, ids, **kw) -> np.ndarray:
        return sum(clear_vector(self.scales[v], **kw) for v in ids)

    def log(self, v: str) -> str:
        return (self.root / f"{v}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + WAIT
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)


def wait_connected(dep: Deployment, *ids: str) -> None:
    """Wait (bounded: WAIT) until each daemon's log says it reached the researcher."""
    end = time.monotonic() + WAIT
    for v in ids:
        while "connected to researcher" not in dep.log(v):
            assert dep.procs[v].poll() is None, dep.log(v)
            assert time.monotonic() < end, f"{v} did not connect:\n{dep.log(v)}"
            time.sleep(0.05)


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop_all()


NODES3 = ["node-a", "node-b", "node-c"]


def check_result(dep: Deployment, res: SumResult, ids: list[str], **kw) -> None:
    want = dep.clear_sum(ids, **kw)
    n = len(dep.dirs)
    assert isinstance(res, SumResult)
    assert res.sum.dtype == np.float64 and res.sum.shape == want.shape
    assert res.contributors == tuple(sorted(ids))
    np.testing.assert_allclose(res.sum, want, rtol=0, atol=bound(len(ids), n))
    np.testing.assert_allclose(
        res.mean, want / len(ids), rtol=0, atol=bound(len(ids), n) / len(ids)
    )
    assert res.clipping.clipped == 0 and not res.clipping.saturated


@pytest.fixture
def daemon_factory(deploy):
    """Build NodeDaemon objects in this process; restore sys.path and close them."""
    made: list[NodeDaemon] = []
    saved_path = list(sys.path)

    def make(v: str) -> NodeDaemon:
        sys.modules.pop("svc_tasks", None)
        d = NodeDaemon(deploy.dirs[v])
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.store.close()
        sys.path[:] = saved_path
        sys.modules.pop("svc_tasks", None)
