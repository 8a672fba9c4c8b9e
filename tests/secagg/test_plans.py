# SPDX-License-Identifier: Apache-2.0
"""Tests of secagg.plans: the plan registry, training_args, the MLP and FedAvg."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import numpy as np
import pytest

from mpc_runtime.errors import ConfigError
from secagg.plans import (
    MLPPlan,
    TrainingPlan,
    get_plan,
    register_plan,
    registered_plans,
)

REPO = Path(__file__).resolve().parents[2]
ROUNDS, NODES = 5, 3
ARGS: dict[str, int | float] = {"num_updates": 50, "lr": 0.1}  # DESIGN §1.
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# Tests that need no torch come first; the others import it via the fixture.


@pytest.fixture(scope="module")
def torch() -> ModuleType:
    module: ModuleType = pytest.importorskip("torch")
    return module


def test_import_secagg_plans_does_not_import_torch() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, secagg, secagg.plans\n"
            "p = secagg.plans.get_plan('mlp').from_training_args({'epochs': 1})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr


def test_registry_has_mlp() -> None:
    assert get_plan("mlp") is MLPPlan
    assert "mlp" in registered_plans()


def test_get_plan_unknown_name_lists_registered() -> None:
    with pytest.raises(ConfigError, match=r"unknown training plan 'cnn' \(.*mlp"):
        get_plan("cnn")


def test_register_plan_same_class_twice_is_a_no_op() -> None:
    assert register_plan(MLPPlan) is MLPPlan


def test_register_plan_name_taken_by_another_class_raises() -> None:
    class Other(TrainingPlan):
        name: ClassVar[str] = "mlp"

    with pytest.raises(ConfigError, match="'mlp' is already registered by"):
        register_plan(Other)


@pytest.mark.parametrize("bad", [int, object(), "mlp"])
def test_register_plan_non_plan_raises(bad: object) -> None:
    with pytest.raises(ConfigError, match="expected a TrainingPlan subclass"):
        register_plan(bad)  # type: ignore[type-var]


def test_register_plan_invalid_name_raises() -> None:
    class Nameless(TrainingPlan):
        pass

    with pytest.raises(ConfigError, match="Nameless"):
        register_plan(Nameless)


def test_check_training_args_fills_defaults() -> None:
    args = MLPPlan.check_training_args({"num_updates": 50})
    assert args == {
        "num_updates": 50,
        "batch_size": 32,
        "lr": 0.1,
        "seed": 0,
        "in_features": 20,
        "n_classes": 4,
        "hidden": 32,
    }
    assert MLPPlan.check_training_args({"epochs": 2, "lr": 1})["lr"] == 1.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"num_update": 5}, r"unknown training_args key\(s\) \['num_update'\]"),
        ({}, "exactly one of .*num_updates.* got neither"),
        ({"num_updates": 5, "epochs": 1}, r"got \['num_updates', 'epochs'\]"),
        ({"num_updates": 0}, r"training_args\['num_updates'\] >= 1"),
        ({"num_updates": 2.0}, r"training_args\['num_updates'\] an integer"),
        ({"epochs": True}, r"training_args\['epochs'\] an integer"),
        ({"epochs": 1, "batch_size": 0}, r"training_args\['batch_size'\] >= 1"),
        ({"epochs": 1, "lr": 0}, r"training_args\['lr'\] finite and > 0"),
        ({"epochs": 1, "lr": float("nan")}, r"training_args\['lr'\] finite"),
        ({"epochs": 1, "lr": "0.1"}, r"training_args\['lr'\] a number"),
        ({"epochs": 1, "seed": -1}, r"training_args\['seed'\] >= 0"),
        ({"epochs": 1, "hidden": 0}, r"training_args\['hidden'\] >= 1"),
        ([("epochs", 1)], "expected training_args a dict"),
    ],
)
def test_check_training_args_bad_key_raises_naming_it(
    args: Mapping[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        MLPPlan.check_training_args(args)


def test_from_training_args_takes_the_model_keys() -> None:
    plan = MLPPlan.from_training_args({"epochs": 1, "in_features": 7, "hidden": 5})
    assert plan.args == {"in_features": 7, "n_classes": 4, "hidden": 5}


def test_plan_unknown_model_argument_raises() -> None:
    with pytest.raises(ConfigError, match=r"unknown model argument\(s\) \['depth'\]"):
        MLPPlan(depth=3)


# The rest needs torch.


def _pooled(parts: list[Split]) -> Split:
    X_tr, X_te, y_tr, y_te = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return X_tr, X_te, y_tr, y_te


@pytest.fixture(scope="module")
def nodes_data() -> list[Split]:
    from secagg.data import holdout, synthetic_classification

    return [
        holdout(*synthetic_classification(i, NODES, seed=0), 0.2, seed=i)
        for i in range(NODES)
    ]


def test_model_init_is_deterministic_and_leaves_global_rng(torch: ModuleType) -> None:
    plan = MLPPlan()
    state = torch.random.get_rng_state()
    a, b, c = plan.model(1), plan.model(1), plan.model(2)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])
    assert [tuple(p.shape) for p in a.parameters()] == [(32, 20), (32,), (4, 32), (4,)]


def test_mlp_learns_on_pooled_data(torch: ModuleType, nodes_data: list[Split]) -> None:
    from secagg.plans import run_local_update

    X_tr, X_te, y_tr, y_te = _pooled(nodes_data)
    plan = MLPPlan()
    model = plan.model(0)
    before = plan.evaluate(model, X_te, y_te)
    state, metrics = run_local_update(
        plan, model.state_dict(), X_tr, y_tr, {"num_updates": 300, "lr": 0.1}
    )
    model.load_state_dict(state)
    after = plan.evaluate(model, X_te, y_te)
    print(
        f"centralized holdout accuracy {before['accuracy']:.3f} -> "
        f"{after['accuracy']:.3f}"
    )
    assert metrics["num_updates"] == 300 and metrics["n_samples"] == len(y_tr)
    assert after["accuracy"] > 0.7  # Chance is 0.25; observed 0.84.
    assert after["loss"] < before["loss"]
    assert after["n_samples"] == len(y_te)


def test_train_epochs_counts_steps(torch: ModuleType, nodes_data: list[Split]) -> None:
    X, _, y, _ = nodes_data[0]
    plan = MLPPlan()
    metrics = plan.train(plan.model(), X, y, {"epochs": 2, "batch_size": 100})
    assert metrics["num_updates"] == 2 * -(-len(y) // 100)


def test_train_is_deterministic(torch: ModuleType, nodes_data: list[Split]) -> None:
    from secagg.plans import run_local_update

    X, _, y, _ = nodes_data[1]
    plan = MLPPlan()
    g = plan.model().state_dict()
    a, _ = run_local_update(plan, g, X, y, {"num_updates": 20, "seed": 3})
    b, _ = run_local_update(plan, g, X, y, {"num_updates": 20, "seed": 3})
    c, _ = run_local_update(plan, g, X, y, {"num_updates": 20, "seed": 4})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_run_local_update_leaves_global_weights_alone(
    torch: ModuleType, nodes_data: list[Split]
) -> None:
    from secagg.plans import run_local_update

    X, _, y, _ = nodes_data[0]
    plan = MLPPlan()
    g = plan.model().state_dict()
    before = {k: v.clone() for k, v in g.items()}
    state, _ = run_local_update(plan, g, X, y, {"num_updates": 5})
    assert all(torch.equal(g[k], before[k]) for k in g)
    assert not all(torch.equal(state[k], g[k]) for k in g)
    assert torch.get_num_threads() == 1  # Documented: the node trains on one thread.


def test_run_local_update_wrong_weights_raises(
    torch: ModuleType, nodes_data: list[Split]
) -> None:
    from secagg.plans import run_local_update

    X, _, y, _ = nodes_data[0]
    other = MLPPlan(hidden=8).model().state_dict()
    with pytest.raises(ConfigError, match="do not fit plan 'mlp'"):
        run_local_update(MLPPlan(), other, X, y, {"num_updates": 1})


def test_run_local_update_model_args_mismatch_raises(
    torch: ModuleType, nodes_data: list[Split]
) -> None:
    from secagg.plans import run_local_update

    X, _, y, _ = nodes_data[0]
    plan = MLPPlan()
    with pytest.raises(ConfigError, match=r"key\(s\) \['hidden'\] differ"):
        run_local_update(
            plan, plan.model().state_dict(), X, y, {"num_updates": 1, "hidden": 8}
        )


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.zeros((4, 7)), np.zeros(4, dtype=np.int64), "20 features"),
        (np.zeros((4, 20)), np.array([0, 1, 2, 4]), r"labels in \[0, 4\)"),
        (np.zeros((4, 20)), np.zeros(3, dtype=np.int64), "expected X"),
        (np.zeros((4, 20)), np.zeros(4), "integer labels"),
        (np.zeros((0, 20)), np.zeros(0, dtype=np.int64), "n >= 1"),
    ],
)
def test_train_bad_data_raises(
    torch: ModuleType, X: np.ndarray, y: np.ndarray, match: str
) -> None:
    plan = MLPPlan()
    with pytest.raises(ConfigError, match=match):
        plan.train(plan.model(), X, y, {"num_updates": 1})


def test_fedavg_three_nodes_matches_centralized(
    torch: ModuleType, nodes_data: list[Split]
) -> None:
    """5 rounds of run_local_update + plain mean of the flattened state_dicts."""
    from secagg.plans import run_local_update
    from secagg.tensors import flatten, unflatten

    X_tr, X_te, y_tr, y_te = _pooled(nodes_data)
    plan = get_plan("mlp").from_training_args(ARGS)
    init = plan.model(0).state_dict()

    global_state = init
    for _ in range(ROUNDS):
        vectors = []
        for X, _, y, _ in nodes_data:
            state, _ = run_local_update(plan, global_state, X, y, ARGS)
            vector, layout = flatten(state)
            vectors.append(vector)
        global_state = unflatten(np.mean(vectors, axis=0), layout, like=global_state)
    model = plan.model()
    model.load_state_dict(global_state)
    fed = plan.evaluate(model, X_te, y_te)["accuracy"]

    # Centralized: the same number of optimizer steps on the pooled data.
    central_args = {**ARGS, "num_updates": ROUNDS * ARGS["num_updates"]}
    state, _ = run_local_update(plan, init, X_tr, y_tr, central_args)
    model.load_state_dict(state)
    central = plan.evaluate(model, X_te, y_te)["accuracy"]

    # Each node alone (label-skewed data) does clearly worse on the pooled holdout.
    local = []
    for X, _, y, _ in nodes_data:
        state, _ = run_local_update(plan, init, X, y, central_args)
        model.load_state_dict(state)
        local.append(plan.evaluate(model, X_te, y_te)["accuracy"])

    print(f"accuracy: fedavg {fed:.3f} centralized {central:.3f} local {local}")
    # Observed: fedavg 0.836, centralized 0.839, local 0.63-0.67.
    assert fed >= central - 0.05
    assert fed > max(local) + 0.08
