# SPDX-License-Identifier: Apache-2.0
"""SecureAggregation against real node daemons (``python -m secagg node start``).

Every deployment is made by the CLI in a temporary directory; the researcher
binds tcp://127.0.0.1 on a free port; every daemon is a subprocess that the
``deploy`` fixture terminates (and kills after a bound) at the end. The
deployment and the fixtures ``deploy`` and ``daemon_factory`` live in
``_service_support.py``.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from mpc_runtime.messages import (
    RefusalReason,
    Refused,
    RoundRequest,
    SetupRequest,
    StreamSpec,
)
from secagg import (
    ClippingWarning,
    ConfigError,
    PhaseTimeout,
    PolicyRefused,
    ShapeMismatch,
    ThresholdError,
)
from secagg.node import DRIVER_CONTEXT

from ._service_support import NODES3, WAIT, C, bound, check_result

# ------------------------------------------------------------------- no daemons


def test_secure_sum_before_setup_raises_config_error(deploy):
    deploy.add_nodes(NODES3)
    with deploy.secagg() as sa:
        assert sa.researcher_id == "researcher"
        assert sa.endpoint == deploy.endpoint
        with pytest.raises(ConfigError):
            sa.secure_sum("vector")


def test_setup_bad_parties_raise_config_error(deploy):
    with deploy.secagg(endpoint="tcp://127.0.0.1:0") as sa:
        with pytest.raises(ConfigError, match="not enrolled"):
            sa.setup(["node-a", "node-b"], job_id="job")
        assert not sa.endpoint.endswith(":0")
        for parties in (["node-a"], ["researcher", "node-a"], ["node-a", "bad id"]):
            with pytest.raises(ConfigError):
                sa.setup(parties, job_id="job")
        with pytest.raises(ConfigError):
            sa.setup(["node-a", "node-a", "node-b"], job_id="job")
        with pytest.raises(ConfigError):
            sa.setup(["node-a", "node-b"], job_id="bad job")


# ----------------------------------------------------------------- with daemons


def test_secure_sum_two_rounds_equal_the_clear_sum_within_bound(deploy):
    deploy.add_nodes(NODES3)
    deploy.start(*NODES3)
    with deploy.secagg() as sa:
        sa.setup(["researcher", *NODES3], job_id="survey-1")
        first = sa.secure_sum("vector")
        check_result(deploy, first, NODES3)
        assert first.dropped == ()
        second = sa.secure_sum("vector", args={"shape": [5], "offset": 0.25})
        check_result(deploy, second, NODES3, shape=(5,), offset=0.25)
        assert second.round == first.round + 1


def test_setup_second_call_noop_force_rekeys_and_restart_resumes(deploy):
    deploy.add_nodes(NODES3)
    deploy.start(*NODES3)
    contexts = deploy.home / "contexts"
    with deploy.secagg() as sa:
        sa.setup(NODES3, job_id="job-1")
        (meta,) = contexts.glob("*.json")
        first_id = meta.read_text()
        t0 = time.monotonic()
        sa.setup(NODES3, job_id="job-1")  # a valid context exists: no-op
        assert time.monotonic() - t0 < 0.5
        assert meta.read_text() == first_id
        sa.setup(NODES3, job_id="job-1", force=True)
        assert meta.read_text() != first_id  # new context id, nonce and T
        res = sa.secure_sum("vector")
        check_result(deploy, res, NODES3)
    # A restarted researcher resumes the context from home/contexts/.
    with deploy.secagg() as sa:
        t0 = time.monotonic()
        sa.setup(NODES3, job_id="job-1")
        assert time.monotonic() - t0 < 0.5
        again = sa.secure_sum("vector")
        check_result(deploy, again, NODES3)
        assert again.round == res.round + 1


def test_setup_node_policy_refuse_raises_policy_refused_naming_it(deploy):
    deploy.add_nodes(NODES3, policy={"node-b": "refuse"})
    deploy.start(*NODES3)
    with deploy.secagg() as sa:
        with pytest.raises(PolicyRefused) as e:
            sa.setup(NODES3, job_id="job-1")
        assert e.value.nodes == ("node-b",)
        with pytest.raises(ConfigError):
            sa.secure_sum("vector")


@pytest.mark.slow
def test_setup_node_not_running_raises_phase_timeout_naming_it(deploy):
    deploy.add_nodes(NODES3)
    deploy.start("node-a", "node-b")
    with deploy.secagg() as sa:
        with pytest.raises(PhaseTimeout) as e:
            sa.setup(NODES3, job_id="job-1")
        assert e.value.nodes == ("node-c",)


@pytest.mark.slow
def test_secure_sum_node_killed_after_setup_survivors_summed_and_dropped(deploy):
    nodes = [*NODES3, "node-d"]
    deploy.add_nodes(nodes)
    deploy.start(*nodes)
    with deploy.secagg(threshold=3) as sa:
        sa.setup(nodes, job_id="job-1")
        check_result(deploy, sa.secure_sum("vector"), nodes)
        proc = deploy.procs["node-c"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        res = sa.secure_sum("vector")
        survivors = ["node-a", "node-b", "node-d"]
        check_result(deploy, res, survivors)
        assert res.dropped == ("node-c",)


def test_secure_sum_shape_mismatch_and_bad_output_name_the_nodes(deploy):
    deploy.add_nodes(NODES3)
    deploy.start(*NODES3)
    with deploy.secagg() as sa:
        sa.setup(NODES3, job_id="job-1")
        with pytest.raises(ShapeMismatch) as e:
            sa.secure_sum("wrong_shape")
        assert e.value.nodes == ("node-c",)
        with pytest.raises(ThresholdError) as e2:
            sa.secure_sum("not_an_array")
        assert set(e2.value.nodes) == set(NODES3)
        # The context is still usable.
        check_result(deploy, sa.secure_sum("vector"), NODES3)
    assert "TypeError" in deploy.log("node-a")


def test_secure_sum_clipped_inputs_warn_with_totals_and_suggestion(deploy):
    deploy.add_nodes(NODES3)
    deploy.start(*NODES3)
    with deploy.secagg() as sa:
        sa.setup(NODES3, job_id="job-1")
        with pytest.warns(ClippingWarning, match="suggested clipping_range") as w:
            res = sa.secure_sum("vector", args={"shape": [2], "offset": 5.0})
        assert len(w) == 1
        # Every input (offset 5 > c = 3) is clipped: |x|/c in (1, 2] or (2, 4].
        assert res.clipping.clipped == 6
        assert sum(res.clipping.histogram) == 6
        np.testing.assert_allclose(res.sum, [3 * C, 3 * C], atol=bound(3, 3))


def test_node_daemon_sigterm_exits_0(deploy):
    deploy.add_nodes(["node-a", "node-b"])
    deploy.start("node-a")
    proc = deploy.procs["node-a"]
    end = time.monotonic() + WAIT
    while "started" not in deploy.log("node-a"):  # bounded: WAIT
        assert proc.poll() is None and time.monotonic() < end, deploy.log("node-a")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0, deploy.log("node-a")


# ------------------------------------------------- the daemon's handler, in-process


def query(name: str, args: dict | None = None, r: int = 7) -> RoundRequest:
    return RoundRequest(
        context_id=DRIVER_CONTEXT,
        round=r,
        sender="researcher",
        kind="task",
        name=name,
        args=args or {},
        streams=(StreamSpec("query", (1,)),),
    )


def test_node_daemon_shape_query_answers_shape_or_refuses(deploy, daemon_factory):
    deploy.add_nodes(["node-a", "node-b"])
    daemon = daemon_factory("node-a")
    (reply,) = daemon.handle(query("vector", {"shape": [4, 1]}), 0.0)
    assert isinstance(reply, Refused) and reply.round == 7
    assert reply.context_id == DRIVER_CONTEXT and reply.sender == "node-a"
    assert (reply.reason, reply.fields) == (
        RefusalReason.NOT_READY,
        ("shape", "d4", "d1"),
    )
    (reply,) = daemon.handle(query("not_an_array"), 0.0)
    assert (reply.reason, reply.fields) == (RefusalReason.INPUT, ("task",))
    (reply,) = daemon.handle(query("no_such_task"), 0.0)
    assert (reply.reason, reply.fields) == (RefusalReason.POLICY, ("task",))


def test_node_daemon_policy_refuse_refuses_setup_and_queries(deploy, daemon_factory):
    deploy.add_nodes(["node-a", "node-b"], policy={"node-a": "refuse"})
    daemon = daemon_factory("node-a")
    setup = SetupRequest(
        context_id=bytes([7]) * 32,
        round=0,
        sender="researcher",
        job_id="job-1",
        nodes=("node-a", "node-b"),
        ring_bits=32,
        clipping_range=3.0,
        threshold=2,
        nonce=bytes(32),
    )
    (reply,) = daemon.handle(setup, 0.0)
    assert isinstance(reply, Refused) and reply.reason is RefusalReason.POLICY
    assert reply.fields == ("policy",) and reply.context_id == setup.context_id
    (reply,) = daemon.handle(query("vector"), 0.0)
    assert reply.reason is RefusalReason.POLICY
