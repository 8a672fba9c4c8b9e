# SPDX-License-Identifier: Apache-2.0
"""Stateful test: random contexts and dropouts end in the exact sum or a named abort."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mpc_runtime.errors import PhaseTimeout, RoundAborted
from mpc_runtime.memory import MemoryNetwork, Phase
from mpc_runtime.messages import StreamSpec
from mpc_runtime.protocol.setup import threshold_floor

from ._support import (
    attacker_can_unmask,
    expected_integer_sum,
    reference_bits,
    revealed_counts,
)

C = 2.0
_PHASES = [None] * 8 + [Phase.KEYS, Phase.UPLOAD, Phase.SURVIVORS, Phase.UNMASK]


class SecureSumMachine(RuleBasedStateMachine):
    """One context; each step runs a round with random inputs and random dropouts."""

    def __init__(self) -> None:
        super().__init__()
        self.net: MemoryNetwork | None = None
        self.inputs: dict[str, dict[str, np.ndarray]] = {}
        self.rounds = 0

    @initialize(
        n=st.integers(2, 12),
        extra=st.integers(0, 12),
        ring_bits=st.sampled_from([32, 32, 64]),
        shapes=st.lists(
            st.tuples(st.integers(0, 7), st.integers(1, 3)), min_size=1, max_size=2
        ),
    )
    def setup(self, n, extra, ring_bits, shapes):
        self.ids = [f"n{i:02d}" for i in range(n)]
        floor = threshold_floor(n)
        self.t = min(n, floor + extra % (n - floor + 1))
        self.need = max(self.t, 2)
        self.ring_bits = ring_bits
        self.streams = [StreamSpec(f"s{i}", (a, b)) for i, (a, b) in enumerate(shapes)]
        self.net = MemoryNetwork(
            self.ids,
            threshold=self.t,
            ring_bits=ring_bits,
            clipping_range=C,
            timeout=10.0,
            inputs=lambda v, req: self.inputs[v],
            node_options={"warn_clipping": False},
        )
        self.net.setup()
        self.bits = reference_bits(n, ring_bits)

    @rule(data=st.data())
    def run_round(self, data):
        net = self.net
        assert net is not None
        drops = {}
        for v in self.ids:
            phase = data.draw(st.sampled_from(_PHASES), label=f"drop {v}")
            if phase is not None:
                drops[v] = phase
        self.inputs = {
            v: {
                s.name: data.draw(
                    st.lists(
                        st.floats(-3 * C, 3 * C, allow_nan=False, width=32),
                        min_size=s.size,
                        max_size=s.size,
                    ).map(
                        lambda xs, s=s: np.array(xs, dtype=np.float32).reshape(s.shape)
                    ),
                    label=f"x {v} {s.name}",
                )
                for s in self.streams
            }
            for v in self.ids
        }

        def alive(phase: Phase) -> list[str]:
            return [
                v for v in self.ids if v not in drops or drops[v].value > phase.value
            ]

        advertisers, uploaders = alive(Phase.KEYS), alive(Phase.UPLOAD)
        signers, responders = alive(Phase.SURVIVORS), alive(Phase.UNMASK)
        failing_phase = None
        if len(advertisers) < self.need:
            failing_phase = "round.keys"
        elif len(uploaders) < self.need:
            failing_phase = "round.upload"
        elif len(signers) < self.t:
            failing_phase = "round.survivors"
        elif len(responders) < self.t:
            failing_phase = "round.unmask"

        event(f"n={len(self.ids)}" if len(self.ids) in (2, 12) else "n=3..11")
        event(f"outcome={failing_phase or 'sum'}")
        try:
            result = net.run_round(streams=self.streams, drop=drops)
        except RoundAborted as e:
            assert failing_phase is not None, f"unexpected abort: {e!r}"
            assert isinstance(e, PhaseTimeout)
            assert e.phase == failing_phase and e.round == net.last_round
            assert e.nodes and set(e.nodes) <= set(drops)
            self._check_nothing_revealed(net.last_round)
        else:
            assert failing_phase is None, f"expected an abort in {failing_phase}"
            assert result.contributors == tuple(uploaders)
            assert result.dropped == tuple(v for v in self.ids if v not in uploaders)
            for s in self.streams:
                want = expected_integer_sum(
                    [self.inputs[v][s.name] for v in uploaders],
                    clipping_range=C,
                    bits=self.bits,
                    ring_bits=self.ring_bits,
                )
                got = result.integer_sums[s.name].ravel().astype(np.uint64)
                np.testing.assert_array_equal(got, want)
                clipped = sum(
                    int(np.count_nonzero(np.abs(self.inputs[v][s.name]) > C))
                    for v in uploaders
                )
                assert result.clipping[s.name].clipped == clipped
                assert sum(result.clipping[s.name].histogram) == clipped
                exact = sum(
                    self.inputs[v][s.name].astype(np.float64).clip(-C, C)
                    for v in uploaders
                )
                step = 2 * C / (2**self.bits - 1)
                assert np.all(
                    np.abs(result.sums[s.name] - exact) <= len(uploaders) * step
                )
        # Whatever happened, the researcher never holds both secrets of anyone who
        # uploaded.
        for v in uploaders:
            assert not attacker_can_unmask(
                net.seen,
                v,
                round=net.last_round,
                threshold=self.t,
                transcript=net.server.transcript,
            )
        # Nodes that saw the round end hold no round secrets (DESIGN §3 erasure).
        for v in self.ids:
            if v not in drops:
                assert not net.nodes[v].holds_round_secrets(net.server.context_id)
        self.rounds += 1

    def _check_nothing_revealed(self, r: int) -> None:
        net = self.net
        assert net is not None
        b, c = revealed_counts(net.seen, round=r)
        # An aborted round reveals nothing usable: no c-share of anyone who uploaded,
        # and fewer than t b-shares unless the sum could have been computed.
        uploaded = {
            i.message.sender
            for i in net.seen
            if i.direction == "in"
            and i.message.round == r
            and i.message.TYPE.name == "MASKED_INPUT"
        }
        assert all(c.get(v, 0) == 0 for v in uploaded)
        revealers = {
            i.message.sender
            for i in net.seen
            if i.direction == "in"
            and i.message.round == r
            and i.message.TYPE.name == "UNMASK_SHARES"
        }
        could_sum = len(revealers) >= self.t
        assert could_sum or all(n_b < self.t for n_b in b.values()), (b, self.t)

    @rule(data=st.data())
    def restart_a_node(self, data):
        v = data.draw(st.sampled_from(self.ids))
        self.net.restart_node(v)

    @invariant()
    def server_ready_between_rounds(self):
        if self.net is not None:
            assert self.net.server.stage.value == "ready"


SecureSumMachine.TestCase.settings = settings(
    deadline=None,
    max_examples=80,
    stateful_step_count=5,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestSecureSumMachine = SecureSumMachine.TestCase


@pytest.mark.slow
def test_state_machine_thorough_many_examples_exact_sum_or_abort():
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        SecureSumMachine,
        settings=settings(
            deadline=None,
            max_examples=300,
            stateful_step_count=6,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
