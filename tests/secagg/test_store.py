# SPDX-License-Identifier: Apache-2.0
"""Tests of FileNodeStore: durability across restarts, the lock, erasure, corruption."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpc_runtime.errors import ConfigError, PhaseTimeout, UnexpectedMessage
from mpc_runtime.memory import MemoryNetwork, Phase
from mpc_runtime.messages import MsgType, RefusalReason, RoundRequest, StreamSpec
from mpc_runtime.protocol.node import ContextRecord, NodeStage
from mpc_runtime.protocol.store import NodeStore, StepAlreadyCommitted
from secagg.store import FileNodeStore

CID = bytes(range(32))
OTHER = bytes(32)
IDS = ["a", "b", "c", "d", "e"]
STREAMS = [StreamSpec("w", (4,))]
REPO = Path(__file__).resolve().parents[2]


def _record(context_id: bytes = CID) -> ContextRecord:
    return ContextRecord(
        context_id=context_id,
        researcher="researcher",
        nodes=("a", "b", "c"),
        ring_bits=32,
        bits=30,
        clipping_range=3.0,
        threshold=2,
        e_secret=b"\x01" * 32,
        share_key=b"\x02" * 32,
        advert_signature=b"\x03" * 64,
        identity_keys={"a": b"\x04" * 32, "b": b"\x05" * 32},
        share_keys={"b": b"\x06" * 32},
        transcript=b"\x07" * 32,
    )


@pytest.fixture
def store(tmp_path):
    with FileNodeStore(tmp_path / "node") as s:
        yield s


def _reopen(store: FileNodeStore) -> FileNodeStore:
    store.close()
    return FileNodeStore(store.directory)


def test_file_store_implements_node_store_protocol(store):
    assert isinstance(store, NodeStore)


def test_file_store_commit_twice_raises_already_committed_across_restart(store):
    store.begin_context(CID)
    store.commit(CID, 1, "upload", b"d" * 32)
    with pytest.raises(StepAlreadyCommitted):
        store.commit(CID, 1, "upload", b"e" * 32)
    store = _reopen(store)
    try:
        with pytest.raises(StepAlreadyCommitted) as info:
            store.commit(CID, 1, "upload", b"e" * 32)
        assert isinstance(info.value, UnexpectedMessage)
        assert (info.value.phase, info.value.round) == ("upload", 1)
        assert store.committed(CID, 1, "upload") == b"d" * 32
        assert store.committed(CID, 1, "reveal") is None
        store.commit(CID, 1, "reveal", b"r")  # Another phase is another step.
    finally:
        store.close()


def test_file_store_seen_contexts_and_last_round_survive_restart(store):
    assert not store.seen_context(CID) and store.last_round(CID) == 0
    store.begin_context(CID)
    store.commit(CID, 0, "advert-e", b"x")
    store.commit(CID, 3, "advert-c", b"y")
    store.commit(CID, 2, "advert-c", b"z")
    store = _reopen(store)
    try:
        assert store.seen_context(CID) and not store.seen_context(OTHER)
        assert store.last_round(CID) == 3 and store.last_round(OTHER) == 0
        with pytest.raises(StepAlreadyCommitted):
            store.begin_context(CID)
        store.begin_context(OTHER)
    finally:
        store.close()
    with FileNodeStore(store.directory) as again:
        assert again.seen_context(OTHER) and again.last_round(OTHER) == 0


def test_file_store_lock_refuses_second_store(store):
    with pytest.raises(ConfigError, match="node directory is in use"):
        FileNodeStore(store.directory)
    store.close()
    with FileNodeStore(store.directory) as again:  # Released on close.
        assert isinstance(again, FileNodeStore)


def test_file_store_lock_refuses_another_process(store):
    code = (
        "import sys\nfrom secagg.store import FileNodeStore\n"
        "from mpc_runtime.errors import ConfigError\n"
        "try:\n    FileNodeStore(sys.argv[1])\n"
        "except ConfigError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(store.directory)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert "node directory is in use" in done.stdout


def test_file_store_closed_store_refuses_writes(store):
    store.close()
    with pytest.raises(ConfigError, match="closed"):
        store.commit(CID, 1, "upload", b"d")


def test_file_store_context_record_round_trip_0600(store):
    assert store.load_context(CID) is None
    store.begin_context(CID)
    store.save_context(CID, _record())
    path = store.directory / "state" / "contexts" / CID.hex() / "context.msgpack"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = _reopen(store)
    try:
        loaded = store.load_context(CID)
        assert loaded == _record() and isinstance(loaded.nodes, tuple)
    finally:
        store.close()


def test_file_store_save_context_rejects_other_records(store):
    with pytest.raises(TypeError, match="expected record ContextRecord"):
        store.save_context(CID, {"e": b"x"})


def test_file_store_drop_context_removes_secret(store):
    store.begin_context(CID)
    store.save_context(CID, _record())
    path = store.directory / "state" / "contexts" / CID.hex() / "context.msgpack"
    assert path.exists()
    store.drop_context(CID)
    assert not path.exists() and store.load_context(CID) is None
    store.drop_context(CID)  # Idempotent.
    assert store.seen_context(CID)  # The context id stays spent.
    leftovers = [p.name for p in path.parent.iterdir()]
    assert leftovers == ["steps"]
    assert not any(b"\x01" * 32 in p.read_bytes() for p in _files(store.directory))


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_file_store_pins_survive_restart_first_pin_wins(store):
    assert store.pinned_key("b") is None
    store.pin_key("b", b"k" * 32)
    store.pin_key("b", b"z" * 32)
    assert store.pinned_key("b") == b"k" * 32
    store = _reopen(store)
    try:
        assert store.pinned_key("b") == b"k" * 32
    finally:
        store.close()


def test_file_store_corrupted_step_raises_config_error_naming_it(store):
    store.begin_context(CID)
    store.commit(CID, 1, "upload", b"d")
    store.close()
    step = next((store.directory / "state").rglob("*.upload.msgpack"))
    step.write_bytes(b"\xc1garbage")
    with pytest.raises(ConfigError, match=f"{step.name}: corrupted state file"):
        FileNodeStore(store.directory)


def test_file_store_step_with_wrong_fields_raises_config_error(store):
    store.begin_context(CID)
    store.commit(CID, 1, "upload", b"d")
    store.close()
    step = next((store.directory / "state").rglob("*.upload.msgpack"))
    step.rename(step.with_name(f"{2:020d}.upload.msgpack"))
    with pytest.raises(ConfigError, match="corrupted state file"):
        FileNodeStore(store.directory)


def test_file_store_corrupted_record_raises_config_error(store):
    store.begin_context(CID)
    store.save_context(CID, _record())
    path = store.directory / "state" / "contexts" / CID.hex() / "context.msgpack"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"context\.msgpack: corrupted state file"):
        store.load_context(CID)


def test_file_store_record_with_open_permissions_refused(store):
    store.begin_context(CID)
    store.save_context(CID, _record())
    path = store.directory / "state" / "contexts" / CID.hex() / "context.msgpack"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="too open"):
        store.load_context(CID)


def test_file_store_unexpected_entry_raises_config_error(store):
    store.close()
    (store.directory / "state" / "contexts" / "not-hex").mkdir()
    with pytest.raises(ConfigError, match="unexpected entry"):
        FileNodeStore(store.directory)


def test_file_store_interrupted_commit_leaves_no_step(store, monkeypatch):
    store.begin_context(CID)

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.commit(CID, 1, "upload", b"d")
    monkeypatch.undo()
    assert store.committed(CID, 1, "upload") is None
    store = _reopen(store)
    try:
        assert store.last_round(CID) == 0
        store.commit(CID, 1, "upload", b"d")
        assert not [p for p in _files(store.directory) if p.name.endswith(".tmp")]
    finally:
        store.close()


def test_file_store_leftover_temp_file_is_discarded_on_open(store):
    store.begin_context(CID)
    store.close()
    steps = store.directory / "state" / "contexts" / CID.hex() / "steps"
    (steps / f".{1:020d}.upload.msgpack.0123456789ab.tmp").write_bytes(b"partial")
    with FileNodeStore(store.directory) as again:
        assert again.last_round(CID) == 0
    assert list(steps.iterdir()) == []


# ------------------------------------------ the protocol machine on real files


def _file_net(tmp_path: Path, **kw) -> tuple[MemoryNetwork, dict[str, FileNodeStore]]:
    rng = np.random.default_rng(0)
    values = {v: rng.uniform(-1, 1, size=4).astype(np.float32) for v in IDS}
    net = MemoryNetwork(IDS, inputs=lambda v, request: {"w": values[v]}, **kw)
    # MemoryNetwork has no store factory: it keeps its stores in ``net.stores``
    # and builds every Node from there, so swapping them in and re-making the
    # (still fresh) nodes runs the protocol on FileNodeStore.
    stores = {}
    for v in IDS:
        stores[v] = FileNodeStore(tmp_path / v)
        net.stores[v] = stores[v]  # type: ignore[assignment]
        net.restart_node(v)
    return net, stores


def _restart_with_new_store(net, stores, tmp_path, v):
    stores[v].close()
    stores[v] = FileNodeStore(tmp_path / v)
    net.stores[v] = stores[v]
    return net.restart_node(v)


def test_file_store_node_restart_after_upload_never_redoes_committed_steps(tmp_path):
    net, stores = _file_net(tmp_path)
    try:
        net.setup()
        captured = {}

        def tamper(to, msg):
            if msg.TYPE is MsgType.SURVIVORS:
                captured[to] = msg
                if to == "a":
                    return None
            return msg

        # "a" uploads, then crashes before signing S (as in test_protocol.py).
        with pytest.raises(PhaseTimeout):
            net.run_round(
                streams=STREAMS,
                drop={"b": Phase.SURVIVORS, "c": Phase.SURVIVORS},
                tamper=tamper,
            )
        # A real restart: a new process would open a new store on the same files.
        node = _restart_with_new_store(net, stores, tmp_path, "a")
        cid = net.server.context_id
        assert node.stage(cid) is NodeStage.READY
        assert not node.holds_round_secrets(cid)
        assert stores["a"].committed(cid, 1, "upload") is not None
        assert stores["a"].last_round(cid) == 1
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
        assert stores["a"].last_round(cid) == 2
    finally:
        for s in stores.values():
            s.close()


def test_file_store_node_refuses_replayed_setup_after_restart(tmp_path):
    net, stores = _file_net(tmp_path)
    try:
        setup_requests = []

        def tamper(to, msg):
            if msg.TYPE is MsgType.SETUP_REQUEST and to == "a":
                setup_requests.append(msg)
            return msg

        net.setup(tamper=tamper)
        _restart_with_new_store(net, stores, tmp_path, "a")
        # The fresh machine knows nothing; only the files say the id was seen.
        out = net.deliver("a", setup_requests[0])
        assert out[0].message.reason is RefusalReason.CONTEXT_SEEN
    finally:
        for s in stores.values():
            s.close()


def test_file_store_tofu_pins_persist(tmp_path):
    net, stores = _file_net(tmp_path, peer_trust="tofu")
    try:
        net.setup()
        stores["a"].close()
        with FileNodeStore(tmp_path / "a") as again:
            assert again.pinned_key("b") == net.public_keys["b"]
            assert again.pinned_key("a") is None
    finally:
        for s in stores.values():
            s.close()


def test_file_store_record_is_a_dataclass_copy(store):
    # The store returns what it saved, not an alias the node could mutate.
    rec = _record()
    store.begin_context(CID)
    store.save_context(CID, rec)
    loaded = store.load_context(CID)
    assert loaded == rec and loaded is not rec
    assert dataclasses.asdict(loaded) == dataclasses.asdict(rec)
