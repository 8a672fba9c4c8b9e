# SPDX-License-Identifier: Apache-2.0
"""Faults against real node daemons: crashes at chosen points, restarts, intruders.

Crashes use the daemon's test-only hook ``SECAGG_TEST_FAULT`` (docs/service.md):
``exit-before:<phase>`` / ``exit-after:<phase>`` make the daemon ``os._exit(86)``
right before / right after sending that phase's message, after its durable
commit, so no test races a signal against timing. The deployment helpers and
fixtures are shared with ``test_service.py`` (``_service_support.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from mpc_runtime.messages import (
    MsgType,
    RefusalReason,
    Refused,
    RoundRequest,
    StreamSpec,
)
from mpc_runtime.transport import generate_curve_keypair
from secagg import ConfigError, PhaseTimeout, PolicyRefused
from secagg import files as secagg_files
from secagg.node import FAULT_EXIT_CODE, Fault, parse_fault

from ._service_support import NODES3, WAIT, Deployment, check_result, wait_connected

NODES5 = ["node-a", "node-b", "node-c", "node-d", "node-e"]


def wait_exit(dep: Deployment, v: str) -> int:
    """The exit status of daemon ``v`` (bounded: WAIT)."""
    return dep.procs[v].wait(WAIT)


def context_dir(dep: Deployment, v: str) -> Path:
    """Node ``v``'s only context directory under ``N/state/contexts``."""
    (cdir,) = (dep.dirs[v] / "state" / "contexts").iterdir()
    return cdir


def steps(dep: Deployment, v: str) -> set[str]:
    """Names of node ``v``'s committed steps, e.g. ``{"...0001.upload", ...}``."""
    return {p.stem for p in (context_dir(dep, v) / "steps").glob("*.msgpack")}


def step(r: int, phase: str) -> str:
    return f"{r:020d}.{phase}"


def started_5(dep: Deployment, fault_nodes: list[str], fault: str):
    """Five nodes, ``fault`` armed in ``fault_nodes``; a researcher with t = 3."""
    dep.add_nodes(NODES5)
    healthy = [v for v in NODES5 if v not in fault_nodes]
    dep.start(*healthy)
    dep.start(*fault_nodes, fault=fault)
    sa = dep.secagg(threshold=3)
    sa.__enter__()
    wait_connected(dep, *NODES5)
    sa.setup(NODES5, job_id="job-1")
    return sa


# ----------------------------------------------------------- a node crashes


@pytest.mark.slow
def test_fault_node_exits_after_upload_is_a_contributor_sum_exact(deploy):
    # DESIGN §1: "A node whose masked upload arrived before the unmask request is a
    # contributor, even if it dies later": its self mask comes back from the
    # others' b-shares, so the sum includes its input.
    with started_5(deploy, ["node-e"], "exit-after:upload") as sa:
        res = sa.secure_sum("vector")
        assert wait_exit(deploy, "node-e") == FAULT_EXIT_CODE
        check_result(deploy, res, NODES5)
        assert res.dropped == ()
    assert step(res.round, "upload") in steps(deploy, "node-e")
    assert step(res.round, "survivors") not in steps(deploy, "node-e")
    for v in NODES5[:4]:
        # Each survivor revealed b-shares for all five and no c-share.
        assert "revealed b=5 c=0" in deploy.log(v)


@pytest.mark.slow
def test_fault_node_exits_after_round_keys_dropped_others_summed(deploy):
    # It sent C_u^r and its shares, then died before masking: the others masked
    # with it, so its pair masks are removed with its c_u^r rebuilt from c-shares.
    with started_5(deploy, ["node-e"], "exit-after:advert-c") as sa:
        res = sa.secure_sum("vector")
        assert wait_exit(deploy, "node-e") == FAULT_EXIT_CODE
        others = NODES5[:4]
        check_result(deploy, res, others)
        assert res.dropped == ("node-e",)
    assert step(res.round, "advert-c") in steps(deploy, "node-e")
    assert step(res.round, "upload") not in steps(deploy, "node-e")
    for v in others:
        assert "revealed b=4 c=1" in deploy.log(v)


@pytest.mark.slow
def test_fault_too_many_exit_round_aborts_named_next_round_all_back(deploy):
    dead = ["node-c", "node-d", "node-e"]
    with started_5(deploy, dead, "exit-after:upload") as sa:
        with pytest.raises(PhaseTimeout) as e:
            sa.secure_sum("vector")
        # Five uploads arrived, but only two signed S (t = 3): nothing is revealed.
        assert e.value.phase == "round.survivors"
        assert e.value.nodes == tuple(dead)
        r = e.value.round
        for v in dead:
            assert wait_exit(deploy, v) == FAULT_EXIT_CODE
        for v in NODES5:
            assert step(r, "reveal") not in steps(deploy, v)
            assert "revealed" not in deploy.log(v)
        # Everybody back: the dead daemons start again from their directories.
        deploy.start(*dead)
        wait_connected(deploy, *dead)
        res = sa.secure_sum("vector")
        check_result(deploy, res, NODES5)
        assert res.round == r + 1 and res.dropped == ()


# ------------------------------------------------------------------ restarts


def test_fault_node_restarted_between_rounds_takes_part_state_persisted(deploy):
    deploy.add_nodes(NODES3)
    deploy.start(*NODES3)
    with deploy.secagg() as sa:
        wait_connected(deploy, *NODES3)
        sa.setup(NODES3, job_id="job-1")
        first = sa.secure_sum("vector")
        check_result(deploy, first, NODES3)
        proc = deploy.procs["node-b"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        before = steps(deploy, "node-b")
        assert step(first.round, "reveal") in before
        deploy.start("node-b")
        wait_connected(deploy, "node-b")
        second = sa.secure_sum("vector", args={"shape": [3]})
        check_result(deploy, second, NODES3, shape=(3,))
        assert second.round == first.round + 1
    # The restarted daemon reused its FileNodeStore: same context, steps appended.
    after = steps(deploy, "node-b")
    assert before < after and step(second.round, "reveal") in after
    assert (context_dir(deploy, "node-b") / "context.msgpack").is_file()


@pytest.mark.slow
def test_fault_restart_after_committed_upload_never_remasks_round(
    deploy, daemon_factory
):
    # exit-before:upload: the upload step of round r is committed, never sent.
    with started_5(deploy, ["node-e"], "exit-before:upload") as sa:
        res = sa.secure_sum("vector")
        r = res.round
        assert wait_exit(deploy, "node-e") == FAULT_EXIT_CODE
        check_result(deploy, res, NODES5[:4])
        assert res.dropped == ("node-e",)
        spent = steps(deploy, "node-e")
        assert step(r, "upload") in spent
        # The daemon's state refuses round r again: a replayed request for r (or any
        # round <= r) is refused before any key, share or vector is made.
        daemon = daemon_factory("node-e")
        replay = RoundRequest(
            context_id=bytes.fromhex(context_dir(deploy, "node-e").name),
            round=r,
            sender="researcher",
            kind="task",
            name="vector",
            args={},
            streams=(StreamSpec("value", (2, 3)),),
        )
        (reply,) = daemon.handle(replay, time.monotonic())
        assert isinstance(reply, Refused)
        assert (reply.reason, reply.fields) == (RefusalReason.UNEXPECTED, ("round",))
        assert steps(deploy, "node-e") == spent
        daemon.store.close()
        # Restarted, it takes part in round r + 1.
        deploy.start("node-e")
        wait_connected(deploy, "node-e")
        nxt = sa.secure_sum("vector")
        check_result(deploy, nxt, NODES5)
        assert nxt.round == r + 1
    assert step(r + 1, "upload") in steps(deploy, "node-e")


# ------------------------------------------------------------------ intruders


def test_fault_setup_naming_node_outside_roster_refused_nothing_revealed(deploy):
    deploy.add_nodes(NODES3)
    # node-a's operator does not trust node-c.
    (deploy.dirs["node-a"] / "peers" / "node-c.pub").unlink()
    deploy.start(*NODES3)
    with deploy.secagg() as sa:
        wait_connected(deploy, *NODES3)
        with pytest.raises(PolicyRefused, match="ROSTER") as e:
            sa.setup(NODES3, job_id="job-1")
        # The refusing node is named (its refusal names no peer, DESIGN §5).
        assert e.value.nodes == ("node-a",)
        with pytest.raises(ConfigError):
            sa.secure_sum("vector")
        assert not (deploy.home / "contexts").exists()
        # node-a began nothing; the others at most advertised E_u (public; they may
        # still be handling the request) and can never reach a ready context: no
        # e key kept, no round step, since no adverts were ever relayed.
        assert not any((deploy.dirs["node-a"] / "state" / "contexts").iterdir())
        for v in ("node-b", "node-c"):
            contexts = deploy.dirs[v] / "state" / "contexts"
            committed = {p.stem for p in contexts.glob("*/steps/*.msgpack")}
            assert committed <= {step(0, "advert-e")}
            assert not list(contexts.glob("*/context.msgpack"))
        assert "reason=ROSTER" in deploy.log("node-a")
        # A context within node-a's roster still works.
        sa.setup(["node-a", "node-b"], job_id="job-2")
        res = sa.secure_sum("vector")
        np.testing.assert_allclose(
            res.sum, deploy.clear_sum(["node-a", "node-b"]), rtol=0, atol=1e-6
        )


def _send_quietly(sock: zmq.Socket, frames: list[bytes]) -> None:
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:
        pass  # Not connected (refused handshake): nothing left the socket.


def _z85(key: str | bytes) -> bytes:
    return key.encode("ascii") if isinstance(key, str) else key


def test_fault_garbage_and_oversized_frames_on_researcher_port_next_sum_ok(
    deploy, caplog
):
    # node-z is enrolled (it passes ZAP) but not in the context; node-a..c are.
    deploy.add_nodes([*NODES3, "node-z"])
    deploy.start(*NODES3)
    host, port = deploy.endpoint.removeprefix("tcp://").rsplit(":", 1)
    researcher = secagg_files.load_researcher_keys(deploy.home)
    z = secagg_files.load_node_identity(deploy.dirs["node-z"])
    caplog.set_level(logging.DEBUG, logger="secagg.secure_aggregation.transport")
    ctx = zmq.Context()
    try:
        with deploy.secagg() as sa:
            wait_connected(deploy, *NODES3)
            sa.setup(NODES3, job_id="job-1")
            # Raw TCP bytes; a zmq DEALER without CURVE; a CURVE client with an
            # unenrolled key; an enrolled one (node-z) sending garbage envelopes.
            with socket.create_connection((host, int(port)), timeout=WAIT) as raw:
                raw.sendall(os.urandom(4096))
            plain, stranger, enrolled = (ctx.socket(zmq.DEALER) for _ in range(3))
            for sock, (public, secret) in (
                (stranger, generate_curve_keypair()),
                (enrolled, (z.curve_public, z.curve_secret)),
            ):
                sock.curve_serverkey = _z85(researcher.curve_public)
                sock.curve_publickey = _z85(public)
                sock.curve_secretkey = _z85(secret)
            enrolled.setsockopt(zmq.ROUTING_ID, b"node-z")
            monitor = enrolled.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            for sock in (plain, stranger, enrolled):
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(deploy.endpoint)
            # Bounded: the enrolled client's handshake, so its garbage is delivered.
            assert monitor.poll(int(WAIT * 1000)), "node-z client did not connect"
            for sock in (plain, stranger, enrolled):
                _send_quietly(sock, [b"\x00garbage", os.urandom(64)])
                _send_quietly(sock, [b"SA\x01\x00\xff\xff\xff\xff"])
            first = sa.secure_sum("vector")
            check_result(deploy, first, NODES3)
            assert "dropped message reason=envelope peer=node-z" in caplog.text
            # A frame above MAXMSGSIZE (8 MiB chunks): libzmq drops the connection.
            for sock in (plain, stranger, enrolled):
                _send_quietly(sock, [os.urandom(9 << 20)])
            second = sa.secure_sum("vector")
            check_result(deploy, second, NODES3)
            assert second.round == first.round + 1
            monitor.close(linger=0)
    finally:
        ctx.destroy(linger=0)


# ------------------------------------------------------------------ the hook


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("exit-after:upload", Fault("after", "upload", MsgType.MASKED_INPUT)),
        ("exit-before:keys", Fault("before", "keys", MsgType.ROUND_ADVERT)),
        ("exit-before:reveal:3", Fault("before", "reveal", MsgType.UNMASK_SHARES, 3)),
        (
            "delay-before:upload:2",
            Fault("before", "upload", MsgType.MASKED_INPUT, 2, "delay"),
        ),
        ("delay-after:upload", None),
        (None, None),
        ("", None),
        ("exit-after", None),
        ("exit-now:upload", None),
        ("exit-after:request", None),
        ("exit-after:upload:x", None),
        ("exit-after:upload:-1", None),
    ],
)
def test_parse_fault_valid_values_parse_others_are_ignored(value, want):
    assert parse_fault(value) == want


def test_fault_bad_or_unreached_value_daemon_serves_and_sigterm_exits_0(deploy):
    deploy.add_nodes(["node-a", "node-b"])
    deploy.start("node-a", fault="exit-after:nonsense")
    deploy.start("node-b", fault="exit-after:reveal:99")
    end = time.monotonic() + WAIT
    for v in ("node-a", "node-b"):
        while "started" not in deploy.log(v):  # bounded: WAIT
            assert deploy.procs[v].poll() is None and time.monotonic() < end
            time.sleep(0.05)
    assert "ignoring SECAGG_TEST_FAULT" in deploy.log("node-a")
    assert "test fault injection armed" in deploy.log("node-b")
    for v in ("node-a", "node-b"):
        deploy.procs[v].send_signal(signal.SIGTERM)
        assert wait_exit(deploy, v) == 0, deploy.log(v)
