# SPDX-License-Identifier: Apache-2.0
"""secagg inside Flower: the Mod and the workflow, driven in-process (no Ray).

The whole module needs the ``flower`` extra (``pip install -e '.[flower,test]'``)
and is skipped without it. Every test runs Flower's own ``DefaultWorkflow`` and
``ClientApp`` (with an unmodified ``NumPyClient``) over
:class:`secagg.integrations.flower.InProcessGrid`, which carries every message
through Flower's serialization and every node context through its protobuf form.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import LegacyContext, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import DefaultWorkflow  # noqa: E402

from mpc_runtime import masking  # noqa: E402
from mpc_runtime.errors import (  # noqa: E402
    ClippingWarning,
    ConfigError,
    PhaseTimeout,
    RoundAborted,
    ShapeMismatch,
    ThresholdError,
)
from secagg.integrations.flower import (  # noqa: E402
    InProcessGrid,
    SecureAggregationWorkflow,
    _state,  # noqa: E402
    make_secure_aggregation_mod,
    secure_aggregation_mod,
)

N_CLIENTS = 5
FIRST = 1001
SHAPES = [(4, 3), (3,), (2, 2, 2)]
C = 3.0


class _Recorder:
    """What each client returned from fit, by (Flower round, node id)."""

    def __init__(self) -> None:
        self.returned: dict[tuple[int, int], list[np.ndarray]] = {}


def _client_app(
    rec: _Recorder,
    *,
    scale: float = 1.0,
    fail: Callable[[int, int], bool] | None = None,
    mods: list[Any] | None = None,
) -> ClientApp:
    class Client(NumPyClient):  # an ordinary user client: nothing secagg in it
        def __init__(self, node_id: int) -> None:
            self.node_id = node_id

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return [np.zeros(s, dtype=np.float32) for s in SHAPES]

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            rnd = int(config.get("server_round", 0))
            if fail is not None and fail(rnd, self.node_id):
                raise RuntimeError("local training failed")
            rng = np.random.default_rng([rnd, self.node_id])
            out = [
                (0.5 * p + scale * rng.uniform(-1.4, 1.4, p.shape)).astype(np.float32)
                for p in parameters
            ]
            rec.returned[(rnd, self.node_id)] = out
            return out, 10 + self.node_id % 7, {"node": self.node_id}

        def evaluate(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[float, int, dict[str, Any]]:
            return 0.0, 1, {}

    def client_fn(context: Context) -> Any:
        return Client(context.node_id).to_client()

    return ClientApp(
        client_fn=client_fn,
        mods=[secure_aggregation_mod] if mods is None else mods,
    )


def _strategy() -> FedAvg:
    from flwr.common import ndarrays_to_parameters

    # Initial parameters, so no random client is asked for them (deterministic).
    return FedAvg(
        fraction_evaluate=0.0,
        min_fit_clients=N_CLIENTS,
        min_available_clients=N_CLIENTS,
        on_fit_config_fn=lambda rnd: {"server_round": rnd},
        initial_parameters=ndarrays_to_parameters(
            [np.zeros(s, dtype=np.float32) for s in SHAPES]
        ),
    )


def _run(
    app: ClientApp,
    workflow: Any,
    *,
    rounds: int = 3,
    drop: Callable[[int, Message], bool] | None = None,
    strategy: FedAvg | None = None,
) -> tuple[InProcessGrid, LegacyContext]:
    grid = InProcessGrid(app, N_CLIENTS, first_node_id=FIRST, drop=drop)
    context = LegacyContext(
        context=Context(
            run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy or _strategy(),
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, context)
    return grid, context


def _stage(msg: Message) -> str | None:
    record = msg.content.config_records.get("secagg") if msg.has_content() else None
    return None if record is None else str(record["stage"])


def _global_model(context: LegacyContext) -> list[np.ndarray]:
    return parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            context.state.array_records["parameters"], keep_input=True
        )
    )


def _check_mean(
    workflow: SecureAggregationWorkflow,
    rec: _Recorder,
    rnd: int,
    contributors: set[int],
    n_context: int = N_CLIENTS,
) -> None:
    res = workflow.results[rnd]
    assert set(res.contributors) == contributors
    m = len(contributors)
    # DESIGN §4: error per element of the sum <= m*c/(2^b - 1), so of the mean
    # <= c/(2^b - 1); b counts the nodes of the context.
    bound = C / (2 ** masking.bits_for(n_context, 32) - 1)
    for i, shape in enumerate(SHAPES):
        expected = np.mean(
            [rec.returned[(rnd, nid)][i].astype(np.float64) for nid in contributors],
            axis=0,
        )
        assert res.mean[i].shape == shape
        assert res.mean[i].dtype == np.float64
        np.testing.assert_allclose(res.mean[i], expected, rtol=0, atol=bound)
        np.testing.assert_allclose(res.sum[i], expected * m, rtol=0, atol=m * bound)


# ------------------------------------------------------------------- the round


def test_flower_rounds_no_dropout_mean_of_all_within_design_bound() -> None:
    rec = _Recorder()
    workflow = SecureAggregationWorkflow(timeout=5, clipping_range=C)
    grid, context = _run(_client_app(rec), workflow, rounds=3)
    everyone = set(range(FIRST, FIRST + N_CLIENTS))
    for rnd in (1, 2, 3):
        _check_mean(workflow, rec, rnd, everyone)
    # One context for the three rounds: setup once, protocol rounds 1..3.
    assert "setup" in workflow.results[1].timings
    assert "setup" not in workflow.results[2].timings
    assert [workflow.results[r].protocol_round for r in (1, 2, 3)] == [1, 2, 3]
    # The strategy (FedAvg, weighted by examples) returns the unweighted mean,
    # in the model's dtype (float32 here).
    model = _global_model(context)
    for got, want in zip(model, workflow.results[3].mean):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Round r trained on round r-1's mean (the request binds those weights).
    assert not workflow.errors


def test_flower_result_dtype_float64_hands_the_strategy_the_decoded_mean() -> None:
    rec = _Recorder()
    workflow = SecureAggregationWorkflow(timeout=5, result_dtype="float64")
    _, context = _run(_client_app(rec), workflow, rounds=1)
    for got, want in zip(_global_model(context), workflow.results[1].mean):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_flower_upload_is_raw_uint32_about_4_bytes_per_parameter() -> None:
    rec = _Recorder()
    workflow = SecureAggregationWorkflow(timeout=5)
    global SHAPES
    saved, SHAPES = SHAPES, [(500, 1000), (100000,)]  # 2.4 MB: two 2 MiB chunks
    try:
        grid, _ = _run(_client_app(rec), workflow, rounds=1)
    finally:
        SHAPES = saved
    d = 600000
    # Everything Flower carries for the upload (chunks, headers, its own object
    # metadata) per parameter: DESIGN §6 asks <= 4.01 at d = 10^6.
    per_param = grid.traffic.up["secagg:upload"] / (N_CLIENTS * d)
    assert 4.0 < per_param <= 4.01


@pytest.mark.parametrize(
    ("stage", "rnd", "counted"),
    [
        ("hello", 1, False),
        ("setup", 1, False),
        ("setup.transcript", 1, False),
        ("keys", 2, False),
        ("upload", 2, False),
        # DESIGN §1: an upload that arrived before the unmask request counts.
        ("survivors", 2, True),
        ("unmask", 2, True),
    ],
)
def test_flower_client_drops_at_stage_survivors_mean_returned(
    stage: str, rnd: int, counted: bool
) -> None:
    rec = _Recorder()
    dropper = FIRST + 2
    current = {"round": 0}

    def drop(nid: int, msg: Message) -> bool:
        current["round"] = int(msg.metadata.group_id or 0)
        return nid == dropper and current["round"] == rnd and _stage(msg) == stage

    workflow = SecureAggregationWorkflow(timeout=5, clipping_range=C)
    _, context = _run(_client_app(rec), workflow, rounds=3, drop=drop)
    everyone = set(range(FIRST, FIRST + N_CLIENTS))
    expected = everyone if counted else everyone - {dropper}
    # A context without the client (setup retried without it) has n = 4.
    n_context = N_CLIENTS - 1 if stage in ("hello", "setup", "setup.transcript") else 5
    _check_mean(workflow, rec, rnd, expected, n_context)
    assert workflow.results[rnd].dropped == (() if counted else (dropper,))
    # The client is back in the next round (a new context, or the same one).
    _check_mean(workflow, rec, rnd + 1, everyone)
    # A setup without the client is not reused once it answers again.
    resetup = stage in ("hello", "setup", "setup.transcript")
    assert ("setup" in workflow.results[rnd + 1].timings) == resetup
    assert not workflow.errors


def test_flower_client_crashes_for_good_rounds_go_on_without_it() -> None:
    rec = _Recorder()
    dead = FIRST + 1

    def drop(nid: int, msg: Message) -> bool:
        return nid == dead and int(msg.metadata.group_id) >= 2

    workflow = SecureAggregationWorkflow(timeout=5)
    _run(_client_app(rec), workflow, rounds=4, drop=drop)
    everyone = set(range(FIRST, FIRST + N_CLIENTS))
    _check_mean(workflow, rec, 1, everyone)
    for rnd in (2, 3, 4):
        # The same context: a silent client costs a deadline, not a new setup.
        _check_mean(workflow, rec, rnd, everyone - {dead})
        assert "setup" not in workflow.results[rnd].timings


def test_flower_client_misses_end_of_setup_context_set_up_again() -> None:
    rec = _Recorder()
    late = FIRST + 3

    # Round 1's first request carries the end of setup (the transcript
    # signatures): a client that misses it never becomes ready in that context.
    def drop(nid: int, msg: Message) -> bool:
        return nid == late and msg.metadata.group_id == "1" and _stage(msg) == "keys"

    workflow = SecureAggregationWorkflow(timeout=5)
    _run(_client_app(rec), workflow, rounds=3, drop=drop)
    everyone = set(range(FIRST, FIRST + N_CLIENTS))
    _check_mean(workflow, rec, 1, everyone - {late})
    _check_mean(workflow, rec, 2, everyone - {late})  # it refuses: not ready
    _check_mean(workflow, rec, 3, everyone)  # a new context includes it again
    assert "setup" in workflow.results[3].timings


@pytest.mark.parametrize("stage", ["keys", "upload", "survivors", "unmask"])
def test_flower_too_many_dropouts_round_aborts_with_named_error(stage: str) -> None:
    rec = _Recorder()
    droppers = {FIRST, FIRST + 1, FIRST + 2}  # 2 of 5 left, t = 3

    def drop(nid: int, msg: Message) -> bool:
        return (
            nid in droppers and msg.metadata.group_id == "1" and (_stage(msg) == stage)
        )

    workflow = SecureAggregationWorkflow(timeout=5)
    with pytest.raises(PhaseTimeout) as info:
        _run(_client_app(rec), workflow, rounds=1, drop=drop)
    assert info.value.phase == f"round.{stage}"
    assert set(info.value.nodes) <= {f"flwr-{nid}" for nid in droppers}
    assert info.value.nodes
    assert 1 in workflow.errors


def test_flower_abort_skip_keeps_model_and_next_round_succeeds() -> None:
    rec = _Recorder()
    droppers = {FIRST, FIRST + 1, FIRST + 2}

    def drop(nid: int, msg: Message) -> bool:
        return (
            nid in droppers
            and msg.metadata.group_id == "2"
            and (_stage(msg) == "upload")
        )

    workflow = SecureAggregationWorkflow(timeout=5, on_abort="skip")
    _, context = _run(_client_app(rec), workflow, rounds=3, drop=drop)
    assert isinstance(workflow.errors[2], PhaseTimeout)
    assert set(workflow.results) == {1, 3}
    # Round 3 trained on round 1's mean: round 2 changed nothing.
    everyone = set(range(FIRST, FIRST + N_CLIENTS))
    _check_mean(workflow, rec, 3, everyone)


def test_flower_fit_raises_client_is_a_dropout() -> None:
    rec = _Recorder()
    bad = FIRST + 4

    workflow = SecureAggregationWorkflow(timeout=5)
    app = _client_app(rec, fail=lambda rnd, nid: rnd == 2 and nid == bad)
    _run(app, workflow, rounds=2)
    everyone = set(range(FIRST, FIRST + N_CLIENTS))
    _check_mean(workflow, rec, 2, everyone - {bad})


def test_flower_fit_returns_other_shape_round_aborts_shape_mismatch() -> None:
    class Odd(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            return [np.zeros(5, dtype=np.float32)], 1, {}

    rec = _Recorder()
    normal = _client_app(rec)

    def client_fn(context: Context) -> Any:
        if context.node_id == FIRST:
            return Odd().to_client()
        raise AssertionError("unused")

    odd_app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])

    def app_call(msg: Message, ctx: Context) -> Message:
        return (odd_app if ctx.node_id == FIRST else normal)(msg, ctx)

    workflow = SecureAggregationWorkflow(timeout=5)
    with pytest.raises(ShapeMismatch) as info:
        _run(app_call, workflow, rounds=1)  # type: ignore[arg-type]
    assert info.value.nodes == (f"flwr-{FIRST}",)


def test_flower_clipping_warns_on_clients_and_server_with_totals() -> None:
    rec = _Recorder()
    workflow = SecureAggregationWorkflow(timeout=5, clipping_range=C)
    with pytest.warns(ClippingWarning) as caught:
        _run(_client_app(rec, scale=3.0), workflow, rounds=1)
    texts = [str(w.message) for w in caught]
    assert any("suggested clipping_range" in t for t in texts)  # the server
    assert any("clipped to ±3.0" in t for t in texts)  # a client
    clip = workflow.results[1].clipping
    expected = sum(
        int(np.sum(np.abs(a) > C)) for arrays in rec.returned.values() for a in arrays
    )
    assert clip.clipped == expected > 0


# ------------------------------------------------------ node directories


def _node_dirs(
    tmp_path: Path, *, skip_trust: tuple[int, int] | None = None
) -> list[Path]:
    from secagg import files

    files.init_researcher(tmp_path / "researcher")
    dirs = []
    for i in range(N_CLIENTS):
        d = tmp_path / f"hospital-{i}"
        files.init_node(
            d,
            f"hospital-{i}",
            "tcp://127.0.0.1:5555",
            tmp_path / "researcher" / "researcher.pub",
        )
        dirs.append(d)
    for i, d in enumerate(dirs):
        peers = [
            o / "node.pub"
            for j, o in enumerate(dirs)
            if j != i and (i, j) != skip_trust
        ]
        files.trust_peers(d, peers)
    return dirs


def _run_dirs(
    app: ClientApp, workflow: Any, dirs: list[Path], rounds: int
) -> InProcessGrid:
    grid = InProcessGrid(
        app,
        N_CLIENTS,
        first_node_id=FIRST,
        node_config=lambda i: {"secagg-dir": str(dirs[i])},
    )
    context = LegacyContext(
        context=Context(
            run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=rounds),
        strategy=_strategy(),
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, context)
    return grid


def test_flower_node_directories_roster_ids_and_durable_store(tmp_path: Path) -> None:
    dirs = _node_dirs(tmp_path)
    rec = _Recorder()
    workflow = SecureAggregationWorkflow(timeout=5)
    _run_dirs(_client_app(rec), workflow, dirs, rounds=2)
    everyone = set(range(FIRST, FIRST + N_CLIENTS))
    _check_mean(workflow, rec, 2, everyone)
    assert workflow._ids[FIRST][0] == "hospital-0"
    # Commits and the ready context are on the node's disk, apart from the
    # daemon's own state directory.
    assert (dirs[0] / "flower" / "state" / "contexts").is_dir()
    assert not (dirs[0] / "state").exists()


def test_flower_node_directory_roster_missing_peer_refuses_setup(
    tmp_path: Path,
) -> None:
    dirs = _node_dirs(tmp_path, skip_trust=(0, 4))  # hospital-0 lacks hospital-4
    rec = _Recorder()
    workflow = SecureAggregationWorkflow(timeout=5)
    _run_dirs(_client_app(rec), workflow, dirs, rounds=1)
    # hospital-0 refuses a setup naming a node outside its roster; setup goes on
    # without the refusing node.
    res = workflow.results[1]
    assert FIRST not in res.contributors
    assert len(res.contributors) == N_CLIENTS - 1


# ---------------------------------------------------------- policy and limits


def test_flower_require_policy_refuses_plain_fit() -> None:
    rec = _Recorder()
    grid, context = _run(_client_app(rec), DefaultWorkflow().fit_workflow, rounds=1)
    # Every client refused to send its parameters in the clear: nothing trained.
    assert rec.returned == {}
    assert all(a.sum() == 0 for a in _global_model(context))


def test_flower_allow_policy_passes_plain_fit_through() -> None:
    rec = _Recorder()
    app = _client_app(rec, mods=[make_secure_aggregation_mod(policy="allow")])
    _run(app, DefaultWorkflow().fit_workflow, rounds=1)
    assert len(rec.returned) == N_CLIENTS


def test_flower_refuse_policy_every_client_refuses_round_aborts() -> None:
    rec = _Recorder()
    app = _client_app(rec, mods=[make_secure_aggregation_mod(policy="refuse")])
    with pytest.raises(PhaseTimeout) as info:
        _run(app, SecureAggregationWorkflow(timeout=5), rounds=1)
    assert info.value.phase == "hello"


def test_flower_different_fit_instructions_refused_before_any_message() -> None:
    class PerClient(FedAvg):
        def configure_fit(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> Any:
            pairs = super().configure_fit(server_round, parameters, client_manager)
            from flwr.common import FitIns

            return [
                (proxy, FitIns(ins.parameters, {"lr": 0.1 * i}))
                for i, (proxy, ins) in enumerate(pairs)
            ]

    rec = _Recorder()
    with pytest.raises(ConfigError, match="same fit instructions"):
        _run(
            _client_app(rec),
            SecureAggregationWorkflow(timeout=5),
            rounds=1,
            strategy=PerClient(fraction_evaluate=0.0),
        )
    assert rec.returned == {}


def test_flower_workflow_bad_arguments_raise_config_error() -> None:
    for kwargs in (
        {"timeout": 0},
        {"clipping_range": -1.0},
        {"ring_bits": 16},
        {"chunk_bytes": 10},
        {"on_abort": "ignore"},
        {"result_dtype": "float16"},
        {"researcher_id": "bad id"},
    ):
        with pytest.raises(ConfigError):
            SecureAggregationWorkflow(**kwargs)


def test_flower_server_never_sees_client_parameters_in_the_clear() -> None:
    rec = _Recorder()
    seen: list[bytes] = []

    workflow = SecureAggregationWorkflow(timeout=5)
    app = _client_app(rec)

    def spy(msg: Message, ctx: Context) -> Message:
        reply = app(msg, ctx)
        if reply.has_content():
            for record in reply.content.array_records.values():
                for array in record.values():
                    seen.append(array.data)
        return reply

    _run(spy, workflow, rounds=1)  # type: ignore[arg-type]
    assert seen  # the masked chunks
    for arrays in rec.returned.values():
        for a in arrays:
            raw = a.tobytes()
            assert all(raw not in blob for blob in seen)


def test_flower_logs_no_warning_in_a_clean_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = _Recorder()
    with caplog.at_level(logging.WARNING, logger="secagg.integrations.flower"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _run(_client_app(rec), SecureAggregationWorkflow(timeout=5), rounds=2)
    assert not [r for r in caplog.records if r.name.endswith("_server")]


# ------------------------------------------------------- a malicious server


def _tampering_pack(
    monkeypatch: pytest.MonkeyPatch, tamper: Callable[[RecordDict, int], bool]
) -> None:
    """Make the server's round requests carry what ``tamper`` decides.

    Only the server packs with ``weights_from_fit``; the clients' packing passes.
    """
    from secagg.integrations.flower import _wire

    original = _wire.pack
    count = {"n": 0}

    def pack(content: RecordDict, msgs: Any, **kw: Any) -> int:
        if kw.get("weights_from_fit"):
            count["n"] += 1
            kw["weights_from_fit"] = tamper(content, count["n"])
        return original(content, msgs, **kw)

    monkeypatch.setattr(_wire, "pack", pack)


def _other_model(content: RecordDict) -> None:
    from flwr.common import ndarrays_to_parameters

    content.array_records["fitins.parameters"] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.full(s, 0.25, dtype=np.float32) for s in SHAPES]),
        keep_input=True,
    )


def test_flower_request_weights_not_the_fit_model_every_client_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The request's frames (bound into D_r) say one model, the fit instructions
    # another: a client never trains on a model its digest does not bind.
    def tamper(content: RecordDict, n: int) -> bool:
        _other_model(content)
        return False  # send the request's own weights frames

    _tampering_pack(monkeypatch, tamper)
    rec = _Recorder()
    with pytest.raises(ThresholdError) as info:
        _run(_client_app(rec), SecureAggregationWorkflow(timeout=5), rounds=1)
    assert info.value.phase == "round.keys"
    assert rec.returned == {}


def test_flower_one_client_given_another_model_round_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # DESIGN §3: a client given a different request masks with keys that do not
    # cancel: the canary check fails, no sum is returned.
    def tamper(content: RecordDict, n: int) -> bool:
        if n == 2:
            _other_model(content)
        return True

    _tampering_pack(monkeypatch, tamper)
    rec = _Recorder()
    with pytest.raises(RoundAborted, match="did not cancel"):
        _run(_client_app(rec), SecureAggregationWorkflow(timeout=5), rounds=1)


# ------------------------------------------------------------------ the wire


def test_flower_wire_unpack_malformed_records_raise_only_malformed_message() -> None:
    import msgpack
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from hypothesis import given
    from hypothesis import strategies as st

    from mpc_runtime.errors import MalformedMessage
    from secagg.integrations.flower import _wire

    def record(**fields: Any) -> RecordDict:
        base: dict[str, Any] = {"v": 1, "kind": "protocol", "chunk": 4096}
        base.update(fields)
        return RecordDict({"secagg": ConfigRecord(base)})

    bad = [
        RecordDict(),
        record(v=2, msgs=msgpack.packb([])),
        record(chunk=1, msgs=msgpack.packb([])),
        record(msgs=b"\xc1"),
        record(msgs=msgpack.packb([[b"x", [], False]] * 5)),
        record(msgs=msgpack.packb([[b"\x93\x01\x02\x03", [10], False]])),
        record(msgs=msgpack.packb([[b"x", [], True]])),
    ]
    extra = record(msgs=msgpack.packb([]))
    extra.array_records["secagg.chunks"] = ArrayRecord(
        {"0/0/0": Array(dtype="uint8", shape=(1,), stype="secagg.raw", data=b"x")}
    )
    bad.append(extra)
    for content in bad:
        with pytest.raises(MalformedMessage):
            _wire.unpack(content)

    @given(st.binary(max_size=256))
    def fuzz(raw: bytes) -> None:
        try:
            _wire.unpack(record(msgs=raw))
        except MalformedMessage:
            pass

    fuzz()


def test_flower_state_store_round_trips_and_prunes_old_steps() -> None:
    store = _state.StateStore()
    cid = b"\x01" * 32
    store.begin_context(cid)
    store.commit(cid, 1, "request", b"a" * 32)
    store.commit(cid, 2, "request", b"b" * 32)
    store.pin_key("peer", b"k" * 32)
    doc = _state.unpack(_state.pack({"store": store.to_doc()}))
    again = _state.StateStore.from_doc(doc["store"])
    assert again.seen_context(cid)
    assert again.last_round(cid) == 2
    assert again.committed(cid, 2, "request") == b"b" * 32
    assert again.committed(cid, 1, "request") is None  # before the last round
    assert again.pinned_key("peer") == b"k" * 32
    with pytest.raises(ConfigError):
        _state.StateStore.from_doc({"seen": "nope"})


def test_example_app_runs_three_secure_rounds_in_one_process():
    # examples/flower/server_app.py as its README says to run it.
    import os
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run(
        [sys.executable, str(repo / "examples" / "flower" / "server_app.py")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Run finished 3 round(s)" in out
    losses = [float(x) for x in re.findall(r"round \d: ([\d.]+)", out)]
    assert len(losses) == 3 and losses[0] > losses[-1]
