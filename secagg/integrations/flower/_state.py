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

The durable part is a :class:`~mpc_runtime.protocol.store.MemoryNodeStore` kept
through its snapshot (:meth:`~mpc_runtime.protocol.store.MemoryNodeStore.snapshot`);
the in-flight part goes through
:meth:`~mpc_runtime.protocol.node.Node.export_contexts` and
:meth:`~mpc_runtime.protocol.node.Node.import_contexts` (the caller, here, holds
the round secrets). Everything is encoded with msgpack, field by field; nothing is
pickled.

Erasure (DESIGN §3): a round's secrets are in the snapshot only while the round
is open on the node; once it ends (reveal, abort, superseded) the next snapshot
no longer has them. Python cannot scrub the bytes Flower keeps; as on disk, the
remedy is the node's own protection of its machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgpack

from mpc_runtime.errors import ConfigError
from mpc_runtime.protocol.node import ContextRecord
from mpc_runtime.protocol.store import MemoryNodeStore

__all__ = ["StateStore", "STATE_VERSION", "WHERE"]

#: 2: context records as ``ContextRecord.to_dict()`` (1 had secagg.store's file form);
#: a state of another version is refused with ConfigError, never misread.
STATE_VERSION: Final = 2
#: Ready context records kept in the state (older ones are dropped; the ids stay
#: in the seen set, so a replayed setup is still refused).
MAX_CONTEXTS: Final = 16
#: How errors name the state.
WHERE: Final = "<flower Context.state>"


class StateStore(MemoryNodeStore):
    """A :class:`~mpc_runtime.protocol.store.NodeStore` kept in ``Context.state``.

    It is :class:`~mpc_runtime.protocol.store.MemoryNodeStore` with a pruned
    msgpack form (:meth:`to_doc`, :meth:`from_doc`): steps of rounds before a
    context's last round are dropped (the node refuses those rounds anyway), and at
    most :data:`MAX_CONTEXTS` ready records (the last saved) are kept.

    It lasts as long as Flower keeps the node's context (the run, on the
    SuperNode); a node that needs replay protection across SuperNode restarts
    uses a node directory instead (``FileNodeStore``, see ``docs/flower.md``).
    """

    def save_context(self, context_id: bytes, record: Any) -> None:
        if not isinstance(record, ContextRecord):
            raise TypeError(f"expected a ContextRecord, got {type(record).__name__}")
        super().save_context(context_id, record)

    def to_doc(self) -> dict[str, Any]:
        """The store as msgpack-ready values, pruned."""
        doc = self.snapshot()
        last = {bytes(cid): r for cid, r in doc["last"]}
        doc["steps"] = [s for s in doc["steps"] if s[1] >= last.get(s[0], 0)]
        doc["contexts"] = doc["contexts"][-MAX_CONTEXTS:]
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> StateStore:
        """Rebuild a store from :meth:`to_doc` output.

        Raises
        ------
        ConfigError
            The document is not a store's.
        """
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{WHERE}: corrupted node store")
        return cls.from_snapshot(doc, where=WHERE)


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
        raise ConfigError(f"{WHERE}: corrupted state (not msgpack)") from None
    if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
        raise ConfigError(f"{WHERE}: expected state version {STATE_VERSION}")
    return doc
