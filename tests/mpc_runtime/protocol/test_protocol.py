# SPDX-License-Identifier: Apache-2.0
"""Tests of the node and server machines: setup rules, rounds, durability, erasure."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from mpc_runtime import keys, sharing
from mpc_runtime.errors import (
    ClippingWarning,
    ConfigError,
    ContextMismatch,
    PhaseTimeout,
    PolicyRefused,
    RoundAborted,
    ShapeMismatch,
    ThresholdError,
    UnexpectedMessage,
)
from mpc_runtime.memory import MemoryNetwork, Phase
from mpc_runtime.messages import (
    AbortReason,
    ContextAdverts,
    MaskedInput,
    MsgType,
    RefusalReason,
    RoundAdvert,
    RoundRequest,
    SetupRequest,
    StreamSpec,
    Survivors,
    Tensor,
    TranscriptSigEntry,
    TranscriptSigs,
    UnmaskRequest,
)
from mpc_runtime.protocol.node import TRANSITIONS, Node, NodeStage
from mpc_runtime.protocol.round import request_digest, weights_hash
from mpc_runtime.protocol.server import (
    SERVER_TRANSITIONS,
    Server,
    ServerRecord,
    ServerStage,
)
from mpc_runtime.protocol.setup import compute_context_id, threshold_floor
from mpc_runtime.protocol.store import MemoryNodeStore, StepAlreadyCommitted

from ._support import expected_integer_sum, reference_bits, revealed_counts

IDS = ["a", "b", "c", "d", "e"]
STREAMS = [StreamSpec("w", (4,))]


def _inputs(values):
    return lambda v, request: {s.name: values[v] for s in request.streams}


def _values(ids=IDS, seed=0):
    rng = np.random.default_rng(seed)
    return {v: rng.uniform(-1, 1, size=4).astype(np.float32) for v in ids}


def _refusals(net, node=None):
    return [r for (v, _, r) in net.refusals if node is None or v == node]


def _ready_net(ids=IDS, **kw):
    values = kw.pop("values", None) or _values(ids)
    net = MemoryNetwork(ids, inputs=_inputs(values), **kw)
    net.setup()
    return net, values


def _setup_request(server: Server, **changes) -> SetupRequest:
    out = server.start_setup(0.0)
    return dataclasses.replace(out[0].message, **changes)


# ------------------------------------------------------------------- tables


def test_transition_tables_every_stage_has_a_row():
    assert set(TRANSITIONS) == set(NodeStage)
    assert set(SERVER_TRANSITIONS) == set(ServerStage)


# -------------------------------------------------------------------- setup


def test_setup_all_nodes_ready_same_transcript():
    net, _ = _ready_net()
    cid = net.server.context_id
    assert all(node.stage(cid) is NodeStage.READY for node in net.nodes.values())
    assert net.server.stage is ServerStage.READY
    assert len(net.server.transcript) == 32


def test_server_threshold_below_floor_raises_config_error():
    with pytest.raises(ConfigError):
        Server(researcher_id="r", job_id="j", nodes=IDS, timeout=1.0, threshold=2)
    with pytest.raises(ConfigError):
        Server(researcher_id="r", job_id="j", nodes=["a"], timeout=1.0)
    with pytest.raises(ConfigError):
        Server(researcher_id="r", job_id="j", nodes=IDS, timeout=1.0, threshold=6)


def test_threshold_floor_matches_design_formula():
    assert [threshold_floor(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    assert threshold_floor(5, 1) == 4


def _lone_node(node_id="a", *, kappa=0, roster_ids=IDS, store=None):
    sk = keys.generate_signing_key()
    roster = {
        v: bytes(keys.generate_signing_key().verify_key)
        for v in roster_ids
        if v != node_id
    }
    return Node(
        node_id,
        sk,
        store=store or MemoryNodeStore(),
        inputs=lambda r: {},
        roster=roster,
        max_colluding_nodes=kappa,
    )


def _signed_request(
    nodes=tuple(IDS), threshold=3, ring_bits=32, researcher="researcher", **kw
):
    from mpc_runtime import masking

    nonce = kw.pop("nonce", bytes(32))
    bits = masking.bits_for(len(nodes), ring_bits)
    cid = compute_context_id(
        researcher_id=researcher,
        job_id="job",
        nodes=nodes,
        ring_bits=ring_bits,
        bits=bits,
        clipping_range=3.0,
        threshold=threshold,
        nonce=nonce,
    )
    fields = dict(
        context_id=cid,
        round=0,
        sender=researcher,
        job_id="job",
        nodes=nodes,
        ring_bits=ring_bits,
        clipping_range=3.0,
        threshold=threshold,
        nonce=nonce,
    )
    fields.update(kw)
    return SetupRequest(**fields)


@pytest.mark.parametrize(
    ("threshold", "kappa", "reason"),
    [
        (2, 0, RefusalReason.THRESHOLD),
        (3, 1, RefusalReason.THRESHOLD),
        (6, 0, RefusalReason.THRESHOLD),
        (4, 1, None),
        (3, 0, None),
    ],
)
def test_node_setup_threshold_outside_its_floor_refused(threshold, kappa, reason):
    node = _lone_node(kappa=kappa)
    out = node.handle(_signed_request(threshold=threshold), 0.0)
    assert len(out) == 1
    if reason is None:
        assert out[0].message.TYPE is MsgType.CONTEXT_ADVERT
    else:
        assert (
            out[0].message.TYPE is MsgType.REFUSED and out[0].message.reason is reason
        )


def test_node_setup_seen_context_refused_even_after_restart():
    store = MemoryNodeStore()
    node = _lone_node(store=store)
    request = _signed_request()
    assert node.handle(request, 0.0)[0].message.TYPE is MsgType.CONTEXT_ADVERT
    assert node.handle(request, 0.0)[0].message.reason is RefusalReason.CONTEXT_SEEN
    restarted = _lone_node(store=store)
    assert (
        restarted.handle(request, 0.0)[0].message.reason is RefusalReason.CONTEXT_SEEN
    )


def test_node_setup_outside_roster_refused():
    node = _lone_node(roster_ids=["a", "b", "c", "d"])
    out = node.handle(_signed_request(), 0.0)
    assert out[0].message.reason is RefusalReason.ROSTER
    assert out[0].message.fields == ("nodes",)


def test_node_setup_forged_context_id_refused_naming_field():
    node = _lone_node()
    out = node.handle(_signed_request(context_id=bytes(32)), 0.0)
    assert out[0].message.reason is RefusalReason.CONTEXT_MISMATCH
    assert out[0].message.fields == ("context_id",)


def test_node_setup_not_named_refused():
    node = _lone_node("z", roster_ids=IDS)
    assert (
        node.handle(_signed_request(), 0.0)[0].message.reason
        is RefusalReason.UNEXPECTED
    )


def test_setup_silent_node_raises_phase_timeout_naming_it():
    net = MemoryNetwork(IDS, timeout=5.0)
    with pytest.raises(PhaseTimeout) as info:
        net.setup(drop={"c": Phase.SETUP})
    assert info.value.nodes == ("c",) and info.value.phase == "setup.adverts"
    with pytest.raises(UnexpectedMessage):
        net.server.start_round(kind="task", name="s", streams=STREAMS, now=0.0)


def test_setup_adverts_missing_a_node_raises_context_mismatch():
    def tamper(to, msg):
        if isinstance(msg, ContextAdverts) and to == "a":
            return dataclasses.replace(msg, adverts=msg.adverts[:-1])
        return msg

    net = MemoryNetwork(IDS)
    with pytest.raises(ContextMismatch) as info:
        net.setup(tamper=tamper)
    assert info.value.fields == ("adverts",) and info.value.nodes == ("a",)


def test_setup_swapped_share_key_refused_as_authentication():
    def tamper(to, msg):
        if isinstance(msg, ContextAdverts) and to == "a":
            first = msg.adverts[1]
            forged = dataclasses.replace(first, share_key=keys.generate_x25519()[1])
            return dataclasses.replace(
                msg, adverts=(msg.adverts[0], forged, *msg.adverts[2:])
            )
        return msg

    net = MemoryNetwork(IDS)
    with pytest.raises(PolicyRefused):
        net.setup(tamper=tamper)
    assert _refusals(net, "a") == [RefusalReason.AUTHENTICATION]


def test_setup_duplicate_share_key_in_adverts_refused_as_context_mismatch():
    """A colluding c re-advertises a's E_a, validly signed with c's own key: only
    DESIGN §3's "duplicate public keys in one transcript are rejected" stops it."""
    net = MemoryNetwork(IDS)

    def tamper(to, msg):
        if isinstance(msg, ContextAdverts) and to == "b":
            e_a = msg.adverts[0].share_key
            signature = keys.sign(
                net.signing_keys["c"], "advert-e", msg.context_id, "c", e_a
            )
            adverts = tuple(
                dataclasses.replace(a, share_key=e_a, signature=signature)
                if a.node == "c"
                else a
                for a in msg.adverts
            )
            return dataclasses.replace(msg, adverts=adverts)
        return msg

    with pytest.raises(ContextMismatch) as info:
        net.setup(tamper=tamper)
    assert info.value.fields == ("share_key",) and info.value.nodes == ("b",)
    assert _refusals(net, "b") == [RefusalReason.CONTEXT_MISMATCH]
    assert net.nodes["b"].stage(net.server.context_id) is NodeStage.FAILED


def test_setup_transcript_differs_node_refuses_context_mismatch():
    captured = {}

    def tamper(to, msg):
        if isinstance(msg, TranscriptSigs):
            captured.setdefault("msg", msg)
            return None
        return msg

    net = MemoryNetwork(IDS)
    net.setup(tamper=tamper)  # the server has all signatures; the nodes never saw them
    msg = captured["msg"]
    entries = list(msg.signatures)
    entries[1] = TranscriptSigEntry(entries[1].node, bytes(32), entries[1].signature)
    out = net.deliver("a", dataclasses.replace(msg, signatures=tuple(entries)))
    assert out[0].message.reason is RefusalReason.CONTEXT_MISMATCH
    assert out[0].message.fields == ("transcript",)
    # The node is not ready: it refuses rounds.
    assert net.nodes["a"].stage(net.server.context_id) is NodeStage.TRANSCRIPT_SIGNED
    with pytest.raises(ThresholdError):
        net.run_round(streams=STREAMS)
    assert set(_refusals(net)) == {
        RefusalReason.CONTEXT_MISMATCH,
        RefusalReason.UNEXPECTED,
    }


def test_setup_tofu_pins_on_first_sight_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mpc_runtime.protocol.node"):
        net, _ = _ready_net(peer_trust="tofu")
    assert any("TOFU" in r.getMessage() for r in caplog.records)
    assert net.stores["a"].pinned_key("b") == net.public_keys["b"]
    result = net.run_round(streams=STREAMS)
    assert result.contributors == tuple(IDS)


# -------------------------------------------------------------------- rounds


def test_round_no_dropout_exact_sum_and_mean():
    net, values = _ready_net()
    result = net.run_round(streams=STREAMS)
    bits = reference_bits(len(IDS), 32)
    want = expected_integer_sum(
        values.values(), clipping_range=3.0, bits=bits, ring_bits=32
    )
    np.testing.assert_array_equal(result.integer_sums["w"].astype(np.uint64), want)
    exact = sum(v.astype(np.float64) for v in values.values())
    assert np.allclose(result.sums["w"], exact, atol=len(IDS) * 6 / (2**bits - 1))
    np.testing.assert_allclose(result.means["w"], result.sums["w"] / len(IDS))
    assert result.sums["w"].dtype == np.float64


def test_round_ring_64_exact_sum():
    net, values = _ready_net(ring_bits=64)
    result = net.run_round(streams=STREAMS)
    want = expected_integer_sum(
        values.values(), clipping_range=3.0, bits=reference_bits(5, 64), ring_bits=64
    )
    np.testing.assert_array_equal(result.integer_sums["w"], want)


def test_round_counter_shared_and_strictly_increasing():
    net, _ = _ready_net()
    net.run_round(streams=STREAMS)
    net.run_round(streams=STREAMS, kind="plan", name="mlp")
    assert net.last_round == 2
    old = RoundRequest(
        context_id=net.server.context_id,
        round=2,
        sender="researcher",
        kind="task",
        name="sum",
        streams=tuple(STREAMS),
    )
    out = net.deliver("a", old)
    assert out[0].message.reason is RefusalReason.UNEXPECTED


def test_round_dropouts_at_each_phase_sum_of_survivors():
    net, values = _ready_net(
        ["a", "b", "c", "d", "e", "f", "g"], values=_values(list("abcdefg"))
    )
    result = net.run_round(
        streams=STREAMS, drop={"b": Phase.KEYS, "d": Phase.UPLOAD, "f": Phase.SURVIVORS}
    )
    assert result.contributors == ("a", "c", "e", "f", "g")
    assert result.dropped == ("b", "d")
    want = expected_integer_sum(
        [values[v] for v in result.contributors],
        clipping_range=3.0,
        bits=reference_bits(7, 32),
        ring_bits=32,
    )
    np.testing.assert_array_equal(result.integer_sums["w"].astype(np.uint64), want)


def test_round_too_many_dropouts_raises_phase_timeout_naming_nodes():
    net, _ = _ready_net()
    with pytest.raises(PhaseTimeout) as info:
        net.run_round(
            streams=STREAMS,
            drop={"a": Phase.UPLOAD, "b": Phase.UPLOAD, "c": Phase.UPLOAD},
        )
    assert info.value.phase == "round.upload" and info.value.nodes == ("a", "b", "c")
    assert info.value.round == 1
    # The context survives: the next round works.
    assert net.run_round(streams=STREAMS).contributors == tuple(IDS)


def test_round_refusals_below_threshold_raise_threshold_error():
    from mpc_runtime.errors import PolicyRefused as Refuse

    def inputs(v, request):
        if v in ("a", "b", "c"):
            raise Refuse("no")
        return {"w": np.zeros(4, dtype=np.float32)}

    net = MemoryNetwork(IDS, inputs=inputs)
    net.setup()
    with pytest.raises(ThresholdError) as info:
        net.run_round(streams=STREAMS)
    assert info.value.nodes == ("a", "b", "c") and info.value.phase == "round.keys"


def test_round_shape_mismatch_refused_without_revealing_shape():
    def inputs(v, request):
        return {"w": np.zeros(5 if v == "c" else 4, dtype=np.float32)}

    net = MemoryNetwork(IDS, inputs=inputs)
    net.setup()
    with pytest.raises(ShapeMismatch) as info:
        net.run_round(streams=STREAMS)
    assert info.value.nodes == ("c",)
    refusal = [
        s.message
        for s in net.seen
        if s.direction == "in" and s.message.TYPE is MsgType.REFUSED
    ]
    assert refusal[0].reason is RefusalReason.SHAPE and refusal[0].fields == (
        "streams",
    )


def test_round_clipped_input_warns_and_totals_clip_words():
    values = {v: np.array([0.5, 4.0, -7.0, 30.0], dtype=np.float32) for v in IDS}
    net = MemoryNetwork(IDS, inputs=_inputs(values))
    net.setup()
    with pytest.warns(ClippingWarning):
        result = net.run_round(streams=STREAMS)
    clip = result.clipping["w"]
    assert clip.clipped == 15 and clip.histogram == (5, 5, 0, 5) and not clip.saturated


def test_round_weights_bound_into_request_digest():
    w1 = (Tensor("fc", np.arange(4, dtype=np.float32)),)
    w2 = (Tensor("fc", np.arange(4, dtype=np.float32) + 1),)
    assert weights_hash(w1) != weights_hash(w2)
    net, _ = _ready_net()
    result = net.run_round(
        streams=STREAMS, kind="plan", name="mlp", args={"lr": 0.1}, weights=w1
    )
    assert result.contributors == tuple(IDS)
    base = RoundRequest(
        context_id=bytes(32),
        round=1,
        sender="r",
        kind="plan",
        name="mlp",
        weights=w1,
        streams=tuple(STREAMS),
    )
    variants = [
        dataclasses.replace(base, weights=w2),
        dataclasses.replace(base, kind="task"),
        dataclasses.replace(base, args={"lr": 0.2}),
        dataclasses.replace(base, round=2),
        dataclasses.replace(base, streams=(StreamSpec("w", (2, 2)),)),
    ]
    digests = {request_digest(bytes(32), r) for r in [base, *variants]}
    assert len(digests) == 6


# --------------------------------------------------------- durability, erasure


class _FailingStore(MemoryNodeStore):
    def commit(self, context_id, round, phase, digest):  # noqa: A002
        if phase == "advert-c":
            raise OSError("disk full")
        super().commit(context_id, round, phase, digest)


def test_node_commit_failure_releases_nothing():
    net, _ = _ready_net()
    net.stores["a"].__class__ = _FailingStore
    request = RoundRequest(
        context_id=net.server.context_id,
        round=1,
        sender="researcher",
        kind="task",
        name="sum",
        streams=tuple(STREAMS),
    )
    with pytest.raises(OSError):
        net.nodes["a"].handle(request, 0.0)
    assert not net.nodes["a"].holds_round_secrets(net.server.context_id)


def test_node_restart_after_upload_never_redoes_committed_steps():
    net, _ = _ready_net()
    captured = {}

    def tamper(to, msg):
        if msg.TYPE is MsgType.SURVIVORS:
            captured[to] = msg
            if to == "a":
                return None
        return msg

    # "a" uploads, then crashes before signing S; the round cannot reach t = 3
    # signatures only if two more are lost, so drop "b" at survivors too.
    with pytest.raises(PhaseTimeout):
        net.run_round(
            streams=STREAMS,
            drop={"b": Phase.SURVIVORS, "c": Phase.SURVIVORS},
            tamper=tamper,
        )
    node = net.restart_node("a")
    cid = net.server.context_id
    assert node.stage(cid) is NodeStage.READY and not node.holds_round_secrets(cid)
    assert net.stores["a"].committed(cid, 1, "upload") is not None
    out = net.deliver("a", captured["a"])
    assert out[0].message.reason is RefusalReason.UNEXPECTED
    again = RoundRequest(
        context_id=cid,
        round=1,
        sender="researcher",
        kind="task",
        name="sum",
        streams=tuple(STREAMS),
    )
    assert net.deliver("a", again)[0].message.reason is RefusalReason.UNEXPECTED
    # The restarted node takes part in the next round.
    assert net.run_round(streams=STREAMS).contributors == tuple(IDS)


def _refuse_first_round_on_a(refusal):
    """Inputs where node a refuses once (shape or policy) and would accept after."""
    asked = []

    def inputs(v, request):
        if v == "a" and not asked:
            asked.append(request.round)
            if refusal == "policy":
                raise PolicyRefused("not this round")
            return {"w": np.zeros(5, dtype=np.float32)}
        return {"w": np.zeros(4, dtype=np.float32)}

    return inputs


def _capture_request_to_a(captured):
    def tamper(to, msg):
        if to == "a" and isinstance(msg, RoundRequest):
            captured.append(msg)
        return msg

    return tamper


@pytest.mark.parametrize("refusal", ["shape", "policy"])
def test_node_refused_round_number_is_spent_and_refused_when_replayed(refusal):
    net = MemoryNetwork(IDS, inputs=_refuse_first_round_on_a(refusal))
    net.setup()
    cid = net.server.context_id
    captured = []
    if refusal == "shape":
        with pytest.raises(ShapeMismatch):
            net.run_round(streams=STREAMS, tamper=_capture_request_to_a(captured))
    else:
        result = net.run_round(streams=STREAMS, tamper=_capture_request_to_a(captured))
        assert "a" not in result.contributors
    assert _refusals(net, "a") == [
        RefusalReason.SHAPE if refusal == "shape" else RefusalReason.POLICY
    ]
    # Refused before any release, yet r = 1 is spent: the replay is refused.
    out = net.deliver("a", captured[0])
    assert out[0].message.reason is RefusalReason.UNEXPECTED
    assert out[0].message.fields == ("round",)
    assert net.stores["a"].last_round(cid) == 1
    assert not net.nodes["a"].holds_round_secrets(cid)
    # The next round number is accepted as usual.
    assert net.run_round(streams=STREAMS).contributors == tuple(IDS)


def test_node_refused_round_number_is_refused_after_restart_on_same_store():
    net = MemoryNetwork(IDS, inputs=_refuse_first_round_on_a("policy"))
    net.setup()
    cid = net.server.context_id
    captured = []
    net.run_round(streams=STREAMS, tamper=_capture_request_to_a(captured))
    assert _refusals(net, "a") == [RefusalReason.POLICY]
    node = net.restart_node("a")  # a fresh machine on the same MemoryNodeStore
    assert node.stage(cid) is NodeStage.READY
    out = net.deliver("a", captured[0])
    assert out[0].message.reason is RefusalReason.UNEXPECTED
    assert out[0].message.fields == ("round",)
    assert not node.holds_round_secrets(cid)
    assert net.run_round(streams=STREAMS).contributors == tuple(IDS)


def test_store_commit_twice_raises_step_already_committed():
    store = MemoryNodeStore()
    store.commit(b"x" * 32, 3, "upload", b"d")
    with pytest.raises(StepAlreadyCommitted):
        store.commit(b"x" * 32, 3, "upload", b"d")
    assert store.last_round(b"x" * 32) == 3


def test_node_round_secrets_erased_after_reveal_and_abort():
    net, _ = _ready_net()
    cid = net.server.context_id
    net.run_round(streams=STREAMS)
    assert not any(n.holds_round_secrets(cid) for n in net.nodes.values())
    with pytest.raises(PhaseTimeout):
        net.run_round(streams=STREAMS, drop={v: Phase.UNMASK for v in "abc"})
    assert not any(net.nodes[v].holds_round_secrets(cid) for v in "de")
    assert all(net.nodes[v].holds_round_secrets(cid) for v in "abc")
    for v in "abc":
        net.nodes[v].tick(net.now())  # no round_timeout configured: nothing happens
    assert net.nodes["a"].holds_round_secrets(cid)


def test_node_tick_after_round_timeout_erases_secrets():
    net, _ = _ready_net(node_options={"round_timeout": 5.0})
    cid = net.server.context_id
    with pytest.raises(PhaseTimeout):
        net.run_round(streams=STREAMS, drop={v: Phase.UNMASK for v in "abc"})
    for v in "abc":
        net.nodes[v].tick(net.now())
        assert not net.nodes[v].holds_round_secrets(cid)


def test_node_reveals_at_most_once_and_signs_one_survivor_set():
    net, _ = _ready_net()
    captured = []

    def tamper(to, msg):
        if msg.TYPE in (MsgType.SURVIVORS, MsgType.UNMASK_REQUEST) and to == "a":
            captured.append(msg)
        return msg

    net.run_round(streams=STREAMS, tamper=tamper)
    survivors, unmask = captured
    assert isinstance(survivors, Survivors) and isinstance(unmask, UnmaskRequest)
    assert net.deliver("a", unmask)[0].message.TYPE is MsgType.REFUSED
    assert net.deliver("a", survivors)[0].message.TYPE is MsgType.REFUSED


def test_node_min_survivors_policy_refuses_small_round():
    net, _ = _ready_net(node_options={"min_survivors": 5})
    with pytest.raises(RoundAborted):
        net.run_round(streams=STREAMS, drop={"e": Phase.KEYS})
    assert set(_refusals(net)) == {RefusalReason.TOO_FEW_PEERS}


def test_server_recover_with_one_bad_share_tries_other_subsets():
    server = Server(researcher_id="r", job_id="j", nodes=IDS, timeout=1.0, threshold=3)
    seed = bytes(range(16))
    shares = sharing.split(seed, threshold=3, xs=[1, 2, 3, 4, 5])
    shares[0] = sharing.Share(shares[0].x, (shares[0].y + 1) % sharing.PRIME)
    assert server._recover(shares, 16, lambda s: s == seed) == seed
    assert server._recover(shares[:3], 16, lambda s: s == seed) is None


# ------------------------------------------- server checks on rebuilt secrets


def _misbehave(net, node_id, monkeypatch, *, rewrite=None, lie_in_shares=None):
    """Make ``node_id`` a malicious node that still holds its real keys.

    ``rewrite(msg)`` replaces each message it sends. ``lie_in_shares`` (16 for
    b_u^r, 32 for c_u^r) makes it share another secret of that size than the one
    it masks with and commits or signs to: its boxes are sealed correctly, so the
    peers accept them, and only the server's check of the rebuilt secret can tell.
    """
    node = net.nodes[node_id]
    honest_handle = node.handle
    honest_split = sharing.split

    def lying_split(secret, **kw):
        if len(secret) == lie_in_shares:
            secret = bytes(range(lie_in_shares))
        return honest_split(secret, **kw)

    def handle(msg, now):
        with monkeypatch.context() as m:
            if lie_in_shares is not None and msg.TYPE is MsgType.ROUND_REQUEST:
                m.setattr(sharing, "split", lying_split)
            out = honest_handle(msg, now)
        if rewrite is not None:
            out = [dataclasses.replace(o, message=rewrite(o.message)) for o in out]
        return out

    node.handle = handle


def _assert_check_failed(net, info, node_id):
    """The round failed loudly at unmask, naming ``node_id``, and no sum exists."""
    r = net.last_round
    error = info.value
    assert type(error) is RoundAborted
    assert "did not reconstruct the committed secrets" in str(error)
    assert (
        error.nodes == (node_id,) and error.phase == "round.unmask" and error.round == r
    )
    with pytest.raises(RoundAborted):
        net.server.outcome(r)
    aborts = [
        s.message
        for s in net.seen
        if s.direction == "out"
        and s.message.TYPE is MsgType.ABORT
        and s.message.round == r
    ]
    assert aborts and all(m.reason is AbortReason.CHECK_FAILED for m in aborts)
    # The node turns honest (a fresh machine on its store) and the context survives.
    net.restart_node(node_id)


@pytest.mark.parametrize("lie", ["commitment", "shares"])
def test_server_seed_commitment_mismatch_raises_round_aborted_naming_node(
    lie, monkeypatch
):
    """c's b-shares rebuild a b_c^r other than the one its upload committed to:
    either the commitment is of another seed, or the shares are."""
    net, _ = _ready_net()

    def forge_commitment(msg):
        if isinstance(msg, MaskedInput):
            wrong = keys.seed_commitment(
                bytes(range(16)),
                transcript=net.server.transcript,
                round=msg.round,
                node=msg.sender,
            )
            return dataclasses.replace(msg, commitment=wrong)
        return msg

    if lie == "commitment":
        _misbehave(net, "c", monkeypatch, rewrite=forge_commitment)
    else:
        _misbehave(net, "c", monkeypatch, lie_in_shares=keys.SEED_SIZE)
    with pytest.raises(RoundAborted) as info:
        net.run_round(streams=STREAMS)
    _assert_check_failed(net, info, "c")
    assert net.run_round(streams=STREAMS).contributors == tuple(IDS)


@pytest.mark.parametrize("lie", ["advert", "shares"])
def test_server_dropout_mask_key_mismatch_raises_round_aborted_naming_node(
    lie, monkeypatch
):
    """d advertises C_d^r (validly signed), drops before upload, and the survivors'
    c-shares of d rebuild a c_d^r whose public key is not C_d^r."""
    net, _ = _ready_net()

    def other_key(msg):
        if isinstance(msg, RoundAdvert):
            _, public = keys.generate_x25519()
            signature = keys.sign(
                net.signing_keys["d"],
                "advert-c",
                net.server.transcript,
                msg.round,
                "d",
                public,
            )
            return dataclasses.replace(msg, mask_key=public, signature=signature)
        return msg

    if lie == "advert":
        _misbehave(net, "d", monkeypatch, rewrite=other_key)
    else:
        _misbehave(net, "d", monkeypatch, lie_in_shares=keys.SECRET_KEY_SIZE)
    with pytest.raises(RoundAborted) as info:
        net.run_round(streams=STREAMS, drop={"d": Phase.UPLOAD})
    _, c_revealed = revealed_counts(net.seen, round=net.last_round)
    assert c_revealed == {"d": 4}  # every survivor revealed its c-share of d
    _assert_check_failed(net, info, "d")
    assert net.run_round(streams=STREAMS).contributors == tuple(IDS)


# ------------------------------------------------------------------ restore


def test_server_restore_from_record_then_round_through_memory():
    net, values = _ready_net()
    first = net.run_round(streams=STREAMS)
    # A round in flight when the researcher stops: its number is spent, not resumed.
    net.server.start_round(kind="task", name="sum", streams=STREAMS, now=net.now())
    record = net.server.record()
    assert record.last_round == first.round + 1
    # The record survives its JSON form unchanged.
    doc = json.loads(json.dumps(record.to_dict()))
    assert ServerRecord.from_dict(doc) == record
    net.server = Server.restore(ServerRecord.from_dict(doc), timeout=net.timeout)
    assert net.server.stage is ServerStage.READY
    assert net.server.context_id == record.context_id
    result = net.run_round(streams=STREAMS)
    assert result.round == record.last_round + 1
    assert result.contributors == tuple(IDS)
    want = expected_integer_sum(
        values.values(), clipping_range=3.0, bits=reference_bits(5, 32), ring_bits=32
    )
    np.testing.assert_array_equal(result.integer_sums["w"].astype(np.uint64), want)


def test_server_record_before_setup_completes_raises_unexpected_message():
    server = Server(researcher_id="r", job_id="j", nodes=IDS, timeout=1.0)
    with pytest.raises(UnexpectedMessage):
        server.record()
    server.start_setup(0.0)
    with pytest.raises(UnexpectedMessage):
        server.record()


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: {"context_id": _flip(r.context_id)}, "context_id does not follow"),
        (lambda r: {"nonce": _flip(r.nonce)}, "context_id does not follow"),
        (lambda r: {"job_id": "other"}, "context_id does not follow"),
        (lambda r: {"clipping_range": 2.0}, "context_id does not follow"),
        (lambda r: {"nonce": r.nonce[:16]}, "nonce of 32 bytes"),
        (lambda r: {"transcript": b""}, "transcript of 32 bytes"),
        (lambda r: {"context_id": "00" * 32}, "context_id of 32 bytes"),
        (lambda r: {"nodes": r.nodes[::-1]}, "sorted"),
        (lambda r: {"nodes": (*r.nodes, "a")}, "sorted"),
        (lambda r: {"nodes": (*r.nodes[:-1], "bad id")}, "node id"),
        (lambda r: {"job_id": "bad job"}, "job_id"),
        (lambda r: {"researcher_id": "a"}, "not including the researcher"),
        (lambda r: {"threshold": 2}, "threshold"),
        (lambda r: {"ring_bits": 16}, "ring_bits"),
        (lambda r: {"ring_bits": True}, "ring_bits"),
        (lambda r: {"last_round": -1}, "last_round"),
        (lambda r: {"last_round": (1 << 63) - 1}, "last_round"),
        (
            lambda r: {"identity_keys": {v: r.identity_keys[v] for v in r.nodes[1:]}},
            "exactly the context's nodes",
        ),
        (
            lambda r: {"identity_keys": {**r.identity_keys, "f": bytes(32)}},
            "exactly the context's nodes",
        ),
        (
            lambda r: {"identity_keys": {**r.identity_keys, "a": bytes(31)}},
            "32 bytes",
        ),
        (
            lambda r: {"identity_keys": {**r.identity_keys, "a": r.identity_keys["b"]}},
            "share an identity key",
        ),
    ],
)
def test_server_restore_bad_record_raises_config_error(change, match):
    net, _ = _ready_net()
    record = net.server.record()
    bad = dataclasses.replace(record, **change(record))
    with pytest.raises(ConfigError, match=match):
        Server.restore(bad, timeout=1.0)
    # ConfigError is a ValueError, as DESIGN §5 says.
    with pytest.raises(ValueError):
        Server.restore(bad, timeout=1.0)
    Server.restore(record, timeout=1.0)  # the unchanged record is fine


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("transcript"),
        lambda d: d.update(nonce="zz" * 32),
        lambda d: d.update(last_round="3"),
        lambda d: d.update(nodes="a,b,c,d,e"),
        lambda d: d.update(ring_bits=32.0),
    ],
)
def test_server_record_from_bad_dict_raises_config_error(edit):
    net, _ = _ready_net()
    doc = net.server.record().to_dict()
    edit(doc)
    with pytest.raises(ConfigError, match="context record"):
        ServerRecord.from_dict(doc)


def test_clip_totals_describe_and_suggested_range():
    from mpc_runtime.protocol.round import ClipTotals

    clip = ClipTotals(clipped=7, histogram=(3, 0, 4, 0), saturated=False)
    assert clip.suggested_range(3.0) == 24.0
    assert clip.describe(3.0) == (
        "7 value(s) clipped to [-3, 3]; |x|/c histogram (1,2]=3 (2,4]=0 (4,8]=4 "
        ">8=0; suggested clipping_range=24"
    )
    capped = ClipTotals(clipped=9, histogram=(0, 0, 0, 9), saturated=True)
    assert capped.describe(0.5, "parameter(s)") == (
        "at least 9 parameter(s) clipped to [-0.5, 0.5]; |x|/c histogram (1,2]=0 "
        "(2,4]=0 (4,8]=0 >8=9; suggested clipping_range=at least 8"
    )
    assert ClipTotals(0, (0, 0, 0, 0), False).suggested_range(2.0) == 2.0
