# SPDX-License-Identifier: Apache-2.0
"""Node durability (DESIGN §3): commit before each release; never redo a step."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final, Protocol, Self, runtime_checkable

from ..errors import ConfigError, UnexpectedMessage
from ._fields import as_bytes, as_list

__all__ = ["StepAlreadyCommitted", "NodeStore", "MemoryNodeStore"]

#: Bounds checked when a snapshot is loaded (as ``secagg.store`` checks its files).
_MAX_CONTEXT_ID: Final = 64
_MAX_DIGEST: Final = 64
_MAX_PHASE: Final = 32
_MAX_ROUND: Final = 10**20


class StepAlreadyCommitted(UnexpectedMessage):
    """The (context, round, phase) step was committed before: it is spent."""


@runtime_checkable
class NodeStore(Protocol):
    """What a node must keep across restarts.

    A file-backed implementation makes :meth:`commit` atomic and durable (insert,
    fsync, exclusive lock on the node directory) before returning; the machine
    releases the outgoing message only after it returns. Stored digests are
    SHA-256 values over public data (keys, commitments, S): no secret is stored
    through :meth:`commit`.
    """

    def begin_context(self, context_id: bytes) -> None:
        """Record ``context_id`` as seen.

        Raises :class:`StepAlreadyCommitted` if it was.
        """

    def seen_context(self, context_id: bytes) -> bool:
        """Whether ``context_id`` was ever begun on this node."""

    def last_round(self, context_id: bytes) -> int:
        """The largest round with a committed step (0 when none)."""

    def commit(self, context_id: bytes, round: int, phase: str, digest: bytes) -> None:  # noqa: A002
        """Commit one release.

        Raises :class:`StepAlreadyCommitted` if this step was committed.
        """

    def committed(self, context_id: bytes, round: int, phase: str) -> bytes | None:  # noqa: A002
        """The digest committed for this step, or None."""

    def save_context(self, context_id: bytes, record: Any) -> None:
        """Keep the node's state of a ready context (its ``e`` key, T, peers' keys)."""

    def load_context(self, context_id: bytes) -> Any | None:
        """The record saved for ``context_id``, or None."""

    def drop_context(self, context_id: bytes) -> None:
        """Erase the saved record (its ``e`` key).

        Called when the context is replaced or failed.
        """

    def pinned_key(self, node: str) -> bytes | None:
        """The identity key pinned for ``node`` on first sight (TOFU), or None."""

    def pin_key(self, node: str, key: bytes) -> None:
        """Pin ``key`` for ``node``."""


class MemoryNodeStore:
    """In-memory :class:`NodeStore` for tests, benchmarks and the in-memory driver.

    It survives a restart of the node *object* (pass the same store to the new
    machine), not of the process; :meth:`snapshot` and :meth:`from_snapshot` carry
    it across processes for drivers that keep it elsewhere.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[bytes] = set()
        self._steps: dict[tuple[bytes, int, str], bytes] = {}
        self._last: dict[bytes, int] = {}
        self._contexts: dict[bytes, Any] = {}
        self._pins: dict[str, bytes] = {}

    def begin_context(self, context_id: bytes) -> None:
        with self._lock:
            if context_id in self._seen:
                raise StepAlreadyCommitted("context already seen", phase="setup")
            self._seen.add(context_id)

    def seen_context(self, context_id: bytes) -> bool:
        with self._lock:
            return context_id in self._seen

    def last_round(self, context_id: bytes) -> int:
        with self._lock:
            return self._last.get(context_id, 0)

    def commit(self, context_id: bytes, round: int, phase: str, digest: bytes) -> None:  # noqa: A002
        key = (context_id, round, phase)
        with self._lock:
            if key in self._steps:
                raise StepAlreadyCommitted(
                    f"step {phase} already committed", phase=phase, round=round
                )
            self._steps[key] = digest
            self._last[context_id] = max(self._last.get(context_id, 0), round)

    def committed(self, context_id: bytes, round: int, phase: str) -> bytes | None:  # noqa: A002
        with self._lock:
            return self._steps.get((context_id, round, phase))

    def save_context(self, context_id: bytes, record: Any) -> None:
        with self._lock:
            # Re-inserted: the records are kept (and snapshotted) in save order.
            self._contexts.pop(context_id, None)
            self._contexts[context_id] = record

    def load_context(self, context_id: bytes) -> Any | None:
        with self._lock:
            return self._contexts.get(context_id)

    def drop_context(self, context_id: bytes) -> None:
        with self._lock:
            self._contexts.pop(context_id, None)

    def pinned_key(self, node: str) -> bytes | None:
        with self._lock:
            return self._pins.get(node)

    def pin_key(self, node: str, key: bytes) -> None:
        with self._lock:
            self._pins.setdefault(node, key)

    # ---------------------------------------------------------------- snapshots

    def snapshot(self) -> dict[str, Any]:
        """The whole store as plain data (bytes, str, int, lists, dicts): msgpack-able.

        The form is::

            {"seen": [context_id, ...],                 # sorted
             "steps": [[context_id, round, phase, digest], ...],
             "last": [[context_id, round], ...],
             "contexts": [ContextRecord.to_dict(), ...],  # in save order
             "pins": {node: identity key}}

        The saved records hold the nodes' ``e_u`` keys: the snapshot is as secret
        as the store. Every record must be a
        :class:`~mpc_runtime.protocol.node.ContextRecord`.

        Raises
        ------
        TypeError
            A saved record is not a ``ContextRecord``.
        """
        from .node import ContextRecord  # node imports this module

        with self._lock:
            records = list(self._contexts.values())
            doc: dict[str, Any] = {
                "seen": sorted(self._seen),
                "steps": [
                    [cid, r, phase, digest]
                    for (cid, r, phase), digest in self._steps.items()
                ],
                "last": [[cid, r] for cid, r in self._last.items()],
                "pins": dict(self._pins),
            }
        for rec in records:
            if not isinstance(rec, ContextRecord):
                raise TypeError(
                    f"expected record ContextRecord, got {type(rec).__name__}"
                )
        doc["contexts"] = [rec.to_dict() for rec in records]
        return doc

    @classmethod
    def from_snapshot(
        cls, doc: Mapping[str, Any], *, where: str = "node store snapshot"
    ) -> Self:
        """A new store holding :meth:`snapshot` output (``doc`` is not kept).

        Every value is checked for its type and bounds (context ids of 1-64
        bytes, rounds in ``[0, 10**20)``, phases and digests of at most 32 and 64
        bytes); ``where`` names the source in errors.

        Raises
        ------
        ConfigError
            ``doc`` is not a snapshot.
        """
        from .node import ContextRecord  # node imports this module

        store = cls()
        try:
            if set(doc) != {"seen", "steps", "last", "contexts", "pins"}:
                raise ValueError("unexpected fields")
            store._seen = {_context_id(c) for c in as_list(doc["seen"])}
            for step in as_list(doc["steps"]):
                cid, r, phase, digest = as_list(step, 4)
                key = (_context_id(cid), _round(r), _text(phase, _MAX_PHASE))
                store._steps[key] = as_bytes(digest, _MAX_DIGEST)
            for item in as_list(doc["last"]):
                cid, r = as_list(item, 2)
                store._last[_context_id(cid)] = _round(r)
            for rec_doc in as_list(doc["contexts"]):
                if not isinstance(rec_doc, Mapping):
                    raise TypeError("expected a context record")
                rec = ContextRecord.from_dict(rec_doc, where=where)
                store._contexts[rec.context_id] = rec
            pins = doc["pins"]
            if not isinstance(pins, Mapping):
                raise TypeError("expected pins as a map")
            store._pins = {_text(k, 1 << 10): as_bytes(v, 64) for k, v in pins.items()}
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: corrupted node store ({e})") from None
        return store


def _context_id(value: object) -> bytes:
    cid = as_bytes(value, _MAX_CONTEXT_ID)
    if not cid:
        raise ValueError("expected a non-empty context id")
    return cid


def _round(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected round int, got {type(value).__name__}")
    if not 0 <= value < _MAX_ROUND:
        raise ValueError(f"expected round in [0, 10**20), got {value}")
    return value


def _text(value: object, max_size: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    if len(value) > max_size:
        raise ValueError(f"expected at most {max_size} characters, got {len(value)}")
    return value
