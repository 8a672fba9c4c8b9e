# SPDX-License-Identifier: Apache-2.0
"""Tests of NodeConfig: defaults, validation, TOML round trip."""

from __future__ import annotations

import dataclasses
import re

import pytest

from mpc_runtime.errors import ConfigError
from secagg.config import NodeConfig, check_endpoint, check_id

EP = "tcp://10.0.0.1:5555"


def test_node_config_defaults_match_design():
    c = NodeConfig(id="node-a", researcher=EP)
    assert (c.policy, c.peer_trust, c.disclose_clip_stats) == (
        "allow",
        "roster",
        False,
    )
    assert (c.min_survivors, c.max_colluding_nodes) == (2, 0)
    assert dict(c.tasks) == dict(c.plans) == dict(c.data) == {}


def test_node_config_is_frozen():
    c = NodeConfig(id="a", researcher=EP)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.policy = "refuse"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.tasks["x"] = "m:f"  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"id": "bad id"}, "expected node id matching"),
        ({"id": "-a"}, "expected node id matching"),
        ({"id": "a" * 65}, "expected node id matching"),
        ({"id": 3}, "expected node id of type str, got int"),
        ({"researcher": "http://x:1"}, "expected researcher endpoint like tcp://"),
        ({"researcher": "tcp://x:70000"}, "expected researcher endpoint like tcp://"),
        ({"policy": "maybe"}, "expected policy one of 'allow', 'require', 'refuse'"),
        ({"peer_trust": "all"}, "expected peer_trust one of 'roster', 'tofu'"),
        ({"disclose_clip_stats": 1}, "expected disclose_clip_stats true or false"),
        ({"min_survivors": 1}, "expected min_survivors >= 2, got 1"),
        ({"min_survivors": True}, "expected min_survivors an integer, got bool"),
        ({"max_colluding_nodes": -1}, "expected max_colluding_nodes >= 0, got -1"),
        ({"tasks": {"h": "nocolon"}}, 'expected tasks.h = "module:function"'),
        ({"tasks": {"bad name!": "m:f"}}, "expected tasks name matching"),
        ({"plans": {"p": 3}}, 'expected plans.p = "module:attribute"'),
        ({"data": []}, "expected [data] a table"),
    ],
)
def test_node_config_invalid_field_raises_config_error(changes, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        NodeConfig(**{"id": "a", "researcher": EP, **changes})


def test_check_id_reuses_messages_rule():
    assert check_id("Node_1.x-y") == "Node_1.x-y"
    with pytest.raises(ConfigError):
        check_id("")


@pytest.mark.parametrize(
    "endpoint", ["tcp://host:1", "tcp://[::1]:5555", "ipc:///tmp/s", "inproc://x"]
)
def test_check_endpoint_accepts_zmq_endpoints(endpoint):
    assert check_endpoint(endpoint) == endpoint


def test_node_config_toml_round_trip(tmp_path):
    c = NodeConfig(
        id="node-a",
        researcher=EP,
        policy="require",
        peer_trust="tofu",
        disclose_clip_stats=True,
        min_survivors=3,
        max_colluding_nodes=1,
        tasks={"histogram": "my_module:histogram"},
        plans={"mlp": "plans.mlp:MLP"},
        data={"mnist": {"path": "/data/mnist"}},
    )
    path = tmp_path / "node.toml"
    path.write_text(c.to_toml())
    assert NodeConfig.from_toml(path) == c


def test_node_config_unknown_key_is_named(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(f'id = "a"\nresearcher = "{EP}"\npolicy_x = "allow"\n')
    with pytest.raises(ConfigError, match=r"node\.toml: unknown key 'policy_x'"):
        NodeConfig.from_toml(path)


def test_node_config_missing_key_is_named(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('id = "a"\n')
    with pytest.raises(ConfigError, match="missing key 'researcher'"):
        NodeConfig.from_toml(path)


def test_node_config_bad_value_names_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(f'id = "a"\nresearcher = "{EP}"\nmin_survivors = 0\n')
    with pytest.raises(ConfigError, match=r"node\.toml: expected min_survivors >= 2"):
        NodeConfig.from_toml(path)


def test_node_config_invalid_toml_names_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("id = \n")
    with pytest.raises(ConfigError, match=r"node\.toml: invalid TOML"):
        NodeConfig.from_toml(path)


def test_node_config_missing_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        NodeConfig.from_toml(tmp_path / "nope.toml")
