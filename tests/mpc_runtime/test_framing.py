# SPDX-License-Identifier: Apache-2.0
"""Tests of mpc_runtime.messages and .framing: golden bytes, round trips, fuzzing."""

from __future__ import annotations

import string

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpc_runtime import framing, keys, sharing
from mpc_runtime import messages as m
from mpc_runtime.errors import MalformedMessage, VersionMismatch

# More fuzzing under the thorough profile (tests/conftest.py), at least 5000 always.
_FUZZ_EXAMPLES = 50_000 if settings.get_current_profile_name() == "thorough" else 5_000

CID = bytes(range(32))
R = "researcher"


def _b(k: int, n: int) -> bytes:
    return bytes([k]) * n


def _samples() -> dict[m.MsgType, m.Message]:
    """One fixed message per type; their bytes are pinned below."""
    h0 = dict(context_id=CID, round=0)
    h7 = dict(context_id=CID, round=7)
    return {
        m.MsgType.SETUP_REQUEST: m.SetupRequest(
            **h0,
            sender=R,
            job_id="job-1",
            nodes=("node-a", "node-b", "node-c"),
            ring_bits=32,
            clipping_range=3.0,
            threshold=2,
            nonce=_b(0xA5, 32),
        ),
        m.MsgType.CONTEXT_ADVERT: m.ContextAdvert(
            **h0,
            sender="node-a",
            identity_key=_b(1, 32),
            share_key=_b(2, 32),
            signature=_b(3, 64),
        ),
        m.MsgType.CONTEXT_ADVERTS: m.ContextAdverts(
            **h0,
            sender=R,
            adverts=(
                m.ContextAdvertEntry("node-a", _b(1, 32), _b(2, 32), _b(3, 64)),
                m.ContextAdvertEntry("node-b", _b(4, 32), _b(5, 32), _b(6, 64)),
            ),
        ),
        m.MsgType.TRANSCRIPT_SIG: m.TranscriptSig(
            **h0, sender="node-a", transcript=_b(7, 32), signature=_b(8, 64)
        ),
        m.MsgType.TRANSCRIPT_SIGS: m.TranscriptSigs(
            **h0,
            sender=R,
            signatures=(
                m.TranscriptSigEntry("node-a", _b(7, 32), _b(8, 64)),
                m.TranscriptSigEntry("node-b", _b(7, 32), _b(9, 64)),
            ),
        ),
        m.MsgType.ROUND_REQUEST: m.RoundRequest(
            **h7,
            sender=R,
            kind="plan",
            name="mlp",
            args={"lr": 0.1, "num_updates": 50},
            weights=(
                m.Tensor("fc.weight", np.arange(6, dtype="<f4").reshape(2, 3)),
                m.Tensor("fc.bias", np.array([1, -1], dtype="<i8")),
            ),
            streams=(m.StreamSpec("fc.weight", (2, 3)), m.StreamSpec("fc.bias", (2,))),
        ),
        m.MsgType.ROUND_ADVERT: m.RoundAdvert(
            **h7,
            sender="node-a",
            mask_key=_b(10, 32),
            signature=_b(11, 64),
            shares={
                "node-c": m.ShareBoxes(c=_b(12, 4), b=_b(13, 4)),
                "node-b": m.ShareBoxes(c=_b(14, 4), b=_b(15, 4)),
            },
        ),
        m.MsgType.ROUND_ADVERTS: m.RoundAdverts(
            **h7,
            sender=R,
            adverts=(
                m.RoundAdvertEntry(
                    "node-b", _b(16, 32), _b(17, 64), _b(18, 4), _b(19, 4)
                ),
            ),
        ),
        m.MsgType.MASKED_INPUT: m.MaskedInput(
            **h7,
            sender="node-a",
            ring_bits=32,
            commitment=_b(20, 32),
            peers=("node-b", "node-c"),
            vectors=(m.Tensor("sum", np.arange(9, dtype="<u4")),),
        ),
        m.MsgType.SURVIVORS: m.Survivors(
            **h7, sender=R, survivors=("node-a", "node-b")
        ),
        m.MsgType.SURVIVOR_SIG: m.SurvivorSig(
            **h7, sender="node-a", survivors=("node-a", "node-b"), signature=_b(21, 64)
        ),
        m.MsgType.UNMASK_REQUEST: m.UnmaskRequest(
            **h7,
            sender=R,
            survivors=("node-a", "node-b"),
            signatures=(
                m.SurvivorSigEntry("node-a", _b(21, 64)),
                m.SurvivorSigEntry("node-b", _b(22, 64)),
            ),
        ),
        m.MsgType.UNMASK_SHARES: m.UnmaskShares(
            **h7,
            sender="node-a",
            b_shares={"node-b": _b(23, 4), "node-a": _b(24, 4)},
            c_shares={"node-c": _b(25, 4)},
        ),
        m.MsgType.CLEAR_UPDATE: m.ClearUpdate(
            context_id=bytes(32),  # The drivers' all-zero context id.
            round=7,
            sender="node-a",
            samples=300,
            tensors=(
                m.Tensor("fc.weight", np.arange(6, dtype="<f4").reshape(2, 3)),
                m.Tensor("fc.bias", np.array([0.5, -1.0], dtype="<f8")),
            ),
        ),
        m.MsgType.REFUSED: m.Refused(
            **h7,
            sender="node-a",
            reason=m.RefusalReason.CONTEXT_MISMATCH,
            fields=("transcript",),
        ),
        m.MsgType.ABORT: m.Abort(**h7, sender=R, reason=m.AbortReason.TIMEOUT),
    }


# Golden bytes (msgpack test_format.py style): header hex, then each payload frame's
# hex. A change here is a wire change: bump PROTOCOL_VERSION and docs/protocol.md.
GOLDEN: dict[m.MsgType, tuple[str, ...]] = {
    m.MsgType.SETUP_REQUEST: (
        (
            "9b0101c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00aa72"
            "657365617263686572a56a6f622d3193a66e6f64652d61a66e6f64652d62a66e6f64652d6320cb40"
            "0800000000000002c420a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5"
            "a5a5"
        ),
    ),
    m.MsgType.CONTEXT_ADVERT: (
        (
            "980102c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00a66e"
            "6f64652d61c4200101010101010101010101010101010101010101010101010101010101010101c4"
            "200202020202020202020202020202020202020202020202020202020202020202c4400303030303"
            "03030303030303030303030303030303030303030303030303030303030303030303030303030303"
            "03030303030303030303030303030303030303"
        ),
    ),
    m.MsgType.CONTEXT_ADVERTS: (
        (
            "960103c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00aa72"
            "6573656172636865729294a66e6f64652d61c4200101010101010101010101010101010101010101"
            "010101010101010101010101c4200202020202020202020202020202020202020202020202020202"
            "020202020202c4400303030303030303030303030303030303030303030303030303030303030303"
            "030303030303030303030303030303030303030303030303030303030303030394a66e6f64652d62"
            "c4200404040404040404040404040404040404040404040404040404040404040404c42005050505"
            "05050505050505050505050505050505050505050505050505050505c44006060606060606060606"
            "06060606060606060606060606060606060606060606060606060606060606060606060606060606"
            "0606060606060606060606060606"
        ),
    ),
    m.MsgType.TRANSCRIPT_SIG: (
        (
            "970104c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00a66e"
            "6f64652d61c4200707070707070707070707070707070707070707070707070707070707070707c4"
            "40080808080808080808080808080808080808080808080808080808080808080808080808080808"
            "08080808080808080808080808080808080808080808080808"
        ),
    ),
    m.MsgType.TRANSCRIPT_SIGS: (
        (
            "960105c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00aa72"
            "6573656172636865729293a66e6f64652d61c4200707070707070707070707070707070707070707"
            "070707070707070707070707c4400808080808080808080808080808080808080808080808080808"
            "080808080808080808080808080808080808080808080808080808080808080808080808080893a6"
            "6e6f64652d62c4200707070707070707070707070707070707070707070707070707070707070707"
            "c4400909090909090909090909090909090909090909090909090909090909090909090909090909"
            "0909090909090909090909090909090909090909090909090909"
        ),
    ),
    m.MsgType.ROUND_REQUEST: (
        (
            "9a010ac420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07aa72"
            "657365617263686572a4706c616ea36d6c70c41b7b226c72223a302e312c226e756d5f7570646174"
            "6573223a35307d9293a966632e776569676874a7666c6f6174333292020393a766632e62696173a5"
            "696e74363491029292a966632e77656967687492020392a766632e626961739102"
        ),
        "000000000000803f0000004000004040000080400000a040",
        "0100000000000000ffffffffffffffff",
    ),
    m.MsgType.ROUND_ADVERT: (
        (
            "98010bc420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07a66e"
            "6f64652d61c4200a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0ac4"
            "400b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b82a66e6f64652d6292c4040e0e0e0e"
            "c4040f0f0f0fa66e6f64652d6392c4040c0c0c0cc4040d0d0d0d"
        ),
    ),
    m.MsgType.ROUND_ADVERTS: (
        (
            "96010cc420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07aa72"
            "6573656172636865729195a66e6f64652d62c4201010101010101010101010101010101010101010"
            "101010101010101010101010c4401111111111111111111111111111111111111111111111111111"
            "1111111111111111111111111111111111111111111111111111111111111111111111111111c404"
            "12121212c40413131313"
        ),
    ),
    m.MsgType.MASKED_INPUT: (
        (
            "99010dc420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07a66e"
            "6f64652d6120c4201414141414141414141414141414141414141414141414141414141414141414"
            "92a66e6f64652d62a66e6f64652d639192a373756d09"
        ),
        "000000000100000002000000030000000400000005000000060000000700000008000000",
    ),
    m.MsgType.SURVIVORS: (
        (
            "96010ec420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07aa72"
            "65736561726368657292a66e6f64652d61a66e6f64652d62"
        ),
    ),
    m.MsgType.SURVIVOR_SIG: (
        (
            "97010fc420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07a66e"
            "6f64652d6192a66e6f64652d61a66e6f64652d62c440151515151515151515151515151515151515"
            "15151515151515151515151515151515151515151515151515151515151515151515151515151515"
            "151515151515"
        ),
    ),
    m.MsgType.UNMASK_REQUEST: (
        (
            "970110c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07aa72"
            "65736561726368657292a66e6f64652d61a66e6f64652d629292a66e6f64652d61c4401515151515"
            "15151515151515151515151515151515151515151515151515151515151515151515151515151515"
            "1515151515151515151515151515151515151592a66e6f64652d62c4401616161616161616161616"
            "16161616161616161616161616161616161616161616161616161616161616161616161616161616"
            "16161616161616161616161616"
        ),
    ),
    m.MsgType.UNMASK_SHARES: (
        (
            "970111c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07a66e"
            "6f64652d6182a66e6f64652d61c40418181818a66e6f64652d62c4041717171781a66e6f64652d63"
            "c40419191919"
        ),
    ),
    m.MsgType.CLEAR_UPDATE: (
        (
            "970114c420000000000000000000000000000000000000000000000000000000000000000007a66e"
            "6f64652d61cd012c9293a966632e776569676874a7666c6f6174333292020393a766632e62696173"
            "a7666c6f617436349102"
        ),
        "000000000000803f0000004000004040000080400000a040",
        "000000000000e03f000000000000f0bf",
    ),
    m.MsgType.REFUSED: (
        (
            "97011ec420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07a66e"
            "6f64652d610491aa7472616e736372697074"
        ),
    ),
    m.MsgType.ABORT: (
        (
            "96011fc420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f07aa72"
            "65736561726368657201"
        ),
    ),
}


def _frames_hex(msg: m.Message) -> tuple[str, ...]:
    return tuple(bytes(f).hex() for f in framing.encode(msg))


def test_golden_table_complete_every_type():
    assert set(GOLDEN) == set(m.MsgType) == set(_samples())


@pytest.mark.parametrize("msg_type", list(m.MsgType), ids=lambda t: t.name)
def test_encode_sample_matches_golden_bytes(msg_type):
    assert _frames_hex(_samples()[msg_type]) == GOLDEN[msg_type]


@pytest.mark.parametrize("msg_type", list(m.MsgType), ids=lambda t: t.name)
def test_decode_golden_bytes_gives_sample(msg_type):
    frames = [bytes.fromhex(h) for h in GOLDEN[msg_type]]
    assert framing.decode(frames) == _samples()[msg_type]


def test_constants_agree_with_keys_and_sharing():
    assert m.KEY_SIZE == keys.PUBLIC_KEY_SIZE
    assert m.SIGNATURE_SIZE == keys.SIGNATURE_SIZE
    assert m.DIGEST_SIZE == keys.DIGEST_SIZE
    assert sharing.SHARE_SIZE <= m.MAX_SHARE_SIZE
    assert keys.NONCE_SIZE + sharing.SHARE_SIZE + 16 <= m.MAX_BOX_SIZE


def test_encode_vector_frames_are_zero_copy_views():
    arr = np.arange(1000, dtype="<u4")
    msg = m.MaskedInput(
        context_id=CID,
        round=1,
        sender="a",
        ring_bits=32,
        commitment=bytes(32),
        peers=(),
        vectors=(m.Tensor("s", arr),),
    )
    frames = framing.encode(msg)
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], dtype="<u4"), arr)
    decoded = framing.decode(frames)
    assert np.shares_memory(decoded.vectors[0].data, arr)


def test_decode_other_version_raises_version_mismatch():
    header = msgpack.packb([2, 1, CID, 0, R], use_bin_type=True)
    with pytest.raises(VersionMismatch):
        framing.decode([header])


def test_decode_version_checked_before_type_raises_version_mismatch():
    header = msgpack.packb([99, 250, "junk"], use_bin_type=True)
    with pytest.raises(VersionMismatch):
        framing.decode([header])


def test_decode_unknown_type_raises_malformed():
    header = msgpack.packb([1, 99, CID, 0, R], use_bin_type=True)
    with pytest.raises(MalformedMessage) as info:
        framing.decode([header])
    assert not isinstance(info.value, VersionMismatch)


@pytest.mark.parametrize(
    "msg_type",
    [m.MsgType.ROUND_REQUEST, m.MsgType.MASKED_INPUT, m.MsgType.CLEAR_UPDATE],
    ids=lambda t: t.name,
)
@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f[:-1],  # the last payload frame is missing
        lambda f: [f[0], bytes(f[1])[:-1], *f[2:]],  # one byte short
        lambda f: [f[0], bytes(f[1]) + b"\0", *f[2:]],  # one byte long
        lambda f: [*f, b""],  # an extra frame
    ],
    ids=["missing", "short", "long", "extra"],
)
def test_decode_frame_length_disagreeing_with_header_raises_malformed(mutate, msg_type):
    frames = framing.encode(_samples()[msg_type])
    with pytest.raises(MalformedMessage):
        framing.decode(mutate(frames))


def test_decode_payload_on_frameless_type_raises_malformed():
    frames = framing.encode(_samples()[m.MsgType.SURVIVORS])
    with pytest.raises(MalformedMessage):
        framing.decode([*frames, b"\0\0\0\0"])


@pytest.mark.parametrize(
    "items",
    [
        [1, 14, CID, 7, R, ["b", "a"]],  # ids not sorted
        [1, 14, CID, 7, R, ["a", "a"]],  # duplicate ids
        [1, 14, CID, 7, R, ["-bad"]],  # id regex
        [1, 14, CID, 7, R, ["a" * 65]],  # id too long
        [1, 14, CID, 7, R, ["a\n"]],  # "$" must not admit a trailing newline
        [1, 14, CID[:31], 7, R, ["a"]],  # context id length
        [1, 14, CID, -1, R, ["a"]],  # negative round
        [1, 14, CID, True, R, ["a"]],  # bool is not an int
        [1, 14, CID, 7, R, ["a"], "extra"],  # trailing field
        [1, 14, CID, 7, R],  # missing field
        [1, 15, CID, 7, "a", ["a"], bytes(63)],  # signature length
        [1, 2, CID, 0, "a", bytes(32), bytes(31), bytes(64)],  # key length
        [1, 17, CID, 7, "a", {"a": b"1"}, {"a": b"2"}],  # b and c shares for one node
        [1, 30, CID, 7, "a", 99, []],  # unknown refusal code
        [1, 1, CID, 0, R, "j", ["a", "b"], 48, 3.0, 2, bytes(32)],  # ring bits
        [1, 1, CID, 0, R, "j", ["a", "b"], 32, float("nan"), 2, bytes(32)],  # NaN range
        [1, 1, CID, 0, R, "j", ["a"], 32, 3.0, 1, bytes(32)],  # fewer than 2 nodes
        [
            1,
            10,
            CID,
            1,
            R,
            "task",
            "t",
            b'{"a":1,"a":2}',
            [],
            [["s", [3]]],
        ],  # dup JSON key
        [
            1,
            10,
            CID,
            1,
            R,
            "task",
            "t",
            b'{ "a":1}',
            [],
            [["s", [3]]],
        ],  # non-canonical JSON
        [1, 10, CID, 1, R, "task", "t", b"[1]", [], [["s", [3]]]],  # args not an object
        [1, 10, CID, 1, R, "task", "t", b"{}", [], []],  # no streams
        [1, 10, CID, 1, R, "job", "t", b"{}", [], [["s", [3]]]],  # kind
        [1, 10, CID, 1, R, "task", "t", b"{}", [], [["s", [1 << 20, 1 << 20]]]],  # size
    ],
)
def test_decode_invalid_field_raises_malformed(items):
    with pytest.raises(MalformedMessage):
        framing.decode([msgpack.packb(items, use_bin_type=True)])


def test_decode_noncanonical_header_raises_malformed():
    # A valid message whose round is packed as uint64 instead of a fixint.
    frames = framing.encode(_samples()[m.MsgType.SURVIVORS])
    good = bytes(frames[0])
    items = msgpack.unpackb(good, raw=False)
    assert good == msgpack.packb(items, use_bin_type=True)
    tail = msgpack.packb(items[4:], use_bin_type=True)[1:]  # without the array marker
    head = msgpack.packb(items[:3], use_bin_type=True)[1:]
    bad = bytes([0x90 | len(items)]) + head + b"\xcf" + (7).to_bytes(8, "big") + tail
    assert msgpack.unpackb(bad, raw=False) == items
    with pytest.raises(MalformedMessage):
        framing.decode([bad])


def test_decode_oversized_header_raises_malformed():
    with pytest.raises(MalformedMessage):
        framing.decode([b"\x00" * (framing.MAX_HEADER_BYTES + 1)])


@pytest.mark.parametrize("frames", [[], b"\x95", "text", None, [None], [123]])
def test_decode_not_frames_raises_malformed(frames):
    with pytest.raises(MalformedMessage):
        framing.decode(frames)


def test_message_construction_bad_field_raises_value_error():
    with pytest.raises(ValueError, match="expected"):
        m.Survivors(context_id=CID, round=1, sender=R, survivors=("b", "a"))
    with pytest.raises(TypeError, match="expected"):
        m.Survivors(context_id=CID, round=1, sender=R, survivors=["a"])
    with pytest.raises(ValueError):
        m.RoundRequest(
            context_id=CID,
            round=1,
            sender=R,
            kind="task",
            name="t",
            args={"x": float("nan")},
            streams=(m.StreamSpec("s", (1,)),),
        )


# DESIGN §3's encoding prefixes a tensor's bytes (in the weights hash of D_r) and
# every byte string with a 4-byte length: nothing longer may be decoded or built.
_PREFIX_LIMIT = (1 << 32) - 1


def _round_request_frames(dtype: str, shape: list[int], frame: bytes) -> list[bytes]:
    items = [1, 10, CID, 1, R, "task", "t", b"{}", [["w", dtype, shape]], [["s", [1]]]]
    return [msgpack.packb(items, use_bin_type=True), frame]


def test_decode_tensor_over_4_gib_raises_malformed_before_reading_the_frame():
    # 2**29 + 1 float64 elements: within MAX_WORDS, but 4 GiB + 8 bytes. The header
    # alone declares it; no frame of that size is needed to hit the bound.
    frames = _round_request_frames("float64", [(1 << 29) + 1], b"")
    with pytest.raises(MalformedMessage, match=f"at most {_PREFIX_LIMIT} bytes"):
        framing.decode(frames)


def test_decode_tensor_over_configured_byte_limit_raises_malformed(monkeypatch):
    monkeypatch.setattr(framing, "MAX_FIELD_BYTES", 16)
    ok = framing.decode(_round_request_frames("float64", [2], bytes(16)))
    assert ok.weights[0].data.nbytes == 16
    with pytest.raises(MalformedMessage, match="at most 16 bytes, got 24"):
        framing.decode(_round_request_frames("float64", [3], bytes(24)))


def test_round_request_tensor_over_4_gib_raises_value_error_without_allocating():
    def request(elements: int) -> m.RoundRequest:
        # A zero-stride view: nbytes is elements * 8, nothing is allocated.
        data = np.broadcast_to(np.zeros(1, dtype="<f8"), (elements,))
        return m.RoundRequest(
            context_id=CID,
            round=1,
            sender=R,
            kind="task",
            name="t",
            weights=(m.Tensor("w", data),),
            streams=(m.StreamSpec("s", (1,)),),
        )

    assert request((1 << 29) - 1).weights[0].data.nbytes == _PREFIX_LIMIT - 7
    with pytest.raises(ValueError, match=f"at most {_PREFIX_LIMIT} bytes"):
        request(1 << 29)  # exactly 4 GiB: one byte too long for the prefix


# -------------------------------------------------------------- CLEAR_UPDATE


def _clear_update(**changes) -> m.ClearUpdate:
    fields = dict(
        context_id=bytes(32),
        round=1,
        sender="node-a",
        samples=10,
        tensors=(m.Tensor("w", np.ones(3, dtype="<f4")),),
    )
    fields.update(changes)
    return m.ClearUpdate(**fields)


def _clear_update_frames(samples, specs, *payloads: bytes) -> list[bytes]:
    items = [1, 20, bytes(32), 1, "node-a", samples, specs]
    return [msgpack.packb(items, use_bin_type=True), *payloads]


@pytest.mark.parametrize("dtype", ["int32", "uint64", "bool", "float16"])
def test_clear_update_non_float_dtype_raises_type_error(dtype):
    with pytest.raises(TypeError, match="expected float32 or float64 tensors"):
        _clear_update(tensors=(m.Tensor("w", np.zeros(2, dtype=dtype)),))


@pytest.mark.parametrize("dtype", ["int32", "uint64", "bool", "float16"])
def test_decode_clear_update_non_float_dtype_raises_malformed(dtype):
    nbytes = 2 * np.dtype(dtype).itemsize
    frames = _clear_update_frames(5, [["w", dtype, [2]]], bytes(nbytes))
    with pytest.raises(MalformedMessage, match="float32 or float64"):
        framing.decode(frames)


def test_clear_update_duplicate_or_no_tensors_raises_value_error():
    w = m.Tensor("w", np.ones(2, dtype="<f8"))
    with pytest.raises(ValueError, match="distinct names"):
        _clear_update(tensors=(w, m.Tensor("w", np.ones(3, dtype="<f4"))))
    with pytest.raises(ValueError, match="expected 1 to 4096 tensors, got 0"):
        _clear_update(tensors=())
    with pytest.raises(TypeError, match="as a tuple"):
        _clear_update(tensors=[w])


def test_decode_clear_update_duplicate_or_no_tensors_raises_malformed():
    spec = ["w", "float64", [1]]
    with pytest.raises(MalformedMessage, match="distinct names"):
        framing.decode(_clear_update_frames(5, [spec, spec], bytes(8), bytes(8)))
    with pytest.raises(MalformedMessage, match="got 0"):
        framing.decode(_clear_update_frames(5, []))


@pytest.mark.parametrize(
    "samples, error",
    [(-1, ValueError), (1 << 63, ValueError), (True, TypeError), (1.0, TypeError)],
)
def test_clear_update_bad_samples_raises(samples, error):
    with pytest.raises(error, match="expected samples"):
        _clear_update(samples=samples)


@pytest.mark.parametrize("samples", [-1, 1 << 63, True, False, 1.0, "1", None])
def test_decode_clear_update_bad_samples_raises_malformed(samples):
    frames = _clear_update_frames(samples, [["w", "float64", [1]]], bytes(8))
    with pytest.raises(MalformedMessage):
        framing.decode(frames)


def test_clear_update_any_shape_and_nonfinite_values_round_trip():
    msg = _clear_update(
        samples=(1 << 63) - 1,
        tensors=(
            m.Tensor("scalar", np.array(np.nan, dtype="<f8")),
            m.Tensor("empty", np.zeros((0, 3), dtype="<f4")),
            m.Tensor("layer1.0.conv1.weight", np.full((1, 2, 1), np.inf, "<f4")),
        ),
    )
    assert framing.decode(framing.encode(msg)) == msg


def test_clear_update_tensor_over_4_gib_raises_value_error_without_allocating():
    data = np.broadcast_to(np.zeros(1, dtype="<f8"), (1 << 29,))
    with pytest.raises(ValueError, match=f"at most {_PREFIX_LIMIT} bytes"):
        _clear_update(tensors=(m.Tensor("w", data),))


def test_decode_clear_update_tensor_over_byte_limit_raises_malformed(monkeypatch):
    frames = _clear_update_frames(5, [["w", "float64", [(1 << 29) + 1]]], b"")
    with pytest.raises(MalformedMessage, match=f"at most {_PREFIX_LIMIT} bytes"):
        framing.decode(frames)
    monkeypatch.setattr(framing, "MAX_FIELD_BYTES", 16)
    ok = framing.decode(_clear_update_frames(5, [["w", "float64", [2]]], bytes(16)))
    assert ok.tensors[0].data.nbytes == 16
    with pytest.raises(MalformedMessage, match="at most 16 bytes, got 24"):
        framing.decode(_clear_update_frames(5, [["w", "float64", [3]]], bytes(24)))


def test_clear_update_tensor_frames_are_zero_copy_views():
    arr = np.arange(1000, dtype="<f4")
    frames = framing.encode(_clear_update(tensors=(m.Tensor("w", arr),)))
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(framing.decode(frames).tensors[0].data, arr)


def test_byte_string_limits_fit_the_4_byte_length_prefix():
    assert m.MAX_FIELD_BYTES == _PREFIX_LIMIT
    for limit in (
        m.MAX_ARGS_BYTES,
        m.MAX_BOX_SIZE,
        m.MAX_SHARE_SIZE,
        framing.MAX_HEADER_BYTES,
        *framing._UNPACK_LIMITS.values(),
    ):
        assert limit <= _PREFIX_LIMIT


# ----------------------------------------------------------------- hypothesis

_ID_CHARS = string.ascii_letters + string.digits
ids = st.builds(
    lambda a, b: a + b,
    st.sampled_from(_ID_CHARS),
    st.text(alphabet=_ID_CHARS + "._-", max_size=63),
)
names = st.builds(
    lambda a, b: a + b,
    st.sampled_from(_ID_CHARS + "_"),
    st.text(alphabet=_ID_CHARS + "._/:-", max_size=40),
)


def sorted_ids(min_size: int = 0, max_size: int = 8):
    return st.sets(ids, min_size=min_size, max_size=max_size).map(
        lambda s: tuple(sorted(s, key=lambda x: x.encode()))
    )


def blob(n: int):
    return st.binary(min_size=n, max_size=n)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=5, alphabet=st.characters(exclude_categories=("Cs",))),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
json_args = st.dictionaries(
    st.text(max_size=8, alphabet=string.ascii_letters), json_values, max_size=5
)

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


def tensors(names_strategy=names, dtype_names=tuple(sorted(m.TENSOR_DTYPES))):
    dtypes = st.sampled_from(dtype_names).map(lambda d: np.dtype(d).newbyteorder("<"))
    return st.builds(
        m.Tensor,
        names_strategy,
        dtypes.flatmap(lambda dt: hnp.arrays(dt, shapes)),
    )


def entries(builder, *parts):
    """Tuples of entries with distinct node ids, sorted by UTF-8 bytes."""
    return sorted_ids(max_size=5).flatmap(
        lambda nodes: st.tuples(
            *[st.builds(builder, st.just(n), *parts) for n in nodes]
        )
    )


@st.composite
def masked_inputs(draw, header):
    ring = draw(st.sampled_from([32, 64]))
    dtype = np.dtype("<u4" if ring == 32 else "<u8")
    stream_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    vectors = tuple(
        m.Tensor(n, draw(hnp.arrays(dtype, st.integers(6, 40)))) for n in stream_names
    )
    return m.MaskedInput(
        **header,
        ring_bits=ring,
        commitment=draw(blob(32)),
        peers=draw(sorted_ids()),
        vectors=vectors,
    )


@st.composite
def unmask_shares(draw, header):
    nodes = draw(sorted_ids(max_size=8))
    split = draw(st.integers(0, len(nodes)))
    share = st.binary(max_size=m.MAX_SHARE_SIZE)
    return m.UnmaskShares(
        **header,
        b_shares={n: draw(share) for n in nodes[:split]},
        c_shares={n: draw(share) for n in nodes[split:]},
    )


@st.composite
def any_message(draw):
    header = dict(
        context_id=draw(blob(32)),
        round=draw(st.integers(0, 2**63 - 1)),
        sender=draw(ids),
    )
    kind = draw(st.sampled_from(list(m.MsgType)))
    box = st.binary(max_size=m.MAX_BOX_SIZE)
    if kind is m.MsgType.SETUP_REQUEST:
        return m.SetupRequest(
            **header,
            job_id=draw(names),
            nodes=draw(sorted_ids(2)),
            ring_bits=draw(st.sampled_from([32, 64])),
            clipping_range=draw(st.floats(min_value=1e-300, max_value=1e300)),
            threshold=draw(st.integers(1, m.MAX_NODES)),
            nonce=draw(blob(32)),
        )
    if kind is m.MsgType.CONTEXT_ADVERT:
        return m.ContextAdvert(
            **header,
            identity_key=draw(blob(32)),
            share_key=draw(blob(32)),
            signature=draw(blob(64)),
        )
    if kind is m.MsgType.CONTEXT_ADVERTS:
        return m.ContextAdverts(
            **header,
            adverts=draw(entries(m.ContextAdvertEntry, blob(32), blob(32), blob(64))),
        )
    if kind is m.MsgType.TRANSCRIPT_SIG:
        return m.TranscriptSig(
            **header, transcript=draw(blob(32)), signature=draw(blob(64))
        )
    if kind is m.MsgType.TRANSCRIPT_SIGS:
        return m.TranscriptSigs(
            **header, signatures=draw(entries(m.TranscriptSigEntry, blob(32), blob(64)))
        )
    if kind is m.MsgType.ROUND_REQUEST:
        weights = draw(st.lists(tensors(), max_size=3, unique_by=lambda t: t.name))
        streams = draw(
            st.lists(
                st.builds(m.StreamSpec, names, shapes),
                min_size=1,
                max_size=3,
                unique_by=lambda s: s.name,
            )
        )
        return m.RoundRequest(
            **header,
            kind=draw(st.sampled_from(["task", "plan"])),
            name=draw(names),
            args=draw(json_args),
            weights=tuple(weights),
            streams=tuple(streams),
        )
    if kind is m.MsgType.ROUND_ADVERT:
        shares = draw(
            st.dictionaries(ids, st.builds(m.ShareBoxes, box, box), max_size=5)
        )
        return m.RoundAdvert(
            **header, mask_key=draw(blob(32)), signature=draw(blob(64)), shares=shares
        )
    if kind is m.MsgType.ROUND_ADVERTS:
        return m.RoundAdverts(
            **header,
            adverts=draw(entries(m.RoundAdvertEntry, blob(32), blob(64), box, box)),
        )
    if kind is m.MsgType.MASKED_INPUT:
        return draw(masked_inputs(header))
    if kind is m.MsgType.SURVIVORS:
        return m.Survivors(**header, survivors=draw(sorted_ids(1)))
    if kind is m.MsgType.SURVIVOR_SIG:
        return m.SurvivorSig(
            **header, survivors=draw(sorted_ids(1)), signature=draw(blob(64))
        )
    if kind is m.MsgType.UNMASK_REQUEST:
        return m.UnmaskRequest(
            **header,
            survivors=draw(sorted_ids(1)),
            signatures=draw(entries(m.SurvivorSigEntry, blob(64))),
        )
    if kind is m.MsgType.UNMASK_SHARES:
        return draw(unmask_shares(header))
    if kind is m.MsgType.CLEAR_UPDATE:
        float_tensors = tensors(dtype_names=("float32", "float64"))
        return m.ClearUpdate(
            **header,
            samples=draw(st.integers(0, 2**63 - 1)),
            tensors=tuple(
                draw(
                    st.lists(
                        float_tensors,
                        min_size=1,
                        max_size=3,
                        unique_by=lambda t: t.name,
                    )
                )
            ),
        )
    if kind is m.MsgType.REFUSED:
        fields = draw(
            st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), max_size=3)
        )
        return m.Refused(
            **header,
            reason=draw(st.sampled_from(list(m.RefusalReason))),
            fields=tuple(fields),
        )
    return m.Abort(**header, reason=draw(st.sampled_from(list(m.AbortReason))))


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(any_message())
def test_decode_encode_any_message_round_trips(msg):
    frames = framing.encode(msg)
    decoded = framing.decode(frames)
    assert decoded == msg
    assert type(decoded) is type(msg)
    # Bytes-level stability: re-encoding gives the same frames.
    assert [bytes(f) for f in framing.encode(decoded)] == [bytes(f) for f in frames]


def _decode_only_malformed(frames) -> None:
    try:
        framing.decode(frames)
    except MalformedMessage:
        pass


@settings(
    deadline=None,
    max_examples=_FUZZ_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_decode_random_bytes_raises_only_malformed(frames):
    _decode_only_malformed(frames)


_VALID = [framing.encode(msg) for msg in _samples().values()]


@st.composite
def mutated_frames(draw):
    frames = [bytearray(bytes(f)) for f in draw(st.sampled_from(_VALID))]
    for _ in range(draw(st.integers(1, 4))):
        target = frames[draw(st.integers(0, len(frames) - 1))]
        op = draw(
            st.sampled_from(["flip", "set", "cut", "insert", "drop_frame", "add_frame"])
        )
        pos = draw(st.integers(0, max(len(target) - 1, 0)))
        if op == "flip" and target:
            target[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and target:
            target[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del target[pos:]
        elif op == "insert":
            target[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "drop_frame" and len(frames) > 1:
            frames.pop()
        elif op == "add_frame":
            frames.append(bytearray(draw(st.binary(max_size=16))))
    return [bytes(f) for f in frames]


@settings(
    deadline=None,
    max_examples=_FUZZ_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_frames())
def test_decode_mutated_valid_frames_raises_only_malformed(frames):
    _decode_only_malformed(frames)


@settings(deadline=None, max_examples=max(200, _FUZZ_EXAMPLES // 25))
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.binary(max_size=40)
        | st.text(max_size=40),
        lambda inner: (
            st.lists(inner, max_size=8)
            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=30,
    ).flatmap(lambda tail: st.tuples(st.sampled_from(list(m.MsgType)), st.just(tail)))
)
def test_decode_structured_garbage_after_valid_prefix_raises_only_malformed(case):
    msg_type, tail = case
    items = [1, int(msg_type), CID, 3, R, *(tail if isinstance(tail, list) else [tail])]
    _decode_only_malformed([msgpack.packb(items, use_bin_type=True)])


def test_tensor_equality_compares_dtype_and_contents():
    a = m.Tensor("t", np.zeros(3, dtype=np.float32))
    assert a == m.Tensor("t", np.zeros(3, dtype=np.float32))
    assert a != m.Tensor("t", np.zeros(3, dtype=np.float64))
    assert a != m.Tensor("t", np.ones(3, dtype=np.float32))
