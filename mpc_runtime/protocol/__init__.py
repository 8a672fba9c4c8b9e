# SPDX-License-Identifier: Apache-2.0
"""Node and server state machines of DESIGN §3: messages in, messages out, no I/O."""

from .node import TRANSITIONS, ContextRecord, InputProvider, Node, NodeStage, Outgoing
from .round import ClipTotals, RoundResult, request_digest, weights_hash
from .server import SERVER_TRANSITIONS, Server, ServerRecord, ServerStage
from .setup import (
    check_threshold,
    compute_context_id,
    compute_transcript,
    threshold_floor,
)
from .store import MemoryNodeStore, NodeStore, StepAlreadyCommitted

__all__ = [
    "TRANSITIONS",
    "SERVER_TRANSITIONS",
    "ClipTotals",
    "ContextRecord",
    "InputProvider",
    "MemoryNodeStore",
    "Node",
    "NodeStage",
    "NodeStore",
    "Outgoing",
    "RoundResult",
    "Server",
    "ServerRecord",
    "ServerStage",
    "StepAlreadyCommitted",
    "check_threshold",
    "compute_context_id",
    "compute_transcript",
    "request_digest",
    "threshold_floor",
    "weights_hash",
]
