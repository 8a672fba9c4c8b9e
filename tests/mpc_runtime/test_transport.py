# SPDX-License-Identifier: Apache-2.0
"""ZeroMQ transport over real sockets on tcp://127.0.0.1 (random ports)."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
import zmq

from mpc_runtime import framing
from mpc_runtime import messages as m
from mpc_runtime import transport as t
from mpc_runtime.errors import ConfigError

CID = bytes(range(32))
R = "researcher"
WAIT = 10.0  # Upper bound of every wait; green runs take a fraction of it.
CHUNK = 64 << 10
OPTS = t.TransportOptions(
    chunk_size=CHUNK,
    reconnect_interval=0.05,
    reconnect_interval_max=0.2,
    heartbeat_interval=0.5,
    send_timeout=2.0,
)


class Net:
    """Creates endpoints and raw sockets and closes all of them (LINGER 0)."""

    def __init__(self) -> None:
        self.researcher_pub, self.researcher_sec = t.generate_curve_keypair()
        self.keys = {n: t.generate_curve_keypair() for n in ("node-a", "node-b")}
        self._closers: list[Callable[[], None]] = []

    def researcher(
        self, endpoint: str = "tcp://127.0.0.1:*", **kw: object
    ) -> t.ResearcherEndpoint:
        kw.setdefault("options", OPTS)
        kw.setdefault("enrolled", {n: pub for n, (pub, _) in self.keys.items()})
        ep = t.ResearcherEndpoint(
            endpoint, self.researcher_pub, self.researcher_sec, **kw
        )
        self._closers.append(ep.close)
        return ep

    def node(
        self, endpoint: str, node_id: str, keys: tuple[str, str] | None = None
    ) -> t.NodeEndpoint:
        pub, sec = keys or self.keys[node_id]
        ep = t.NodeEndpoint(
            endpoint, node_id, pub, sec, self.researcher_pub, options=OPTS
        )
        self._closers.append(ep.close)
        return ep

    def raw(self, endpoint: str, keys: tuple[str, str], routing_id: str) -> zmq.Socket:
        """A bare DEALER with a valid CURVE client setup, for hostile frames."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.routing_id = routing_id.encode()
        sock.curve_serverkey = self.researcher_pub.encode()
        sock.curve_publickey = keys[0].encode()
        sock.curve_secretkey = keys[1].encode()
        sock.sndtimeo = int(WAIT * 1000)
        sock.connect(endpoint)

        def close() -> None:
            sock.close(linger=0)
            ctx.term()

        self._closers.append(close)
        return sock

    def close(self) -> None:
        for close in reversed(self._closers):
            close()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        n.close()


def advert(sender: str, round_: int = 0) -> m.ContextAdvert:
    return m.ContextAdvert(
        context_id=CID,
        round=round_,
        sender=sender,
        identity_key=bytes([1]) * 32,
        share_key=bytes([2]) * 32,
        signature=bytes([3]) * 64,
    )


def setup_request() -> m.SetupRequest:
    return m.SetupRequest(
        context_id=CID,
        round=0,
        sender=R,
        job_id="job-1",
        nodes=("node-a", "node-b"),
        ring_bits=32,
        clipping_range=3.0,
        threshold=2,
        nonce=bytes([0xA5]) * 32,
    )


def masked_input(sender: str, words: int) -> m.MaskedInput:
    rng = np.random.default_rng(7)
    return m.MaskedInput(
        context_id=CID,
        round=3,
        sender=sender,
        ring_bits=32,
        commitment=bytes([9]) * 32,
        peers=("node-b",),
        vectors=(
            m.Tensor("big", rng.integers(0, 2**32, words, dtype="<u4")),
            m.Tensor("small", np.arange(6, dtype="<u4")),
        ),
    )


def recv_ok(ep: t.ResearcherEndpoint) -> tuple[str, m.Message]:
    got = ep.recv(WAIT)
    assert got is not None, f"nothing received; drops={dict(ep.drops)}"
    return got


def serve_until(
    ep: t.ResearcherEndpoint, done: Callable[[], bool], *nodes: t.NodeEndpoint
) -> None:
    """Serve ``ep`` (and ``nodes``) in short recv calls until ``done()``.

    Bounded by WAIT. Nodes redial inside their own recv, so a test that waits
    for a node's reconnection serves it too.
    """
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, (dict(ep.drops), dict(ep.events))
        assert ep.recv(0.03) is None
        for node in nodes:
            assert node.recv(0.01) is None


def envelope(entries: list[tuple[int, int]], *, version: int = 1) -> bytes:
    head = struct.pack(">2sBBI", b"SA", version, 0, len(entries))
    return head + b"".join(struct.pack(">IQ", n, size) for n, size in entries)


def connected_pair(net: Net) -> tuple[t.ResearcherEndpoint, t.NodeEndpoint]:
    """A researcher and node-a, with node-a bound (it has spoken once)."""
    res = net.researcher()
    node = net.node(res.endpoint, "node-a")
    assert node.send(advert("node-a"))
    assert recv_ok(res) == ("node-a", advert("node-a"))
    assert res.is_routable("node-a")
    return res, node


# ------------------------------------------------------------------ round trips


def test_transport_round_trip_both_ways_large_vector_chunked_byte_exact(net):
    res, node = connected_pair(net)
    big = masked_input("node-a", words=300_000)  # 1.2 MB: 19 chunks of 64 KiB
    assert len(t._split(big, OPTS)) - 1 > 10
    assert node.send(big)
    sender, got = recv_ok(res)
    assert sender == "node-a"
    assert got == big
    assert got.vectors[0].data.tobytes() == big.vectors[0].data.tobytes()

    for msg in (
        setup_request(),
        m.Survivors(context_id=CID, round=3, sender=R, survivors=("node-a", "node-b")),
    ):
        assert res.send("node-a", msg)
        assert node.recv(WAIT) == msg
    big_back = masked_input(R, words=200_000)
    assert res.send("node-a", big_back)
    assert node.recv(WAIT) == big_back
    assert res.dropped == 0 and node.dropped == 0


def test_transport_send_to_silent_or_unknown_node_returns_false(net):
    res, _ = connected_pair(net)
    net.node(res.endpoint, "node-b")  # Connected, but has not spoken yet.
    assert not res.send("node-b", setup_request())
    assert not res.send("node-z", setup_request())
    assert res.send("node-a", setup_request())


def test_transport_recv_nothing_sent_returns_none_at_deadline(net):
    res = net.researcher()
    node = net.node(res.endpoint, "node-a")
    start = time.monotonic()
    assert res.recv(0.2) is None
    assert node.recv(0.2) is None
    assert time.monotonic() - start < 2.0


# ------------------------------------------------------------ traffic counters


def wire_bytes(msg: m.Message) -> int:
    """What the traffic counters count for ``msg``: envelope plus chunks."""
    return sum(len(f) for f in t._split(msg, OPTS))


def traffic(
    sent: Sequence[m.Message] = (), received: Sequence[m.Message] = ()
) -> dict[str, int]:
    return {
        "sent_bytes": sum(wire_bytes(x) for x in sent),
        "sent_messages": len(sent),
        "received_bytes": sum(wire_bytes(x) for x in received),
        "received_messages": len(received),
    }


def test_transport_traffic_counts_exact_wire_bytes_both_ways_small_and_chunked(net):
    res = net.researcher()
    node = net.node(res.endpoint, "node-a")
    assert res.traffic == node.traffic == traffic()
    up = [advert("node-a"), masked_input("node-a", words=300_000)]
    down = [setup_request(), masked_input(R, words=200_000)]
    assert len(t._split(up[1], OPTS)) - 1 > 10  # Chunked: 19 chunks of 64 KiB.
    assert len(t._split(down[1], OPTS)) - 1 > 10
    # Envelope + chunks == envelope + logical frames: chunking adds no bytes.
    assert wire_bytes(up[1]) == len(t._split(up[1], OPTS)[0]) + sum(
        memoryview(f).nbytes for f in framing.encode(up[1])
    )

    for msg in up:
        assert node.send(msg)
        assert recv_ok(res) == ("node-a", msg)
    assert node.traffic == traffic(sent=up)
    assert res.traffic == traffic(received=up)

    for msg in down:
        assert res.send("node-a", msg)
        assert node.recv(WAIT) == msg
    assert res.traffic == traffic(sent=down, received=up)
    assert node.traffic == traffic(sent=up, received=down)
    assert res.dropped == 0 and node.dropped == 0


def test_transport_traffic_refused_send_and_dropped_message_not_counted(net):
    res, node = connected_pair(net)
    first = [advert("node-a")]
    assert res.traffic == traffic(received=first)
    # Refused sends: a node that never spoke, an unknown id, a revoked node.
    silent = net.node(res.endpoint, "node-b")
    assert not res.send("node-b", setup_request())
    assert not res.send("node-z", setup_request())
    # Closed first: two live connections with one routing id hand it back and
    # forth (ROUTER_HANDOVER), and a message can be lost in between.
    silent.close()
    # Dropped on receipt: a spoofed header sender, then a revoked node.
    node_b = net.node(res.endpoint, "node-b")
    assert node_b.send(advert("node-a"))
    serve_until(res, lambda: res.drops["sender"] >= 1)
    res.revoke("node-a")
    assert not res.send("node-a", setup_request())
    assert node.send(advert("node-a", round_=1))
    serve_until(res, lambda: res.drops["unenrolled"] >= 1)
    assert res.traffic == traffic(received=first)
    # What the nodes queued counts on their side: send returned True.
    assert node.traffic == traffic(sent=[*first, advert("node-a", round_=1)])
    assert node_b.traffic == traffic(sent=[advert("node-a")])


def test_transport_traffic_node_send_timed_out_not_counted(net):
    # No researcher listens and the queue holds sndhwm = 1 message: a later send
    # times out and returns False.
    opts = t.TransportOptions(sndhwm=1, send_timeout=0.2, chunk_size=CHUNK)
    pub, sec = net.keys["node-a"]
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with t.NodeEndpoint(
        endpoint, "node-a", pub, sec, net.researcher_pub, options=opts
    ) as node:
        results = [node.send(advert("node-a", round_=i)) for i in range(3)]
        assert results[0] and not results[-1]
        queued = [advert("node-a", round_=i) for i, ok in enumerate(results) if ok]
        assert node.traffic == traffic(sent=queued)


# ------------------------------------------------------------ enrollment / ZAP


def test_transport_unenrolled_key_refused_until_enrolled_then_delivers(net):
    res = net.researcher(enrolled={})
    node = net.node(res.endpoint, "node-a")
    assert node.send(advert("node-a"))
    serve_until(res, lambda: res.events["handshake_failed_auth"] >= 2, node)
    assert res.recv(0.3) is None
    assert not res.is_routable("node-a")

    res.enroll("node-a", net.keys["node-a"][0])
    # libzmq drops the queue of a refused connection; the node redials by itself.
    serve_until(res, lambda: node.events["handshake_succeeded"] > 0, node)
    assert node.send(advert("node-a", round_=1))
    assert recv_ok(res) == ("node-a", advert("node-a", round_=1))
    assert res.send("node-a", setup_request())
    assert node.recv(WAIT) == setup_request()


def test_transport_stranger_key_never_gets_through(net):
    res = net.researcher()
    stranger = net.node(res.endpoint, "node-a", keys=t.generate_curve_keypair())
    assert stranger.send(advert("node-a"))
    serve_until(res, lambda: res.events["handshake_failed_auth"] >= 2, stranger)
    assert res.recv(0.3) is None
    assert res.dropped == 0  # Refused at the handshake: nothing reached us.


def test_transport_revoked_node_dropped_on_live_connection_and_unroutable(net):
    res, node = connected_pair(net)
    res.revoke("node-a")
    assert "node-a" not in res.enrolled
    assert not res.send("node-a", setup_request())
    assert node.send(advert("node-a", round_=1))
    serve_until(res, lambda: res.drops["unenrolled"] >= 1)
    assert not res.is_routable("node-a")


def test_transport_enroll_key_of_other_node_raises_config_error(net):
    res = net.researcher()
    with pytest.raises(ConfigError):
        res.enroll("node-c", net.keys["node-a"][0])
    with pytest.raises(ConfigError):
        res.enroll("bad id!", t.generate_curve_keypair()[0])
    with pytest.raises(ConfigError):
        res.enroll("node-c", "not a key")


# ------------------------------------------------------------ identity binding


def test_transport_spoofed_header_sender_dropped_and_serving_continues(net):
    res = net.researcher()
    node_b = net.node(res.endpoint, "node-b")
    assert node_b.send(advert("node-a"))  # Authenticated as node-b.
    assert node_b.send(advert("node-b"))
    assert recv_ok(res) == ("node-b", advert("node-b"))
    assert res.drops["sender"] == 1
    assert not res.is_routable("node-a")


def test_transport_squatted_routing_id_dropped_and_not_routable(net):
    res = net.researcher()
    squatter = net.raw(res.endpoint, net.keys["node-b"], routing_id="node-a")
    for sender in ("node-a", "node-b"):
        squatter.send_multipart(t._split(advert(sender), OPTS))
    serve_until(res, lambda: res.drops["routing_id"] >= 2)
    assert not res.is_routable("node-a")
    assert not res.is_routable("node-b")
    assert not res.send("node-a", setup_request())


def test_transport_squatter_on_connected_node_id_dropped_and_node_takes_it_back(net):
    res, node = connected_pair(net)
    squatter = net.raw(res.endpoint, net.keys["node-b"], routing_id="node-a")
    # ROUTER_HANDOVER is on: the squatter's connection takes "node-a" over until it
    # speaks; its first message is dropped and unbinds the id (fail closed).
    serve_until(res, lambda: res.events["handshake_succeeded"] >= 2)
    squatter.send_multipart(t._split(advert("node-b"), OPTS))
    serve_until(res, lambda: res.drops["routing_id"] >= 1)
    assert not res.is_routable("node-a")
    assert not res.send("node-a", setup_request())
    # The real node redials (handover closed its connection) and takes its id back
    # by speaking; from then on it alone receives what is sent to "node-a".
    squatter.close(linger=0)
    deadline = time.monotonic() + WAIT
    while not res.is_routable("node-a"):
        assert time.monotonic() < deadline, (dict(res.drops), dict(res.events))
        assert node.send(advert("node-a"))
        got = res.recv(0.2)
        assert got in (None, ("node-a", advert("node-a")))
        assert node.recv(0.01) is None
    assert res.send("node-a", setup_request())
    assert node.recv(WAIT) == setup_request()


def test_transport_node_pinned_to_other_researcher_key_never_delivers(net):
    res = net.researcher()
    other_pub, _ = t.generate_curve_keypair()
    pub, sec = net.keys["node-a"]
    node = t.NodeEndpoint(res.endpoint, "node-a", pub, sec, other_pub, options=OPTS)
    try:
        assert node.send(advert("node-a"))
        serve_until(
            res,
            lambda: sum(v for k, v in res.events.items() if "failed" in k) >= 2,
            node,
        )
        assert res.recv(0.3) is None
    finally:
        node.close()


# ------------------------------------------------------------ hostile frames


def test_transport_garbage_frames_dropped_and_serving_continues(net):
    res = net.researcher()
    raw = net.raw(res.endpoint, net.keys["node-b"], routing_id="node-b")
    header = framing.encode(advert("node-b"))[0]
    bad = [
        [b"garbage"],  # Not an envelope.
        [envelope([(1, 3)], version=2), b"abc"],  # Unknown transport version.
        [envelope([(2, 3)]), b"abc"],  # Fewer chunks than declared.
        [envelope([(1, 3)]), b"abc", b"def"],  # More chunks than declared.
        [envelope([(1, 4)]), b"abc"],  # Chunk sizes differ from the total.
        [envelope([(1, 7)]), b"garbage"],  # Well framed, undecodable.
        [envelope([(1, len(header) - 1)]), header[:-1]],  # Truncated header.
    ]
    for frames in bad:
        raw.send_multipart(frames)
    node_a = net.node(res.endpoint, "node-a")
    serve_until(res, lambda: res.dropped >= len(bad))
    assert res.drops["malformed"] == 2
    assert res.drops["envelope"] == len(bad) - 2
    assert node_a.send(advert("node-a"))
    assert recv_ok(res) == ("node-a", advert("node-a"))
    # The same connection still works for a valid message.
    raw.send_multipart(t._split(advert("node-b"), OPTS))
    assert recv_ok(res) == ("node-b", advert("node-b"))


def test_transport_oversized_frame_drops_connection_and_serving_continues(net):
    res = net.researcher()
    raw = net.raw(res.endpoint, net.keys["node-b"], routing_id="node-b")
    raw.send_multipart(t._split(advert("node-b"), OPTS))
    assert recv_ok(res) == ("node-b", advert("node-b"))
    # Above our per-chunk limit but within libzmq's CURVE slack: dropped by us.
    raw.send_multipart([envelope([(1, CHUNK + 1)]), bytes(OPTS.frame_limit + 1)])
    serve_until(res, lambda: res.drops["limits"] == 1)
    # Far above MAXMSGSIZE: libzmq drops the connection.
    before = res.events["disconnected"]
    raw.send_multipart([envelope([(1, 2 * CHUNK)]), bytes(2 * CHUNK)])
    serve_until(res, lambda: res.events["disconnected"] > before)
    node_a = net.node(res.endpoint, "node-a")
    assert node_a.send(advert("node-a"))
    assert recv_ok(res) == ("node-a", advert("node-a"))


@pytest.mark.parametrize(
    "entries",
    [
        [(1, 1 << 40)],  # 1 TiB declared: far above max_message_bytes.
        [(OPTS.max_chunks + 1, 100)],  # Too many chunks in one frame.
        [(4096, 1), (4096, 1), (1, 1)],  # Too many chunks in total.
    ],
    ids=["total-bytes", "chunks-one-frame", "chunks-total"],
)
def test_transport_declared_over_limits_dropped_not_allocated(net, entries):
    res = net.researcher()
    raw = net.raw(res.endpoint, net.keys["node-b"], routing_id="node-b")
    raw.send_multipart([envelope(entries), b"x"])
    serve_until(res, lambda: res.drops["limits"] >= 1)
    raw.send_multipart(t._split(advert("node-b"), OPTS))
    assert recv_ok(res) == ("node-b", advert("node-b"))
    assert res.dropped == 1


def test_transport_message_over_sender_limits_raises_value_error(net):
    res, node = connected_pair(net)
    small = t.TransportOptions(chunk_size=CHUNK, max_message_bytes=1 << 20)
    with pytest.raises(ValueError):
        t._split(masked_input("node-a", words=300_000), small)
    with pytest.raises(TypeError):
        node.send("not a message")  # type: ignore[arg-type]


# ------------------------------------------------------------ (re)connection


def _free_port() -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        return sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        sock.close(linger=0)
        ctx.term()


def test_transport_node_started_before_researcher_connects_and_delivers(net):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    node = net.node(endpoint, "node-a")
    assert node.send(advert("node-a"))
    res = net.researcher(endpoint)
    assert recv_ok(res) == ("node-a", advert("node-a"))
    assert res.send("node-a", setup_request())
    assert node.recv(WAIT) == setup_request()


def test_transport_researcher_restart_node_reconnects_and_delivers(net):
    first, node = connected_pair(net)
    endpoint = first.endpoint
    first.close()
    second = net.researcher(endpoint)
    assert not second.is_routable("node-a")  # Fresh endpoint: nothing bound yet.
    assert node.send(advert("node-a", round_=1))
    assert recv_ok(second) == ("node-a", advert("node-a", round_=1))
    assert second.send("node-a", setup_request())
    assert node.recv(WAIT) == setup_request()


def test_transport_closed_endpoint_refuses_use_and_close_is_idempotent(net):
    res = net.researcher()
    with t.NodeEndpoint(
        res.endpoint, "node-a", *net.keys["node-a"], net.researcher_pub, options=OPTS
    ) as node:
        pass
    node.close()
    with pytest.raises(ConfigError):
        node.send(advert("node-a"))
    res.close()
    res.close()
    with pytest.raises(ConfigError):
        res.recv(0.01)


# ------------------------------------------------------------ configuration


def test_transport_socket_options_applied_from_options(net):
    opts = t.TransportOptions(
        sndhwm=7, rcvhwm=9, heartbeat_interval=0.25, send_timeout=1.5
    )
    res = net.researcher(options=opts)
    sock = res._socket
    assert sock.getsockopt(zmq.LINGER) == 0
    assert (sock.getsockopt(zmq.SNDHWM), sock.getsockopt(zmq.RCVHWM)) == (7, 9)
    assert sock.getsockopt(zmq.SNDTIMEO) == 1500
    assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 250
    assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 750
    assert sock.getsockopt(zmq.HEARTBEAT_TTL) // 100 == 7  # Kept in 100 ms units.
    assert sock.getsockopt(zmq.MAXMSGSIZE) > opts.frame_limit
    assert sock.getsockopt(zmq.IPV6) == 0
    assert sock.getsockopt(zmq.CURVE_SERVER) == 1


def test_generate_curve_keypair_returns_z85_strings():
    pub, sec = t.generate_curve_keypair()
    assert len(pub) == len(sec) == 40 and pub != sec
    assert zmq.curve_public(sec.encode()) == pub.encode()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(chunk_size=0),
        dict(send_timeout=float("nan")),
        dict(heartbeat_interval=-1),
        dict(max_chunks=10),
        dict(max_frame_bytes=1024),
    ],
)
def test_transport_options_invalid_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        t.TransportOptions(**kwargs)


def test_node_endpoint_bad_id_or_key_raises_config_error():
    pub, sec = t.generate_curve_keypair()
    with pytest.raises(ConfigError):
        t.NodeEndpoint("tcp://127.0.0.1:1", "bad id!", pub, sec, pub)
    with pytest.raises(ConfigError):
        t.NodeEndpoint("tcp://127.0.0.1:1", "node-a", pub, "short", pub)
