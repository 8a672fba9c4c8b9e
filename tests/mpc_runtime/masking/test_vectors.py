# SPDX-License-Identifier: Apache-2.0
"""Official (NIST SP 800-38A) and custom (our mask format) vectors, every implementation."""

from __future__ import annotations

import platform
import struct
from pathlib import Path

import numpy as np
import pytest

from mpc_runtime import masking
from tests.vectors import load_kv

from .conftest import _native

NIST = load_kv("sp800_38a_ctr_aes128.txt")
CUSTOM = load_kv("mask_vectors.txt")


def _has_aes() -> bool:
    try:
        return any(
            "aes" in line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith(("flags", "Features"))
        )
    except OSError:
        return False


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not _has_aes(),
    reason="the compiled variants need x86-64 AES-NI; others use the reference",
)
def test_native_extension_is_built_and_runs_here() -> None:
    # Guards against a test run that silently exercised only the reference.
    assert _native is not None, "mpc_runtime.masking._native is not importable"
    assert "aesni" in _native.available()


@pytest.mark.parametrize("vector", NIST)
def test_keystream_sp800_38a_f51_matches(
    implementation: str, vector: dict[str, str]
) -> None:
    key, iv = bytes.fromhex(vector["KEY"]), bytes.fromhex(vector["IV"])
    plaintext = bytes.fromhex(vector["PLAINTEXT"])
    stream = masking._impl.keystream(key, iv, len(plaintext))
    assert stream.hex() == vector["KEYSTREAM"]
    assert bytes(a ^ b for a, b in zip(plaintext, stream)).hex() == vector["CIPHERTEXT"]


@pytest.mark.parametrize("nbytes", [0, 1, 15, 16, 17, 100, 4096 + 3])
def test_keystream_counter_carry_matches_openssl(
    implementation: str, nbytes: int
) -> None:
    # An initial counter two blocks below 2**128 wraps the whole 128-bit counter,
    # and one below 2**64 carries into the high half (SP 800-38A §B.1).
    from mpc_runtime.masking import _reference

    key = bytes(range(16))
    for iv in (b"\xff" * 16, bytes(8) + b"\xff" * 7 + b"\xfe", bytes(15) + b"\x01"):
        assert masking._impl.keystream(key, iv, nbytes) == _reference.keystream(
            key, iv, nbytes
        )


def _unpack(hexstr: str, ring: int) -> np.ndarray:
    return np.frombuffer(
        bytes.fromhex(hexstr), dtype="<u4" if ring == 32 else "<u8"
    ).astype(np.uint32 if ring == 32 else np.uint64)


def _keys(hexstr: str) -> list[bytes]:
    raw = bytes.fromhex(hexstr)
    return [raw[i : i + 16] for i in range(0, len(raw), 16)]


@pytest.mark.parametrize(
    "vector", CUSTOM, ids=lambda v: f"ring{v['RING']}-bits{v['BITS']}"
)
def test_protect_custom_vectors_match(
    implementation: str, vector: dict[str, str]
) -> None:
    ring, bits = int(vector["RING"]), int(vector["BITS"])
    raw = bytes.fromhex(vector["X"])
    x = np.array(struct.unpack(f"<{len(raw) // 8}d", raw), dtype=np.float64)
    y, _ = masking.protect(
        x,
        clipping_range=float.fromhex(vector["C"]),
        bits=bits,
        ring_bits=ring,
        add_keys=_keys(vector["ADD"]),
        sub_keys=_keys(vector["SUB"]),
    )
    np.testing.assert_array_equal(y, _unpack(vector["Y"], ring))


@pytest.mark.parametrize(
    "vector", CUSTOM, ids=lambda v: f"ring{v['RING']}-offset{v['OFFSET']}"
)
def test_mask_integers_custom_vectors_match(
    implementation: str, vector: dict[str, str]
) -> None:
    ring = int(vector["RING"])
    masked = masking.mask_integers(
        _unpack(vector["WORDS"], ring),
        offset=int(vector["OFFSET"]),
        ring_bits=ring,
        add_keys=_keys(vector["ADD"]),
        sub_keys=_keys(vector["SUB"]),
    )
    np.testing.assert_array_equal(masked, _unpack(vector["MASKED"], ring))
