# SPDX-License-Identifier: Apache-2.0
"""Node durability (DESIGN §3): commit before each release; never redo a step."""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

from ..errors import UnexpectedMessage

__all__ = ["StepAlreadyCommitted", "NodeStore", "MemoryNodeStore"]


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
    machine), not of the process.
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
