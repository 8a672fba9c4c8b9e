# SPDX-License-Identifier: Apache-2.0
"""The public masking API: argument checking, errors, dtypes, views (DESIGN §4)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mpc_runtime import masking
from mpc_runtime.masking import ClipStats

from .conftest import NATIVE_VARIANTS

KEY = bytes(range(16))


def test_protect_empty_input_gives_empty_output_and_zero_stats(
    implementation: str,
) -> None:
    for ring, dtype in ((32, np.uint32), (64, np.uint64)):
        y, stats = masking.protect(
            np.zeros(0, np.float32),
            clipping_range=3.0,
            bits=8,
            ring_bits=ring,
            add_keys=[KEY],
        )
        assert y.dtype == dtype and y.shape == (0,)
        assert stats == ClipStats(size=0, clipped=0, max_abs=0.0)
        assert stats.fraction == 0.0


def test_protect_quantizes_design_example(implementation: str) -> None:
    # b = 2: s = 3 / 6 = 0.5; x = -3, -1, 0, 1, 3 -> (x + 3) * 0.5 = 0, 1, 1.5, 2, 3
    # round-half-even sends 1.5 to 2.
    y, stats = masking.protect(
        np.array([-3.0, -1.0, 0.0, 1.0, 3.0, 7.0]), clipping_range=3.0, bits=2
    )
    assert y.tolist() == [0, 1, 2, 2, 3, 3]
    assert stats == ClipStats(size=6, clipped=1, max_abs=7.0)
    assert stats.fraction == pytest.approx(1 / 6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_protect_nonfinite_raises_with_count_and_first_index(
    implementation: str, bad: float, dtype: type
) -> None:
    x = np.zeros(5000, dtype)
    x[[1234, 4000, 4999]] = bad
    with pytest.raises(ValueError, match=r"3 non-finite .* index 1234"):
        masking.protect(x, clipping_range=3.0, bits=16)


def test_protect_non_contiguous_and_big_endian_views_match_contiguous(
    implementation: str,
) -> None:
    base = np.linspace(-5, 5, 3001)
    strided = base[::3]
    big = strided.astype(">f8")
    want, _ = masking.protect(
        np.ascontiguousarray(strided), clipping_range=3.0, bits=20, add_keys=[KEY]
    )
    for view in (strided, big, base[1:][::3].astype(np.float32)[:0]):
        got, _ = masking.protect(view, clipping_range=3.0, bits=20, add_keys=[KEY])
        if view.size:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        ([1.0, 2.0], TypeError, "numpy.ndarray"),
        (np.zeros(3, np.int32), TypeError, "float32 or float64"),
        (np.zeros(3, np.float16), TypeError, "float32 or float64"),
        (np.zeros((2, 2)), ValueError, "1-D"),
        (np.zeros(()), ValueError, "1-D"),
    ],
)
def test_protect_rejects_bad_input(x: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        masking.protect(x, clipping_range=3.0, bits=16)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"clipping_range": -1.0}, ValueError, "clipping_range"),
        ({"clipping_range": 0.0}, ValueError, "clipping_range"),
        ({"clipping_range": float("nan")}, ValueError, "clipping_range"),
        ({"clipping_range": float("inf")}, ValueError, "clipping_range"),
        ({"clipping_range": "3"}, TypeError, "clipping_range"),
        ({"bits": 0}, ValueError, "bits"),
        ({"bits": 33}, ValueError, "bits"),
        ({"bits": 49, "ring_bits": 64}, ValueError, "bits"),
        ({"bits": 2.5}, TypeError, "bits"),
        ({"ring_bits": 16}, ValueError, "ring_bits"),
        ({"add_keys": [b"short"]}, ValueError, "16 bytes"),
        ({"sub_keys": [bytes(17)]}, ValueError, "16 bytes"),
        ({"add_keys": ["x" * 16]}, TypeError, "bytes"),
        ({"add_keys": bytes(16)}, TypeError, "sequence of keys"),
    ],
)
def test_protect_rejects_bad_parameters(kwargs: dict, exc: type, match: str) -> None:
    args = {"clipping_range": 3.0, "bits": 16, **kwargs}
    with pytest.raises(exc, match=match):
        masking.protect(np.zeros(4), **args)


def test_key_errors_never_echo_key_material() -> None:
    secret = b"\xab" * 15
    with pytest.raises(ValueError) as info:
        masking.protect(np.zeros(4), clipping_range=3.0, bits=16, add_keys=[secret])
    assert "ab" not in str(info.value).lower().replace("bytes", "")


def test_protect_into_writes_callers_buffer_and_checks_it(implementation: str) -> None:
    x = np.linspace(-1, 1, 100)
    out = np.empty(100, np.uint32)
    got, stats = masking.protect_into(
        out, x, clipping_range=3.0, bits=30, add_keys=[KEY]
    )
    assert got is out and stats.size == 100
    np.testing.assert_array_equal(
        out, masking.protect(x, clipping_range=3.0, bits=30, add_keys=[KEY])[0]
    )
    with pytest.raises(ValueError, match="length"):
        masking.protect_into(np.empty(99, np.uint32), x, clipping_range=3.0, bits=30)
    with pytest.raises(ValueError, match="ring_bits"):
        masking.protect_into(np.empty(100, np.uint64), x, clipping_range=3.0, bits=30)
    with pytest.raises(TypeError, match="uint32 or uint64"):
        masking.protect_into(np.empty(100, np.int32), x, clipping_range=3.0, bits=30)
    with pytest.raises(ValueError, match="C-contiguous"):
        masking.protect_into(
            np.empty(200, np.uint32)[::2], x, clipping_range=3.0, bits=30
        )
    raw = np.zeros(100, np.float64)
    with pytest.raises(ValueError, match="share memory"):
        masking.protect_into(
            raw.view(np.uint64), raw, clipping_range=3.0, bits=30, ring_bits=64
        )


def test_mask_integers_rejects_out_of_ring_words_and_bad_offset() -> None:
    with pytest.raises(ValueError, match="words in"):
        masking.mask_integers(np.array([2**32], np.int64), offset=0)
    with pytest.raises(ValueError, match="words in"):
        masking.mask_integers(np.array([-1], np.int64), offset=0)
    with pytest.raises(ValueError, match="offset"):
        masking.mask_integers(np.array([1], np.uint32), offset=-1)
    with pytest.raises(TypeError, match="integer dtype"):
        masking.mask_integers(np.array([1.0]), offset=0)


def test_unmask_infers_ring_from_dtype_and_checks_explicit_ring(
    implementation: str,
) -> None:
    s = np.arange(10, dtype=np.uint64)
    masked = masking.mask_integers(s, offset=0, ring_bits=64, add_keys=[KEY])
    np.testing.assert_array_equal(masking.unmask(masked, add_keys=[KEY]), s)
    np.testing.assert_array_equal(
        masking.unmask(masked, add_keys=[KEY], ring_bits=64), s
    )
    with pytest.raises(ValueError, match="ring_bits"):
        masking.unmask(masked, add_keys=[KEY], ring_bits=32)
    with pytest.raises(TypeError):
        masking.unmask(np.zeros(3, np.int64))


def test_sum_masked_streams_any_iterable_and_wraps(implementation: str) -> None:
    top = np.full(5, 2**32 - 1, np.uint32)
    total = masking.sum_masked(top for _ in range(21))
    assert total.tolist() == [(21 * (2**32 - 1)) % 2**32] * 5
    with pytest.raises(ValueError, match="at least one"):
        masking.sum_masked([])
    with pytest.raises(TypeError, match="uint32"):
        masking.sum_masked([np.zeros(3, np.uint64)])
    with pytest.raises(ValueError, match="length"):
        masking.sum_masked([np.zeros(3, np.uint32), np.zeros(4, np.uint32)])
    with pytest.raises(TypeError, match="dtype"):
        masking.sum_masked([np.zeros(3, np.uint32), np.zeros(3, np.uint64)])


def test_accumulate_into_adds_in_place_with_ring_of_acc(implementation: str) -> None:
    acc = np.full(4, 2**64 - 1, np.uint64)
    assert masking.accumulate_into(acc, np.full(4, 2, np.uint64)) is acc
    assert acc.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="share memory"):
        masking.accumulate_into(acc, acc)
    with pytest.raises(TypeError):
        masking.accumulate_into(acc, np.ones(4, np.uint32))


def test_dequantize_sum_refuses_words_masks_did_not_cancel() -> None:
    bits = masking.bits_for(3, 32)
    ok = np.array([0, 3 * (2**bits - 1)], np.uint32)
    assert masking.dequantize_sum(ok, 3, clipping_range=3.0, bits=bits).tolist() == [
        -9.0,
        9.0,
    ]
    with pytest.raises(ValueError, match="did not cancel"):
        masking.dequantize_sum(ok + np.uint32(1), 3, clipping_range=3.0, bits=bits)
    with pytest.raises(ValueError, match="contributors"):
        masking.dequantize_sum(ok, 0, clipping_range=3.0, bits=bits)


@pytest.mark.parametrize(
    ("n", "ring", "bits"),
    [
        (1, 32, 32),
        (2, 32, 31),
        (3, 32, 30),
        (4, 32, 30),
        (5, 32, 29),
        (1000, 32, 22),
        (2, 64, 48),
        (2**17, 64, 47),
    ],
)
def test_bits_for_leaves_room_for_the_sum(n: int, ring: int, bits: int) -> None:
    assert masking.bits_for(n, ring) == bits
    assert n * (2**bits - 1) < 2**ring


def test_bits_for_rejects_bad_arguments() -> None:
    for args in ((0, 32), (3, 16), (2**33, 32)):
        with pytest.raises(ValueError):
            masking.bits_for(*args)


def _import_masking(kernel: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SECAGG_KERNEL": kernel}
    code = "import warnings; warnings.simplefilter('error'); from mpc_runtime import masking; print(masking.IMPLEMENTATION)"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_secagg_kernel_reference_is_honoured() -> None:
    run = _import_masking("reference")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "reference"


def test_secagg_kernel_unknown_or_unavailable_raises_importerror() -> None:
    for kernel in ("fastest", "armv8" if os.uname().machine != "aarch64" else "vaes"):
        run = _import_masking(kernel)
        assert run.returncode != 0
        assert "ImportError" in run.stderr and "SECAGG_KERNEL" in run.stderr


@pytest.mark.skipif(not NATIVE_VARIANTS, reason="no compiled variant runs here")
def test_secagg_kernel_auto_picks_best_runnable_variant_silently() -> None:
    run = _import_masking("auto")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == NATIVE_VARIANTS[0]


def test_missing_extension_falls_back_with_one_runtimewarning() -> None:
    # None in sys.modules makes the import fail as a missing or broken build would,
    # whatever import hooks an editable install added.
    code = (
        "import sys, warnings\n"
        "sys.modules['mpc_runtime.masking._native'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from mpc_runtime import masking\n"
        "print(masking.IMPLEMENTATION, len([x for x in w if x.category is RuntimeWarning]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SECAGG_KERNEL"}
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["reference", "1"]
    assert (
        "falls back to the slow numpy masking reference" in run.stderr
    )  # the WARNING log


def test_missing_extension_with_named_variant_raises_importerror() -> None:
    code = "import sys; sys.modules['mpc_runtime.masking._native'] = None; from mpc_runtime import masking"
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SECAGG_KERNEL": "aesni"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "SECAGG_KERNEL=aesni: the compiled kernel is not importable" in run.stderr
