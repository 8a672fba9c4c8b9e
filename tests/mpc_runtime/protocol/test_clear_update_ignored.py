# SPDX-License-Identifier: Apache-2.0
"""CLEAR_UPDATE (cleartext training) is accepted by neither state machine.

The server ignores it in every stage (no reply, no state change); a node refuses it
as ``UNEXPECTED`` like any other out-of-phase message, without a state change.
"""

from __future__ import annotations

import numpy as np

from mpc_runtime.memory import MemoryNetwork
from mpc_runtime.messages import (
    ClearUpdate,
    Message,
    MsgType,
    RefusalReason,
    Refused,
    StreamSpec,
    Tensor,
)
from mpc_runtime.protocol.node import TRANSITIONS
from mpc_runtime.protocol.server import SERVER_TRANSITIONS, ServerStage

IDS = ["a", "b", "c"]
ZERO_CID = bytes(32)


def _clear_update(context_id: bytes, round_: int, sender: str) -> ClearUpdate:
    return ClearUpdate(
        context_id=context_id,
        round=round_,
        sender=sender,
        samples=12,
        tensors=(Tensor("w", np.ones(4, dtype=np.float32)),),
    )


def test_clear_update_in_no_row_of_either_transition_table():
    assert all(MsgType.CLEAR_UPDATE not in row for row in TRANSITIONS.values())
    assert all(MsgType.CLEAR_UPDATE not in row for row in SERVER_TRANSITIONS.values())


def test_clear_update_ignored_by_server_and_refused_by_node_in_every_stage():
    values = {v: np.full(4, i / 10, dtype=np.float32) for i, v in enumerate(IDS)}
    net = MemoryNetwork(IDS, inputs=lambda v, request: {"w": values[v]})
    server_stages: set[ServerStage] = set()

    def inject(to: str, msg: Message) -> Message:
        # Called before every researcher -> node message: inject CLEAR_UPDATEs in
        # whatever stage both machines are in, then let the protocol go on.
        server, node, now = net.server, net.nodes[to], net.now()
        cid = server.context_id
        stage = server.stage
        for context_id in (cid, ZERO_CID):
            assert server.handle(_clear_update(context_id, msg.round, to), now) == []
            assert server.stage is stage
        server_stages.add(stage)
        node_stage, secrets = node.stage(cid), node.holds_round_secrets(cid)
        for context_id in (cid, ZERO_CID):
            replies = node.handle(
                _clear_update(context_id, msg.round, "researcher"), now
            )
            assert [r.to for r in replies] == ["researcher"]
            refusal = replies[0].message
            assert isinstance(refusal, Refused)
            assert refusal.reason is RefusalReason.UNEXPECTED
            assert node.stage(cid) is node_stage
            assert node.holds_round_secrets(cid) == secrets
        return msg

    net.setup(tamper=inject)
    result = net.run_round(streams=[StreamSpec("w", (4,))], tamper=inject)
    assert server_stages >= {
        ServerStage.SETUP_ADVERTS,
        ServerStage.READY,
        ServerStage.SETUP_SIGNATURES,
        ServerStage.KEYS,
        ServerStage.UPLOAD,
        ServerStage.SURVIVORS,
        ServerStage.UNMASK,
    }
    # Nothing injected changed the outcome: the round sums every node's input.
    assert result.contributors == tuple(IDS) and result.dropped == ()
    np.testing.assert_allclose(result.sums["w"], sum(values.values()), atol=1e-6)
