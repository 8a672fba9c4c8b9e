# SPDX-License-Identifier: Apache-2.0
"""Malicious researcher (DESIGN §3): every attack ends in abort or garbage, no leak."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mpc_runtime import keys
from mpc_runtime.errors import PhaseTimeout, RoundAborted
from mpc_runtime.memory import MemoryNetwork
from mpc_runtime.messages import (
    MsgType,
    RefusalReason,
    RoundAdvertEntry,
    RoundAdverts,
    RoundRequest,
    StreamSpec,
    Survivors,
    SurvivorSigEntry,
    UnmaskRequest,
)

from ._support import attacker_can_unmask, attacker_secrets, revealed_counts

IDS = ["a", "b", "c", "d", "e"]
T = 3
STREAMS = [StreamSpec("w", (6,))]


@pytest.fixture
def net():
    rng = np.random.default_rng(7)
    values = {v: rng.uniform(-1, 1, size=6).astype(np.float32) for v in IDS}
    network = MemoryNetwork(IDS, inputs=lambda v, req: {"w": values[v]}, threshold=T)
    network.setup()
    network.values = values
    return network


def _assert_no_leak(net, round_):
    for v in IDS:
        assert not attacker_can_unmask(
            net.seen, v, round=round_, threshold=T, transcript=net.server.transcript
        )


def _no_abort(tamper):
    """The attacker keeps the round open: it never sends the nodes an abort."""

    def wrapped(to, msg):
        return None if msg.TYPE is MsgType.ABORT else tamper(to, msg)

    return wrapped


def _refusal_reasons(net, round_):
    return {(v, r) for (v, rnd, r) in net.refusals if rnd == round_}


def test_attack_lie_about_survivors_nodes_never_reveal_both_secrets(net):
    """Tell a, b, c that S = {a, b, c} and d, e that S = {b, c, d, e}: a's b-shares
    come from the first group, and the attacker wants a's c-shares from the second."""
    s1, s2 = ("a", "b", "c"), ("b", "c", "d", "e")

    def tamper(to, msg):
        if isinstance(msg, Survivors):
            return dataclasses.replace(msg, survivors=s1 if to in s1 else s2)
        return msg

    with pytest.raises(
        PhaseTimeout
    ):  # the honest server never gets t signatures on its own S
        net.run_round(streams=STREAMS, tamper=_no_abort(tamper))
    r = net.last_round
    sigs = {
        i.message.sender: i.message
        for i in net.seen
        if i.direction == "in"
        and i.message.TYPE is MsgType.SURVIVOR_SIG
        and i.message.round == r
    }
    assert set(sigs) == set(IDS)  # everyone signed the one S it was shown

    def request(survivors, signers):
        return UnmaskRequest(
            context_id=net.server.context_id,
            round=r,
            sender="researcher",
            survivors=survivors,
            signatures=tuple(SurvivorSigEntry(v, sigs[v].signature) for v in signers),
        )

    # The first group has t signatures on S1: it reveals b-shares for S1 only.
    for v in s1:
        out = net.deliver(v, request(s1, s1))
        assert out[0].message.TYPE is MsgType.UNMASK_SHARES
        assert set(out[0].message.c_shares) == {"d", "e"}
    # The second group signed S2 but only d and e did (b, c signed S1): 2 < t, no
    # reveal; signatures made on S1 do not verify on S2, and S1 is not what d and e
    # signed.
    for v in ("d", "e"):
        assert (
            net.deliver(v, request(s2, ("b", "c", "d", "e")))[0].message.reason
            is RefusalReason.SURVIVORS
        )
        assert (
            net.deliver(v, request(s1, s1))[0].message.reason is RefusalReason.SURVIVORS
        )
    b, c = revealed_counts(net.seen, round=r)
    assert b.get("a", 0) == 3 and c.get("a", 0) == 0
    _assert_no_leak(net, r)
    uploads, seeds, c_secrets = attacker_secrets(
        net.seen, round=r, threshold=T, transcript=net.server.transcript
    )
    assert (
        "a" in seeds
        and "a" not in c_secrets
        and not set(uploads["a"].peers) <= set(c_secrets)
    )


def test_attack_relabel_shares_peer_left_out_and_round_aborts(net):
    """Hand a the boxes b sent it under c's name and vice versa."""

    def tamper(to, msg):
        if isinstance(msg, RoundAdverts) and to == "a":
            entries = {e.node: e for e in msg.adverts}
            b, c = entries["b"], entries["c"]
            entries["b"] = dataclasses.replace(b, c_box=c.c_box, b_box=c.b_box)
            entries["c"] = dataclasses.replace(c, c_box=b.c_box, b_box=b.b_box)
            return dataclasses.replace(
                msg, adverts=tuple(entries[v] for v in sorted(entries))
            )
        return msg

    with pytest.raises(RoundAborted) as info:
        net.run_round(streams=STREAMS, tamper=_no_abort(tamper))
    r = net.last_round
    assert "peer sets" in str(info.value)
    upload = next(
        i.message
        for i in net.seen
        if i.direction == "in"
        and i.message.TYPE is MsgType.MASKED_INPUT
        and i.message.sender == "a"
    )
    assert upload.peers == ("d", "e")
    assert revealed_counts(net.seen, round=r) == ({}, {})
    # Pressing on regardless: a refuses to sign an S naming peers it excluded.
    out = net.deliver(
        "a",
        Survivors(
            context_id=net.server.context_id,
            round=r,
            sender="researcher",
            survivors=tuple(IDS),
        ),
    )
    assert out[0].message.reason is RefusalReason.SURVIVORS
    _assert_no_leak(net, r)


# A point of order 8 (libsodium's list): X25519 with it is all-zero for any scalar.
LOW_ORDER_POINT = bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
)


def test_attack_low_order_mask_key_peer_left_out_and_round_aborts(net):
    """Show a a low-order C_c^r, validly signed by a colluding c (its boxes are
    untouched and open): a's X25519 with it would be all-zero, so a leaves c out of
    P_a^r; c masked with a, so the peer sets disagree and the round aborts before
    anything is revealed (DESIGN §3: all-zero X25519 outputs are rejected)."""

    def tamper(to, msg):
        if isinstance(msg, RoundAdverts) and to == "a":
            entries = list(msg.adverts)
            for i, e in enumerate(entries):
                if e.node == "c":
                    signature = keys.sign(
                        net.signing_keys["c"],
                        "advert-c",
                        net.server.transcript,
                        msg.round,
                        "c",
                        LOW_ORDER_POINT,
                    )
                    entries[i] = dataclasses.replace(
                        e, mask_key=LOW_ORDER_POINT, signature=signature
                    )
            return dataclasses.replace(msg, adverts=tuple(entries))
        return msg

    with pytest.raises(RoundAborted) as info:
        net.run_round(streams=STREAMS, tamper=_no_abort(tamper))
    r = net.last_round
    assert "peer sets" in str(info.value)
    assert set(info.value.nodes) == {"a", "c"}
    uploads = {
        i.message.sender: i.message
        for i in net.seen
        if i.direction == "in"
        and i.message.TYPE is MsgType.MASKED_INPUT
        and i.message.round == r
    }
    assert uploads["a"].peers == ("b", "d", "e")
    assert "a" in uploads["c"].peers
    assert revealed_counts(net.seen, round=r) == ({}, {})
    # Pressing on regardless: a refuses to sign an S naming c.
    out = net.deliver(
        "a",
        Survivors(
            context_id=net.server.context_id,
            round=r,
            sender="researcher",
            survivors=tuple(IDS),
        ),
    )
    assert out[0].message.reason is RefusalReason.SURVIVORS
    _assert_no_leak(net, r)


def test_attack_reflect_shares_back_to_sender_or_other_peer_rejected(net):
    """Give a its own boxes (addressed to b) as if they came from b.

    And give d the boxes b addressed to c.
    """
    adverts = {}

    def tamper(to, msg):
        if isinstance(msg, RoundAdverts):
            adverts[to] = msg
        return msg

    # Run the keys phase honestly once to harvest the boxes, then replay them mixed up.
    net.run_round(streams=STREAMS, tamper=tamper)
    r = net.last_round
    seen_adverts = {
        i.message.sender: i.message
        for i in net.seen
        if i.direction == "in"
        and i.message.TYPE is MsgType.ROUND_ADVERT
        and i.message.round == r
    }
    a_to_b = seen_adverts["a"].shares["b"]
    b_to_c = seen_adverts["b"].shares["c"]

    def tamper2(to, msg):
        if isinstance(msg, RoundAdverts) and to in ("a", "d"):
            entries = {e.node: e for e in msg.adverts}
            b = entries["b"]
            boxes = a_to_b if to == "a" else b_to_c
            entries["b"] = RoundAdvertEntry(
                b.node, b.mask_key, b.signature, boxes.c, boxes.b
            )
            return dataclasses.replace(
                msg, adverts=tuple(entries[v] for v in sorted(entries))
            )
        return msg

    with pytest.raises(RoundAborted):
        net.run_round(streams=STREAMS, tamper=tamper2)
    r2 = net.last_round
    uploads = {
        i.message.sender: i.message
        for i in net.seen
        if i.direction == "in"
        and i.message.TYPE is MsgType.MASKED_INPUT
        and i.message.round == r2
    }
    assert "b" not in uploads["a"].peers and "b" not in uploads["d"].peers
    assert revealed_counts(net.seen, round=r2) == ({}, {})
    _assert_no_leak(net, r2)


def test_attack_replay_old_round_adverts_node_refuses_and_is_left_out(net):
    old = {}

    def harvest(to, msg):
        if isinstance(msg, RoundAdverts):
            old[to] = msg
        return msg

    net.run_round(streams=STREAMS, tamper=harvest)

    # Verbatim replay (old round number) in the next round: refused as another round.
    def replay(to, msg):
        if isinstance(msg, RoundAdverts) and to == "a":
            return old["a"]
        return msg

    # a refuses (wrong round) and is left out; a's c_a^r may be rebuilt, which
    # exposes round r only, and a never uploaded in it.
    result = net.run_round(streams=STREAMS, tamper=replay)
    r = net.last_round
    assert ("a", RefusalReason.UNEXPECTED) in {
        (v, x) for (v, rnd, x) in net.refusals if rnd == 1
    }
    assert result.contributors == ("b", "c", "d", "e")
    _assert_no_leak(net, r)

    # Relabelled replay (old adverts under the new round number): signatures bind r,
    # share AAD binds r, so a keeps no peer and refuses; the others sum without a.
    def relabel(to, msg):
        if isinstance(msg, RoundAdverts) and to == "a":
            return dataclasses.replace(old["a"], round=msg.round)
        return msg

    result = net.run_round(streams=STREAMS, tamper=relabel)
    r = net.last_round
    assert ("a", RefusalReason.TOO_FEW_PEERS) in _refusal_reasons(net, r)
    assert "a" not in result.contributors
    want = sum(net.values[v].astype(np.float64) for v in result.contributors)
    assert np.allclose(result.sums["w"], want, atol=1e-6)
    _assert_no_leak(net, r)
    assert not net.nodes["a"].holds_round_secrets(net.server.context_id)


def test_attack_different_request_to_one_node_gives_loud_garbage(net):
    def tamper(to, msg):
        if isinstance(msg, RoundRequest) and to == "c":
            return dataclasses.replace(msg, args={"bins": 11})
        return msg

    with pytest.raises(RoundAborted) as info:
        net.run_round(streams=STREAMS, tamper=tamper)
    assert "did not cancel" in str(info.value) or "masks" in str(info.value)
    r = net.last_round
    _, c = revealed_counts(net.seen, round=r)
    assert c == {}  # nobody dropped: no c-share was revealed
    _assert_no_leak(net, r)


def test_attack_forged_survivor_signatures_not_counted(net):
    captured = {}

    def tamper(to, msg):
        if isinstance(msg, UnmaskRequest):
            captured[to] = msg
            return None
        return msg

    with pytest.raises(PhaseTimeout):
        net.run_round(streams=STREAMS, tamper=_no_abort(tamper))
    msg = captured["a"]
    fake = keys.sign(
        keys.generate_signing_key(),
        "survivors",
        net.server.transcript,
        msg.round,
        frozenset(msg.survivors),
    )
    forged = dataclasses.replace(
        msg,
        signatures=tuple(
            SurvivorSigEntry(e.node, fake if e.node != "a" else e.signature)
            for e in msg.signatures
        ),
    )
    assert net.deliver("a", forged)[0].message.reason is RefusalReason.SURVIVORS
    assert revealed_counts(net.seen, round=msg.round) == ({}, {})
