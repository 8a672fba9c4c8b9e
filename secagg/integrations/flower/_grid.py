# SPDX-License-Identifier: Apache-2.0
# flwr is an optional extra: the type check also runs where it is not installed.
# mypy: disable-error-code="import-not-found"
"""An in-process Flower ``Grid``: the ServerApp side calls ClientApps directly.

Flower's simulation engine always starts Ray; this grid runs a ``ClientApp`` for
each of ``num_nodes`` nodes in the calling process, one message at a time, for
tests, examples and benchmarks. Like a deployment, every message and reply
crosses a serialization boundary (Flower's own object deflate/inflate, which also
counts the bytes), and with ``isolate=True`` (default) each node's ``Context`` is
round-tripped through its protobuf form before every call, as when
``flwr-clientapp`` runs each message in a fresh process.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.user_config import UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.serverapp.grid import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "Traffic"]

logger = logging.getLogger(__name__)

#: Replies kept for messages whose sender never pulls them (fire-and-forget pushes).
_MAX_UNPULLED = 4096
#: ``drop(node_id, message) -> bool``: True makes the node silent for ``message``.
DropHook = Callable[[int, Message], bool]


@dataclass(slots=True)
class Traffic:
    """Bytes Flower would move (its deflated objects), by direction and stage."""

    down: dict[str, int] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)

    def add(self, direction: str, stage: str, nbytes: int) -> None:
        table = self.down if direction == "down" else self.up
        table[stage] = table.get(stage, 0) + nbytes


def _stage(msg: Message) -> str:
    # This integration's stage, Flower SecAgg+'s stage, or the message type.
    if msg.has_content():
        for key in ("secagg", "secaggplus_configs"):
            record = msg.content.config_records.get(key)
            stage = None if record is None else record.get("stage")
            if isinstance(stage, str):
                return f"{key}:{stage}"
    return str(msg.metadata.message_type)


def _carry(msg: Message) -> tuple[Message, int]:
    """Deflate and inflate ``msg`` as Flower's transport does; count its bytes."""
    objects = get_all_nested_objects(msg)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    nbytes = sum(len(c) for c in contents.values())
    copy = inflate_object_from_contents(msg.object_id, contents)
    assert isinstance(copy, Message)
    return copy, nbytes


class InProcessGrid(Grid):  # type: ignore[misc,unused-ignore]  # Any without flwr
    """A Flower ``Grid`` that delivers messages to in-process ``ClientApp`` calls.

    Parameters
    ----------
    client_app
        The ``ClientApp`` every node runs.
    num_nodes, first_node_id
        How many nodes, and the first node id (the others follow it).
    node_config
        ``node_config(i) -> dict`` for node index i (default: ``{}``), e.g. a
        dataset partition or ``secagg-dir``.
    run_id
        The run's id; also set as the process' Flower task identity.
    drop
        ``drop(node_id, message) -> bool``: the node is silent for that message
        (no reply: its sender's ``send_and_receive`` returns without it, at once).
    isolate
        Round-trip each node's ``Context`` through protobuf before each call.

    Attributes
    ----------
    traffic
        :class:`Traffic` of every message carried.
    contexts
        The nodes' contexts, by node id.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        node_config: Callable[[int], Mapping[str, UserConfigValue]] | None = None,
        run_id: int = 1,
        first_node_id: int = 1001,
        drop: DropHook | None = None,
        isolate: bool = True,
    ) -> None:
        self.client_app = client_app
        self.drop = drop
        self.isolate = isolate
        self.traffic = Traffic()
        self.contexts: dict[int, Context] = {}
        for i in range(num_nodes):
            nid = first_node_id + i
            self.contexts[nid] = Context(
                run_id=run_id,
                node_id=nid,
                node_config=dict(node_config(i) if node_config else {}),
                state=RecordDict(),
                run_config={},
            )
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count(1)
        # Messages take their run and sender from the process' task identity, as
        # in a ServerApp process.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    def set_run(self, run: Run) -> None:
        """Set the run (its id must match the one given at construction)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message (deprecated in Flower; kept for the ABC)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The node ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Carry each message to its node and run the node's ClientApp on it."""
        ids = []
        for msg in messages:
            carried, nbytes = _carry(msg)
            mid = uuid.uuid4().hex
            carried.metadata.__dict__["_message_id"] = mid
            self.traffic.add("down", _stage(msg), nbytes)
            self._pending[mid] = carried
            ids.append(mid)
        # One ClientApp call per message, in order, like nodes answering.
        for mid in ids:
            self._deliver(mid)
        return ids

    def _deliver(self, mid: str) -> None:
        msg = self._pending.pop(mid)
        nid = msg.metadata.dst_node_id
        stage = _stage(msg)  # before the ClientApp (a mod may consume its record)
        if nid not in self.contexts or (self.drop and self.drop(nid, msg)):
            return
        ctx = self.contexts[nid]
        if self.isolate:
            ctx = context_from_proto(context_to_proto(ctx))
        try:
            reply = self.client_app(msg, ctx)
        # A ClientApp that raises is an error reply in Flower, not a crash.
        except Exception as e:  # noqa: BLE001
            logger.warning("node=%d ClientApp raised %s: %s", nid, type(e).__name__, e)
            reply = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"{type(e).__name__}: {e}",
                ),
                reply_to=msg,
            )
        else:
            # Flower keeps the context only when the ClientApp succeeded.
            self.contexts[nid] = ctx
        carried, nbytes = _carry(reply)
        carried.metadata.__dict__["_message_id"] = f"r{next(self._ids)}"
        self.traffic.add("up", stage, nbytes)
        self._replies[mid] = carried
        while len(self._replies) > _MAX_UNPULLED:  # pushed, never pulled (aborts)
            del self._replies[next(iter(self._replies))]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to the given messages (each returned once)."""
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, run every node, and pull: silent nodes have no reply."""
        return self.pull_messages(self.push_messages(messages))
