# SPDX-License-Identifier: Apache-2.0
"""``secagg demo`` end to end, as a user runs it: a subprocess, real daemons."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def demo(*argv: str, **kw) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "secagg", "demo", *argv],
        cwd=kw.pop("cwd"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def daemons_of(tmp_prefix: str) -> list[int]:
    """Pids of live processes whose command line names a demo directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if tmp_prefix.encode() in cmdline and b"node start" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_demo_runs_to_the_end_same_accuracy_and_writes_the_plot(tmp_path):
    proc = demo("--rounds", "3", "--size", "300", "--out", str(tmp_path), cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (tmp_path / "secagg-demo.png").stat().st_size > 10_000
    rows = re.findall(
        r"^\s+(\d) \|\s+([\d.]+)\s+([\d.]+) \|\s+([\d.]+)\s+([\d.]+)$", out, flags=re.M
    )
    assert [r[0] for r in rows] == ["1", "2", "3"]
    final = re.search(r"final test accuracy: secure ([\d.]+), cleartext ([\d.]+)", out)
    assert final is not None
    secure, clear = float(final[1]), float(final[2])
    assert abs(secure - clear) <= 0.01  # The "within 1 point".
    assert secure > 0.5  # 4 classes: well above chance after 3 rounds.
    assert "bytes on the wire" in out and "round.upload" in out
    assert daemons_of("secagg-demo-") == []


def test_demo_ctrl_c_stops_every_daemon_and_exits_130(tmp_path):
    proc = demo("--rounds", "50", "--out", str(tmp_path), "--keep", cwd=tmp_path)
    assert proc.stdout is not None
    line = ""
    end = time.monotonic() + 120
    while "training with secure aggregation" not in line:
        line = proc.stdout.readline()
        assert line and time.monotonic() < end, "the demo did not start training"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # What Ctrl-C in a terminal sends.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    kept = re.search(r"kept (\S+)", err)
    assert kept is not None
    assert daemons_of(kept[1]) == []
    assert not (tmp_path / "secagg-demo.png").exists()
