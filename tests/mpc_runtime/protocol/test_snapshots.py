# SPDX-License-Identifier: Apache-2.0
"""Snapshots for drivers whose process does not outlive a message.

``MemoryNodeStore.snapshot``/``from_snapshot``, ``ContextRecord.to_dict``/
``from_dict`` and ``Node.export_contexts``/``import_contexts``: every node is
rebuilt from msgpack-ed snapshots mid-setup and mid-round, and the round still
gives the exact sum; malformed snapshots are refused with ConfigError.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import numpy as np
import pytest

from mpc_runtime.errors import ConfigError
from mpc_runtime.memory import MemoryNetwork
from mpc_runtime.messages import Message, MsgType, StreamSpec
from mpc_runtime.protocol.node import ContextRecord, Node, NodeStage
from mpc_runtime.protocol.store import MemoryNodeStore

from ._support import expected_integer_sum, reference_bits

IDS = ["a", "b", "c", "d", "e"]
STREAMS = [StreamSpec("w", (4,)), StreamSpec("v", (2, 3))]


def _values(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        v: {
            s.name: rng.uniform(-1, 1, size=s.shape).astype(np.float32) for s in STREAMS
        }
        for v in IDS
    }


def _net(values: dict[str, dict[str, np.ndarray]]) -> MemoryNetwork:
    return MemoryNetwork(
        IDS,
        inputs=lambda v, request: {s.name: values[v][s.name] for s in request.streams},
    )


def _msgpack(doc: Any) -> Any:
    """Through msgpack as a driver would keep it (proves it is plain data)."""
    return msgpack.unpackb(
        msgpack.packb(doc, use_bin_type=True), raw=False, strict_map_key=True
    )


def _restart_from_snapshot(net: MemoryNetwork, v: str) -> Node:
    """Replace node ``v`` by a fresh machine built only from its snapshots."""
    store_doc = _msgpack(net.stores[v].snapshot())
    docs, arrays = net.nodes[v].export_contexts()
    docs = _msgpack(docs)
    arrays = {k: np.array(a, copy=True) for k, a in arrays.items()}
    net.stores[v] = MemoryNodeStore.from_snapshot(store_doc)
    node = net.restart_node(v)
    node.import_contexts(docs, arrays)
    return node


def _restart_all_before(msg_type: MsgType, net: MemoryNetwork, seen: list[NodeStage]):
    cid_stage: dict[str, bool] = {}

    def tamper(to: str, msg: Message) -> Message:
        if msg.TYPE is msg_type and not cid_stage.get(to):
            cid_stage[to] = True
            stage = net.nodes[to].stage(msg.context_id)
            assert stage is not None
            seen.append(stage)
            _restart_from_snapshot(net, to)
            assert net.nodes[to].stage(msg.context_id) is stage
        return msg

    return tamper


def _check_exact_sum(result: Any, values: dict[str, dict[str, np.ndarray]]) -> None:
    assert result.contributors == tuple(IDS)
    for s in STREAMS:
        want = expected_integer_sum(
            [values[v][s.name] for v in IDS],
            clipping_range=3.0,
            bits=reference_bits(len(IDS), 32),
            ring_bits=32,
        )
        got = result.integer_sums[s.name].astype(np.uint64).ravel()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("before", "stage"),
    [
        (MsgType.ROUND_ADVERTS, NodeStage.KEYS_SENT),
        (MsgType.SURVIVORS, NodeStage.UPLOADED),
        (MsgType.UNMASK_REQUEST, NodeStage.SURVIVORS_SIGNED),
    ],
)
def test_round_completes_with_exact_sum_after_restart_from_snapshots(before, stage):
    values = _values()
    net = _net(values)
    net.setup()
    seen: list[NodeStage] = []
    result = net.run_round(
        streams=STREAMS, tamper=_restart_all_before(before, net, seen)
    )
    assert seen == [stage] * len(IDS)
    _check_exact_sum(result, values)
    cid = net.server.context_id
    assert not any(n.holds_round_secrets(cid) for n in net.nodes.values())
    # After the round, the export holds no secrets (ready contexts are left out).
    assert all(n.export_contexts() == ([], {}) for n in net.nodes.values())
    # And the next round runs on the restored machines as usual.
    _check_exact_sum(net.run_round(streams=STREAMS), values)


@pytest.mark.parametrize(
    ("before", "stage"),
    [
        (MsgType.CONTEXT_ADVERTS, NodeStage.ADVERTISED),
        (MsgType.TRANSCRIPT_SIGS, NodeStage.TRANSCRIPT_SIGNED),
    ],
)
def test_setup_completes_after_restart_from_snapshots(before, stage):
    values = _values(1)
    net = _net(values)
    seen: list[NodeStage] = []
    net.setup(tamper=_restart_all_before(before, net, seen))
    assert seen == [stage] * len(IDS)
    cid = net.server.context_id
    assert all(n.stage(cid) is NodeStage.READY for n in net.nodes.values())
    _check_exact_sum(net.run_round(streams=STREAMS), values)


def test_export_mid_round_holds_the_round_secrets_and_inputs():
    values = _values()
    net = _net(values)
    net.setup()
    cid = net.server.context_id
    exported: list[tuple[list[dict[str, Any]], dict[str, np.ndarray]]] = []

    def tamper(to: str, msg: Message) -> Message:
        if msg.TYPE is MsgType.ROUND_ADVERTS and to == "a":
            exported.append(net.nodes["a"].export_contexts())
        return msg

    net.run_round(streams=STREAMS, tamper=tamper)
    [(docs, arrays)] = exported
    [doc] = docs
    assert doc["stage"] == "keys_sent"
    assert doc["record"]["context_id"] == cid
    assert doc["round"]["c_secret"] and doc["round"]["b_seed"]
    assert set(arrays) == {f"{cid.hex()}/w", f"{cid.hex()}/v"}
    np.testing.assert_array_equal(arrays[f"{cid.hex()}/w"], values["a"]["w"])


# ------------------------------------------------------------------ store


def _store_with_data() -> tuple[MemoryNodeStore, ContextRecord]:
    net = _net(_values())
    net.setup()
    net.run_round(streams=STREAMS)
    store = net.stores["a"]
    store.pin_key("peer", b"k" * 32)
    record = store.load_context(net.server.context_id)
    assert isinstance(record, ContextRecord)
    return store, record


def test_store_snapshot_round_trips():
    store, record = _store_with_data()
    cid = record.context_id
    doc = _msgpack(store.snapshot())
    again = MemoryNodeStore.from_snapshot(doc)
    assert again.snapshot() == doc
    assert again.seen_context(cid)
    assert again.last_round(cid) == store.last_round(cid) == 1
    assert again.committed(cid, 1, "upload") == store.committed(cid, 1, "upload")
    assert again.pinned_key("peer") == b"k" * 32
    assert again.load_context(cid) == record


def test_store_snapshot_refuses_foreign_records():
    store = MemoryNodeStore()
    store.save_context(b"x" * 32, {"e": b"secret"})
    with pytest.raises(TypeError, match="expected record ContextRecord"):
        store.snapshot()


def _bad_store_docs(doc: dict[str, Any]) -> list[Any]:
    bad: list[Any] = []

    def variant(path: tuple[Any, ...], value: Any) -> None:
        d = copy.deepcopy(doc)
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        bad.append(d)

    variant(("seen",), "nope")
    variant(("seen", 0), b"")
    variant(("seen", 0), b"x" * 65)
    variant(("steps", 0), [b"x" * 32, 1, "upload"])
    variant(("steps", 0, 1), -1)
    variant(("steps", 0, 1), True)
    variant(("steps", 0, 1), 10**20)
    variant(("steps", 0, 2), "p" * 33)
    variant(("steps", 0, 3), "digest")
    variant(("last", 0), [b"x" * 32])
    variant(("contexts", 0, "threshold"), "3")
    variant(("contexts", 0, "nodes"), "abc")
    variant(("contexts", 0, "extra"), 1)
    variant(("contexts", 0), [])
    variant(("pins",), [])
    variant(("pins", "peer"), "key")
    variant(("extra",), 1)
    d = copy.deepcopy(doc)
    del d["pins"]
    bad.append(d)
    return bad


def test_store_from_snapshot_refuses_malformed_docs():
    store, _ = _store_with_data()
    doc = _msgpack(store.snapshot())
    for bad in _bad_store_docs(doc):
        with pytest.raises(ConfigError, match="node store snapshot"):
            MemoryNodeStore.from_snapshot(bad)
    with pytest.raises(ConfigError, match="^here: "):
        MemoryNodeStore.from_snapshot({"seen": 1}, where="here")


def test_context_record_dict_round_trips_and_is_checked():
    _, record = _store_with_data()
    doc = _msgpack(record.to_dict())
    assert list(doc) == [
        "context_id",
        "researcher",
        "nodes",
        "ring_bits",
        "bits",
        "clipping_range",
        "threshold",
        "e_secret",
        "share_key",
        "advert_signature",
        "identity_keys",
        "share_keys",
        "transcript",
    ]
    again = ContextRecord.from_dict(doc)
    assert again == record and isinstance(again.nodes, tuple)
    for name, value in [
        ("bits", True),
        ("clipping_range", 3),
        ("e_secret", "s"),
        ("nodes", ["a", 1]),
        ("share_keys", {"a": "k"}),
    ]:
        with pytest.raises(
            ConfigError, match=rf"^rec: corrupted context record \({name}\)"
        ):
            ContextRecord.from_dict({**doc, name: value}, where="rec")


# ---------------------------------------------------------------- contexts


def _mid_round_export() -> tuple[
    MemoryNetwork, list[dict[str, Any]], dict[str, np.ndarray]
]:
    net = _net(_values())
    net.setup()
    exported: list[Any] = []

    def tamper(to: str, msg: Message) -> Message:
        if msg.TYPE is MsgType.ROUND_ADVERTS and to == "a":
            exported.append(net.nodes["a"].export_contexts())
        return msg

    net.run_round(streams=STREAMS, tamper=tamper)
    [(docs, arrays)] = exported
    return net, _msgpack(docs), arrays


def _bad_context_snapshots(
    docs: list[dict[str, Any]], arrays: dict[str, np.ndarray]
) -> list[tuple[Any, dict[str, np.ndarray]]]:
    key = next(iter(arrays))
    bad: list[tuple[Any, dict[str, np.ndarray]]] = []

    def doc_variant(change) -> None:
        d = copy.deepcopy(docs)
        change(d[0])
        bad.append((d, arrays))

    doc_variant(lambda d: d.update(stage="failed"))
    doc_variant(lambda d: d.update(stage="ready"))
    doc_variant(lambda d: d.update(stage="nope"))
    doc_variant(lambda d: d.update(round=None))
    doc_variant(lambda d: d.update(extra=1))
    doc_variant(lambda d: d.pop("record"))
    doc_variant(lambda d: d["record"].update(threshold=None))
    doc_variant(lambda d: d["round"].update(request=b"not a message"))
    doc_variant(lambda d: d["round"].update(round=d["round"]["round"] + 1))
    doc_variant(lambda d: d["round"].update(own_c=b"short"))
    doc_variant(lambda d: d["round"].update(held_b={"b": b"short"}))
    doc_variant(lambda d: d["round"].update(peers="abc"))
    doc_variant(lambda d: d["round"].update(started=1))
    doc_variant(lambda d: d["round"].update(inputs=["w"]))
    doc_variant(lambda d: d["round"].update(stowaway=1))
    doc_variant(lambda d: d["round"].pop("c_secret"))
    doc_variant(lambda d: d.update(stage="uploaded"))  # inputs are gone by then
    bad.append(("nope", arrays))
    bad.append(([1], arrays))
    bad.append((docs, {k: v for k, v in arrays.items() if k != key}))
    bad.append((docs, {**arrays, key: arrays[key].astype(np.int64)}))
    bad.append((docs, {**arrays, key: arrays[key][:1]}))
    bad.append((docs, {**arrays, key: [0.0] * arrays[key].size}))
    return bad


def test_import_contexts_round_trips_into_a_fresh_node():
    net, docs, arrays = _mid_round_export()
    cid = net.server.context_id
    fresh = net.restart_node("a")
    assert fresh.stage(cid) is NodeStage.READY  # from the store only
    fresh.import_contexts(docs, arrays)
    assert fresh.stage(cid) is NodeStage.KEYS_SENT
    assert fresh.holds_round_secrets(cid)
    again, again_arrays = fresh.export_contexts()
    assert _msgpack(again) == docs
    assert again_arrays.keys() == arrays.keys()


def test_import_contexts_refuses_malformed_snapshots_and_changes_nothing():
    net, docs, arrays = _mid_round_export()
    cid = net.server.context_id
    for bad_docs, bad_arrays in _bad_context_snapshots(docs, arrays):
        fresh = net.restart_node("a")
        with pytest.raises(ConfigError, match="node snapshot"):
            fresh.import_contexts(bad_docs, bad_arrays)
        assert not fresh.holds_round_secrets(cid)
    with pytest.raises(ConfigError, match="^there: "):
        net.restart_node("a").import_contexts([{}], {}, where="there")
