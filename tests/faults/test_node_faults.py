# SPDX-License-Identifier: Apache-2.0
"""Crashes, restarts and delays with five real node daemons and the default t.

n = 5, so t = ⌊5/2⌋ + 1 = 3 and up to two nodes may drop out of a round. Faults
are injected at chosen points with the daemon's test-only hook
(``SECAGG_TEST_FAULT``, docs/service.md): a node exits (``os._exit(86)``, after
its durable commit, like a crash) or blocks right before sending a phase's
message. The researcher is crashed the same way, in a subprocess that stops at a
chosen stage of a round. No test races a signal against timing.

After every case:

- the outcome is the exact sum of the contributors (DESIGN §4 bound) or a named
  abort;
- every node's state directory still loads (a copy is opened with
  :class:`secagg.store.FileNodeStore`, which validates every file and refuses a
  corrupt one), and no temporary file is left behind;
- no node revealed what the protocol forbids: each committed ``reveal`` step is
  exactly b-shares for the contributors and c-shares for the dropped nodes that
  had sent their round keys (DESIGN §3), never both for one node, and nothing is
  revealed in an aborted round.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest

from mpc_runtime.errors import PhaseTimeout
from mpc_runtime.protocol.node import _digest
from secagg.node import FAULT_DELAY_ENV, FAULT_EXIT_CODE
from secagg.store import FileNodeStore

from ..secagg._service_support import WAIT, Deployment, check_result, wait_connected

pytestmark = pytest.mark.slow

NODES5 = ["node-a", "node-b", "node-c", "node-d", "node-e"]
AREA = "Node and researcher faults (n = 5, t = 3)"


# ----------------------------------------------------------------- helpers


def restart(dep: Deployment, v: str, fault: str | None = None) -> None:
    """Stop daemon ``v`` (if running) and start it again, ``fault`` armed."""
    proc = dep.procs.get(v)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        assert proc.wait(WAIT) == 0
    dep.start(v, fault=fault)
    wait_connected(dep, v)


def deployment(dep: Deployment):
    dep.add_nodes(NODES5)
    dep.start(*NODES5)
    sa = dep.secagg()  # Default threshold: t = 3 of 5.
    sa.__enter__()
    wait_connected(dep, *NODES5)
    sa.setup(NODES5, job_id="faults")
    assert sa._current_server().threshold == 3
    return sa


def check_state(dep: Deployment, tmp: Path) -> int:
    """Open a copy of every node's directory with FileNodeStore (which validates
    every state file); return the number of files checked."""
    checked = 0
    for v, d in dep.dirs.items():
        copy = tmp / f"state-check-{v}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(d, copy, ignore=shutil.ignore_patterns("node.lock"))
        leftovers = [p for p in (copy / "state").rglob("*.tmp")]
        assert leftovers == [], f"{v}: temporary files left: {leftovers}"
        with FileNodeStore(copy) as store:
            for cdir in (copy / "state" / "contexts").iterdir():
                cid = bytes.fromhex(cdir.name)
                if (cdir / "context.msgpack").exists():
                    assert store.load_context(cid) is not None
                checked += 1 + len(list((cdir / "steps").glob("*.msgpack")))
        shutil.rmtree(copy)
    return checked


def reveal_digest(dep: Deployment, v: str, context_id: bytes, r: int) -> bytes | None:
    path = (
        dep.dirs[v]
        / "state"
        / "contexts"
        / context_id.hex()
        / "steps"
        / f"{r:020d}.reveal.msgpack"
    )
    if not path.exists():
        return None
    return bytes(msgpack.unpackb(path.read_bytes())["digest"])


def check_reveals(
    dep: Deployment,
    context_id: bytes,
    r: int,
    contributors: tuple[str, ...],
    keyed_dropouts: tuple[str, ...],
) -> int:
    """Every revealing node revealed b for exactly the contributors and c for
    exactly the dropouts that had sent keys; return how many revealed."""
    want = _digest("step", frozenset(contributors), frozenset(keyed_dropouts))
    revealed = 0
    for v in contributors:
        got = reveal_digest(dep, v, context_id, r)
        if got is not None:
            assert got == want, f"{v} revealed another set in round {r}"
            revealed += 1
    for v in NODES5:
        if v not in contributors:
            assert reveal_digest(dep, v, context_id, r) is None
    return revealed


def next_round(sa) -> int:
    return sa._current_server().last_round + 1


# ------------------------------------------------------ a node dies in a phase


@pytest.mark.parametrize(
    ("phase", "fault"),
    [
        ("upload", "exit-before:upload"),
        ("unmask", "exit-before:reveal"),
    ],
)
def test_each_node_killed_in_turn_during_a_round(
    deploy, tmp_path, reliability, phase, fault
):
    sa = deployment(deploy)
    try:
        files_checked = 0
        for v in NODES5:
            r = next_round(sa)
            restart(deploy, v, fault=f"{fault}:{r}")
            res = sa.secure_sum("vector")
            assert deploy.procs[v].wait(WAIT) == FAULT_EXIT_CODE
            others = [u for u in NODES5 if u != v]
            cid = sa._current_server().context_id
            if phase == "upload":
                # It sent its keys, not its vector: dropped, its pair masks removed
                # with the others' c-shares.
                check_result(deploy, res, others)
                assert res.dropped == (v,)
                revealed = check_reveals(deploy, cid, r, tuple(others), (v,))
            else:
                # Its upload arrived: a contributor, although it never revealed.
                check_result(deploy, res, NODES5)
                assert res.dropped == ()
                # It committed its reveal (exactly b(S)), then crashed before
                # sending: the sum came from the other four.
                revealed = check_reveals(deploy, cid, r, tuple(NODES5), ())
            assert revealed == (4 if phase == "upload" else 5)
            files_checked += check_state(deploy, tmp_path)
            restart(deploy, v)
        # All five back: the next round includes everyone.
        res = sa.secure_sum("vector")
        check_result(deploy, res, NODES5)
    finally:
        sa.close()
    outcome = (
        "dropped; exact sum of the other 4; its masks removed via c-shares"
        if phase == "upload"
        else "a contributor (upload arrived); exact sum of all 5 from 4 reveals"
    )
    reliability.add(
        AREA,
        f"a node crashes before its {phase} message",
        f"each of the 5 nodes in turn ({fault}), then all 5 back",
        len(NODES5),
        f"{outcome}; reveals exactly b(S), c(dropped); "
        f"{files_checked} state files valid",
    )


def test_each_node_killed_in_turn_during_setup(deploy, tmp_path, reliability):
    sa = deployment(deploy)
    try:
        files_checked = 0
        for v in NODES5:
            restart(deploy, v, fault="exit-before:advert-e")
            with pytest.raises(PhaseTimeout) as info:
                sa.setup(NODES5, job_id="faults", force=True)
            # Setup needs every party: the silent one is named.
            assert info.value.nodes == (v,)
            assert deploy.procs[v].wait(WAIT) == FAULT_EXIT_CODE
            files_checked += check_state(deploy, tmp_path)
            restart(deploy, v)
            sa.setup(NODES5, job_id="faults", force=True)
            check_result(deploy, sa.secure_sum("vector"), NODES5)
    finally:
        sa.close()
    reliability.add(
        AREA,
        "a node crashes during setup",
        "each of the 5 nodes in turn exits before its context advert "
        "(exit-before:advert-e); restarted; setup(force=True) again",
        len(NODES5),
        "PhaseTimeout naming exactly that node; after its restart a new context "
        f"and an exact sum of all 5; {files_checked} state files valid",
    )


def test_three_nodes_killed_before_reveal_abort_reveals_nothing(
    deploy, tmp_path, reliability
):
    sa = deployment(deploy)
    try:
        r = next_round(sa)
        dead = ["node-c", "node-d", "node-e"]
        for v in dead:
            restart(deploy, v, fault=f"exit-before:survivors:{r}")
        with pytest.raises(PhaseTimeout) as info:
            sa.secure_sum("vector")
        assert info.value.nodes == tuple(dead) and info.value.round == r
        cid = sa._current_server().context_id
        for v in NODES5:
            assert reveal_digest(deploy, v, cid, r) is None
        files = check_state(deploy, tmp_path)
        for v in dead:
            restart(deploy, v)
        check_result(deploy, sa.secure_sum("vector"), NODES5)
    finally:
        sa.close()
    reliability.add(
        AREA,
        "more nodes crash than the threshold allows",
        "3 of 5 exit before signing S (t = 3 needs 3 signatures)",
        1,
        "PhaseTimeout naming the 3; no node revealed any share; after restarts "
        f"an exact sum of all 5; {files} state files valid",
    )


# ------------------------------------------- restarts and delays between rounds


def test_each_node_stopped_and_restarted_between_rounds(deploy, tmp_path, reliability):
    sa = deployment(deploy)
    try:
        for v in NODES5:
            restart(deploy, v)  # SIGTERM (exits 0), then a fresh process.
            res = sa.secure_sum("vector")
            check_result(deploy, res, NODES5)
        files = check_state(deploy, tmp_path)
    finally:
        sa.close()
    reliability.add(
        AREA,
        "a node restarts between rounds",
        "each of the 5 nodes in turn: SIGTERM (exit 0), start again, next round",
        len(NODES5),
        f"exact sum of all 5 every round; {files} state files valid",
    )


@pytest.mark.parametrize("phase", ["advert-c", "upload"])
def test_node_delayed_past_the_deadline_is_dropped_then_back(
    deploy, tmp_path, reliability, monkeypatch, phase
):
    # The phase deadline is 2 s (tests/secagg/_service_support.TIMEOUT); the node
    # blocks 4 s before sending, then sends late.
    monkeypatch.setenv(FAULT_DELAY_ENV, "4")
    sa = deployment(deploy)
    try:
        runs = 0
        for v in ("node-a", "node-e"):
            r = next_round(sa)
            restart(deploy, v, fault=f"delay-before:{phase}:{r}")
            res = sa.secure_sum("vector")
            others = [u for u in NODES5 if u != v]
            check_result(deploy, res, others)
            assert res.dropped == (v,)
            cid = sa._current_server().context_id
            # Late keys: nobody masked with it; late upload: keys were sent.
            keyed = (v,) if phase == "upload" else ()
            assert check_reveals(deploy, cid, r, tuple(others), keyed) == 4
            # Once it wakes, its late message is ignored; the next round has all 5.
            time.sleep(2.5)
            assert deploy.procs[v].poll() is None
            check_result(deploy, sa.secure_sum("vector"), NODES5)
            restart(deploy, v)
            runs += 1
        files = check_state(deploy, tmp_path)
    finally:
        sa.close()
    reliability.add(
        AREA,
        f"a node is slower than the deadline ({phase})",
        f"node-a, then node-e, blocks 4 s (deadline 2 s) before its {phase} "
        "message (delay-before)",
        runs,
        "dropped from that round, exact sum of the other 4; its late message "
        f"ignored; next round exact with all 5; {files} state files valid",
    )


# --------------------------------------------------- the researcher crashes


RESEARCHER = textwrap.dedent(
    """
    import os, sys, time
    from secagg import SecureAggregation
    from mpc_runtime.messages import StreamSpec

    home, endpoint, stage = sys.argv[1], sys.argv[2], sys.argv[3]
    nodes = sys.argv[4].split(",")
    sa = SecureAggregation(timeout=2.0, clipping_range=3.0, home=home,
                           endpoint=endpoint)
    sa.__enter__()
    sa.setup(nodes, job_id="faults")
    server = sa._current_server()
    shape, absent = sa._discover_shape(server, "vector", {})
    r, out = server.start_round(kind="task", name="vector", args={},
                                streams=(StreamSpec("value", shape),),
                                now=time.monotonic())
    sa._save(sa._current, server)
    # Crash (no close, no flush) as soon as the round reaches the chosen stage.
    sa._get_link().pump(lambda: server.stage.value == stage, server=server,
             outbox=list(out), limit=20.0)
    print(f"round={r} stage={server.stage.value}", flush=True)
    os._exit(86 if server.stage.value == stage else 1)
    """
)


@pytest.mark.parametrize(
    "stage", ["round.keys", "round.upload", "round.survivors", "round.unmask"]
)
def test_researcher_crashes_mid_round_and_restarts(
    deploy, tmp_path, reliability, stage
):
    sa = deployment(deploy)
    first = sa.secure_sum("vector")
    sa.close()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RESEARCHER,
            str(deploy.home),
            deploy.endpoint,
            stage,
            ",".join(NODES5),
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 86, proc.stderr[-2000:]
    crashed = int(proc.stdout.split("round=")[1].split()[0])
    assert crashed == first.round + 1
    # The restarted researcher resumes the context from disk (no new setup) and
    # goes on with the next round number; the nodes drop the interrupted round.
    with deploy.secagg() as again:
        again.setup(NODES5, job_id="faults")
        server = again._current_server()
        assert server.context_id == sa._current_server().context_id
        res = again.secure_sum("vector")
        check_result(deploy, res, NODES5)
        assert res.round == crashed + 1
        cid = server.context_id
        revealed = 0
        if stage == "round.unmask":
            # The unmask requests were queued just before the crash (os._exit does
            # not flush, so any number of them left): whoever got one revealed
            # exactly what S allows, and those shares died with the process.
            revealed = check_reveals(deploy, cid, crashed, tuple(NODES5), ())
        else:
            for v in NODES5:
                assert reveal_digest(deploy, v, cid, crashed) is None
    files = check_state(deploy, tmp_path)
    reliability.add(
        AREA,
        f"the researcher crashes in {stage}",
        "a researcher process exits (os._exit, no close) once the round reaches "
        f"{stage}; a new researcher process resumes from home/contexts",
        1,
        "context resumed without setup; next round number; exact sum of all 5; "
        + (
            f"the interrupted round's reveals ({revealed} of 5 got the request) "
            "were exactly b(S)"
            if stage == "round.unmask"
            else "nothing revealed for the interrupted round"
        )
        + f"; {files} state files valid",
    )
