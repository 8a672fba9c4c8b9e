# SPDX-License-Identifier: Apache-2.0
# flwr is an optional extra: the type check also runs where it is not installed.
# mypy: disable-error-code="import-not-found"
"""The client side: a Flower Mod that runs one secagg node machine per client.

The mod sits in front of the user's unchanged ``ClientApp`` (``NumPyClient`` or
``Client`` through ``client_fn``). Messages that carry this integration's record
(:mod:`._wire`) are protocol traffic: the mod rebuilds the node's
:class:`~mpc_runtime.protocol.node.Node` from ``Context.state``, hands it the
protocol messages, and replies with what the machine answers. The user's ``fit``
runs inside the machine's input provider when a round request arrives, so the
trained parameters go straight into clipping, quantization and masking; they never
leave the mod in the clear.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import nacl.signing
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from mpc_runtime import keys
from mpc_runtime.errors import ConfigError, MalformedMessage, PolicyRefused
from mpc_runtime.messages import RoundRequest, check_id
from mpc_runtime.protocol.node import Node
from mpc_runtime.protocol.store import NodeStore
from secagg.config import NodeConfig
from secagg.files import NODE_TOML, load_node_identity, load_roster

from . import _state, _wire
from ._params import PLAN, STREAM, flatten, request_args, stream_spec, weights_frames

__all__ = [
    "make_secure_aggregation_mod",
    "secure_aggregation_mod",
    "NODE_CONFIG_DIR",
    "STATE_RECORD",
    "INPUTS_RECORD",
]

logger = logging.getLogger(__name__)

#: ``node_config`` key naming a ``secagg node init`` directory (identity, roster,
#: policy, durable store) on a SuperNode: ``--node-config "secagg-dir='/path'"``.
NODE_CONFIG_DIR: Final = "secagg-dir"
#: ``Context.state`` records of the mod: the node's state, and round inputs.
STATE_RECORD: Final = "secagg.node"
INPUTS_RECORD: Final = "secagg.inputs"
#: Subdirectory of a node directory holding the Flower runs' durable store, apart
#: from the daemon's own ``state/`` (each takes its own directory lock).
FLOWER_STORE_DIR: Final = "flower"

#: The legacy fit messages' records (flwr.compat.common.recorddict_compat).
_FITINS_PARAMETERS: Final = "fitins.parameters"
_FITINS_CONFIG: Final = "fitins.config"
_FITRES_PARAMETERS: Final = "fitres.parameters"

Policy = Literal["allow", "require", "refuse"]
PeerTrust = Literal["roster", "tofu"]
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


@dataclass(frozen=True, slots=True)
class _Settings:
    node_dir: str | None
    policy: Policy | None
    peer_trust: PeerTrust | None
    min_survivors: int | None
    max_colluding_nodes: int | None


@dataclass(slots=True)
class _Identity:
    node_id: str
    signing_key: nacl.signing.SigningKey
    policy: Policy
    peer_trust: PeerTrust
    roster: dict[str, bytes] | None
    min_survivors: int
    max_colluding_nodes: int
    node_dir: Path | None


def _resolve(settings: _Settings, ctxt: Context, doc: dict[str, Any]) -> _Identity:
    """Who this client is and its policy: a node directory, or a per-run identity."""
    raw_dir = settings.node_dir or ctxt.node_config.get(NODE_CONFIG_DIR)
    if raw_dir:
        d = Path(str(raw_dir)).expanduser()
        ident = load_node_identity(d)
        config = NodeConfig.from_toml(d / NODE_TOML)
        peer_trust: Any = settings.peer_trust or config.peer_trust
        policy: Any = settings.policy or config.policy
        return _Identity(
            node_id=ident.id,
            signing_key=ident.signing_key,
            policy=policy,
            peer_trust=peer_trust,
            roster=load_roster(d) if peer_trust == "roster" else None,
            min_survivors=settings.min_survivors or config.min_survivors,
            max_colluding_nodes=(
                config.max_colluding_nodes
                if settings.max_colluding_nodes is None
                else settings.max_colluding_nodes
            ),
            node_dir=d,
        )
    # No directory: a per-run identity kept in Context.state, and peers' keys
    # pinned on first sight (TOFU) since no roster was installed.
    seed = doc.get("seed")
    if not isinstance(seed, bytes) or len(seed) != keys.SECRET_KEY_SIZE:
        seed = bytes(keys.generate_signing_key())
        doc["seed"] = seed
    trust: Any = settings.peer_trust or "tofu"
    if trust == "roster":
        raise ConfigError(
            "peer_trust='roster' needs a node directory (secagg node init) with "
            f"peers/; set node_config {NODE_CONFIG_DIR!r} or node_dir="
        )
    return _Identity(
        node_id=f"flwr-{ctxt.node_id}",
        signing_key=nacl.signing.SigningKey(seed),
        policy=settings.policy or "require",
        peer_trust=trust,
        roster=None,
        min_survivors=settings.min_survivors or 2,
        max_colluding_nodes=settings.max_colluding_nodes or 0,
        node_dir=None,
    )


def _load_state(ctxt: Context) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    record = ctxt.state.config_records.get(STATE_RECORD)
    doc: dict[str, Any] = {}
    if record is not None:
        blob = record.get("state")
        if not isinstance(blob, bytes):
            raise ConfigError("Context.state: corrupted secagg node state")
        doc = _state.unpack(blob)
    arrays: dict[str, np.ndarray] = {}
    inputs = ctxt.state.array_records.get(INPUTS_RECORD)
    if inputs is not None:
        arrays = {k: a.numpy() for k, a in inputs.items()}
    return doc, arrays


def _save_state(
    ctxt: Context, doc: dict[str, Any], arrays: Mapping[str, np.ndarray]
) -> None:
    ctxt.state.config_records[STATE_RECORD] = ConfigRecord({"state": _state.pack(doc)})
    if arrays:
        ctxt.state.array_records[INPUTS_RECORD] = ArrayRecord(
            {k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()}
        )
    else:
        ctxt.state.array_records.pop(INPUTS_RECORD, None)


def _same_weights(request: RoundRequest, arrays: list[np.ndarray]) -> bool:
    """Whether the request's weights are exactly the model this client trains on.

    D_r binds the request's weights (DESIGN §3); training on anything else would
    let a server give each client its own model under one digest.
    """
    frames = weights_frames(arrays)
    return len(request.weights) == len(frames) and all(
        t.data.dtype.name == a.dtype.name
        and t.data.shape == a.shape
        and np.array_equal(
            np.ascontiguousarray(t.data).reshape(-1).view(np.uint8),
            np.frombuffer(f, dtype=np.uint8),
        )
        for t, a, f in zip(request.weights, arrays, frames)
    )


class _FitError(Exception):
    """The user's fit failed or returned something that cannot be aggregated."""


def _hello(content: RecordDict, ident: _Identity) -> None:
    content.config_records[_wire.RECORD] = ConfigRecord(
        {
            "v": _wire.WIRE_VERSION,
            "kind": _wire.KIND_HELLO,
            "stage": "hello",
            "id": ident.node_id,
            "identity_key": bytes(ident.signing_key.verify_key),
        }
    )


def _run_protocol(
    msg: Message,
    ctxt: Context,
    call_next: Callable[[Message, Context], Message],
    ident: _Identity,
    store: NodeStore,
    doc: dict[str, Any],
    arrays: dict[str, np.ndarray],
) -> tuple[RecordDict, dict[str, np.ndarray]]:
    content = msg.content
    fit_arrays: list[np.ndarray] | None = None

    def fit_weights() -> list[memoryview]:
        nonlocal fit_arrays
        record = content.array_records.get(_FITINS_PARAMETERS)
        if record is None:
            raise MalformedMessage("round request without fit instructions")
        try:
            fit_arrays = parameters_to_ndarrays(
                compat.arrayrecord_to_parameters(record, keep_input=True)
            )
        # numpy.load raises several types on malformed input; this is the boundary
        # where the server's bytes become arrays.
        except Exception:
            raise MalformedMessage("undecodable fit parameters") from None
        return weights_frames(fit_arrays)

    msgs, chunk = _wire.unpack(content, fit_weights=fit_weights)
    fit_reply: RecordDict | None = None

    def provider(request: RoundRequest) -> Mapping[str, np.ndarray]:
        nonlocal fit_reply
        # DESIGN §3: the request must describe what this client was asked to do;
        # the weights are bound by construction (rebuilt from the fit message).
        config = content.config_records.get(_FITINS_CONFIG, ConfigRecord())
        if (
            request.kind != "plan"
            or request.name != PLAN
            or fit_arrays is None
            or request.args != request_args(dict(config))
            or request.streams != (stream_spec(fit_arrays),)
            or not _same_weights(request, fit_arrays)
        ):
            raise PolicyRefused("round request does not match the fit instructions")
        del content.config_records[_wire.RECORD]
        content.array_records.pop(_wire.CHUNKS, None)
        out = call_next(msg, ctxt)
        if out.has_error():
            raise _FitError(f"fit failed: {out.error.reason}")
        fitres = compat.recorddict_to_fitres(out.content, keep_input=False)
        vector = flatten(parameters_to_ndarrays(fitres.parameters))
        if not np.isfinite(vector).all():
            # Refuse now (INPUT) rather than fail the masking at upload.
            raise _FitError("fit returned NaN or infinite parameters")
        # The reply keeps the fit's status, example count and metrics (in the
        # clear, as with Flower's SecAgg+); the parameters go only into the mask.
        fit_reply = RecordDict()
        for name, crec in out.content.config_records.items():
            fit_reply.config_records[name] = crec
        for name, mrec in out.content.metric_records.items():
            fit_reply.metric_records[name] = mrec
        fit_reply.array_records[_FITRES_PARAMETERS] = ArrayRecord()
        # A different size is the machine's SHAPE refusal (ShapeMismatch).
        return {STREAM: vector}

    node = Node(
        ident.node_id,
        ident.signing_key,
        store=store,
        inputs=provider,
        roster=ident.roster,
        peer_trust=ident.peer_trust,
        min_survivors=ident.min_survivors,
        max_colluding_nodes=ident.max_colluding_nodes,
        logger=logger,
    )
    node.import_contexts(doc.get("contexts", []), arrays, where=_state.WHERE)
    now = time.time()
    replies = []
    for m in msgs:
        for out in node.handle(m, now):
            replies.append(out.message)
    reply = fit_reply if fit_reply is not None else RecordDict()
    _wire.pack(reply, replies, stage=_wire.stage_of(msgs), chunk_bytes=chunk)
    contexts, new_arrays = node.export_contexts()
    doc["contexts"] = contexts
    return reply, new_arrays


def make_secure_aggregation_mod(
    *,
    node_dir: str | os.PathLike[str] | None = None,
    policy: Policy | None = None,
    peer_trust: PeerTrust | None = None,
    min_survivors: int | None = None,
    max_colluding_nodes: int | None = None,
) -> Mod:
    """Build a Flower client Mod running secagg's node side.

    Parameters
    ----------
    node_dir
        A ``secagg node init`` directory: the node id and Ed25519 key, its peer
        roster (``peers/``), its policy (``node.toml``) and a durable store under
        ``node_dir/flower``. Default: the ``node_config`` entry ``secagg-dir``;
        without either, a per-run identity kept in ``Context.state``.
    policy
        ``"require"`` (default without a directory: plain ``fit`` instructions are
        refused, so a server cannot skip secure aggregation), ``"allow"`` (plain
        fit passes through) or ``"refuse"``. Default with a directory: its
        ``node.toml``.
    peer_trust
        ``"roster"`` (peers' keys from the directory's roster) or ``"tofu"``
        (pin keys on first sight through the server; the default without a
        directory).
    min_survivors, max_colluding_nodes
        Node policy of DESIGN §3 (defaults: the directory's ``node.toml``, else 2
        and 0).

    Returns
    -------
    callable
        ``mod(message, context, call_next) -> Message``, for
        ``ClientApp(client_fn=..., mods=[mod])``.

    Raises
    ------
    ConfigError
        Invalid arguments.

    .. warning::
       Without a roster, first contact trusts the server to relay the right keys
       (honest-but-curious); the node logs a warning when it pins a key.
    """
    if policy not in (None, "allow", "require", "refuse"):
        raise ConfigError(f"expected policy allow|require|refuse, got {policy!r}")
    if peer_trust not in (None, "roster", "tofu"):
        raise ConfigError(f"expected peer_trust roster|tofu, got {peer_trust!r}")
    for name, value, low in (
        ("min_survivors", min_survivors, 2),
        ("max_colluding_nodes", max_colluding_nodes, 0),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < low
        ):
            raise ConfigError(f"expected {name} an int >= {low}, got {value!r}")
    settings = _Settings(
        node_dir=None if node_dir is None else os.fspath(node_dir),
        policy=policy,
        peer_trust=peer_trust,
        min_survivors=min_survivors,
        max_colluding_nodes=max_colluding_nodes,
    )

    def secure_aggregation_mod(
        msg: Message,
        ctxt: Context,
        call_next: Callable[[Message, Context], Message],
    ) -> Message:
        kind = _wire.record_kind(msg.content) if msg.has_content() else None
        if kind is None:
            if (
                msg.metadata.message_type == MessageType.TRAIN
                and msg.has_content()
                and _FITINS_PARAMETERS in msg.content.array_records
            ):
                doc, _ = _load_state(ctxt)
                if _resolve(settings, ctxt, doc).policy == "require":
                    # secagg.node's "require": training updates never leave in
                    # the clear.
                    raise PolicyRefused(
                        "this node's policy requires secure aggregation for fit"
                    )
            return call_next(msg, ctxt)
        doc, arrays = _load_state(ctxt)
        ident = _resolve(settings, ctxt, doc)
        if ident.policy == "refuse":
            raise PolicyRefused("this node's policy refuses secure aggregation")
        check_id(ident.node_id, "node id")
        reply = RecordDict()
        if kind == _wire.KIND_HELLO:
            _hello(reply, ident)
            _save_state(ctxt, doc, arrays)
            return Message(reply, reply_to=msg)
        if kind != _wire.KIND_PROTOCOL:
            raise MalformedMessage(f"secagg record: unknown kind {kind!r}")
        if ident.node_dir is not None:
            from secagg.store import FileNodeStore

            with FileNodeStore(ident.node_dir / FLOWER_STORE_DIR) as fstore:
                reply, arrays = _run_protocol(
                    msg, ctxt, call_next, ident, fstore, doc, arrays
                )
        else:
            store = (
                _state.StateStore.from_doc(doc["store"])
                if "store" in doc
                else (_state.StateStore())
            )
            reply, arrays = _run_protocol(
                msg, ctxt, call_next, ident, store, doc, arrays
            )
            doc["store"] = store.to_doc()
        _save_state(ctxt, doc, arrays)
        return Message(reply, reply_to=msg)

    return secure_aggregation_mod


#: The mod with default settings: ``ClientApp(client_fn=..., mods=[secure_aggregation_mod])``.
#: A SuperNode's ``node_config`` entry ``secagg-dir`` selects a node directory.
secure_aggregation_mod: Final = make_secure_aggregation_mod()
