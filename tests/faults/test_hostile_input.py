# SPDX-License-Identifier: Apache-2.0
"""Hostile input: fuzzed frames, a hostile socket peer, a hostile researcher, a relay.

DESIGN §5: "A malformed, oversized, replayed, unsigned or out-of-phase message is
rejected and logged; the daemon keeps serving and no state changes." Four cases:

1. ``framing.decode`` on at least 100 000 seeded inputs (random frames, every
   single-bit flip and every truncation of every golden header, random mutations of
   every golden sample, structured msgpack garbage). Only ``MalformedMessage``
   may escape; beyond that, every wrapped cause must be a ValueError, TypeError or
   msgpack error (anything else is a bug the catch-all would hide), every input
   that does decode must re-encode to the same bytes, and no input may be slow.
2. The researcher's socket (a real ``SecureAggregation`` with three real daemons)
   flooded from raw DEALERs: an enrolled key of a fourth node that runs no daemon
   (so ROUTER_HANDOVER never takes a live node's routing id), the same key under
   another routing id, and an unenrolled key, while secure sums run. Every
   message is classified before it is sent; the endpoint's drop counters must grow
   by exactly those numbers and every sum stays exact.
3. A hostile researcher: after a real setup and round, the test binds its own
   ``ResearcherEndpoint`` with the researcher's keys and sends the daemons replays,
   other-context messages, malformed frames, hostile round requests, setups naming
   ids outside the roster, odd senders, and seeded mutations of the real
   messages (classified by the node's rules before sending). After each batch:
   the process is alive, answers a shape query, each refusal it sent is the
   expected one in order, each frame it dropped is in its log under the expected
   reason, and its state directory is byte-identical, except for the round numbers
   a refused round request spends by design (DESIGN §3), accounted for one by one.
   Then a real round (after those numbers) gives the exact sum.
4. A relay that swaps a node's key advert (share key, identity key) in the
   in-memory driver, for several node counts, both peer-trust modes.

Inputs are drawn from seeded generators (test input, not key material), so a
failure reproduces. Marked slow (tests/faults is the fault suite).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import resource
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from mpc_runtime import framing, keys, masking
from mpc_runtime import messages as m
from mpc_runtime.errors import (
    ContextMismatch,
    MalformedMessage,
    PolicyRefused,
    UnexpectedMessage,
    VersionMismatch,
)
from mpc_runtime.memory import MemoryNetwork
from mpc_runtime.protocol.node import NodeStage
from mpc_runtime.protocol.setup import compute_context_id
from mpc_runtime.transport import (
    TRANSPORT_VERSION,
    ResearcherEndpoint,
    generate_curve_keypair,
)
from secagg import files
from secagg.node import DRIVER_CONTEXT
from secagg.store import STATE_DIR

from ..mpc_runtime.test_framing import _samples
from ..secagg._service_support import (
    NODES3,
    REPO,
    WAIT,
    Deployment,
    check_result,
    wait_connected,
)

pytestmark = pytest.mark.slow

AREA = "Hostile input"
SEED = 20240611
SPARE = "node-x"  # Enrolled, no daemon: its keys are borrowed by the hostile peer.
MiB = 1 << 20


# ----------------------------------------------------------------- generators


def _envelope(entries: list[tuple[int, int]], *, version: int = TRANSPORT_VERSION):
    """Chunk envelope bytes (docs/protocol.md §4.3) for ``(chunks, total)`` entries."""
    head = struct.pack(">2sBBI", b"SA", version, 0, len(entries))
    return head + b"".join(struct.pack(">IQ", n, size) for n, size in entries)


def _wrap(frames: list[bytes], rng: random.Random | None = None) -> list[bytes]:
    """``[envelope, *chunks]`` for logical ``frames``; split into chunks at random."""
    entries, chunks = [], []
    for f in frames:
        cuts: list[int] = []
        if rng is not None and len(f) > 1 and rng.random() < 0.3:
            k = rng.randint(1, min(3, len(f) - 1))
            cuts = sorted(rng.sample(range(1, len(f)), k))
        bounds = [0, *cuts, len(f)]
        chunks += [f[a:b] for a, b in zip(bounds, bounds[1:])]
        entries.append((len(cuts) + 1, len(f)))
    return [_envelope(entries), *chunks]


_BIG_TOKENS = (
    b"\xc6\xff\xff\xff\xff",  # bin 32 of 4 GiB
    b"\xc5\xff\xff",  # bin 16 of 64 KiB
    b"\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array 32 of 2^32 items
    b"\xdf\xff\xff\xff\xff",  # map 32 of 2^32 pairs
    b"\xdc\xff\xff",  # array 16 of 65535 items
    b"\xc9\xff\xff\xff\xff\x01",  # ext 32
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint 64 max
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # int 64 min
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
    b"\xca\x7f\x80\x00\x00",  # float32 inf
    b"\xd6\xff\x00\x00\x00\x00",  # ext -1 (a timestamp)
    b"\xc1",  # never used
    b"\x91" * 3000 + b"\xc0",  # nested 3000 deep
)


def _hostile_values() -> list[Any]:
    """Values that are wrong somewhere: types, lengths, ranges, ids, dtypes, shapes."""
    nan, inf = float("nan"), float("inf")
    return [
        None,
        True,
        False,
        0,
        1,
        -1,
        255,
        256,
        2**31,
        2**32,
        2**63 - 1,
        2**63,
        2**64 - 1,
        -(2**63),
        1.0,
        -0.0,
        nan,
        inf,
        -inf,
        1e308,
        "",
        "a" * 64,
        "a" * 65,
        "a" * 1025,
        "-a",
        "_a",
        ".a",
        "a\n",
        "a b",
        "é",
        "\x00",
        "../x",
        "node-a",
        "researcher",
        "A",
        "0",
        b"",
        bytes(1),
        bytes(31),
        bytes(32),
        bytes(33),
        bytes(63),
        bytes(64),
        bytes(65),
        bytes(257),
        bytes(65537),
        [],
        [[]],
        [None],
        ["a", "a"],
        ["b", "a"],
        (0,) * 5000,  # A tuple packs as an array too; never edited in place.
        [2**31, 2**31],
        [-1],
        [1] * 9,
        [2**20] * 8,
        [2**31 - 6],
        {"b": b"", "a": b""},
        {"a": b"1"},
        {},
        {1: 2},
        ["t", "complex64", [1]],
        ["t", "object", [1]],
        ["t", "float128", [1]],
        ["t", "<f4", [2]],
        ["t", "float32", [2**31]],
        ["t", "float64", [2**30, 4]],
        ["v", 2**31],
        ["v", 5],
        ["node-a", bytes(32), bytes(64), bytes(300), bytes(4)],
        msgpack.ExtType(1, b"x"),
    ]


class HostileFrames:
    """Seeded generator of hostile logical frame lists (case 1, reused by case 2)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.golden = [
            [bytes(f) for f in framing.encode(msg)] for msg in _samples().values()
        ]
        self.items = [
            msgpack.unpackb(g[0], raw=False, strict_map_key=False) for g in self.golden
        ]
        self.values = _hostile_values()

    # -- random frames

    def random_frames(self) -> list[bytes]:
        rng = self.rng
        frames = []
        for _ in range(rng.choice((0, 1, 1, 1, 2, 2, 3, 5))):
            size = rng.choice((0, rng.randint(1, 16), rng.randint(1, 300), 4096))
            frames.append(rng.randbytes(size))
        if frames and rng.random() < 0.4:
            # A plausible start: an array header, version 1, a type byte.
            start = bytes([0x90 + rng.randint(5, 15), 1, rng.randint(0, 40)])
            frames[0] = start + frames[0]
        return frames

    # -- mutations of golden samples

    def bit_flips(self) -> Iterator[list[bytes]]:
        """Every single-bit flip of every golden header (payloads untouched)."""
        for g in self.golden:
            header = g[0]
            for i in range(len(header)):
                for bit in range(8):
                    h = bytearray(header)
                    h[i] ^= 1 << bit
                    yield [bytes(h), *g[1:]]

    def truncations(self) -> Iterator[list[bytes]]:
        """Every proper prefix of every golden header and payload frame."""
        for g in self.golden:
            for k, frame in enumerate(g):
                for cut in range(len(frame)):
                    yield [*g[:k], frame[:cut], *g[k + 1 :]]

    def mutate(self) -> list[bytes]:
        rng = self.rng
        frames = [bytearray(f) for f in rng.choice(self.golden)]
        for _ in range(rng.randint(1, 3)):
            k = rng.randrange(len(frames))
            f = frames[k]
            pos = rng.randrange(len(f) + 1)
            op = rng.randrange(13)
            if op == 0 and f:  # flip bits
                for _ in range(rng.randint(1, 4)):
                    f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
            elif op == 1 and f:  # set a byte
                f[rng.randrange(len(f))] = rng.randrange(256)
            elif op == 2:  # truncate
                del f[pos:]
            elif op == 3:  # extend
                f.extend(rng.randbytes(rng.choice((1, 2, 8, 100))))
            elif op == 4 and len(f) > 1:  # swap two bytes
                i, j = rng.randrange(len(f)), rng.randrange(len(f))
                f[i], f[j] = f[j], f[i]
            elif op == 5:  # insert
                f[pos:pos] = rng.randbytes(rng.randint(1, 9))
            elif op == 6:  # delete a range
                del f[pos : pos + rng.randint(1, 9)]
            elif op == 7:  # duplicate a range
                f[pos:pos] = f[pos : pos + rng.randint(1, 16)]
            elif op == 8 and len(frames) > 1:  # drop a frame
                frames.pop(rng.randrange(len(frames)))
            elif op == 9:  # add a frame
                frames.insert(
                    rng.randrange(len(frames) + 1), bytearray(rng.randbytes(8))
                )
            elif op == 10:  # duplicate a frame
                frames.append(bytearray(frames[k]))
            elif op == 11 and len(f) > 1:  # split a frame in two
                cut = rng.randrange(1, len(f))
                frames[k : k + 1] = [f[:cut], f[cut:]]
            elif op == 12 and len(frames) > 1:  # merge or reorder frames
                if rng.random() < 0.5:
                    frames[0:2] = [frames[0] + frames[1]]
                else:
                    rng.shuffle(frames)
        return [bytes(f) for f in frames]

    # -- structured msgpack garbage

    def _value(self) -> Any:
        value = self.rng.choice(self.values)
        # A copy: edits must never reach the shared pool (nor make cycles).
        return copy.deepcopy(value) if isinstance(value, (list, dict)) else value

    def _edit(self, node: Any, depth: int = 0) -> Any:
        """Replace, delete, add or swap somewhere inside ``node`` (a copy)."""
        rng = self.rng
        if isinstance(node, list) and node and (depth < 4 and rng.random() < 0.6):
            i = rng.randrange(len(node))
            node[i] = self._edit(node[i], depth + 1)
            return node
        if isinstance(node, dict) and node and depth < 4 and rng.random() < 0.5:
            key = rng.choice(list(node))
            node[key] = self._edit(node[key], depth + 1)
            return node
        if isinstance(node, list) and node and rng.random() < 0.3:
            op = rng.randrange(3)
            if op == 0:
                node.pop(rng.randrange(len(node)))
            elif op == 1:
                node.insert(rng.randrange(len(node) + 1), self._value())
            else:
                node.append(copy.deepcopy(node[rng.randrange(len(node))]))
            return node
        return self._value()

    def structured(self) -> list[bytes]:
        rng = self.rng
        k = rng.randrange(len(self.items))
        items = copy.deepcopy(self.items[k])
        payloads = list(self.golden[k][1:])
        op = rng.randrange(10)
        if op == 0:  # another version: VersionMismatch
            items[0] = rng.choice((0, 2, 255, 2**32, -1))
        elif op == 1:  # another (or unknown) type with these fields
            items[1] = rng.choice((*range(0, 40), 255, 256))
        elif op == 2:  # a header field (context id, round, sender) replaced
            items[rng.randint(2, 4)] = self._value()
        elif op == 3:  # fields missing or extra
            if rng.random() < 0.5 and len(items) > 5:
                del items[rng.randrange(5, len(items)) :]
            else:
                items += [self._value() for _ in range(rng.randint(1, 3))]
        else:  # somewhere inside the type's own fields
            for _ in range(rng.randint(1, 2)):
                i = rng.randrange(5, len(items))
                items[i] = self._edit(items[i])
        if rng.random() < 0.2 and payloads:  # payloads disagreeing with the header
            j = rng.randrange(len(payloads))
            payloads[j] = rng.choice(
                (b"", payloads[j][:-1], payloads[j] + b"\0", payloads[j] * 2)
            )
        if rng.random() < 0.1:
            payloads.append(rng.randbytes(rng.choice((0, 4, 8))))
        parts = [msgpack.packb(x, use_bin_type=True) for x in items]
        count = len(parts)
        if rng.random() < 0.25:  # a huge declared size or an impossible token
            parts[rng.randrange(len(parts))] = rng.choice(_BIG_TOKENS)
        if rng.random() < 0.1:  # an array header that miscounts its items
            count = max(0, count + rng.choice((-1, 1, 100, 2**20)))
        head = (
            bytes([0x90 + count])
            if count < 16
            else b"\xdc" + count.to_bytes(2, "big")
            if count < 1 << 16
            else b"\xdd" + count.to_bytes(4, "big")
        )
        return [head + b"".join(parts), *payloads]


# ------------------------------------------------------------ case 1: decoder


_CAUSES = (ValueError, TypeError, msgpack.UnpackException)


def test_frame_decoder_fuzz_only_malformed_escapes(reliability):
    gen = HostileFrames(SEED)
    rng = gen.rng
    plan: list[tuple[str, Callable[[], Iterator[list[bytes]]]]] = [
        ("random frames", lambda: (gen.random_frames() for _ in range(50_000))),
        ("every bit flip of every golden header", gen.bit_flips),
        ("every truncation of every golden frame", gen.truncations),
        (
            "random mutations of golden samples",
            lambda: (gen.mutate() for _ in range(60_000)),
        ),
        (
            "structured msgpack garbage",
            lambda: (gen.structured() for _ in range(80_000)),
        ),
    ]
    tried: Counter[str] = Counter()
    outcome: Counter[str] = Counter()
    escaped: list[str] = []
    odd_causes: list[str] = []
    noncanonical: list[str] = []
    slowest = (0.0, "")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for category, inputs in plan:
        for frames in inputs():
            tried[category] += 1
            # The transport hands decode memoryviews and bytearrays too.
            kind = rng.randrange(3)
            given: list[Any] = (
                frames
                if kind == 0
                else [memoryview(f) for f in frames]
                if kind == 1
                else [bytearray(f) for f in frames]
            )
            t0 = time.perf_counter()
            try:
                msg = framing.decode(given)
            except VersionMismatch:
                outcome["VersionMismatch"] += 1
            except MalformedMessage as e:
                outcome["MalformedMessage"] += 1
                cause = e.__cause__
                if cause is not None and not isinstance(cause, _CAUSES):
                    odd_causes.append(f"{category}: {cause!r:.200} <- {frames!r:.200}")
            except Exception as e:  # noqa: BLE001 - this is what the test looks for
                escaped.append(f"{category}: {e!r:.200} <- {frames!r:.200}")
            else:
                outcome["decoded"] += 1
                again = [bytes(f) for f in framing.encode(msg)]
                if again != frames:
                    noncanonical.append(f"{category}: {frames!r:.300}")
            dt = time.perf_counter() - t0
            if dt > slowest[0]:
                slowest = (dt, category)
    elapsed = time.perf_counter() - started
    rss_grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    total = sum(tried.values())
    assert not escaped, f"{len(escaped)} escaped decode, e.g. {escaped[:5]}"
    assert not odd_causes, f"{len(odd_causes)} unexpected causes: {odd_causes[:5]}"
    assert not noncanonical, f"decoded but not canonical: {noncanonical[:5]}"
    assert total >= 100_000 and sum(outcome.values()) == total
    assert outcome["VersionMismatch"] > 0 and outcome["decoded"] > 0
    assert slowest[0] < 1.0, slowest
    assert rss_grew < 256, f"peak RSS grew by {rss_grew:.0f} MiB"
    assert elapsed < 90, f"{elapsed:.1f}s"
    malformed = outcome["MalformedMessage"] + outcome["VersionMismatch"]
    reliability.add(
        AREA,
        "Frame decoder fuzz (`framing.decode`)",
        f"{total} seeded inputs: "
        + ", ".join(f"{n} {c}" for c, n in tried.items())
        + "; frames given as bytes, memoryview or bytearray",
        total,
        f"{malformed} raised MalformedMessage ({outcome['VersionMismatch']} of them "
        f"VersionMismatch), {outcome['decoded']} decoded and re-encoded to the same "
        "bytes; nothing else escaped, every wrapped cause a ValueError/TypeError/"
        f"msgpack error; slowest input {slowest[0] * 1000:.1f} ms, "
        f"{elapsed:.1f} s in all, peak RSS +{max(rss_grew, 0):.0f} MiB",
    )


# ------------------------------------------------------- shared service helpers


def _researcher_pub(dep: Deployment) -> bytes:
    return files.load_researcher_keys(dep.home).curve_public


def _dealer(
    ctx: zmq.Context[Any], dep: Deployment, keys_: tuple[bytes, bytes], rid: str
) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, rid.encode())
    sock.setsockopt(zmq.SNDTIMEO, int(WAIT * 1000))
    sock.setsockopt(zmq.CURVE_SERVERKEY, _researcher_pub(dep))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys_[0])
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys_[1])
    sock.connect(dep.endpoint)
    return sock


def _start_debug(dep: Deployment, *ids: str) -> None:
    """Deployment.start with ``-vv``: the daemon logs every dropped frame's reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECAGG_TEST_")}
    env["OMP_NUM_THREADS"] = "1"
    for v in ids:
        with open(dep.root / f"{v}.log", "wb") as log:
            dep.procs[v] = subprocess.Popen(
                [sys.executable, "-m", "secagg", "-vv", "node", "start"]
                + ["--dir", str(dep.dirs[v])],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )


# --------------------------------------------------- case 2: researcher socket


def _socket_plan(
    gen: HostileFrames, cid: bytes
) -> tuple[list[tuple[str, list[bytes]]], int]:
    """Hostile multipart messages for the enrolled spare's DEALER, each labelled
    with the drop reason the researcher must count ("valid": it passes the
    transport, authenticated as the spare, and must be ignored above it)."""
    rng = gen.rng
    plan: list[tuple[str, list[bytes]]] = []

    def label(frames: list[bytes]) -> str:
        if not 1 <= len(frames) <= framing.MAX_FRAMES:
            return "envelope"
        try:
            msg = framing.decode(frames)
        except MalformedMessage:
            return "malformed"
        return "valid" if msg.sender == SPARE else "sender"

    # Not an envelope at all, or a broken one.
    for _ in range(300):
        first = rng.randbytes(rng.randint(0, 64))
        if first.startswith(b"SA"):
            first = b"X" + first
        extra = [rng.randbytes(rng.randint(0, 32)) for _ in range(rng.randint(0, 3))]
        plan.append(("envelope", [first, *extra]))
    body = framing.encode(_samples()[m.MsgType.SURVIVORS])[0]
    good = _envelope([(1, len(body))])
    broken = [
        [_envelope([(1, len(body))], version=2), body],  # another transport version
        [b"SB" + good[2:], body],  # magic
        [good[:3] + b"\x01" + good[4:], body],  # flags
        [good[:4] + b"\0\0\0\0", body],  # n = 0
        [good[:4] + b"\0\0\0\2" + good[8:], body],  # n disagrees with the length
        [good + b"\0", body],  # trailing envelope byte
        [_envelope([(0, len(body))]), body],  # a zero chunk count
        [_envelope([(2, len(body))]), body],  # fewer chunks than declared
        [good, body, body],  # more chunks than declared
        [_envelope([(1, len(body) + 1)]), body],  # sizes do not add up
        [_envelope([(2, len(body))]), body[:5], body[5:] + b"!"],  # nor here
        [_envelope([(1, 4)] * (framing.MAX_FRAMES + 1)), *[b"abcd"] * 4],  # n > max
    ]
    for _ in range(25):
        plan += [("envelope", list(f)) for f in broken]
    # Declared over the limits: never allocated.
    over = [
        [(1, 1 << 40)],  # 1 TiB
        [(1, (2 << 30) + 1)],  # max_message_bytes + 1
        [(8193, 100)],  # more chunks than max_chunks in one frame
        [(4096, 1), (4096, 1), (1, 1)],  # in total
        [(1, 10), (1, 1 << 62)],
    ]
    for _ in range(60):
        plan += [("limits", [_envelope(e), b"x"]) for e in over]
    # Well framed, undecodable (or, by chance, decodable: labelled by decoding).
    makers = (gen.random_frames, gen.mutate, gen.structured)
    for _ in range(1200):
        frames = rng.choice(makers)()
        frames = [f[: 60 << 10] for f in frames]
        plan.append((label(frames), _wrap(frames, rng) if frames else [_envelope([])]))
    # Valid messages: claiming other senders (dropped), or the spare's own.
    for i in range(700):
        msg = rng.choice(list(_samples().values()))
        sender = SPARE if i % 2 else rng.choice(("node-a", "node-b", "researcher"))
        context = rng.choice((cid, DRIVER_CONTEXT, rng.randbytes(32)))
        msg = dataclasses.replace(msg, sender=sender, context_id=context)
        frames = [bytes(f) for f in framing.encode(msg)]
        plan.append((label(frames), _wrap(frames, rng)))
    # Shape answers and transcript signatures a member would send, from the spare.
    for q in range(100):
        fake: m.Message = m.Refused(
            context_id=DRIVER_CONTEXT,
            round=q,
            sender=SPARE,
            reason=m.RefusalReason.NOT_READY,
            fields=("shape", "d9", "d9"),
        )
        if q % 2:
            fake = m.TranscriptSig(
                context_id=cid,
                round=0,
                sender=SPARE,
                transcript=rng.randbytes(32),
                signature=rng.randbytes(64),
            )
        plan.append(("valid", [bytes(f) for f in _wrap(_frames_of(fake))]))
    rng.shuffle(plan)
    # Two chunks above max_frame_bytes (8 MiB) yet within MAXMSGSIZE: dropped by us.
    big = 8 * MiB + 1
    plan += [("limits", [_envelope([(1, big)]), bytes(big)]) for _ in range(2)]
    return plan, sum(1 for reason, _ in plan if reason == "valid")


def _frames_of(msg: m.Message) -> list[bytes]:
    return [bytes(f) for f in framing.encode(msg)]


def test_researcher_socket_fuzz_drops_counted_and_sums_exact(deploy, reliability):
    deploy.add_nodes([*NODES3, SPARE])
    deploy.start(*NODES3)
    spare = files.load_node_identity(deploy.dirs[SPARE])
    spare_keys = (spare.curve_public, spare.curve_secret)
    with deploy.secagg(timeout=5.0) as sa:
        wait_connected(deploy, *NODES3)
        sa.setup(NODES3, job_id="hostile-socket")
        first = sa.secure_sum("vector")
        check_result(deploy, first, NODES3)
        ep = sa._open()
        cid = sa._current_server().context_id
        plan, n_valid = _socket_plan(HostileFrames(SEED + 1), cid)
        squat_gen = HostileFrames(SEED + 2)
        squat = [_wrap(squat_gen.mutate(), squat_gen.rng) for _ in range(200)]
        squat += [_wrap(_frames_of(_samples()[m.MsgType.REFUSED]))] * 50
        stranger_plan = [_wrap(squat_gen.mutate()) for _ in range(300)]
        expected = Counter(reason for reason, _ in plan if reason != "valid")
        expected["routing_id"] += len(squat)

        # What the researcher accepts from the spare is counted by wrapping recv.
        accepted: Counter[str] = Counter()
        real_recv = ep.recv

        def recv(timeout: float):
            got = real_recv(timeout)
            if got is not None and got[0] == SPARE:
                accepted[got[1].TYPE.name] += 1
            return got

        ep.recv = recv  # type: ignore[method-assign]
        drops0, events0 = Counter(ep.drops), Counter(ep.events)
        ctx = zmq.Context()
        public, secret = generate_curve_keypair()
        # Made here, used only by the flood thread, closed here after it ends.
        enrolled = _dealer(ctx, deploy, spare_keys, SPARE)
        squatter = _dealer(ctx, deploy, spare_keys, "node-y")
        stranger = _dealer(ctx, deploy, (public.encode(), secret.encode()), "node-z")
        errors: list[BaseException] = []
        stranger_tried = 0

        def flood() -> None:
            nonlocal stranger_tried
            try:
                batches = [plan[i : i + 60] for i in range(0, len(plan), 60)]
                for i, batch in enumerate(batches):
                    for _, frames in batch:
                        enrolled.send_multipart(frames)
                    for frames in squat[i * 5 : i * 5 + 5]:
                        squatter.send_multipart(frames)
                    for frames in stranger_plan[i * 6 : i * 6 + 6]:
                        stranger_tried += 1
                        try:
                            stranger.send_multipart(frames, zmq.NOBLOCK)
                        except zmq.Again:
                            pass  # Refused at the handshake: nothing is queued.
                    time.sleep(0.05)
                for frames in squat[len(batches) * 5 :]:
                    squatter.send_multipart(frames)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        sums = [first]
        thread = threading.Thread(target=flood, daemon=True)
        started = time.monotonic()
        thread.start()
        try:
            while thread.is_alive() or len(sums) < 4:
                res = sa.secure_sum("vector")
                check_result(deploy, res, NODES3)
                sums.append(res)
            thread.join(WAIT)
            assert not errors, errors
            # Serve until every hostile message has been counted (bounded).
            link = sa._get_link()
            link.pump(
                lambda: (
                    Counter(ep.drops) - drops0 == expected
                    and sum(accepted.values()) == n_valid
                ),
                server=None,
                outbox=[],
                limit=WAIT,
            )
            grew = Counter(ep.drops) - drops0
            assert grew == expected, (grew, expected)
            assert sum(accepted.values()) == n_valid, (accepted, n_valid)
            assert ep.events["handshake_failed_auth"] > events0["handshake_failed_auth"]
            assert all(ep.is_routable(v) for v in NODES3)
            assert not ep.is_routable("node-y")
            last = sa.secure_sum("vector")
            check_result(deploy, last, NODES3)
            sums.append(last)
        finally:
            for sock in (enrolled, squatter, stranger):
                sock.close(linger=0)
            ctx.term()
    elapsed = time.monotonic() - started
    rounds = [s.round for s in sums]
    assert rounds == list(range(rounds[0], rounds[0] + len(rounds)))
    n_enrolled = len(plan)
    total = n_enrolled + len(squat) + stranger_tried
    reliability.add(
        AREA,
        "Researcher socket fuzz (3 daemons, enrolled spare key, squatted id, "
        "unenrolled key)",
        f"{n_enrolled} multipart messages from node-x's enrolled key (random frames, "
        "broken envelopes, declared sizes over the limits, two 8 MiB chunks, "
        "undecodable frames, other senders, valid messages from a non-member), "
        f"{len(squat)} under routing id node-y, {stranger_tried} from an "
        f"unenrolled key; {len(sums)} secure sums meanwhile",
        total,
        "drops grew by exactly the classified counts ("
        + ", ".join(f"{k} {v}" for k, v in sorted(expected.items()))
        + f"); {n_valid} valid non-member messages passed the transport and were "
        "ignored; the unenrolled key never got past the handshake; every sum "
        f"exact, rounds consecutive; {elapsed:.1f} s",
    )


# ----------------------------------------------------- case 3: hostile researcher


_HELLO = ("hello",)
_DROP_RE = re.compile(r"dropped message reason=(\w+) peer=researcher")


@dataclasses.dataclass
class Probe:
    """One hostile message for a daemon and what it must do with it."""

    what: str
    message: m.Message | None = None  # sent with ResearcherEndpoint.send
    raw: list[bytes] | None = None  # or these logical frames, or these wire parts
    wire: list[bytes] | None = None
    refusal: m.RefusalReason | None = None  # the reply it must send, if any
    dropped: str | None = None  # or the node endpoint's drop reason
    spends: int | None = None  # a round number the refusal spends (DESIGN §3)


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    root = directory / STATE_DIR
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _step_name(cid: bytes, r: int, phase: str) -> str:
    return f"contexts/{cid.hex()}/steps/{r:020d}.{phase}.msgpack"


class HostileResearcher:
    """The test's own ResearcherEndpoint at the deployment's address."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        rk = files.load_researcher_keys(dep.home)
        self.researcher_id = rk.id
        self.ep = ResearcherEndpoint(
            dep.endpoint,
            rk.curve_public,
            rk.curve_secret,
            enrolled=files.load_enrolled(dep.home),
        )
        self.query = 1000
        end = time.monotonic() + WAIT
        while not all(self.ep.is_routable(v) for v in NODES3):
            assert time.monotonic() < end, "daemons did not say hello"
            self.ep.recv(0.05)

    def send(self, v: str, probe: Probe) -> None:
        if probe.message is not None:
            assert self.ep.send(v, probe.message), probe.what
            return
        parts = probe.wire if probe.wire is not None else _wrap(probe.raw or [])
        self.ep._socket.send_multipart([v.encode(), *parts])

    def shape_query(self, v: str) -> list[m.Message]:
        """Ask ``v`` for the vector task's shape; return what it sent before answering
        (hellos left out). ZeroMQ keeps order on one connection and the daemon
        handles messages one at a time, so that is its reply to everything before."""
        self.query += 1
        q = self.query
        assert self.ep.send(
            v,
            m.RoundRequest(
                context_id=DRIVER_CONTEXT,
                round=q,
                sender=self.researcher_id,
                kind="task",
                name="vector",
                args={},
                streams=(m.StreamSpec("query", (1,)),),
            ),
        )
        got: list[m.Message] = []
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            item = self.ep.recv(0.1)
            if item is None:
                continue
            sender, msg = item
            if isinstance(msg, m.Refused) and msg.fields == _HELLO:
                continue
            assert sender == v, (sender, msg)
            if msg.context_id == DRIVER_CONTEXT and msg.round == q:
                assert isinstance(msg, m.Refused), msg
                assert msg.reason is m.RefusalReason.NOT_READY, msg
                assert msg.fields == ("shape", "d2", "d3"), msg
                return got
            got.append(msg)
        raise AssertionError(f"{v} did not answer the shape query; got {got}")

    def close(self) -> None:
        self.ep.close()


def _record_sends(ep: ResearcherEndpoint, sent: dict[tuple[str, m.MsgType], Any]):
    real_send = ep.send

    def send(node_id: str, msg: m.Message) -> bool:
        ok = real_send(node_id, msg)
        if ok and msg.context_id != DRIVER_CONTEXT:
            sent[node_id, msg.TYPE] = msg
        return ok

    ep.send = send  # type: ignore[method-assign]


def _replays(v: str, sent, cid: bytes, r: int, rid: str) -> list[Probe]:
    own = [
        m.MsgType.SETUP_REQUEST,
        m.MsgType.CONTEXT_ADVERTS,
        m.MsgType.TRANSCRIPT_SIGS,
        m.MsgType.ROUND_REQUEST,
        m.MsgType.ROUND_ADVERTS,
        m.MsgType.SURVIVORS,
        m.MsgType.UNMASK_REQUEST,
    ]
    out = []
    for t in own:
        reason = (
            m.RefusalReason.CONTEXT_SEEN
            if t is m.MsgType.SETUP_REQUEST
            else m.RefusalReason.UNEXPECTED
        )
        out.append(Probe(f"replayed {t.name}", sent[v, t], refusal=reason))
    for u in NODES3:
        if u != v:  # What was meant for another node.
            for t in (m.MsgType.ROUND_ADVERTS, m.MsgType.UNMASK_REQUEST):
                out.append(
                    Probe(
                        f"{u}'s {t.name}",
                        sent[u, t],
                        refusal=m.RefusalReason.UNEXPECTED,
                    )
                )
    for t in (m.MsgType.ROUND_ADVERTS, m.MsgType.SURVIVORS, m.MsgType.UNMASK_REQUEST):
        out.append(
            Probe(
                f"{t.name} relabelled to round {r + 1}",
                dataclasses.replace(sent[v, t], round=r + 1),
                refusal=m.RefusalReason.UNEXPECTED,
            )
        )
    out.append(
        Probe(
            "ROUND_REQUEST relabelled to round 0",
            dataclasses.replace(sent[v, m.MsgType.ROUND_REQUEST], round=0),
            refusal=m.RefusalReason.UNEXPECTED,
        )
    )
    for rr in (r, r + 1):  # Between rounds an abort is ignored without a reply.
        out.append(
            Probe(
                f"ABORT round {rr}",
                m.Abort(
                    context_id=cid, round=rr, sender=rid, reason=m.AbortReason.TIMEOUT
                ),
            )
        )
    return out + out  # Each replayed twice.


def _other_contexts(v: str, sent, cid: bytes, rng: random.Random) -> list[Probe]:
    flipped = bytes([cid[0] ^ 1]) + cid[1:]
    out = []
    for (to, t), msg in sorted(sent.items()):
        if to != v:
            continue
        for other in (rng.randbytes(32), flipped):
            reason = (
                m.RefusalReason.CONTEXT_MISMATCH
                if t is m.MsgType.SETUP_REQUEST
                else m.RefusalReason.UNEXPECTED
            )
            out.append(
                Probe(
                    f"{t.name} under another context id",
                    dataclasses.replace(msg, context_id=other),
                    refusal=reason,
                )
            )
        if t is not m.MsgType.ROUND_REQUEST:
            # Under the drivers' all-zero id: not a driver message, ignored.
            out.append(
                Probe(
                    f"{t.name} under the driver context id",
                    dataclasses.replace(msg, context_id=DRIVER_CONTEXT),
                )
            )
    return out


def _odd_senders(v: str, sent, r: int) -> list[Probe]:
    out = []
    request = sent[v, m.MsgType.ROUND_REQUEST]
    for who in ("researcher-2", "node-a", "Researcher", "0", "z" * 64, v):
        for (to, t), msg in sorted(sent.items()):
            if to != v:
                continue
            reason = (
                m.RefusalReason.CONTEXT_SEEN
                if t is m.MsgType.SETUP_REQUEST
                else m.RefusalReason.UNEXPECTED
            )
            out.append(
                Probe(
                    f"{t.name} from {who}",
                    dataclasses.replace(msg, sender=who),
                    refusal=reason,
                )
            )
        # A fresh round number, but not from the context's researcher: not spent.
        out.append(
            Probe(
                f"fresh ROUND_REQUEST from {who}",
                dataclasses.replace(request, sender=who, round=r + 500),
                refusal=m.RefusalReason.UNEXPECTED,
            )
        )
    return out


def _raw_items(msg: m.Message) -> tuple[list[Any], list[bytes]]:
    frames = _frames_of(msg)
    return msgpack.unpackb(frames[0], raw=False), frames[1:]


def _pack(items: list[Any], payloads: list[bytes]) -> list[bytes]:
    return [msgpack.packb(items, use_bin_type=True), *payloads]


def _wire_malformed(request: m.RoundRequest) -> list[Probe]:
    """Frames the node endpoint must drop: bad tensors, shapes, ids, envelopes."""
    nan = np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, -0.0], dtype="<f4")
    weighted = dataclasses.replace(
        request,
        kind="plan",
        name="mlp",
        weights=(
            m.Tensor("fc.weight", nan.reshape(2, 3)),
            m.Tensor("fc.bias", nan[:2]),
        ),
    )
    base, payloads = _raw_items(weighted)
    out: list[Probe] = []

    def probe(what: str, edit: Callable[[list[Any], list[bytes]], None]) -> None:
        items, frames = copy.deepcopy(base), list(payloads)
        edit(items, frames)
        out.append(Probe(what, raw=_pack(items, frames), dropped="malformed"))

    W, S = 8, 9  # The weights and streams fields of a ROUND_REQUEST header.
    for dtype in ("complex64", "object", "float128", "<f4", "float", "V8", "U4", ""):
        probe(
            f"weights dtype {dtype!r}", lambda i, f, d=dtype: i[W][0].__setitem__(1, d)
        )
    probe("weights dtype int as str", lambda i, f: i[W][0].__setitem__(1, 5))
    probe("weights frame one byte short", lambda i, f: f.__setitem__(0, f[0][:-1]))
    probe("weights frame one byte long", lambda i, f: f.__setitem__(0, f[0] + b"\0"))
    probe("weights frame missing", lambda i, f: f.pop())
    probe("weights frame extra", lambda i, f: f.append(bytes(8)))
    probe("weights frames swapped", lambda i, f: f.reverse())
    for shape in ([2**31, 2**31], [2**32], [2**16] * 8, [-1, 6], [1] * 9, [2.0, 3]):
        probe(
            f"weights shape {shape}",
            lambda i, f, s=shape: i[W][0].__setitem__(2, s),
        )
    probe(
        "weights tensor of 4 GiB declared, 24 bytes sent",
        lambda i, f: i[W][0].__setitem__(2, [2**30, 4]),
    )
    for shape in ([2**31], [2**16, 2**15], [2**31 - 5], [-2], [1] * 9):
        probe(
            f"stream shape {shape}",
            lambda i, f, s=shape: i[S].__setitem__(0, ["value", s]),
        )
    probe("no streams", lambda i, f: i.__setitem__(S, []))
    probe("duplicate streams", lambda i, f: i[S].append(list(i[S][0])))
    probe("duplicate tensor names", lambda i, f: i[W][1].__setitem__(0, "fc.weight"))
    probe("args with NaN", lambda i, f: i.__setitem__(7, b'{"lr":NaN}'))
    probe("args not canonical", lambda i, f: i.__setitem__(7, b'{"b":1,"a":2}'))
    probe("args not an object", lambda i, f: i.__setitem__(7, b"[1]"))
    probe("args as str", lambda i, f: i.__setitem__(7, "{}"))
    probe("kind 'script'", lambda i, f: i.__setitem__(5, "script"))
    for sender in ("", "a" * 65, "-x", "x\n", "../x", "é", "a b", 7, None):
        probe(f"sender {sender!r}", lambda i, f, s=sender: i.__setitem__(4, s))
    for round_ in (-1, 2**63, 2**64 - 1, True, 1.0):
        probe(f"round {round_!r}", lambda i, f, r=round_: i.__setitem__(3, r))
    probe("context id of 31 bytes", lambda i, f: i.__setitem__(2, i[2][:31]))
    probe("protocol version 2", lambda i, f: i.__setitem__(0, 2))
    probe("unknown type 99", lambda i, f: i.__setitem__(1, 99))
    probe("type SURVIVORS with these fields", lambda i, f: i.__setitem__(1, 14))
    header = _pack(base, payloads)[0]
    for token in _BIG_TOKENS:
        out.append(
            Probe(
                f"declared size token {token[:3].hex()}",
                raw=[header[:20] + token + header[20:40], *payloads],
                dropped="malformed",
            )
        )
    # Below the protocol: the chunk envelope.
    good = _frames_of(weighted)
    env = _wrap(good)
    out += [
        Probe("not an envelope", wire=[b"garbage"], dropped="envelope"),
        Probe("empty message", wire=[b""], dropped="envelope"),
        Probe(
            "transport version 2",
            wire=[_envelope([(1, len(g)) for g in good], version=2), *good],
            dropped="envelope",
        ),
        Probe("fewer chunks than declared", wire=env[:-1], dropped="envelope"),
        Probe("more chunks than declared", wire=[*env, b"x"], dropped="envelope"),
        Probe(
            "chunk sizes not adding up",
            wire=[_envelope([(1, len(good[0]) + 1)]), good[0]],
            dropped="envelope",
        ),
        Probe(
            "1 TiB declared", wire=[_envelope([(1, 1 << 40)]), b"x"], dropped="limits"
        ),
        Probe(
            "8193 chunks declared",
            wire=[_envelope([(8193, 10)]), b"x"],
            dropped="limits",
        ),
    ]
    for p in out:  # The test's own check that each really is malformed.
        if p.raw is not None:
            with pytest.raises(MalformedMessage):
                framing.decode(p.raw)
    return out


def _hostile_requests(request: m.RoundRequest, first: int) -> list[Probe]:
    """Well-formed round requests the node must refuse; each spends its round."""
    nan = np.array([np.nan, np.inf, -np.inf, 1e38, -0.0, 5e-324], dtype="<f8")
    weights_all = tuple(
        m.Tensor(f"w.{d}", np.ones(3, dtype=np.dtype(d).newbyteorder("<")))
        for d in sorted(m.TENSOR_DTYPES)
    )
    cases = [
        (
            "plan round, NaN/inf weights",
            dict(kind="plan", name="mlp", weights=(m.Tensor("fc.weight", nan),)),
            m.RefusalReason.POLICY,
        ),
        (
            "plan round, weights of every dtype",
            dict(kind="plan", name="mlp", weights=weights_all),
            m.RefusalReason.POLICY,
        ),
        (
            "task round, NaN/inf weights, another stream shape",
            dict(
                weights=(m.Tensor("w", nan.reshape(2, 3)),),
                streams=(m.StreamSpec("value", (7,)),),
            ),
            m.RefusalReason.SHAPE,
        ),
        (
            "task round, stream of 2^31 - 6 elements declared",
            dict(streams=(m.StreamSpec("value", (2**31 - 6,)),)),
            m.RefusalReason.SHAPE,
        ),
        (
            "task round, 8-dim stream of 2^31 - 6 elements declared",
            dict(streams=(m.StreamSpec("value", (1,) * 7 + (2**31 - 6,)),)),
            m.RefusalReason.SHAPE,
        ),
        (
            "task round, 4096 streams",
            dict(streams=tuple(m.StreamSpec(f"s{i}", (2, 3)) for i in range(4096))),
            m.RefusalReason.POLICY,
        ),
        (
            "task round, args giving another shape",
            dict(args={"shape": [3, 2]}),
            m.RefusalReason.SHAPE,
        ),
        ("task not offered", dict(name="exfiltrate"), m.RefusalReason.POLICY),
        ("task returning a list", dict(name="not_an_array"), m.RefusalReason.INPUT),
        (
            "task round, args of 60 KiB",
            dict(args={"pad": "x" * (60 << 10), "shape": [6]}),
            m.RefusalReason.SHAPE,
        ),
    ]
    out = []
    for k, (what, changes, reason) in enumerate(cases):
        r = first + k
        msg = dataclasses.replace(request, round=r, **changes)
        out.append(Probe(what, msg, refusal=reason, spends=r))
    return out


def _bad_setups(v: str, rid: str, sent, rng: random.Random) -> list[Probe]:
    """Setup requests with one defect each; none may begin a context."""
    real = sent[v, m.MsgType.SETUP_REQUEST]

    def setup(nodes, *, threshold=2, ring_bits=32, forge=False) -> m.SetupRequest:
        nodes = tuple(sorted(nodes, key=lambda x: x.encode()))
        nonce = rng.randbytes(32)
        cid = compute_context_id(
            researcher_id=rid,
            job_id=real.job_id,
            nodes=nodes,
            ring_bits=ring_bits,
            bits=masking.bits_for(len(nodes), ring_bits),
            clipping_range=real.clipping_range,
            threshold=threshold,
            nonce=nonce,
        )
        return m.SetupRequest(
            context_id=rng.randbytes(32) if forge else cid,
            round=0,
            sender=rid,
            job_id=real.job_id,
            nodes=nodes,
            ring_bits=ring_bits,
            clipping_range=real.clipping_range,
            threshold=threshold,
            nonce=nonce,
        )

    R = m.RefusalReason
    others = [u for u in NODES3 if u != v]
    out = []
    for odd in (
        "mallory",
        "A",
        "0",
        "x.y_z-1",
        "z" * 64,
        "node-x",
        "node-a.",
        "node-A",
    ):
        if odd in NODES3:
            continue
        out.append(
            Probe(
                f"setup naming {odd!r}",
                setup([*NODES3, odd], threshold=3),
                refusal=R.ROSTER,
            )
        )
    many = [f"sybil-{i:04d}" for i in range(1000)]
    out += [
        Probe(
            "setup naming 1000 sybils",
            setup([*NODES3, *many], threshold=600),
            refusal=R.ROSTER,
        ),
        Probe(
            "setup not naming this node",
            setup([*others, "mallory"]),
            refusal=R.UNEXPECTED,
        ),
        Probe("setup with t = 1", setup(NODES3, threshold=1), refusal=R.THRESHOLD),
        Probe("setup with t = 4 > n", setup(NODES3, threshold=4), refusal=R.THRESHOLD),
        Probe(
            "setup with a forged context id",
            setup(NODES3, forge=True),
            refusal=R.CONTEXT_MISMATCH,
        ),
        Probe(
            "setup, ring 64, forged context id",
            setup(NODES3, ring_bits=64, forge=True),
            refusal=R.CONTEXT_MISMATCH,
        ),
        Probe(
            "setup replayed with another nonce",
            dataclasses.replace(real, nonce=rng.randbytes(32)),
            refusal=R.CONTEXT_SEEN,
        ),
    ]
    return out


def _mutated_replays(
    v: str, sent, cid: bytes, rid: str, rng: random.Random, count: int
) -> list[Probe]:
    """Seeded mutations of the real messages ``v`` got (all but the two kinds a
    READY node may accept), classified by the node's rules between rounds: what
    does not decode is dropped, what does is refused UNEXPECTED (any type but
    ROUND_REQUEST and ABORT, another context, or not from the researcher), and
    an ABORT of the context from the researcher is ignored."""
    pool = [
        _frames_of(msg)
        for (to, t), msg in sorted(sent.items())
        if to == v and t not in (m.MsgType.SETUP_REQUEST, m.MsgType.ROUND_REQUEST)
    ]
    pool.append(
        _frames_of(
            m.Abort(context_id=cid, round=1, sender=rid, reason=m.AbortReason.TIMEOUT)
        )
    )
    out: list[Probe] = []
    while len(out) < count:
        frames = [bytearray(f) for f in rng.choice(pool)]
        h = frames[0]
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.randrange(4), rng.randrange(len(h))
            if op == 0:
                h[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                h[pos] = rng.randrange(256)
            elif op == 2:
                del h[pos:]
            else:
                h[pos:pos] = rng.randbytes(rng.randint(1, 4))
            if not h:
                h.append(0x90)
        raw = [bytes(f) for f in frames]
        try:
            msg = framing.decode(raw)
        except MalformedMessage:
            out.append(Probe("mutated, undecodable", raw=raw, dropped="malformed"))
            continue
        if msg.TYPE in (m.MsgType.SETUP_REQUEST, m.MsgType.ROUND_REQUEST):
            continue  # Might be acceptable: not a hostile input with one outcome.
        if msg.context_id == DRIVER_CONTEXT:
            continue  # A driver message (32 bytes turned to zeros: not by chance).
        ignored = (
            msg.context_id == cid and msg.sender == rid and msg.TYPE is m.MsgType.ABORT
        )
        out.append(
            Probe(
                f"mutated {msg.TYPE.name}",
                msg,
                refusal=None if ignored else m.RefusalReason.UNEXPECTED,
            )
        )
    return out


def _bump_researcher_record(home: Path, job_id: str, last_round: int) -> None:
    """The test's hostile endpoint spent round numbers on the nodes: tell the
    researcher's record, as SecureAggregation does before each request it sends."""
    for path in (home / "contexts").glob("*.json"):
        doc = json.loads(path.read_text("utf-8"))
        if doc.get("job_id") == job_id:
            assert doc["last_round"] <= last_round
            doc["last_round"] = last_round
            path.write_text(json.dumps(doc, indent=1, sort_keys=True), "utf-8")
            return
    raise AssertionError(f"no context record for {job_id}")


def test_daemon_hostile_researcher_keeps_serving_state_unchanged(deploy, reliability):
    job = "hostile-daemon"
    deploy.add_nodes(NODES3)
    _start_debug(deploy, *NODES3)
    sent: dict[tuple[str, m.MsgType], Any] = {}
    with deploy.secagg() as sa:
        wait_connected(deploy, *NODES3)
        _record_sends(sa._open(), sent)
        sa.setup(NODES3, job_id=job)
        res = sa.secure_sum("vector")
        check_result(deploy, res, NODES3)
        cid, r = sa._current_server().context_id, res.round
        rid = sa.researcher_id
        # Every node has revealed (so it is between rounds) before the socket goes.
        end = time.monotonic() + WAIT
        while not all(
            _step_name(cid, r, "reveal") in _snapshot(deploy.dirs[v]) for v in NODES3
        ):
            assert time.monotonic() < end, "a node never got the unmask request"
            time.sleep(0.05)
    assert len(sent) == 7 * len(NODES3), sorted(sent)

    rng = random.Random(SEED + 3)
    request = sent[NODES3[0], m.MsgType.ROUND_REQUEST]
    next_round = r + 1000  # Rounds the hostile requests spend, one per request.
    batches: list[tuple[str, Callable[[str], list[Probe]]]] = [
        (
            "Replayed setup and old-round messages",
            lambda v: _replays(v, sent, cid, r, rid),
        ),
        (
            "Messages for other context ids",
            lambda v: _other_contexts(v, sent, cid, rng),
        ),
        (
            "Odd senders (valid ids, not the context's researcher)",
            lambda v: _odd_senders(v, sent, r),
        ),
        (
            "Malformed round requests, odd ids on the wire, bad envelopes",
            lambda v: _wire_malformed(request),
        ),
        (
            "Setup requests naming ids outside the roster, bad t, forged ids",
            lambda v: _bad_setups(v, rid, sent, rng),
        ),
        (
            "Seeded mutations of the real messages (bit flips, bytes set, cut, "
            "inserted), classified by the node's rules before sending",
            lambda v: _mutated_replays(v, sent, cid, rid, rng, 1000),
        ),
    ]
    snaps = {v: _snapshot(deploy.dirs[v]) for v in NODES3}
    procs = deploy.procs
    spent: dict[str, list[int]] = {v: [] for v in NODES3}
    rows = []
    hostile = HostileResearcher(deploy)
    try:
        for title, build in [
            *batches,
            (
                "Well-formed hostile round requests (NaN/inf weights, every dtype, "
                "giant stream shapes, 4096 streams, unknown task)",
                None,
            ),
        ]:
            sent_count, n_spent, t0 = 0, 0, time.monotonic()
            refusals: Counter[str] = Counter()
            drops: Counter[str] = Counter()
            for v in NODES3:
                if build is None:
                    probes = _hostile_requests(
                        sent[v, m.MsgType.ROUND_REQUEST], next_round
                    )
                else:
                    probes = build(v)
                logged = Counter(_DROP_RE.findall(deploy.log(v)))
                for p in probes:
                    hostile.send(v, p)
                replies = hostile.shape_query(v)
                assert procs[v].poll() is None, deploy.log(v)
                want = [
                    (p.message.context_id, p.message.round, p.refusal)
                    for p in probes
                    if p.refusal is not None and p.message is not None
                ]
                got = [
                    (x.context_id, x.round, getattr(x, "reason", x.TYPE))
                    for x in replies
                ]
                assert got == want, (title, v, got, want)
                dropped = Counter(_DROP_RE.findall(deploy.log(v))) - logged
                assert dropped == Counter(p.dropped for p in probes if p.dropped), (
                    title,
                    v,
                    dropped,
                )
                # State: byte-identical, but for the rounds refusals spend by design.
                now = _snapshot(deploy.dirs[v])
                new = {k: now[k] for k in now.keys() - snaps[v].keys()}
                kept = {k: now.get(k, b"<deleted>") for k in snaps[v]}
                assert kept == snaps[v], (title, v)
                rounds = [p.spends for p in probes if p.spends is not None]
                assert set(new) == {_step_name(cid, x, "request") for x in rounds}, (
                    title,
                    v,
                    sorted(new),
                )
                for x in rounds:
                    doc = msgpack.unpackb(new[_step_name(cid, x, "request")])
                    assert (doc["round"], doc["phase"]) == (x, "request")
                spent[v] += rounds
                n_spent += len(rounds)
                snaps[v] = now
                sent_count += len(probes)
                refusals.update(p.refusal.name for p in probes if p.refusal)
                drops.update(p.dropped for p in probes if p.dropped)
            ignored = sent_count - sum(refusals.values()) - sum(drops.values())
            took = time.monotonic() - t0
            rows.append((title, sent_count, refusals, drops, ignored, n_spent, took))
    finally:
        hostile.close()
    # The daemons still run real rounds: the researcher learns the spent rounds.
    last = max(max(x) for x in spent.values())
    _bump_researcher_record(deploy.home, job, last)
    with deploy.secagg() as sa:
        assert not sa._get_link().wait_routable(NODES3, WAIT)
        sa.setup(NODES3, job_id=job)  # Resumed from the record: nodes not contacted.
        after = sa.secure_sum("vector")
        check_result(deploy, after, NODES3)
        assert after.round == last + 1
    for v in NODES3:
        assert procs[v].poll() is None and "Traceback" not in deploy.log(v)
    for title, count, refusals, drops, ignored, n_spent, took in rows:
        parts = [f"{n} refused {k}" for k, n in sorted(refusals.items())]
        parts += [f"{n} dropped ({k})" for k, n in sorted(drops.items())]
        if ignored:
            parts.append(f"{ignored} ignored without a reply (as specified)")
        reliability.add(
            AREA,
            f"Daemon, hostile researcher: {title}",
            f"{count} messages to 3 live daemons (each node's own copy), after a "
            f"real setup and round ({took:.2f} s)",
            count,
            "; ".join(parts)
            + ". After each batch every daemon was alive and answered a shape "
            "query; its refusals matched one by one and in order, its log showed "
            "exactly the expected drops; state files byte-identical"
            + (
                f" except the {n_spent} `request` steps of the refused round numbers "
                "(one each): DESIGN §3 spends a round number once accepted for "
                "processing, so a refusal after that point is durable; the next real "
                f"round ({last + 1}) gave the exact sum"
                if n_spent
                else ""
            ),
        )


# --------------------------------------------------------- case 4: relay swaps


def _relay(variant: str, victim: str, target: str, attacker):
    """A tamper hook: change ``target``'s advert in what is relayed to ``victim``."""

    def tamper(to: str, msg: m.Message) -> m.Message | None:
        if not isinstance(msg, m.ContextAdverts) or to != victim:
            return msg
        adverts = []
        for a in msg.adverts:
            if a.node == target:
                if variant == "share key":
                    a = dataclasses.replace(a, share_key=keys.generate_x25519()[1])
                elif variant == "identity key":
                    a = dataclasses.replace(a, identity_key=bytes(attacker.verify_key))
                else:  # Identity and share key, advert re-signed by the attacker.
                    e = keys.generate_x25519()[1]
                    a = dataclasses.replace(
                        a,
                        identity_key=bytes(attacker.verify_key),
                        share_key=e,
                        signature=keys.sign(
                            attacker, "advert-e", msg.context_id, a.node, e
                        ),
                    )
            adverts.append(a)
        return dataclasses.replace(msg, adverts=tuple(adverts))

    return tamper


def _released_nothing(net: MemoryNetwork) -> None:
    """No node sent a round advert (share boxes), an upload or a share."""
    kinds = {s.message.TYPE for s in net.seen if s.direction == "in"}
    assert not kinds & {
        m.MsgType.ROUND_ADVERT,
        m.MsgType.MASKED_INPUT,
        m.MsgType.UNMASK_SHARES,
    }, kinds
    cid = net.server.context_id
    for v, node in net.nodes.items():
        assert not node.holds_round_secrets(cid)
        assert net.stores[v].last_round(cid) == 0


# (trust, variant) -> (expected error, refusal reason of the victim or None).
_RELAY = {
    ("roster", "share key"): (PolicyRefused, m.RefusalReason.AUTHENTICATION),
    ("roster", "re-signed identity and share key"): (
        PolicyRefused,
        m.RefusalReason.AUTHENTICATION,
    ),
    ("roster", "identity key"): (None, None),
    ("tofu", "share key"): (PolicyRefused, m.RefusalReason.AUTHENTICATION),
    ("tofu", "identity key"): (PolicyRefused, m.RefusalReason.AUTHENTICATION),
    ("tofu", "re-signed identity and share key"): (ContextMismatch, None),
}


@pytest.mark.parametrize(
    ("trust", "variant"), list(_RELAY), ids=lambda x: x.replace(" ", "-")
)
def test_relay_swapping_a_key_advert_fails_setup_naming_the_node(
    trust, variant, reliability
):
    error, reason = _RELAY[trust, variant]
    rng = random.Random(f"{SEED}/{trust}/{variant}")
    runs = 0
    started = time.perf_counter()
    for n in (3, 4, 5, 7):
        for _ in range(4):
            ids = [f"n{i}" for i in range(n)]
            victim, target = rng.sample(ids, 2)
            values = {v: np.full(4, rng.uniform(-1, 1)) for v in ids}
            net = MemoryNetwork(
                ids,
                peer_trust=trust,
                inputs=lambda v, req, values=values: {
                    s.name: values[v] for s in req.streams
                },
            )
            attacker = keys.generate_signing_key()
            tamper = _relay(variant, victim, target, attacker)
            cid = net.server.context_id
            if error is None:
                # Roster nodes take identity keys from the roster only, and T does
                # not cover the advertised one: the swap changes nothing.
                net.setup(tamper=tamper)
                result = net.run_round(streams=[m.StreamSpec("w", (4,))])
                assert result.contributors == tuple(sorted(ids))
                np.testing.assert_allclose(
                    result.sums["w"], sum(values.values()), atol=n * 3.0 / 2**28
                )
                runs += 1
                continue
            with pytest.raises(error) as info:
                net.setup(tamper=tamper)
            assert info.value.nodes == (victim,), info.value
            refused = [(v, why) for v, _, why in net.refusals]
            if reason is not None:
                assert refused == [(victim, reason)], refused
                assert reason.name in str(info.value)
                assert net.stores[victim].committed(cid, 0, "transcript-sig") is None
            else:
                assert info.value.fields == ("transcript",)
                assert refused == []
                # The TOFU caveat (docs/files.md §8): pinned at first contact.
                pinned = net.stores[victim].pinned_key(target)
                assert pinned == bytes(attacker.verify_key)
            _released_nothing(net)
            assert net.nodes[victim].stage(cid) is NodeStage.FAILED
            with pytest.raises(UnexpectedMessage):
                net.server.start_round(
                    kind="task", name="s", streams=[m.StreamSpec("w", (4,))], now=0.0
                )
            if trust == "tofu" and reason is not None:
                # A refused advert set pins nothing (it used to pin the swapped key
                # for good, before its signature was checked).
                pins = {u: net.stores[victim].pinned_key(u) for u in ids}
                assert set(pins.values()) == {None}, pins
            runs += 1
    elapsed = time.perf_counter() - started
    what = {
        "share key": "the target's E_u replaced in CONTEXT_ADVERTS sent to the victim",
        "identity key": "the target's identity key replaced (signature untouched)",
        "re-signed identity and share key": "the target's identity key, E_u and "
        "signature replaced by the attacker's own, validly signed",
    }[variant]
    if error is None:
        outcome = (
            "setup completed and the next round's sum was exact every time: with a "
            "roster the advertised identity key is never used (the roster's is), "
            "and T does not cover it"
        )
    elif reason is not None:
        outcome = (
            f"setup failed every time with {error.__name__} naming the victim only "
            f"(the victim refused with {reason.name}; docs/protocol.md §10 maps any "
            "setup refusal but CONTEXT_MISMATCH to PolicyRefused); no round keys, "
            "uploads or shares released"
            + ("; nothing pinned by the victim" if trust == "tofu" else "")
        )
    else:
        outcome = (
            "the victim pinned the attacker's key on first sight (the TOFU caveat) "
            "but its transcript differs: ContextMismatch(fields=('transcript',)) "
            "naming the victim only; no round keys, uploads or shares released"
        )
    reliability.add(
        AREA,
        f"Relay swaps a key advert ({trust}, {variant})",
        f"{what}; n = 3, 4, 5, 7, 4 random victim/target pairs each ({elapsed:.2f} s)",
        runs,
        outcome,
    )
