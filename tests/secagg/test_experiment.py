# SPDX-License-Identifier: Apache-2.0
"""Experiment: federated training against real node daemons (subprocesses).

The reference for every aggregate is computed here, in this process, with the
same functions the nodes run (:func:`secagg.plans.run_local_update` on the same
``[data]`` arrays and the same per-round ``training_args``): training is
deterministic, so the secure mean must equal the clear mean within DESIGN §4's
quantization bound (plus float32 rounding when it is loaded into the model).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from secagg import (  # noqa: E402
    ConfigError,
    Experiment,
    PolicyRefused,
    SecureAggregation,
)
from secagg.config import NodeConfig  # noqa: E402
from secagg.data import load_arrays  # noqa: E402
from secagg.experiment import RoundRecord  # noqa: E402
from secagg.plans import MLPPlan, run_local_update  # noqa: E402
from secagg.tensors import flatten  # noqa: E402

from ._service_support import NODES3, C, Deployment  # noqa: E402

pytestmark = pytest.mark.slow

#: Phase deadline: generous, because the first round of each daemon also builds
#: torch's state; only failure cases ever wait for it.
TIMEOUT = 10.0
ARGS = {"num_updates": 5, "lr": 0.1, "batch_size": 16, "hidden": 8}


def add_training(dep: Deployment, sizes: dict[str, int] | None = None) -> None:
    """Give every node the ``mlp`` plan and its own synthetic data."""
    sizes = sizes or {}
    ids = sorted(dep.dirs)
    for i, v in enumerate(ids):
        path = dep.dirs[v] / "node.toml"
        cfg = NodeConfig.from_toml(path)
        data = {
            "train": {
                "kind": "synthetic",
                "node_index": i,
                "n_nodes": len(ids),
                "n_samples": sizes.get(v, 64),
            }
        }
        cfg = dataclasses.replace(cfg, plans={"mlp": "secagg.plans:MLPPlan"}, data=data)
        path.write_text(cfg.to_toml())


def local_vectors(dep, exp, round_, global_sd, ids) -> dict[str, np.ndarray]:
    """What each node sends in ``round_``, computed here."""
    out = {}
    for v in ids:
        cfg = NodeConfig.from_toml(dep.dirs[v] / "node.toml")
        X, y = load_arrays(cfg.data["train"], dep.dirs[v])
        args = exp.training_args_for(round_)
        state, metrics = run_local_update(exp.plan, global_sd, X, y, args)
        out[v] = (flatten(state)[0].astype(np.float64), metrics)
    return out


def model_vector(exp: Experiment) -> np.ndarray:
    return flatten(exp.state_dict())[0].astype(np.float64)


def mean_bound(n: int, expected: np.ndarray) -> np.ndarray:
    """Mean error: c/(2^b − 1) (DESIGN §4, the sum's m·c/(2^b−1) over m), plus
    one float32 rounding of the value loaded into the model."""
    bits = min(32 - (n - 1).bit_length(), 48)
    return C / (2**bits - 1) * 1.000001 + np.spacing(
        np.abs(expected).astype(np.float32)
    ).astype(np.float64)


def experiment(dep: Deployment, **kw) -> Experiment:
    kw.setdefault("training_args", ARGS)
    kw.setdefault("rounds", 2)
    kw.setdefault("nodes", NODES3)
    return Experiment(endpoint=dep.endpoint, training_plan="mlp", home=dep.home, **kw)


def secure(**kw) -> SecureAggregation:
    return SecureAggregation(timeout=TIMEOUT, clipping_range=C, **kw)


# ----------------------------------------------------------------- no daemons


def test_experiment_arguments_are_checked_up_front(deploy):
    deploy.add_nodes(NODES3)
    with pytest.raises(ConfigError, match="unknown training plan"):
        Experiment(endpoint=deploy.endpoint, training_plan="nope", home=deploy.home)
    with pytest.raises(ConfigError, match="num_update"):
        experiment(deploy, training_args={"num_update": 5})
    with pytest.raises(ConfigError, match="rounds"):
        experiment(deploy, rounds=0)
    with pytest.raises(ConfigError, match="at least 2 nodes"):
        experiment(deploy, nodes=["node-a"])
    with pytest.raises(ConfigError, match="secagg"):
        experiment(deploy, secagg="yes")
    with pytest.raises(ConfigError, match="endpoint"):
        experiment(deploy, secagg=SecureAggregation(endpoint="tcp://127.0.0.1:1"))


def test_experiment_job_is_stable_and_nodes_default_to_the_enrolled(deploy):
    deploy.add_nodes(NODES3)
    with experiment(deploy, nodes=None, secagg=True) as exp:
        job = exp.job()
        assert job.nodes == NODES3 and isinstance(job.nodes, list)
        assert exp.job() == job and exp.job().id.startswith("mlp-")
        assert exp.researcher_id == "researcher"
        assert isinstance(exp.secagg, SecureAggregation)
        # The Experiment and its SecureAggregation share one socket.
        assert exp.secagg.endpoint == exp.endpoint == deploy.endpoint
        assert exp.secagg._link is exp._link
    with experiment(deploy) as exp:
        assert exp.secagg is None


def test_progress_bar_line_shows_round_loss_accuracy_and_time(deploy):
    import io

    deploy.add_nodes(NODES3)
    rec = RoundRecord(
        round=2,
        secure=True,
        contributors=tuple(NODES3),
        dropped=(),
        train_loss=0.4321,
        test={"loss": 0.5, "accuracy": 0.875, "n_samples": 8},
        timings={"total": 1.25},
        bytes_sent=1,
        bytes_received=2,
    )
    with experiment(deploy, rounds=4) as exp:
        out = io.StringIO()
        exp._draw(rec, out)
    line = out.getvalue()
    assert line.startswith("\r[" + "#" * 12 + "." * 12 + "] round 2/4")
    assert "loss 0.4321" in line and "acc 0.875" in line and "1.25s" in line


# ----------------------------------------------------------------- with daemons


def test_secure_training_two_rounds_equals_clear_mean_and_force_setup(deploy):
    deploy.add_nodes(NODES3)
    add_training(deploy)
    deploy.start(*NODES3)
    with experiment(deploy, secagg=secure()) as exp:
        for round_ in (1, 2):
            before = exp.state_dict()
            sent = local_vectors(deploy, exp, round_, before, NODES3)
            if round_ == 2:
                # DESIGN §1: re-create the context between rounds.
                old = exp.secagg._current_server().context_id
                exp.secagg.setup(
                    parties=[exp.researcher_id] + exp.job().nodes,
                    job_id=exp.job().id,
                    force=True,
                )
                assert exp.secagg._current_server().context_id != old
            rec = exp.run(rounds=1)[-1]
            assert isinstance(rec, RoundRecord)
            assert rec.round == round_ and rec.secure
            assert rec.contributors == tuple(NODES3) and rec.dropped == ()
            want = np.mean([sent[v][0] for v in NODES3], axis=0)
            got = model_vector(exp)
            assert np.all(np.abs(got - want) <= mean_bound(3, want))
            # Not trivially equal to the model that was sent out.
            assert np.abs(got - flatten(before)[0]).max() > 1e-4
            loss = np.mean([sent[v][1]["loss"] for v in NODES3])
            assert rec.train_loss == pytest.approx(loss, abs=1e-6)
            assert rec.bytes_sent > 0 and rec.bytes_received > 0
            assert {"round.keys", "round.upload", "round.unmask"} <= set(rec.timings)
        assert exp.history[1].protocol_round == 1  # A new context starts at 1.


@pytest.mark.parametrize("weighted", [True, False])
def test_cleartext_training_is_fedavg_weighted_or_plain(deploy, weighted):
    deploy.add_nodes(NODES3)
    sizes = {"node-a": 40, "node-b": 90, "node-c": 150}
    add_training(deploy, sizes)
    deploy.start(*NODES3)
    with experiment(deploy, weighted=weighted, rounds=1) as exp:
        before = exp.state_dict()
        sent = local_vectors(deploy, exp, 1, before, NODES3)
        (rec,) = exp.run()
        assert not rec.secure and rec.contributors == tuple(NODES3)
        w = np.array([sizes[v] for v in NODES3], dtype=np.float64)
        if not weighted:
            w = np.ones(3)
        want = sum(wi * sent[v][0] for wi, v in zip(w, NODES3)) / w.sum()
        got = model_vector(exp)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        other = sum(sent[v][0] for v in NODES3) / 3 if weighted else None
        if other is not None:
            # The weighting is visible: the plain mean is a different model.
            assert np.abs(other - want).max() > 1e-5


def test_secure_training_node_refusing_secagg_is_named(deploy):
    deploy.add_nodes(NODES3, policy={"node-b": "refuse"})
    add_training(deploy)
    deploy.start(*NODES3)
    with experiment(deploy, secagg=secure()) as exp:
        with pytest.raises(PolicyRefused) as info:
            exp.run()
        assert info.value.nodes == ("node-b",)
        assert exp.history == []


def test_cleartext_training_node_requiring_secagg_is_named(deploy):
    deploy.add_nodes(NODES3, policy={"node-c": "require"})
    add_training(deploy)
    deploy.start(*NODES3)
    with experiment(deploy, timeout=TIMEOUT) as exp:
        with pytest.raises(PolicyRefused) as info:
            exp.run()
        assert info.value.nodes == ("node-c",)
    assert "requires secure aggregation" in deploy.log("node-c")


def test_secure_training_survives_a_node_dying_before_upload(deploy):
    deploy.add_nodes(NODES3)
    add_training(deploy)
    deploy.start("node-a", "node-b")
    deploy.start("node-c", fault="exit-before:upload:1")
    with experiment(deploy, secagg=secure(), rounds=1) as exp:
        before = exp.state_dict()
        sent = local_vectors(deploy, exp, 1, before, ["node-a", "node-b"])
        (rec,) = exp.run()
        assert rec.contributors == ("node-a", "node-b")
        assert rec.dropped == ("node-c",)
        want = (sent["node-a"][0] + sent["node-b"][0]) / 2
        got = model_vector(exp)
        assert np.all(np.abs(got - want) <= mean_bound(3, want))


def test_node_without_the_plan_refuses_cleartext_and_daemon_keeps_serving(deploy):
    deploy.add_nodes(NODES3)
    add_training(deploy)
    path = deploy.dirs["node-a"] / "node.toml"
    cfg = NodeConfig.from_toml(path)
    path.write_text(dataclasses.replace(cfg, plans={}).to_toml())
    deploy.start(*NODES3)
    with experiment(deploy, timeout=TIMEOUT) as exp:
        with pytest.raises(PolicyRefused) as info:
            exp.run()
        assert info.value.nodes == ("node-a",)
    assert "not offered" in deploy.log("node-a")
    with experiment(deploy, nodes=["node-b", "node-c"], rounds=1) as exp:
        (rec,) = exp.run()
        assert rec.contributors == ("node-b", "node-c")


def test_mlp_plan_model_args_reach_the_nodes(deploy):
    # hidden=8 (ARGS) differs from the default 32: the nodes built the same shape.
    deploy.add_nodes(NODES3)
    add_training(deploy)
    deploy.start(*NODES3)
    with experiment(deploy, rounds=1) as exp:
        exp.run()
        assert exp.state_dict()["0.weight"].shape == (8, 20)
        assert isinstance(exp.plan, MLPPlan)
