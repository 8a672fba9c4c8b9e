# SPDX-License-Identifier: Apache-2.0
"""Node configuration (``node.toml``, DESIGN §1): a frozen, validated dataclass."""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import tomli_w

from mpc_runtime import messages
from mpc_runtime.errors import ConfigError

__all__ = [
    "POLICIES",
    "PEER_TRUST",
    "NodeConfig",
    "check_id",
    "check_endpoint",
    "read_toml",
]

#: Values of ``policy`` in ``node.toml`` (DESIGN §1).
POLICIES: Final = ("allow", "require", "refuse")
#: Values of ``peer_trust`` in ``node.toml`` (DESIGN §3, "Peer identity").
PEER_TRUST: Final = ("roster", "tofu")

# A task or plan reference: an importable module path, a colon, an attribute path.
_REF_RE: Final = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:"
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
)
_TCP_RE: Final = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):([0-9]{1,5})")
# TOML files we read are small; anything larger is not a config file.
_MAX_TOML_BYTES: Final = 1 << 20

_HEADER: Final = (
    "# secagg node configuration (DESIGN §1). Restart the node daemon after editing.\n"
    '# [tasks]: name = "module:function", called as f(args) -> float array; the\n'
    "# node directory comes first on the import path.\n"
    '# [plans]: name = "module:Class", a TrainingPlan this node agrees to train,\n'
    '# e.g. mlp = "secagg.plans:MLPPlan".\n'
    '# [data]: train = {kind = "npz", path = "train.npz"} (or "csv", "synthetic"):\n'
    "# the local training data; a [data] entry named after a plan overrides it.\n\n"
)


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid node or researcher id.

    The rule is :func:`mpc_runtime.messages.check_id`'s
    (``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``); this wrapper only turns its errors into
    :class:`~mpc_runtime.errors.ConfigError`, the error of bad arguments and files.

    Raises
    ------
    ConfigError
        ``value`` is not a ``str`` or does not match the pattern.
    """
    try:
        return messages.check_id(value, what)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def check_endpoint(value: object, what: str = "researcher endpoint") -> str:
    """Return ``value`` if it is a ZeroMQ endpoint a node can connect to.

    Accepted: ``tcp://HOST:PORT`` (PORT 1-65535; an IPv6 host in brackets),
    ``ipc://PATH`` and ``inproc://NAME``.

    Raises
    ------
    ConfigError
        Anything else.
    """
    if not isinstance(value, str):
        raise ConfigError(f"expected {what} of type str, got {type(value).__name__}")
    if value.startswith(("ipc://", "inproc://")) and value.split("://", 1)[1]:
        return value
    m = _TCP_RE.fullmatch(value)
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"expected {what} like tcp://HOST:PORT, got {value[:200]!r}")
    return value


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; every failure is a ConfigError naming the file.

    Raises
    ------
    ConfigError
        The file is missing, unreadable, too large or not valid TOML.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_TOML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{os.fspath(path)}: cannot read: {e.strerror}") from None
    if len(data) > _MAX_TOML_BYTES:
        raise ConfigError(
            f"{os.fspath(path)}: expected at most {_MAX_TOML_BYTES} bytes, got more"
        )
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{os.fspath(path)}: invalid TOML: {e}") from None


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"expected {name} one of {expected}, got {value!r}")


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected {name} an integer, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"expected {name} >= {minimum}, got {value}")


def _refs(value: object, table: str, attr: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected [{table}] a table, got {type(value).__name__}")
    for name, ref in value.items():
        try:
            messages.check_name(name, f"{table} name")
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if not isinstance(ref, str) or _REF_RE.fullmatch(ref) is None:
            raise ConfigError(
                f'expected {table}.{name} = "module:{attr}", got {ref!r:.200}'
            )
    return MappingProxyType(dict(value))


def import_reference(reference: str, what: str) -> object:
    """Import ``"module:attr"`` (a ``[tasks]`` or ``[plans]`` entry) and return it.

    Raises
    ------
    ConfigError
        The reference is malformed, the module cannot be imported (any exception:
        it is the operator's code; only its type is reported, its text may hold
        data), or the attribute is missing.
    """
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected a {what} as 'module:name', got {reference!r:.200}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(
            f"cannot import {what} module {module_name!r}: {type(e).__name__}"
        ) from None
    value: object = module
    for part in attr.split("."):
        value = getattr(value, part, None)
        if value is None:
            raise ConfigError(f"{reference!r}: no {attr!r} in {module_name!r}")
    return value


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The contents of ``N/node.toml`` (DESIGN §1).

    Parameters
    ----------
    id
        The node id (``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``).
    researcher
        The researcher's endpoint, e.g. ``tcp://HOST:5555``.
    policy
        ``"allow"`` (default), ``"require"`` or ``"refuse"`` secure aggregation.
    peer_trust
        ``"roster"`` (default: peers' keys from ``N/peers/``) or ``"tofu"``.
    disclose_clip_stats
        Send this node's own clipping figures to the researcher (default False).
    min_survivors
        The smallest sum this node takes part in (default 2, at least 2).
    max_colluding_nodes
        κ_node of the node's own threshold floor (default 0).
    tasks
        ``{task name: "module:function"}`` for ``secure_sum``.
    plans
        ``{plan name: "module:attribute"}`` for training.
    data
        ``{name: value}``: data set locations for tasks and plans, free-form TOML.

    Raises
    ------
    ConfigError
        Any field is invalid; the message says what was expected and what was given.
    """

    id: str
    researcher: str
    policy: str = "allow"
    peer_trust: str = "roster"
    disclose_clip_stats: bool = False
    min_survivors: int = 2
    max_colluding_nodes: int = 0
    tasks: Mapping[str, str] = field(default_factory=dict)
    plans: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_id(self.id, "node id")
        check_endpoint(self.researcher)
        _check_choice(self.policy, "policy", POLICIES)
        _check_choice(self.peer_trust, "peer_trust", PEER_TRUST)
        if not isinstance(self.disclose_clip_stats, bool):
            raise ConfigError(
                "expected disclose_clip_stats true or false, "
                f"got {type(self.disclose_clip_stats).__name__}"
            )
        _check_int(self.min_survivors, "min_survivors", 2)
        _check_int(self.max_colluding_nodes, "max_colluding_nodes", 0)
        # Frozen: store read-only copies so the caller's dicts cannot change us.
        object.__setattr__(self, "tasks", _refs(self.tasks, "tasks", "function"))
        object.__setattr__(self, "plans", _refs(self.plans, "plans", "attribute"))
        if not isinstance(self.data, Mapping) or not all(
            isinstance(k, str) for k in self.data
        ):
            raise ConfigError(
                f"expected [data] a table, got {type(self.data).__name__}"
            )
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "node.toml"
    ) -> NodeConfig:
        """Build from parsed TOML; unknown keys are rejected by name.

        Raises
        ------
        ConfigError
            A key is unknown or missing, or a value is invalid (prefixed by ``source``).
        """
        known = cls.__dataclass_fields__
        for key in data:
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r} (expected one of "
                    f"{', '.join(known)})"
                )
        for key in ("id", "researcher"):
            if key not in data:
                raise ConfigError(f"{source}: missing key {key!r}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> NodeConfig:
        """Read and validate ``node.toml``.

        Raises
        ------
        ConfigError
            The file is unreadable or invalid; the message names it.
        """
        return cls.from_dict(read_toml(path), os.fspath(path))

    def to_dict(self) -> dict[str, Any]:
        """The TOML document as plain dicts (tables always present, maybe empty)."""
        return {
            "id": self.id,
            "researcher": self.researcher,
            "policy": self.policy,
            "peer_trust": self.peer_trust,
            "disclose_clip_stats": self.disclose_clip_stats,
            "min_survivors": self.min_survivors,
            "max_colluding_nodes": self.max_colluding_nodes,
            "tasks": dict(self.tasks),
            "plans": dict(self.plans),
            "data": dict(self.data),
        }

    def to_toml(self) -> str:
        """The ``node.toml`` text, with a short explanatory header comment."""
        return _HEADER + tomli_w.dumps(self.to_dict())
