# SPDX-License-Identifier: Apache-2.0
"""A node machine's state in Flower's ``Context.state``, between two messages.

Flower runs a ``ClientApp`` in a fresh process per message in a deployment
(``flwr-clientapp``), and hands it the node's ``Context`` each time; only
``Context.state`` survives from one message to the next, on the node's own
machine (Flower: "data it holds will never leave the system it's running
from"). A round spans four messages, so the node machine's whole state must go
there: the durable part (:class:`StateStore`, a
:class:`~mpc_runtime.protocol.store.NodeStore`) and the in-flight part (setup in
progress, the current round's secrets and inputs).

The in-flight part lives in private attributes of
:class:`mpc_runtime.protocol.node.Node` (``_contexts``), which has no public
export/import yet; :func:`export_contexts` and :func:`import_contexts` are the one
place that reaches into them, and they refuse to run if the machine's fields
changed (a test pins the field sets). Everything is encoded with msgpack, field by
field; nothing is pickled.

Erasure (DESIGN §3): a round's secrets are in the snapshot only while the round
is open on the node; once it ends (reveal, abort, superseded) the next snapshot
no longer has them. Python cannot scrub the bytes Flower keeps; as on disk, the
remedy is the node's own protection of its machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np

from mpc_runtime import framing
from mpc_runtime.errors import ConfigError, MalformedMessage
from mpc_runtime.messages import RoundRequest
from mpc_runtime.protocol.node import (
    ContextRecord,
    Node,
    NodeStage,
    _Context,
    _RoundState,
)
from mpc_runtime.protocol.store import StepAlreadyCommitted
from mpc_runtime.sharing import Share
from secagg.store import _record_from_doc, _record_to_doc

__all__ = ["StateStore", "export_contexts", "import_contexts", "STATE_VERSION"]

STATE_VERSION: Final = 1
#: Ready context records kept in the state (older ones are dropped; the ids stay
#: in the seen set, so a replayed setup is still refused).
MAX_CONTEXTS: Final = 16
_WHERE: Final = Path("<flower Context.state>")

#: The fields this codec knows. A change in the machine breaks loudly here.
_ROUND_FIELDS: Final = frozenset(
    {
        "round",
        "request",
        "digest",
        "inputs",
        "c_secret",
        "mask_key",
        "b_seed",
        "own_c",
        "own_b",
        "peers",
        "peer_mask_keys",
        "held_c",
        "held_b",
        "signed_survivors",
        "started",
    }
)
_CONTEXT_FIELDS: Final = frozenset({"record", "stage", "round"})


def check_machine_fields() -> None:
    """Raise RuntimeError if the node machine's private state changed shape."""
    round_fields = {f.name for f in dataclasses.fields(_RoundState)}
    context_fields = {f.name for f in dataclasses.fields(_Context)}
    if round_fields != _ROUND_FIELDS or context_fields != _CONTEXT_FIELDS:
        raise RuntimeError(
            "mpc_runtime.protocol.node changed its round state; "
            "secagg.integrations.flower._state must be updated"
        )


class StateStore:
    """A :class:`~mpc_runtime.protocol.store.NodeStore` kept in ``Context.state``.

    It is :class:`~mpc_runtime.protocol.store.MemoryNodeStore` with a msgpack
    form (:meth:`to_doc`, :meth:`from_doc`) and pruning: steps of rounds before a
    context's last round are dropped (the node refuses those rounds anyway), and at
    most :data:`MAX_CONTEXTS` ready records are kept.

    It lasts as long as Flower keeps the node's context (the run, on the
    SuperNode); a node that needs replay protection across SuperNode restarts
    uses a node directory instead (``FileNodeStore``, see ``docs/flower.md``).
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._steps: dict[tuple[bytes, int, str], bytes] = {}
        self._last: dict[bytes, int] = {}
        self._contexts: dict[bytes, ContextRecord] = {}
        self._pins: dict[str, bytes] = {}

    def begin_context(self, context_id: bytes) -> None:
        if context_id in self._seen:
            raise StepAlreadyCommitted("context already seen", phase="setup")
        self._seen.add(context_id)

    def seen_context(self, context_id: bytes) -> bool:
        return context_id in self._seen

    def last_round(self, context_id: bytes) -> int:
        return self._last.get(context_id, 0)

    def commit(self, context_id: bytes, round: int, phase: str, digest: bytes) -> None:  # noqa: A002
        key = (context_id, round, phase)
        if key in self._steps:
            raise StepAlreadyCommitted(
                f"step {phase} already committed", phase=phase, round=round
            )
        self._steps[key] = digest
        self._last[context_id] = max(self._last.get(context_id, 0), round)

    def committed(self, context_id: bytes, round: int, phase: str) -> bytes | None:  # noqa: A002
        return self._steps.get((context_id, round, phase))

    def save_context(self, context_id: bytes, record: Any) -> None:
        if not isinstance(record, ContextRecord):
            raise TypeError(f"expected a ContextRecord, got {type(record).__name__}")
        self._contexts.pop(context_id, None)
        self._contexts[context_id] = record

    def load_context(self, context_id: bytes) -> Any | None:
        return self._contexts.get(context_id)

    def drop_context(self, context_id: bytes) -> None:
        self._contexts.pop(context_id, None)

    def pinned_key(self, node: str) -> bytes | None:
        return self._pins.get(node)

    def pin_key(self, node: str, key: bytes) -> None:
        self._pins.setdefault(node, key)

    # ------------------------------------------------------------- msgpack form

    def to_doc(self) -> dict[str, Any]:
        """The store as msgpack-ready values, pruned."""
        while len(self._contexts) > MAX_CONTEXTS:
            del self._contexts[next(iter(self._contexts))]
        steps = [
            [cid, r, phase, digest]
            for (cid, r, phase), digest in self._steps.items()
            if r >= self._last.get(cid, 0)
        ]
        return {
            "seen": sorted(self._seen),
            "steps": steps,
            "last": [[cid, r] for cid, r in self._last.items()],
            "contexts": [_record_to_doc(rec) for rec in self._contexts.values()],
            "pins": dict(self._pins),
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> StateStore:
        """Rebuild a store from :meth:`to_doc` output.

        Raises
        ------
        ConfigError
            The document is not a store's.
        """
        store = cls()
        try:
            store._seen = {_bytes(c) for c in doc["seen"]}
            for cid, r, phase, digest in doc["steps"]:
                store._steps[(_bytes(cid), _int(r), _str(phase))] = _bytes(digest)
            store._last = {_bytes(cid): _int(r) for cid, r in doc["last"]}
            for rec_doc in doc["contexts"]:
                rec = _record_from_doc(dict(rec_doc), _WHERE)
                store._contexts[rec.context_id] = rec
            store._pins = {_str(k): _bytes(v) for k, v in doc["pins"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{_WHERE}: corrupted node store ({e})") from None
        return store


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected int, got {type(value).__name__}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value


def _ids(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return tuple(_str(v) for v in value)


def _round_to_doc(
    state: _RoundState, prefix: str, arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    # Only the streams of the request are used after the keys phase; D_r is kept
    # as computed, so the weights (the whole model) are not stored again.
    request = dataclasses.replace(state.request, weights=())
    for name, x in state.inputs.items():
        arrays[f"{prefix}/{name}"] = x
    return {
        "round": state.round,
        "request": bytes(framing.encode(request)[0]),
        "digest": state.digest,
        "inputs": sorted(state.inputs),
        "c_secret": state.c_secret,
        "mask_key": state.mask_key,
        "b_seed": state.b_seed,
        "own_c": state.own_c.to_bytes(),
        "own_b": state.own_b.to_bytes(),
        "peers": list(state.peers),
        "peer_mask_keys": dict(state.peer_mask_keys),
        "held_c": {v: s.to_bytes() for v, s in state.held_c.items()},
        "held_b": {v: s.to_bytes() for v, s in state.held_b.items()},
        "signed_survivors": (
            None if state.signed_survivors is None else list(state.signed_survivors)
        ),
        "started": float(state.started),
    }


def _round_from_doc(
    doc: Mapping[str, Any], prefix: str, arrays: Mapping[str, np.ndarray]
) -> _RoundState:
    request = framing.decode([_bytes(doc["request"])])
    if not isinstance(request, RoundRequest):
        raise TypeError("expected a round request")
    signed = doc["signed_survivors"]
    started = doc["started"]
    if not isinstance(started, float):
        raise TypeError("expected a float start time")
    return _RoundState(
        round=_int(doc["round"]),
        request=request,
        digest=_bytes(doc["digest"]),
        inputs={_str(n): np.asarray(arrays[f"{prefix}/{n}"]) for n in doc["inputs"]},
        c_secret=_bytes(doc["c_secret"]),
        mask_key=_bytes(doc["mask_key"]),
        b_seed=_bytes(doc["b_seed"]),
        own_c=Share.from_bytes(_bytes(doc["own_c"])),
        own_b=Share.from_bytes(_bytes(doc["own_b"])),
        peers=_ids(doc["peers"]),
        peer_mask_keys={_str(v): _bytes(k) for v, k in doc["peer_mask_keys"].items()},
        held_c={_str(v): Share.from_bytes(_bytes(s)) for v, s in doc["held_c"].items()},
        held_b={_str(v): Share.from_bytes(_bytes(s)) for v, s in doc["held_b"].items()},
        signed_survivors=None if signed is None else _ids(signed),
        started=started,
    )


def export_contexts(node: Node) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The node's in-flight contexts as msgpack-ready values, and round inputs.

    Ready contexts without a round are left out (the store keeps their records
    and the machine reloads them on demand), and so are failed ones (unknown and
    failed contexts are refused alike).
    """
    check_machine_fields()
    docs: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    contexts: dict[bytes, _Context] = node._contexts
    for cid, ctx in contexts.items():
        if ctx.stage is NodeStage.FAILED or (
            ctx.stage is NodeStage.READY and ctx.round is None
        ):
            continue
        prefix = cid.hex()
        docs.append(
            {
                "record": _record_to_doc(ctx.record),
                "stage": ctx.stage.value,
                "round": None
                if ctx.round is None
                else _round_to_doc(ctx.round, prefix, arrays),
            }
        )
    return docs, arrays


def import_contexts(
    node: Node,
    docs: list[Any],
    arrays: Mapping[str, np.ndarray],
    store: Any,
) -> None:
    """Put :func:`export_contexts` output back into a fresh machine.

    A record the store also holds is shared with the store, as in a machine
    that never stopped.

    Raises
    ------
    ConfigError
        The snapshot is not one of this version.
    """
    check_machine_fields()
    contexts: dict[bytes, _Context] = {}
    try:
        for doc in docs:
            record = _record_from_doc(dict(doc["record"]), _WHERE)
            saved = store.load_context(record.context_id)
            if isinstance(saved, ContextRecord):
                record = saved
            rnd = doc["round"]
            contexts[record.context_id] = _Context(
                record=record,
                stage=NodeStage(_str(doc["stage"])),
                round=None
                if rnd is None
                else _round_from_doc(rnd, record.context_id.hex(), arrays),
            )
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        MalformedMessage,
    ) as e:
        raise ConfigError(f"{_WHERE}: corrupted node snapshot ({e})") from None
    node._contexts.update(contexts)


def pack(doc: Mapping[str, Any]) -> bytes:
    """msgpack the state document."""
    packed: bytes = msgpack.packb(
        {"v": STATE_VERSION, **doc}, use_bin_type=True, strict_types=False
    )
    return packed


def unpack(data: bytes) -> dict[str, Any]:
    """Parse :func:`pack` output.

    Raises
    ------
    ConfigError
        Not a state document of this version.
    """
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    # msgpack documents that exceptions other than its own can escape unpackb on
    # malformed input, so this boundary catches broadly (STYLE §5).
    except Exception:
        raise ConfigError(f"{_WHERE}: corrupted state (not msgpack)") from None
    if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
        raise ConfigError(f"{_WHERE}: expected state version {STATE_VERSION}")
    return doc
