# SPDX-License-Identifier: Apache-2.0
"""Algebraic properties of masking: cancellation, inverses, quantization error."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpc_runtime import masking

finite64 = st.floats(allow_nan=False, allow_infinity=False, width=64)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(
    x=hnp.arrays(np.float64, st.integers(0, 300), elements=finite64),
    ring=st.sampled_from([32, 64]),
    nkeys=st.integers(0, 4),
)
def test_unmask_after_protect_is_quantization(
    implementation: str, x, ring, nkeys
) -> None:
    keys = [os.urandom(16) for _ in range(nkeys)]
    bits = min(ring - 2, 48)
    plain, _ = masking.protect(x, clipping_range=3.0, bits=bits, ring_bits=ring)
    masked, _ = masking.protect(
        x,
        clipping_range=3.0,
        bits=bits,
        ring_bits=ring,
        add_keys=keys[:2],
        sub_keys=keys[2:],
    )
    if nkeys and x.size > 3:
        assert not np.array_equal(masked, plain)
    restored = masking.unmask(masked, add_keys=keys[:2], sub_keys=keys[2:])
    np.testing.assert_array_equal(restored, plain)


@given(
    n_nodes=st.integers(2, 12),
    d=st.integers(0, 200),
    ring=st.sampled_from([32, 64]),
    dropped=st.sets(st.integers(0, 11)),
    seed=st.integers(0, 2**32 - 1),
)
def test_pairwise_masks_cancel_for_any_survivor_set(
    implementation: str, n_nodes, d, ring, dropped, seed
) -> None:
    # Node u adds PRG(k_uv) for v > u and subtracts it for v < u (DESIGN §3), plus
    # its self mask. Survivors' sum, minus their self masks, minus the dropouts'
    # pair masks with each survivor, is the survivors' plain sum.
    rng = np.random.default_rng(seed)
    bits = masking.bits_for(n_nodes, ring)
    pair = {
        (u, v): os.urandom(16) for u in range(n_nodes) for v in range(u + 1, n_nodes)
    }
    self_key = [os.urandom(16) for _ in range(n_nodes)]
    xs = [rng.uniform(-4, 4, d) for _ in range(n_nodes)]
    survivors = [u for u in range(n_nodes) if u not in dropped] or [0]
    uploads, plains = [], []
    for u in survivors:
        add = [self_key[u]] + [pair[(u, v)] for v in range(u + 1, n_nodes)]
        sub = [pair[(v, u)] for v in range(u)]
        uploads.append(
            masking.protect(
                xs[u],
                clipping_range=3.0,
                bits=bits,
                ring_bits=ring,
                add_keys=add,
                sub_keys=sub,
            )[0]
        )
        plains.append(
            masking.protect(xs[u], clipping_range=3.0, bits=bits, ring_bits=ring)[0]
        )
    total = masking.sum_masked(iter(uploads), ring_bits=ring)
    # Undo what did not cancel: survivors' self masks and pair masks towards dropouts.
    add, sub = [self_key[u] for u in survivors], []
    for u in survivors:
        for v in range(n_nodes):
            if v in survivors or v == u:
                continue
            (add if v > u else sub).append(pair[(min(u, v), max(u, v))])
    s = masking.unmask(total, add_keys=add, sub_keys=sub)
    np.testing.assert_array_equal(s, masking.sum_masked(plains, ring_bits=ring))


@given(
    x=hnp.arrays(np.float64, st.integers(1, 300), elements=st.floats(-3.0, 3.0)),
    c=st.sampled_from([3.0, 1.5, 0.01]),
    bits=st.integers(1, 48),
)
def test_quantize_dequantize_error_at_most_half_step(
    implementation: str, x, c, bits
) -> None:
    x = np.clip(x * (c / 3.0), -c, c)
    ring = 32 if bits <= 32 else 64
    q, stats = masking.protect(x, clipping_range=c, bits=bits, ring_bits=ring)
    assert stats.clipped == 0
    back = masking.dequantize_sum(q, 1, clipping_range=c, bits=bits)
    step = 2 * c / (2**bits - 1)
    # Half a step, plus float64 rounding of the scale and of the result.
    assert np.max(np.abs(back - x)) <= step / 2 + 8 * np.finfo(np.float64).eps * c


@given(
    xs=st.lists(hnp.arrays(np.float32, 64, elements=finite32), min_size=1, max_size=9),
    c=st.sampled_from([3.0, 0.5]),
)
def test_dequantize_sum_within_design_bound(implementation: str, xs, c) -> None:
    m = len(xs)
    bits = masking.bits_for(m, 32)
    qs = [masking.protect(x, clipping_range=c, bits=bits)[0] for x in xs]
    total = masking.dequantize_sum(
        masking.sum_masked(qs), m, clipping_range=c, bits=bits
    )
    clipped_sum = np.sum([np.clip(x.astype(np.float64), -c, c) for x in xs], axis=0)
    # DESIGN §4: error per element <= m*c/(2^b - 1), plus float64 rounding.
    assert (
        np.max(np.abs(total - clipped_sum))
        <= m * c / (2**bits - 1) * (1 + 1e-9) + 1e-12 * m * c
    )


@given(x=hnp.arrays(np.float32, st.integers(0, 500), elements=finite32))
def test_protect_float32_equals_its_float64_conversion(implementation: str, x) -> None:
    key = os.urandom(16)
    a, sa = masking.protect(x, clipping_range=3.0, bits=31, add_keys=[key])
    b, sb = masking.protect(
        x.astype(np.float64), clipping_range=3.0, bits=31, add_keys=[key]
    )
    np.testing.assert_array_equal(a, b)
    assert sa == sb


@given(
    x=hnp.arrays(np.float64, st.integers(0, 500), elements=finite64),
    c=st.sampled_from([3.0, 1e-3]),
)
def test_clip_stats_and_histogram_count_values_beyond_range(
    implementation: str, x, c
) -> None:
    _, stats = masking.protect(x, clipping_range=c, bits=16)
    a = np.abs(x)
    assert stats.size == x.size
    assert stats.clipped == int(np.count_nonzero(a > c))
    assert stats.max_abs == (float(a.max()) if x.size else 0.0)
    hist = masking.clip_histogram(x, clipping_range=c)
    assert sum(hist) == stats.clipped
    assert hist[3] == int(np.count_nonzero(a > 8 * c))


@pytest.mark.parametrize("ring", [32, 64])
def test_add_then_subtract_same_key_is_identity(implementation: str, ring: int) -> None:
    key = os.urandom(16)
    w = np.arange(1000, dtype=np.uint32 if ring == 32 else np.uint64)
    once = masking.mask_integers(
        w, offset=0, ring_bits=ring, add_keys=[key], sub_keys=[key]
    )
    np.testing.assert_array_equal(once, w)
    added = masking.mask_integers(w, offset=17, ring_bits=ring, add_keys=[key])
    np.testing.assert_array_equal(
        masking.mask_integers(added, offset=17, ring_bits=ring, sub_keys=[key]), w
    )


def test_mask_integers_offset_continues_the_protect_keystream(
    implementation: str,
) -> None:
    # The clip and canary words are keystream words d..d+5 of the same key.
    key = os.urandom(16)
    x = np.linspace(-1, 1, 13)
    y, _ = masking.protect(x, clipping_range=3.0, bits=30, add_keys=[key])
    q, _ = masking.protect(x, clipping_range=3.0, bits=30)
    long = masking.mask_integers(
        np.concatenate([q, np.ones(6, np.uint32)]), offset=0, add_keys=[key]
    )
    tail = masking.mask_integers(np.ones(6, np.uint32), offset=13, add_keys=[key])
    np.testing.assert_array_equal(long[:13], y)
    np.testing.assert_array_equal(long[13:], tail)
