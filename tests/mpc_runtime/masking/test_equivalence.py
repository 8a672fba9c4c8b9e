# SPDX-License-Identifier: Apache-2.0
"""Every compiled variant gives the numpy reference's bytes, for arbitrary inputs."""

from __future__ import annotations

from types import ModuleType

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpc_runtime.masking import _reference

# Lengths around SIMD widths (4/8/16/32 words) and the kernel's chunk sizes.
EDGE_LENGTHS = [
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    9,
    15,
    16,
    17,
    31,
    32,
    33,
    63,
    64,
    65,
    127,
    128,
    129,
    1023,
    1024,
    1025,
    2047,
    2048,
    2049,
    4095,
    4096,
    4097,
    8193,
]

keys_st = st.lists(st.binary(min_size=16, max_size=16), max_size=4)
signs_st = st.lists(st.sampled_from([1, -1]), min_size=4, max_size=4)


def _kernel_args(keys: list[bytes], signs: list[int]) -> tuple[bytes, bytes]:
    return b"".join(keys), bytes(1 if s == 1 else 0xFF for s in signs[: len(keys)])


@st.composite
def inputs(draw: st.DrawFn) -> tuple[np.ndarray, float, int, int]:
    ring = draw(st.sampled_from([32, 64]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 20000)))
    c = draw(st.sampled_from([3.0, 1.0, 0.5, 1e-3, 1e6, 2.0**-20]))
    bits = draw(st.integers(1, min(ring, 48)))
    elements = st.floats(
        allow_nan=False, allow_infinity=False, width=32 if dtype is np.float32 else 64
    )
    # A slice offset makes the view unaligned relative to the allocation.
    start = draw(st.integers(0, 3))
    base = draw(
        hnp.arrays(
            dtype,
            n + start,
            elements=elements | st.sampled_from([c, -c, 0.0, -0.0, c / 2]),
        )
    )
    return base[start:], c, bits, ring


@given(case=inputs(), keys=keys_st, signs=signs_st)
def test_protect_native_equals_reference(
    native_variant: ModuleType, case, keys, signs
) -> None:
    x, c, bits, ring = case
    kb, sb = _kernel_args(keys, signs)
    dtype = np.uint32 if ring == 32 else np.uint64
    x = np.ascontiguousarray(x)
    got, want = np.empty(x.size, dtype), np.empty(x.size, dtype)
    stats_native = native_variant.protect_into(got, x, c, bits, kb, sb)
    stats_ref = _reference.protect_into(want, x, c, bits, kb, sb)
    np.testing.assert_array_equal(got, want)
    assert stats_native == stats_ref


@given(
    n=st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 5000)),
    offset=st.one_of(st.integers(0, 9), st.integers(0, 2**40)),
    ring=st.sampled_from([32, 64]),
    keys=keys_st,
    signs=signs_st,
    seed=st.integers(0, 2**32 - 1),
)
def test_mask_native_equals_reference(
    native_variant: ModuleType, n, offset, ring, keys, signs, seed
) -> None:
    dtype = np.uint32 if ring == 32 else np.uint64
    w = np.random.default_rng(seed).integers(
        0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True
    )
    kb, sb = _kernel_args(keys, signs)
    got, want = w.copy(), w.copy()
    native_variant.mask_into(got, offset, kb, sb)
    _reference.mask_into(want, offset, kb, sb)
    np.testing.assert_array_equal(got, want)


@given(
    n=st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 5000)),
    count=st.integers(1, 11),
    ring=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_native_equals_reference(
    native_variant: ModuleType, n, count, ring, seed
) -> None:
    dtype = np.uint32 if ring == 32 else np.uint64
    rng = np.random.default_rng(seed)
    vs = [
        rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
        for _ in range(count)
    ]
    got, want = vs[0].copy(), vs[0].copy()
    native_variant.sum_into(got, vs[1:])
    _reference.sum_into(want, vs[1:])
    np.testing.assert_array_equal(got, want)


@given(
    nbytes=st.integers(0, 3000),
    iv=st.binary(min_size=16, max_size=16),
    key=st.binary(min_size=16, max_size=16),
)
def test_keystream_native_equals_reference(
    native_variant: ModuleType, nbytes, iv, key
) -> None:
    assert native_variant.keystream(key, iv, nbytes) == _reference.keystream(
        key, iv, nbytes
    )


@given(
    n=st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 5000)),
    ring=st.sampled_from([32, 64]),
    m=st.integers(1, 2**16),
    bits=st.integers(1, 48),
    c=st.sampled_from([3.0, 0.5, 1e-3, 1e6]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dequantize_native_equals_reference(
    native_variant: ModuleType, n, ring, m, bits, c, seed
) -> None:
    dtype = np.uint32 if ring == 32 else np.uint64
    s = np.random.default_rng(seed).integers(
        0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True
    )
    top = 2 ** min(bits, ring) - 1
    bound = min(m * top, np.iinfo(dtype).max)
    got, want = np.empty(n), np.empty(n)
    over_native = native_variant.dequantize_into(
        got, s, 2 * c, float(top), m * c, bound
    )
    over_ref = _reference.dequantize_into(want, s, 2 * c, float(top), m * c, bound)
    assert over_native == over_ref
    np.testing.assert_array_equal(got, want)
