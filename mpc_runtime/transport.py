# SPDX-License-Identifier: Apache-2.0
"""ZeroMQ transport: ROUTER/DEALER over CurveZMQ with ZAP, chunking and deadlines.

This is the socket half of the ZeroMQ driver (DESIGN §3 "Identity and
transport"). It moves :mod:`mpc_runtime.messages` between the researcher and
its nodes and contains no protocol logic.

* :class:`ResearcherEndpoint`: a ROUTER that binds, a CurveZMQ server with the
  researcher's key pair, and a ZAP handler (a
  :class:`zmq.auth.thread.ThreadAuthenticator` thread) that admits only
  enrolled node keys.
* :class:`NodeEndpoint`: a DEALER that connects out, a CurveZMQ client pinned to
  the researcher's public key. It may start before the researcher listens and
  reconnects after a restart of either side (ZeroMQ reconnects by itself; the
  DEALER keeps its queue across reconnections). libzmq gives up on an endpoint
  after a *failed handshake* (ZAP refusal, wrong server key) and drops that
  connection's queue, so the node watches its socket monitor and redials with
  back-off inside :meth:`NodeEndpoint.send`/:meth:`NodeEndpoint.recv`: a node
  enrolled after it started gets in without a restart.

Both are context managers that own their sockets and close them with LINGER 0.
Like ZeroMQ sockets, an endpoint is used from one thread; only
:meth:`ResearcherEndpoint.enroll` and :meth:`~ResearcherEndpoint.revoke` may be
called from any thread.

Authentication and the sender of a message
------------------------------------------
ZAP binds each connection to a node id: the authenticator's
``curve_user_id`` returns the id enrolled for the client's CURVE public key, so
every frame received on that connection carries the authenticated ``User-Id``
property. The researcher takes *that* as the sender. It never trusts the
ROUTER routing id (chosen by the peer) nor the ``sender`` field of the header
(written by the peer): a message whose ``sender`` differs from its User-Id is
dropped and logged. Because ZAP runs only at the handshake, enrollment is also
checked per message, so :meth:`ResearcherEndpoint.revoke` takes effect on
connections that are already up. The socket sets a ZAP domain and
``ZAP_ENFORCE_DOMAIN``, so if no ZAP handler were running libzmq would refuse
every client instead of admitting any key (its legacy behaviour).

Routing to a node
-----------------
Nodes set ``ROUTING_ID`` to their node id, so the researcher sends to a node by
id. A routing id is chosen by the peer, so a node could announce another
node's id ("squatting"). Hence the researcher routes to an id only after it has
received at least one authenticated message on which routing id == User-Id
(the id is then *bound*), and a message whose routing id differs from its
User-Id is dropped, logged at WARNING, and unbinds that routing id (fail
closed: the real node must speak again before it is routable).
``ROUTER_HANDOVER`` is on, so a restarted node replaces its own stale connection
at once: libzmq reaps a dead connection only when the socket is used, and without
handover a node reconnecting while the researcher is idle would be refused as a
duplicate id for as long as both stay up. (ZAP cannot check the peer's routing id:
libzmq puts the server's own id in the ZAP identity frame.) The cost: an enrolled
node connecting under another node's id takes that id over until its first
message, which is dropped and unbinds the id. Until then it may receive what was
meant for the other node, and that is harmless: everything the researcher sends
is public to enrolled nodes or signed and AEAD-encrypted end to end (DESIGN §3),
so a squatter can only deny service (the victim becomes a dropout, which the
protocol recovers), and its victim takes the id back by reconnecting.
``ROUTER_MANDATORY`` makes a send to an unknown or disconnected id fail instead
of vanishing; :meth:`ResearcherEndpoint.send` reports it as ``False``.

Chunk envelope (transport version 1)
------------------------------------
On the wire a message is ``[envelope, *chunks]``, where the logical frames
``[header, *payloads]`` of :func:`mpc_runtime.framing.encode` are cut into
chunks of at most ``chunk_size`` bytes (a frame no longer than that is one
chunk, sent as is). All integers are big-endian::

    offset  size  field
    0       2     magic b"SA"
    2       1     transport version = 1
    3       1     flags = 0 (reserved; anything else is refused)
    4       4     n: number of logical frames, 1 ... framing.MAX_FRAMES
    8       12*n  per logical frame: chunk count (u32, >= 1), total bytes (u64)

The receiver checks the envelope (length exactly ``8 + 12 n``, declared total
bytes <= ``max_message_bytes``, total chunks <= ``max_chunks`` and equal to the
number of frames that follow) *before* it reassembles anything, then checks
every chunk against ``max_frame_bytes`` and the running sum against the
declared total, and only then copies multi-chunk frames into one buffer (a
single-chunk frame is used in place, zero copy). A peer therefore cannot make
the receiver allocate more than it declared, nor declare more than the limits.
ZeroMQ itself drops the connection of a peer that sends one frame above
``max_frame_bytes`` (``MAXMSGSIZE``). Any change to these bytes bumps the
transport version.
"""

from __future__ import annotations

import collections
import logging
import math
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import zmq
import zmq.auth.thread
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from . import framing
from .errors import ConfigError, MalformedMessage
from .messages import Message, check_id

__all__ = [
    "TRANSPORT_VERSION",
    "TransportOptions",
    "ResearcherEndpoint",
    "NodeEndpoint",
    "generate_curve_keypair",
]

logger = logging.getLogger(__name__)

#: Version byte of the chunk envelope (independent of the protocol version).
TRANSPORT_VERSION: Final = 1

_MAGIC: Final = b"SA"
_ENVELOPE_HEAD: Final = struct.Struct(">2sBBI")
_ENVELOPE_ENTRY: Final = struct.Struct(">IQ")
_MAX_ENVELOPE_BYTES: Final = (
    _ENVELOPE_HEAD.size + _ENVELOPE_ENTRY.size * framing.MAX_FRAMES
)
_ZAP_DOMAIN: Final = b"secagg"
_CURVE_SLACK: Final = 256
_CURVE_KEY_Z85_LEN: Final = 40

# Monitor events the researcher counts (exposed as ``events``, used by tests).
_MONITOR_EVENTS: Final[dict[int, str]] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
}


def generate_curve_keypair() -> tuple[str, str]:
    """Return a fresh CurveZMQ key pair ``(public_z85, secret_z85)``.

    Both are 40-character Z85 strings (``zmq.curve_keypair``). Keep the secret
    key out of logs and world-readable files.
    """
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def _z85_key(value: object, what: str) -> bytes:
    """Return ``value`` (Z85 str/bytes or 32 raw bytes) as 40 Z85 bytes."""
    if isinstance(value, str):
        # A str is always Z85 text; raw 32-byte keys must be bytes.
        value = value.encode("ascii", "replace")
        if len(value) != _CURVE_KEY_Z85_LEN:
            raise ConfigError(f"expected {what} of 40 Z85 characters")
    if not isinstance(value, (bytes, bytearray)):
        raise ConfigError(
            f"expected {what} as a Z85 str or bytes, got {type(value).__name__}"
        )
    value = bytes(value)
    if len(value) == 32:
        return z85.encode(value)
    if len(value) != _CURVE_KEY_Z85_LEN:
        raise ConfigError(
            f"expected {what} of 40 Z85 characters or 32 bytes, got {len(value)}"
        )
    try:
        z85.decode(value)
    except Exception:
        # z85.decode raises assorted errors on bad alphabet; the key is not echoed.
        raise ConfigError(f"expected {what} in Z85") from None
    return value


def _node_id(value: object) -> str:
    try:
        return check_id(value, "node id")
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportOptions:
    """Socket options, deadlines (seconds) and size limits (bytes) of an endpoint.

    Parameters
    ----------
    sndhwm, rcvhwm
        ZeroMQ high-water marks, in messages.
    send_timeout
        How long a send may wait for queue space (``SNDTIMEO``).
    heartbeat_interval, heartbeat_timeout, heartbeat_ttl
        ZMTP heartbeats; a peer silent for ``heartbeat_timeout`` is
        disconnected. ``None`` timeouts mean ``3 * heartbeat_interval``.
    reconnect_interval, reconnect_interval_max
        Node reconnection back-off (``RECONNECT_IVL``, ``RECONNECT_IVL_MAX``).
    handshake_timeout
        Deadline of the CURVE handshake (``HANDSHAKE_IVL``).
    chunk_size
        Logical frames above this many bytes are sent as several chunks.
    max_frame_bytes
        ``MAXMSGSIZE``: a single received frame above it drops the connection.
        ``None`` means ``max(chunk_size, largest envelope)``.
    max_message_bytes, max_chunks
        Bounds of one reassembled message (declared total, chunk count).
    copy_threshold
        Frames of at least this many bytes are sent zero-copy (``copy=False``).
    ipv6
        Enable IPv6 on the socket.
    """

    sndhwm: int = 1000
    rcvhwm: int = 1000
    send_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float | None = None
    heartbeat_ttl: float | None = None
    reconnect_interval: float = 0.1
    reconnect_interval_max: float = 2.0
    handshake_timeout: float = 10.0
    chunk_size: int = 8 << 20
    max_frame_bytes: int | None = None
    max_message_bytes: int = 2 << 30
    max_chunks: int = 8192
    copy_threshold: int = 64 << 10
    ipv6: bool = False

    def __post_init__(self) -> None:
        for name in ("sndhwm", "rcvhwm", "chunk_size", "max_message_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expected {name} as an int >= 1, got {value!r}")
        if not isinstance(self.max_chunks, int) or not (
            framing.MAX_FRAMES <= self.max_chunks <= 1 << 32
        ):
            raise ConfigError(
                f"expected max_chunks in [{framing.MAX_FRAMES}, 2**32], "
                f"got {self.max_chunks!r}"
            )
        if not isinstance(self.copy_threshold, int) or self.copy_threshold < 0:
            raise ConfigError(
                f"expected copy_threshold as an int >= 0, got {self.copy_threshold!r}"
            )
        for name in (
            "send_timeout",
            "heartbeat_interval",
            "heartbeat_timeout",
            "heartbeat_ttl",
            "reconnect_interval",
            "reconnect_interval_max",
            "handshake_timeout",
        ):
            value = getattr(self, name)
            if value is None and name in ("heartbeat_timeout", "heartbeat_ttl"):
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ConfigError(
                    f"expected {name} as a finite number of seconds > 0, got {value!r}"
                )
        if self.frame_limit < max(self.chunk_size, _MAX_ENVELOPE_BYTES):
            raise ConfigError(
                "expected max_frame_bytes >= max(chunk_size, "
                f"{_MAX_ENVELOPE_BYTES}), got {self.max_frame_bytes!r}"
            )

    @property
    def frame_limit(self) -> int:
        """The effective ``MAXMSGSIZE``."""
        if self.max_frame_bytes is None:
            return max(self.chunk_size, _MAX_ENVELOPE_BYTES)
        return self.max_frame_bytes


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _apply_options(sock: zmq.Socket[Any], opts: TransportOptions) -> None:
    ivl = opts.heartbeat_interval
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, opts.sndhwm)
    sock.setsockopt(zmq.RCVHWM, opts.rcvhwm)
    sock.setsockopt(zmq.SNDTIMEO, _ms(opts.send_timeout))
    sock.setsockopt(zmq.HEARTBEAT_IVL, _ms(ivl))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ms(opts.heartbeat_timeout or 3 * ivl))
    sock.setsockopt(zmq.HEARTBEAT_TTL, _ms(opts.heartbeat_ttl or 3 * ivl))
    sock.setsockopt(zmq.HANDSHAKE_IVL, _ms(opts.handshake_timeout))
    # With CURVE, libzmq applies MAXMSGSIZE to the encrypted MESSAGE command, which
    # is a few dozen bytes longer than the frame it carries.
    sock.setsockopt(zmq.MAXMSGSIZE, opts.frame_limit + _CURVE_SLACK)
    sock.setsockopt(zmq.IPV6, 1 if opts.ipv6 else 0)


# ---------------------------------------------------------------- chunk envelope


def _split(msg: Message, opts: TransportOptions) -> list[Any]:
    """Encode ``msg`` as ``[envelope, *chunks]`` (memoryviews, no copies)."""
    entries: list[bytes] = []
    chunks: list[memoryview] = []
    total = 0
    for frame in framing.encode(msg):
        view = memoryview(frame).cast("B")
        size = view.nbytes
        count = max(1, -(-size // opts.chunk_size))
        entries.append(_ENVELOPE_ENTRY.pack(count, size))
        chunks.extend(
            view[i * opts.chunk_size : (i + 1) * opts.chunk_size] for i in range(count)
        )
        total += size
    if total > opts.max_message_bytes or len(chunks) > opts.max_chunks:
        raise ValueError(
            f"expected a message of at most {opts.max_message_bytes} bytes in "
            f"{opts.max_chunks} chunks, got {total} bytes in {len(chunks)}"
        )
    head = _ENVELOPE_HEAD.pack(_MAGIC, TRANSPORT_VERSION, 0, len(entries))
    return [head + b"".join(entries), *chunks]


class _Drop(Exception):
    """A received message is dropped; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _parse_envelope(frame: zmq.Frame, opts: TransportOptions) -> list[tuple[int, int]]:
    data = frame.bytes
    if len(data) < _ENVELOPE_HEAD.size or len(data) > _MAX_ENVELOPE_BYTES:
        raise _Drop("envelope", f"envelope of {len(data)} bytes")
    magic, version, flags, count = _ENVELOPE_HEAD.unpack_from(data)
    if magic != _MAGIC or version != TRANSPORT_VERSION or flags != 0:
        raise _Drop("envelope", f"magic/version/flags {magic!r}/{version}/{flags}")
    if not 1 <= count <= framing.MAX_FRAMES or len(data) != (
        _ENVELOPE_HEAD.size + count * _ENVELOPE_ENTRY.size
    ):
        raise _Drop("envelope", f"{count} logical frames in {len(data)} bytes")
    entries = [
        _ENVELOPE_ENTRY.unpack_from(
            data, _ENVELOPE_HEAD.size + i * _ENVELOPE_ENTRY.size
        )
        for i in range(count)
    ]
    declared_bytes = sum(size for _, size in entries)
    declared_chunks = sum(n for n, _ in entries)
    if any(n < 1 for n, _ in entries):
        raise _Drop("envelope", "a logical frame of zero chunks")
    # Limits are checked on what the peer declares, before anything is reassembled.
    if declared_bytes > opts.max_message_bytes or declared_chunks > opts.max_chunks:
        raise _Drop(
            "limits", f"declared {declared_bytes} bytes in {declared_chunks} chunks"
        )
    return entries


def _drain(sock: zmq.Socket[Any], frame: zmq.Frame | None) -> None:
    """Discard the rest of a multipart message (its parts arrive atomically)."""
    more = frame is not None and frame.more
    while more:
        try:
            more = sock.recv(zmq.NOBLOCK, copy=False).more
        except zmq.Again:
            return


def _read_frames(
    sock: zmq.Socket[Any], envelope: zmq.Frame, opts: TransportOptions
) -> list[memoryview | bytearray]:
    """Read the chunks announced by ``envelope`` and reassemble logical frames.

    On :class:`_Drop` the rest of the multipart message has been discarded.
    """
    last: zmq.Frame = envelope
    parts: list[zmq.Frame] = []
    try:
        entries = _parse_envelope(envelope, opts)
        expected = sum(n for n, _ in entries)
        while last.more:
            if len(parts) == expected:
                raise _Drop("envelope", "more chunks than declared")
            last = sock.recv(zmq.NOBLOCK, copy=False)
            parts.append(last)
            if len(last) > opts.frame_limit:
                raise _Drop("limits", f"chunk of {len(last)} bytes")
        if len(parts) != expected:
            raise _Drop("envelope", f"{len(parts)} chunks, declared {expected}")
    except _Drop:
        _drain(sock, last)
        raise
    frames: list[memoryview | bytearray] = []
    pos = 0
    for count, size in entries:
        group = [memoryview(p.buffer) for p in parts[pos : pos + count]]
        pos += count
        if sum(g.nbytes for g in group) != size:
            raise _Drop("envelope", "chunk sizes differ from the declared total")
        if count == 1:
            frames.append(group[0])  # Zero copy: the view keeps the frame alive.
            continue
        # Allocation happens only once the received sizes match a declared total
        # that is already within max_message_bytes.
        buf = bytearray(size)
        offset = 0
        for g in group:
            buf[offset : offset + g.nbytes] = g
            offset += g.nbytes
        frames.append(buf)
    return frames


# ---------------------------------------------------------------------- endpoints


#: Keys of :attr:`_Endpoint.traffic`.
_TRAFFIC_KEYS: Final = (
    "sent_bytes",
    "sent_messages",
    "received_bytes",
    "received_messages",
)


class _Endpoint:
    """What both endpoints share: options, drop and traffic counters, sending."""

    _socket: zmq.Socket[Any]

    def __init__(
        self,
        options: TransportOptions | None,
        context: zmq.Context[Any] | None,
        log: logging.Logger | None,
    ) -> None:
        if options is not None and not isinstance(options, TransportOptions):
            raise ConfigError(
                f"expected options as TransportOptions, got {type(options).__name__}"
            )
        if not zmq.has("curve"):
            raise RuntimeError("expected libzmq with CURVE support, got one without")
        self.options = options or TransportOptions()
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self.log = log or logger
        #: Dropped messages by reason (tests and metrics read it).
        self.drops: collections.Counter[str] = collections.Counter()
        #: Messages and bytes this endpoint moved: ``sent_bytes``, ``sent_messages``
        #: (counted when ``send`` returns ``True``), ``received_bytes``,
        #: ``received_messages`` (counted when ``recv`` returns the message; drops
        #: are not counted). Bytes are this transport's frames: the chunk envelope
        #: plus the chunks, i.e. the logical frames of :func:`framing.encode`. The
        #: ROUTER's routing-id frame, ZMTP framing, CURVE overhead and TCP/IP
        #: headers are not counted.
        self.traffic: collections.Counter[str] = collections.Counter(
            dict.fromkeys(_TRAFFIC_KEYS, 0)
        )
        self._closed = False

    @property
    def dropped(self) -> int:
        """Total number of received messages dropped so far."""
        return sum(self.drops.values())

    def _drop(self, reason: str, peer: str, detail: str) -> None:
        self.drops[reason] += 1
        level = logging.WARNING if reason in ("sender", "routing_id") else logging.DEBUG
        # Only the reason, the peer and sizes are logged, never frame contents.
        self.log.log(
            level, "dropped message reason=%s peer=%s %s", reason, peer, detail
        )

    def _send_parts(self, parts: list[Any], routing_id: bytes | None = None) -> None:
        """Send ``[routing_id, *parts]`` and count ``parts`` once all are queued."""
        if routing_id is not None:
            self._socket.send(routing_id, zmq.SNDMORE)
        threshold = self.options.copy_threshold
        last = len(parts) - 1
        sent = 0
        for i, part in enumerate(parts):
            nbytes = memoryview(part).nbytes
            self._socket.send(
                part,
                zmq.SNDMORE if i < last else 0,
                copy=nbytes < threshold,
            )
            sent += nbytes
        self.traffic["sent_messages"] += 1
        self.traffic["sent_bytes"] += sent

    def _count_received(self, envelope: zmq.Frame, frames: list[Any]) -> None:
        """Count an accepted message: its envelope plus its reassembled frames."""
        self.traffic["received_messages"] += 1
        self.traffic["received_bytes"] += len(envelope) + sum(
            memoryview(f).nbytes for f in frames
        )

    def _decode(self, frames: list[Any], peer: str) -> Message | None:
        try:
            return framing.decode(frames)
        except MalformedMessage as e:
            self._drop("malformed", peer, type(e).__name__)
            return None

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("expected an open endpoint, got a closed one")

    def _close_context(self) -> None:
        if self._own_context:
            self._context.term()


class _EnrollmentAuthenticator(zmq.auth.thread.ThreadAuthenticator):
    """ZAP handler admitting enrolled node keys and naming each connection.

    ``callback`` (a pyzmq credentials provider) admits a key iff it is enrolled;
    ``curve_user_id`` returns the node id enrolled for it, which libzmq attaches
    to every message of the connection as ``User-Id``.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        log: logging.Logger,
        lock: threading.Lock,
        by_key: dict[bytes, str],
    ) -> None:
        super().__init__(context=context, log=log)
        self._lock = lock
        self._by_key = by_key

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            return bytes(key) in self._by_key

    def curve_user_id(self, client_public_key: bytes) -> str:
        with self._lock:
            # A key revoked between callback() and here gets an empty User-Id,
            # which is never enrolled, so its messages are dropped.
            return self._by_key.get(z85.encode(client_public_key), "")


class ResearcherEndpoint(_Endpoint):
    """The researcher's ROUTER: binds, CurveZMQ server, ZAP-admitted nodes.

    Parameters
    ----------
    endpoint
        Where to bind, e.g. ``"tcp://0.0.0.0:5555"``; a port of ``*`` binds a
        random free port (``bind_to_random_port``). :attr:`endpoint` tells the
        bound address.
    public_key, secret_key
        The researcher's CurveZMQ key pair (Z85 str/bytes or 32 raw bytes).
    enrolled
        Initial ``{node_id: curve_public_key}``; see :meth:`enroll`.
    options
        :class:`TransportOptions` (HWMs, heartbeats, timeouts, size limits).
    context
        A ``zmq.Context`` to use (not terminated on close). ZAP handlers are
        per context, so use one ResearcherEndpoint per context.
    logger
        Logger to use instead of this module's.

    Raises
    ------
    ConfigError
        Bad keys, ids or options.
    zmq.ZMQError
        The address cannot be bound.
    """

    def __init__(
        self,
        endpoint: str,
        public_key: str | bytes,
        secret_key: str | bytes,
        *,
        enrolled: Mapping[str, str | bytes] | None = None,
        options: TransportOptions | None = None,
        context: zmq.Context[Any] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        public = _z85_key(public_key, "researcher public key")
        secret = _z85_key(secret_key, "researcher secret key")
        super().__init__(options, context, logger)
        self._lock = threading.Lock()
        self._by_key: dict[bytes, str] = {}
        self._by_id: dict[str, bytes] = {}
        self._bound: set[str] = set()
        #: Connection events seen by the socket monitor, by name.
        self.events: collections.Counter[str] = collections.Counter()
        self._auth = _EnrollmentAuthenticator(
            self._context, self.log, self._lock, self._by_key
        )
        self._socket = None  # type: ignore[assignment]
        self._monitor: zmq.Socket[Any] | None = None
        try:
            for node, key in (enrolled or {}).items():
                self.enroll(node, key)
            # The ZAP handler runs before the socket binds, so no client is ever
            # admitted without it.
            self._auth.start()
            self._auth.configure_curve_callback(
                domain=_ZAP_DOMAIN.decode(), credentials_provider=self._auth
            )
            sock = self._context.socket(zmq.ROUTER)
            self._socket = sock
            _apply_options(sock, self.options)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # A restarted node must get its id back: libzmq reaps a dead connection
            # only when the socket is used, so without handover a node reconnecting
            # while the researcher is idle is refused as a duplicate id for good.
            # The cost (module docstring): a squatter can take over an id until it
            # speaks, which denies service and reveals nothing.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self._monitor = sock.get_monitor_socket(sum(_MONITOR_EVENTS))
            self._monitor.setsockopt(zmq.LINGER, 0)
            address, _, port = endpoint.rpartition(":")
            if port == "*":
                sock.bind_to_random_port(address)
            else:
                sock.bind(endpoint)
            self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.close()
            raise
        self.log.info("researcher endpoint bound endpoint=%s", self.endpoint)

    # -- enrollment

    def enroll(self, node_id: str, curve_public_key: str | bytes) -> None:
        """Admit ``node_id`` with this CurveZMQ public key (replacing its old key).

        Takes effect for the next handshake; a node already refused redials by
        itself (:class:`NodeEndpoint`).

        .. warning::
           ``User-Id`` is the node id, not the key, so replacing a node's key
           does not cut off a connection already authenticated with the old
           key; it ends when that connection drops. To cut a key off at once,
           restart the endpoint.

        Raises
        ------
        ConfigError
            Bad id or key, or the key is enrolled under another id.
        """
        node = _node_id(node_id)
        key = _z85_key(curve_public_key, "node public key")
        with self._lock:
            holder = self._by_key.get(key)
            if holder is not None and holder != node:
                raise ConfigError(f"expected a key not enrolled yet, got {holder}'s")
            old = self._by_id.pop(node, None)
            if old is not None:
                del self._by_key[old]
            self._by_key[key] = node
            self._by_id[node] = key
        self.log.info("enrolled node peer=%s", node)

    def revoke(self, node_id: str) -> None:
        """Refuse ``node_id`` from now on, on new and existing connections.

        Messages already authenticated as ``node_id`` are dropped from now on
        and it is no longer routable. Unknown ids are ignored.
        """
        with self._lock:
            key = self._by_id.pop(node_id, None)
            if key is not None:
                del self._by_key[key]
            self._bound.discard(node_id)
        self.log.info("revoked node peer=%s", node_id)

    @property
    def enrolled(self) -> frozenset[str]:
        """Ids of the enrolled nodes."""
        with self._lock:
            return frozenset(self._by_id)

    def is_routable(self, node_id: str) -> bool:
        """Whether ``node_id`` has authenticated itself on its routing id."""
        with self._lock:
            return node_id in self._bound

    # -- I/O

    def send(self, node_id: str, msg: Message) -> bool:
        """Queue ``msg`` for ``node_id``.

        ``msg``'s arrays are sent without copying: do not mutate them until the
        call returns and ZeroMQ has sent them.

        Returns
        -------
        bool
            ``True`` once queued; ``False`` when the node is not routable (never
            authenticated on this endpoint, revoked, or disconnected:
            ``ROUTER_MANDATORY``'s EHOSTUNREACH) or its queue stayed full for
            ``send_timeout``. The caller treats ``False`` as a dropout.

        Raises
        ------
        TypeError
            ``msg`` is not a protocol message.
        ValueError
            ``msg`` exceeds ``max_message_bytes`` or ``max_chunks``.
        """
        self._check_open()
        parts = _split(msg, self.options)
        with self._lock:
            routable = node_id in self._bound
        if not routable:
            self.log.debug("send refused: not routable peer=%s", node_id)
            return False
        try:
            self._send_parts(parts, routing_id=node_id.encode("utf-8"))
        except zmq.Again:
            self.log.warning("send timed out: queue full peer=%s", node_id)
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # The connection is gone; whoever takes the routing id next must
            # authenticate on it before anything is routed there again.
            with self._lock:
                self._bound.discard(node_id)
            self.log.debug("send refused: host unreachable peer=%s", node_id)
            return False
        self.log.debug(
            "sent type=%s round=%d peer=%s frames=%d",
            msg.TYPE.name,
            msg.round,
            node_id,
            len(parts),
        )
        return True

    def recv(self, timeout: float) -> tuple[str, Message] | None:
        """Return the next valid ``(sender_id, message)``, or ``None`` at the deadline.

        ``sender_id`` is the ZAP-authenticated node id. Invalid messages
        (unauthenticated, spoofed sender or routing id, bad envelope, over the
        limits, undecodable) are dropped, counted in :attr:`drops` and logged,
        and waiting continues until ``timeout`` seconds have passed.
        """
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            ready = dict(poller.poll(max(0, math.ceil(remaining * 1000))))
            if self._monitor is not None and self._monitor in ready:
                self._read_monitor()
            if self._socket in ready:
                got = self._recv_one()
                if got is not None:
                    return got
            # A flood of invalid messages cannot hold the caller past the deadline.
            if time.monotonic() >= deadline:
                return None

    def _read_monitor(self) -> None:
        assert self._monitor is not None
        for _ in range(1000):  # Bounded: events are small and few.
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            name = _MONITOR_EVENTS.get(parse_monitor_message(frames)["event"])
            if name is not None:
                self.events[name] += 1
                self.log.debug("connection event=%s", name)

    def _recv_one(self) -> tuple[str, Message] | None:
        sock = self._socket
        try:
            rid_frame = sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        routing_id = rid_frame.bytes.decode("utf-8", "replace")
        peer = routing_id[:64]
        if not rid_frame.more:
            self._drop("envelope", peer, "no frames")
            return None
        envelope = sock.recv(zmq.NOBLOCK, copy=False)
        try:
            # A str property name gives a str (pyzmq's stub says int | str).
            user_id = cast(str, envelope.get("User-Id"))
        except zmq.ZMQError:
            user_id = ""
        try:
            sender = self._authenticate(user_id, rid_frame.bytes)
        except _Drop as d:
            # Checked before the envelope is even parsed: nothing is reassembled
            # for a peer that is not who it claims to be.
            _drain(sock, envelope)
            self._drop(d.reason, peer, d.detail)
            return None
        try:
            frames = _read_frames(sock, envelope, self.options)
        except _Drop as d:
            self._drop(d.reason, peer, d.detail)
            return None
        msg = self._decode(frames, sender)
        if msg is None:
            return None
        if msg.sender != sender:
            self._drop("sender", sender, "header sender differs from User-Id")
            return None
        with self._lock:
            if sender in self._by_id:
                self._bound.add(sender)
        self._count_received(envelope, frames)
        self.log.debug(
            "received type=%s round=%d peer=%s frames=%d",
            msg.TYPE.name,
            msg.round,
            sender,
            len(frames),
        )
        return sender, msg

    def _authenticate(self, user_id: str, routing_id: bytes) -> str:
        with self._lock:
            if not user_id or user_id not in self._by_id:
                raise _Drop("unenrolled", "User-Id not enrolled")
            if routing_id != user_id.encode("utf-8"):
                # Somebody else announced this routing id: fail closed until the
                # real node authenticates on it again.
                self._bound.discard(routing_id.decode("utf-8", "replace"))
                raise _Drop("routing_id", f"routing id claimed by User-Id {user_id}")
        return user_id

    def close(self) -> None:
        """Close the socket, the monitor and the ZAP thread (LINGER 0). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            if self._monitor is not None:
                try:
                    self._socket.disable_monitor()
                except zmq.ZMQError:
                    pass
        if self._monitor is not None:
            self._monitor.close(linger=0)
        if self._socket is not None:
            self._socket.close(linger=0)
        self._auth.stop()
        self._close_context()

    def __enter__(self) -> ResearcherEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NodeEndpoint(_Endpoint):
    """A node's DEALER: connects out, CurveZMQ client pinned to the researcher.

    It may start before the researcher listens; ZeroMQ connects when it does and
    reconnects after either side restarts, and messages sent meanwhile wait in
    the queue (up to ``sndhwm``).

    Parameters
    ----------
    endpoint
        The researcher's address, e.g. ``"tcp://host:5555"``.
    node_id
        This node's id; also its ``ROUTING_ID``.
    public_key, secret_key
        The node's CurveZMQ key pair.
    researcher_key
        The researcher's CurveZMQ public key (pinned: another server fails the
        handshake).
    options, context, logger
        As for :class:`ResearcherEndpoint`.

    Raises
    ------
    ConfigError
        Bad id, keys or options.
    """

    def __init__(
        self,
        endpoint: str,
        node_id: str,
        public_key: str | bytes,
        secret_key: str | bytes,
        researcher_key: str | bytes,
        *,
        options: TransportOptions | None = None,
        context: zmq.Context[Any] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.node_id = _node_id(node_id)
        public = _z85_key(public_key, "node public key")
        secret = _z85_key(secret_key, "node secret key")
        server = _z85_key(researcher_key, "researcher public key")
        super().__init__(options, context, logger)
        self.endpoint = endpoint
        self._socket = None  # type: ignore[assignment]
        self._monitor: zmq.Socket[Any] | None = None
        self._retry_at: float | None = None
        self._backoff = self.options.reconnect_interval
        #: Connection events seen by the socket monitor, by name.
        self.events: collections.Counter[str] = collections.Counter()
        try:
            sock = self._context.socket(zmq.DEALER)
            self._socket = sock
            _apply_options(sock, self.options)
            sock.setsockopt(zmq.ROUTING_ID, self.node_id.encode("utf-8"))
            sock.setsockopt(zmq.RECONNECT_IVL, _ms(self.options.reconnect_interval))
            sock.setsockopt(
                zmq.RECONNECT_IVL_MAX, _ms(self.options.reconnect_interval_max)
            )
            sock.setsockopt(zmq.CURVE_SERVERKEY, server)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self._monitor = sock.get_monitor_socket(sum(_MONITOR_EVENTS))
            self._monitor.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        except BaseException:
            self.close()
            raise
        self.log.info("node endpoint connecting endpoint=%s", endpoint)

    def send(self, msg: Message) -> bool:
        """Queue ``msg`` for the researcher.

        Returns
        -------
        bool
            ``True`` once queued, ``False`` if the queue stayed full for
            ``send_timeout``.

        Raises
        ------
        TypeError
            ``msg`` is not a protocol message.
        ValueError
            ``msg`` exceeds ``max_message_bytes`` or ``max_chunks``.
        """
        self._check_open()
        parts = _split(msg, self.options)
        self._service()
        try:
            self._send_parts(parts)
        except zmq.Again:
            self.log.warning("send timed out: queue full peer=researcher")
            return False
        self.log.debug(
            "sent type=%s round=%d peer=researcher frames=%d",
            msg.TYPE.name,
            msg.round,
            len(parts),
        )
        return True

    def recv(self, timeout: float) -> Message | None:
        """Return the next valid message from the researcher, or ``None``.

        The only peer is the pinned researcher (CURVE authenticates it), so no
        sender is returned. Invalid messages are dropped and counted in
        :attr:`drops`; waiting continues until ``timeout`` seconds have passed.
        """
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            now = time.monotonic()
            wait = deadline - now
            if self._retry_at is not None:
                wait = min(wait, self._retry_at - now)
            ready = dict(poller.poll(max(0, math.ceil(wait * 1000))))
            self._service()
            if self._socket in ready:
                msg = self._recv_one()
                if msg is not None:
                    return msg
            if time.monotonic() >= deadline:
                return None

    def _service(self) -> None:
        """Read monitor events and redial after a failed handshake when due.

        libzmq treats a failed handshake (ZAP refusal, wrong server key) as a
        protocol error and stops reconnecting that endpoint; a node that is
        enrolled later, or a researcher restarted with new enrollments, must
        still be reachable, so the node redials with back-off
        (``reconnect_interval`` doubling up to ``reconnect_interval_max``).
        Runs inside :meth:`send` and :meth:`recv`, which the daemon calls.
        """
        assert self._monitor is not None
        for _ in range(1000):  # Bounded: events are small and few.
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            name = _MONITOR_EVENTS.get(parse_monitor_message(frames)["event"])
            if name is None:
                continue
            self.events[name] += 1
            if name == "handshake_succeeded":
                self._backoff = self.options.reconnect_interval
                self.log.info("connected to researcher endpoint=%s", self.endpoint)
            elif name.startswith("handshake_failed") and self._retry_at is None:
                self.log.warning(
                    "handshake refused (not enrolled or wrong researcher key) "
                    "endpoint=%s retry_in=%.2fs",
                    self.endpoint,
                    self._backoff,
                )
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(
                    2 * self._backoff, self.options.reconnect_interval_max
                )
        if self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._retry_at = None
            try:
                self._socket.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass  # The failed session may already have removed the endpoint.
            self._socket.connect(self.endpoint)

    def _recv_one(self) -> Message | None:
        try:
            envelope = self._socket.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        try:
            frames = _read_frames(self._socket, envelope, self.options)
        except _Drop as d:
            self._drop(d.reason, "researcher", d.detail)
            return None
        msg = self._decode(frames, "researcher")
        if msg is not None:
            self._count_received(envelope, frames)
            self.log.debug(
                "received type=%s round=%d peer=researcher frames=%d",
                msg.TYPE.name,
                msg.round,
                len(frames),
            )
        return msg

    def close(self) -> None:
        """Close the socket (LINGER 0) and an owned context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._socket is not None and self._monitor is not None:
            try:
                self._socket.disable_monitor()
            except zmq.ZMQError:
                pass
        if self._monitor is not None:
            self._monitor.close(linger=0)
        if self._socket is not None:
            self._socket.close(linger=0)
        self._close_context()

    def __enter__(self) -> NodeEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
