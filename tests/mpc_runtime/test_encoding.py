# SPDX-License-Identifier: Apache-2.0
"""Golden bytes, injectivity and refusals of the DESIGN §3 encoding."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_runtime.encoding import DOMAIN, encode, encode_fields

# "secagg/v1/" spelled out byte by byte, so the golden tests do not trust DOMAIN.
PREFIX_HEX = "73 65 63 61 67 67 2f 76 31 2f"


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


# Each expectation was written by hand from the DESIGN §3 rules; "|" separates
# fields for the reader. Label "t" is 74, then the NUL terminator 00.
GOLDEN = [
    pytest.param(("x",), PREFIX_HEX + "78 00", id="label-only"),
    pytest.param(("t", 0), PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 00", id="int-0"),
    pytest.param(("t", 1), PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 01", id="int-1"),
    pytest.param(
        ("t", 2**64 - 1), PREFIX_HEX + "74 00 | ff ff ff ff ff ff ff ff", id="int-max"
    ),
    pytest.param(
        ("t", 0x0102030405060708),
        PREFIX_HEX + "74 00 | 01 02 03 04 05 06 07 08",
        id="int-big-endian",
    ),
    pytest.param(("t", "ab"), PREFIX_HEX + "74 00 | 00 00 00 02 61 62", id="str"),
    pytest.param(("t", ""), PREFIX_HEX + "74 00 | 00 00 00 00", id="str-empty"),
    pytest.param(
        ("t", "é€"),
        PREFIX_HEX + "74 00 | 00 00 00 05 c3 a9 e2 82 ac",
        id="str-utf8-length-in-bytes",
    ),
    pytest.param(
        ("t", b"\x00\xff"), PREFIX_HEX + "74 00 | 00 00 00 02 00 ff", id="bytes"
    ),
    pytest.param(("t", b""), PREFIX_HEX + "74 00 | 00 00 00 00", id="bytes-empty"),
    pytest.param(
        ("t", bytearray(b"\x01")), PREFIX_HEX + "74 00 | 00 00 00 01 01", id="bytearray"
    ),
    # IEEE-754 binary64 of 3.0: sign 0, exponent 1024 (0x400), mantissa 0.5 -> 0x8.
    pytest.param(
        ("t", 3.0), PREFIX_HEX + "74 00 | 40 08 00 00 00 00 00 00", id="float-3"
    ),
    pytest.param(
        ("t", -0.5), PREFIX_HEX + "74 00 | bf e0 00 00 00 00 00 00", id="float-neg-half"
    ),
    pytest.param(
        ("t", [1, "a"]),
        PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 02"
        "| 00 00 00 00 00 00 00 01 | 00 00 00 01 61",
        id="list",
    ),
    pytest.param(
        ("t", (1, "a")),
        PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 02"
        "| 00 00 00 00 00 00 00 01 | 00 00 00 01 61",
        id="tuple-as-list",
    ),
    pytest.param(
        ("t", [[1], []]),
        PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 02"
        "| 00 00 00 00 00 00 00 01 | 00 00 00 00 00 00 00 01"
        "| 00 00 00 00 00 00 00 00",
        id="nested-lists",
    ),
    pytest.param(
        ("t", []), PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 00", id="list-empty"
    ),
    pytest.param(
        ("t", set()), PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 00", id="set-empty"
    ),
    # Sorted by raw UTF-8 bytes: "ab" (61 62) < "b" (62) < "z" (7a) < "é" (c3 a9)
    # < "€" (e2 82 ac) < "😀" (f0 9f 98 80). Sorting by the length-prefixed encoding
    # would put "b" before "ab"; this pins DESIGN §3's rule.
    pytest.param(
        ("t", {"😀", "€", "é", "z", "b", "ab"}),
        PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 06"
        "| 00 00 00 02 61 62 | 00 00 00 01 62 | 00 00 00 01 7a"
        "| 00 00 00 02 c3 a9 | 00 00 00 03 e2 82 ac | 00 00 00 04 f0 9f 98 80",
        id="set-utf8-order",
    ),
    pytest.param(
        ("t", frozenset({b"\x02", b"\x01\xff"})),
        PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 02"
        "| 00 00 00 02 01 ff | 00 00 00 01 02",
        id="frozenset-bytes",
    ),
    # A realistic KDF info: encode("share", sender, receiver) of DESIGN §3.
    pytest.param(
        ("share", "node-a", "node-b"),
        PREFIX_HEX + "73 68 61 72 65 00"
        "| 00 00 00 06 6e 6f 64 65 2d 61 | 00 00 00 06 6e 6f 64 65 2d 62",
        id="share-info",
    ),
    pytest.param(
        ("t", 7, "w", [2.0], b"k"),
        PREFIX_HEX + "74 00 | 00 00 00 00 00 00 00 07 | 00 00 00 01 77"
        "| 00 00 00 00 00 00 00 01 | 40 00 00 00 00 00 00 00 | 00 00 00 01 6b",
        id="mixed",
    ),
]


@pytest.mark.parametrize(("args", "expected"), GOLDEN)
def test_encode_golden_inputs_give_hand_checked_bytes(
    args: tuple[Any, ...], expected: str
) -> None:
    assert encode(*args) == _hex(expected)


def test_encode_domain_is_versioned_prefix() -> None:
    assert DOMAIN == _hex(PREFIX_HEX)
    assert encode("x").startswith(b"secagg/v1/x\x00")


def test_encode_fields_omits_prefix() -> None:
    assert encode_fields([1, "a"]) == _hex("00 00 00 00 00 00 00 01 | 00 00 00 01 61")


# ----------------------------------------------------------------------- injectivity
#
# The encoding is injective for a *fixed schema* (the types at each position), which
# is how the protocol uses it: every label has one field layout. Across schemas it is
# not meant to be (b"abcd" and the integer 0x0000000461626364 share bytes; so do "a"
# and b"a"), so the properties below draw a schema first, then values of it.

# A schema is "int", "str", "bytes" or ("list", item_schema).
_leaf_schemas = st.sampled_from(["int", "str", "bytes"])
schemas = st.recursive(
    _leaf_schemas, lambda inner: st.tuples(st.just("list"), inner), max_leaves=3
)
field_schemas = st.lists(schemas, max_size=5)


def _values(schema: Any) -> st.SearchStrategy[Any]:
    if schema == "int":
        return st.integers(min_value=0, max_value=2**64 - 1)
    if schema == "str":
        return st.text(max_size=8)
    if schema == "bytes":
        return st.binary(max_size=8)
    return st.lists(_values(schema[1]), max_size=4)


def _fields(schema_list: list[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(*(_values(s) for s in schema_list))


def _decode_one(schema: Any, data: bytes, pos: int) -> tuple[Any, int]:
    """An independent decoder: DESIGN §3 read backwards, for one known schema."""
    if schema == "int":
        return struct.unpack_from(">Q", data, pos)[0], pos + 8
    if schema in ("str", "bytes"):
        (length,) = struct.unpack_from(">I", data, pos)
        raw = data[pos + 4 : pos + 4 + length]
        assert len(raw) == length
        return (raw.decode("utf-8") if schema == "str" else raw), pos + 4 + length
    (count,) = struct.unpack_from(">Q", data, pos)
    pos += 8
    items = []
    for _ in range(count):
        item, pos = _decode_one(schema[1], data, pos)
        items.append(item)
    return items, pos


def _decode(label: str, schema_list: list[Any], data: bytes) -> tuple[Any, ...]:
    head = DOMAIN + label.encode("ascii") + b"\0"
    assert data.startswith(head)
    pos = len(head)
    out = []
    for schema in schema_list:
        value, pos = _decode_one(schema, data, pos)
        out.append(value)
    assert pos == len(data), "trailing bytes"
    return tuple(out)


@settings(deadline=None)
@given(data=st.data(), schema_list=field_schemas)
def test_encode_any_schema_decodes_back_to_fields(
    data: st.DataObject, schema_list: list[Any]
) -> None:
    # A left inverse exists, so encode is injective on each schema.
    fields = data.draw(_fields(schema_list))
    assert _decode("t", schema_list, encode("t", *fields)) == fields


@settings(deadline=None)
@given(data=st.data(), schema_list=field_schemas)
def test_encode_different_fields_same_schema_give_different_bytes(
    data: st.DataObject, schema_list: list[Any]
) -> None:
    a = data.draw(_fields(schema_list))
    b = data.draw(_fields(schema_list))
    assert (encode("t", *a) == encode("t", *b)) == (a == b)


_labels = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=8
)


@settings(deadline=None)
@given(
    label_a=_labels,
    label_b=_labels,
    fields_a=st.lists(st.binary(max_size=4), max_size=3),
    fields_b=st.lists(st.binary(max_size=4), max_size=3),
)
def test_encode_different_labels_give_different_bytes(
    label_a: str, label_b: str, fields_a: list[bytes], fields_b: list[bytes]
) -> None:
    # The label is NUL-terminated and cannot contain NUL, so it is prefix-free.
    if label_a != label_b:
        assert encode(label_a, *fields_a) != encode(label_b, *fields_b)


@settings(deadline=None)
@given(items=st.sets(st.text(max_size=6), max_size=6))
def test_encode_set_equals_list_sorted_by_utf8(items: set[str]) -> None:
    ordered = sorted(items, key=lambda s: s.encode("utf-8"))
    assert encode("t", items) == encode("t", ordered)
    assert encode("t", frozenset(items)) == encode("t", ordered)


# -------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "field",
    [True, False, [1, True], None, {"a": 1}, object(), {1, 2}, 1j],
    ids=[
        "true",
        "false",
        "nested-bool",
        "none",
        "dict",
        "object",
        "set-of-int",
        "complex",
    ],
)
def test_encode_undefined_type_raises_type_error(field: object) -> None:
    with pytest.raises(TypeError):
        encode("t", field)


@pytest.mark.parametrize("value", [-1, -(2**63), 2**64, 2**100])
def test_encode_int_out_of_range_raises_value_error(value: int) -> None:
    with pytest.raises(ValueError, match="2\\*\\*64"):
        encode("t", value)


def test_encode_label_with_nul_raises_value_error() -> None:
    with pytest.raises(ValueError):
        encode("a\0b")


def test_encode_non_ascii_label_raises_value_error() -> None:
    # UnicodeEncodeError is a ValueError.
    with pytest.raises(ValueError):
        encode("é")
