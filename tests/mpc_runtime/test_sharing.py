# SPDX-License-Identifier: Apache-2.0
"""Shamir t-of-n over GF(2**521 - 1): reconstruction, secrecy, tampering, encoding."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_runtime import sharing
from mpc_runtime.errors import AuthenticationError, MalformedMessage, ThresholdError
from mpc_runtime.sharing import PRIME, Share, combine, split

# The protocol's two secret sizes (a seed b_u^r, a scalar c_u^r), plus the limits.
secret_sizes = st.sampled_from([16, 32, 1, 65])


@st.composite
def setups(draw: st.DrawFn, min_t: int = 1) -> tuple[bytes, int, int]:
    """(secret, n, t) with 2 ≤ n ≤ 12 and min_t ≤ t ≤ n."""
    n = draw(st.integers(2, 12))
    t = draw(st.integers(min_t, n))
    exact = secret_sizes.flatmap(lambda k: st.binary(min_size=k, max_size=k))
    secret = draw(exact | st.binary(min_size=1, max_size=65))
    return secret, n, t


def lagrange_at(points: Sequence[tuple[int, int]], at: int) -> int:
    """Evaluate the unique polynomial of degree < len(points) through ``points`` at
    ``at``, over GF(PRIME). Written here independently of the module under test."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if i != j:
                term = term * (at - xj) * pow(xi - xj, PRIME - 2, PRIME) % PRIME
        total = (total + term) % PRIME
    return total


# ------------------------------------------------------------------ reconstruction


@settings(deadline=None)
@given(setup=setups(), data=st.data())
def test_combine_any_t_subset_in_any_order_reconstructs(
    setup: tuple[bytes, int, int], data: st.DataObject
) -> None:
    secret, n, t = setup
    shares = split(secret, threshold=t, xs=range(1, n + 1))
    assert [s.x for s in shares] == list(range(1, n + 1))
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(t, n))]
    assert combine(subset, threshold=t, secret_size=len(secret)) == secret


@settings(deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    xs=st.lists(st.integers(1, 2**64 - 1), min_size=2, max_size=8, unique=True),
    data=st.data(),
)
def test_combine_arbitrary_indices_reconstructs(
    secret: bytes, xs: list[int], data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, len(xs)))
    shares = split(secret, threshold=t, xs=xs)
    shuffled = data.draw(st.permutations(shares))
    assert combine(shuffled, threshold=t, secret_size=32) == secret


def test_split_threshold_one_gives_secret_to_everyone() -> None:
    secret = bytes(range(16))
    shares = split(secret, threshold=1, xs=[1, 2, 3])
    assert all(s.y == int.from_bytes(secret, "big") for s in shares)


def test_combine_leading_zero_bytes_kept_at_fixed_length() -> None:
    secret = bytes(31) + b"\x01"
    shares = split(secret, threshold=2, xs=[1, 2, 3])
    assert combine(shares[1:], threshold=2, secret_size=32) == secret


def test_combine_uses_only_first_threshold_shares() -> None:
    secret = bytes(range(32))
    shares = split(secret, threshold=2, xs=[1, 2, 3])
    garbage = Share(3, (shares[2].y + 1) % PRIME)
    mixed = [shares[0], shares[1], garbage]
    assert combine(mixed, threshold=2, secret_size=32) == secret


# ---------------------------------------------------------------------- secrecy


@settings(deadline=None)
@given(setup=setups(min_t=2), data=st.data())
def test_combine_t_minus_one_shares_does_not_give_secret(
    setup: tuple[bytes, int, int], data: st.DataObject
) -> None:
    secret, n, t = setup
    shares = data.draw(st.permutations(split(secret, threshold=t, xs=range(1, n + 1))))
    few = shares[: t - 1]
    # Interpolating t - 1 points gives the lower-degree polynomial through them,
    # whose value at 0 is a field element unrelated to the secret.
    guess = lagrange_at([(s.x, s.y) for s in few], 0)
    assert guess != int.from_bytes(secret, "big")
    # Through the API: the value is (overwhelmingly) not even a valid secret.
    try:
        out = combine(few, threshold=t - 1, secret_size=len(secret))
    except AuthenticationError:
        pass
    else:
        assert out != secret


@settings(deadline=None)
@given(setup=setups(min_t=2), data=st.data())
def test_split_t_minus_one_shares_are_consistent_with_every_secret(
    setup: tuple[bytes, int, int], data: st.DataObject
) -> None:
    # Perfect secrecy, constructively: fix any t - 1 shares of the real secret;
    # for any candidate secret s' there is a polynomial of degree t - 1 through
    # (0, s') and those shares (Lagrange through t points), so a t-th share exists
    # that together with the fixed ones reconstructs s'.
    secret, n, t = setup
    shares = data.draw(st.permutations(split(secret, threshold=t, xs=range(1, n + 1))))
    fixed = shares[: t - 1]
    candidate = data.draw(st.binary(min_size=len(secret), max_size=len(secret)))
    points = [(0, int.from_bytes(candidate, "big"))] + [(s.x, s.y) for s in fixed]
    free_x = n + 1  # Any index not among the fixed ones.
    completing = Share(free_x, lagrange_at(points, free_x))
    # The completing polynomial passes through every fixed share ...
    for s in fixed:
        assert lagrange_at(points, s.x) == s.y
    # ... and the module, given those shares, reconstructs the candidate.
    rebuilt = combine([*fixed, completing], threshold=t, secret_size=len(secret))
    assert rebuilt == candidate


def test_split_small_example_every_secret_possible_from_one_share() -> None:
    # t = 2, one share (x, y) fixed: for each secret s the line s + a·X with
    # a = (y - s) / x passes through it; exhibit it for several s.
    share = split(b"\x2a", threshold=2, xs=[1, 2, 3])[1]
    for s in range(256):
        a = (share.y - s) * pow(share.x, -1, PRIME) % PRIME
        assert (s + a * share.x) % PRIME == share.y
        other = Share(3, (s + a * 3) % PRIME)
        assert combine([share, other], threshold=2, secret_size=1) == bytes([s])


# ---------------------------------------------------------------- randomness


def test_split_coefficients_come_from_secrets_randbelow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = secrets.randbelow

    def counting(bound: int) -> int:
        calls.append(bound)
        return real(bound)

    monkeypatch.setattr(secrets, "randbelow", counting)
    split(bytes(32), threshold=4, xs=range(1, 8))
    assert calls == [PRIME] * 3  # t - 1 coefficients, each uniform in GF(p).


def test_split_fixed_coefficients_give_known_shares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # f(X) = 5 + 3X + 2X^2 with a_1 = 3 drawn first: f(1) = 10, f(2) = 19, f(3) = 32.
    draws = iter([3, 2])
    monkeypatch.setattr(secrets, "randbelow", lambda bound: next(draws))
    shares = split(b"\x05", threshold=3, xs=[1, 2, 3])
    assert [(s.x, s.y) for s in shares] == [(1, 10), (2, 19), (3, 32)]


def test_sharing_module_does_not_use_random() -> None:
    assert "random" not in vars(sharing)
    assert "numpy" not in vars(sharing)


def test_split_same_secret_twice_gives_different_shares() -> None:
    a = split(bytes(32), threshold=2, xs=[1, 2])
    b = split(bytes(32), threshold=2, xs=[1, 2])
    assert a != b


# ---------------------------------------------------------------------- tamper


@settings(deadline=None)
@given(setup=setups(), data=st.data())
def test_combine_tampered_share_raises_or_gives_other_secret(
    setup: tuple[bytes, int, int], data: st.DataObject
) -> None:
    secret, n, t = setup
    shares = split(secret, threshold=t, xs=range(1, n + 1))
    victim = data.draw(st.integers(0, t - 1))
    delta = data.draw(st.integers(1, PRIME - 1))
    shares[victim] = Share(shares[victim].x, (shares[victim].y + delta) % PRIME)
    # Every Lagrange coefficient at 0 is non-zero, so any change moves the result.
    try:
        out = combine(shares, threshold=t, secret_size=len(secret))
    except AuthenticationError as e:
        assert str(e) == "shares are inconsistent"
    else:
        assert out != secret


def test_combine_crafted_tamper_gives_different_in_range_secret() -> None:
    # A tamper chosen to shift f(0) by exactly 1 stays in range: combine cannot see
    # it, and the protocol's later checks (seed commitment, X25519_base(c) == C)
    # must. Shift share i by λ_i^{-1}, where λ_i is its Lagrange coefficient at 0.
    secret = bytes(range(32))
    shares = split(secret, threshold=3, xs=[1, 2, 3, 4])
    used = shares[:3]
    i = 1
    lam = 1
    for j, s in enumerate(used):
        if j != i:
            lam = lam * s.x * pow(s.x - used[i].x, -1, PRIME) % PRIME
    shift = pow(lam, -1, PRIME)
    used[i] = Share(used[i].x, (used[i].y + shift) % PRIME)
    out = combine(used, threshold=3, secret_size=32)
    assert out != secret
    assert int.from_bytes(out, "big") == int.from_bytes(secret, "big") + 1


def test_combine_out_of_range_result_raises_authentication_error() -> None:
    shares = split(b"\xff" * 16, threshold=2, xs=[1, 2])
    # Decoding as 8 bytes cannot hold a 16-byte value.
    with pytest.raises(AuthenticationError) as info:
        combine(shares, threshold=2, secret_size=8)
    assert info.value.__cause__ is None


# ---------------------------------------------------------------------- errors


def test_combine_duplicate_x_raises_malformed_message() -> None:
    shares = split(bytes(16), threshold=2, xs=[1, 2, 3])
    with pytest.raises(MalformedMessage, match="x=1"):
        combine([shares[0], shares[0]], threshold=2, secret_size=16)
    forged = Share(1, (shares[0].y + 1) % PRIME)
    with pytest.raises(MalformedMessage):
        combine([shares[0], shares[1], forged], threshold=2, secret_size=16)


def test_combine_fewer_than_threshold_raises_threshold_error() -> None:
    shares = split(bytes(16), threshold=3, xs=[1, 2, 3])
    with pytest.raises(ThresholdError, match="need 3 shares, got 2"):
        combine(shares[:2], threshold=3, secret_size=16)
    with pytest.raises(ThresholdError):
        combine([], threshold=1, secret_size=16)


def test_combine_non_share_item_raises_malformed_message() -> None:
    with pytest.raises(MalformedMessage):
        combine([(1, 2)], threshold=1, secret_size=16)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"threshold": 0}, ValueError),
        ({"threshold": True}, TypeError),
        ({"secret_size": 0}, ValueError),
        ({"secret_size": 66}, ValueError),
        ({"secret_size": 16.0}, TypeError),
    ],
    ids=["t-0", "t-bool", "size-0", "size-66", "size-float"],
)
def test_combine_bad_parameters_raise(
    kwargs: dict[str, object], error: type[Exception]
) -> None:
    shares = split(bytes(16), threshold=1, xs=[1])
    args: dict[str, object] = {"threshold": 1, "secret_size": 16, **kwargs}
    with pytest.raises(error):
        combine(shares, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("secret", "threshold", "xs", "error"),
    [
        (b"", 1, [1], ValueError),
        (bytes(66), 1, [1], ValueError),
        ("secret", 1, [1], TypeError),
        (bytes(16), 0, [1], ValueError),
        (bytes(16), 3, [1, 2], ValueError),
        (bytes(16), 1, [1, 1], ValueError),
        (bytes(16), 1, [0, 1], ValueError),
        (bytes(16), 1, [2**64], ValueError),
        (bytes(16), 1, [True], TypeError),
        (bytes(16), 1.5, [1], TypeError),
    ],
    ids=[
        "empty",
        "66-bytes",
        "str",
        "t-0",
        "t-above-n",
        "dup-x",
        "x-0",
        "x-big",
        "x-bool",
        "t-float",
    ],
)
def test_split_bad_arguments_raise(
    secret: bytes, threshold: int, xs: list[int], error: type[Exception]
) -> None:
    with pytest.raises(error):
        split(secret, threshold=threshold, xs=xs)


def test_split_error_messages_do_not_contain_the_secret() -> None:
    secret = b"\xc0\xff\xee" * 22  # 66 bytes: one too many.
    with pytest.raises(ValueError) as info:
        split(secret, threshold=1, xs=[1])
    assert "c0ffee" not in str(info.value) and "\\xc0" not in str(info.value)


# --------------------------------------------------------------------- encoding


@settings(deadline=None)
@given(x=st.integers(1, 2**64 - 1), y=st.integers(0, PRIME - 1))
def test_share_to_bytes_from_bytes_round_trips(x: int, y: int) -> None:
    share = Share(x, y)
    raw = share.to_bytes()
    assert len(raw) == sharing.SHARE_SIZE == 74
    assert raw[:8] == x.to_bytes(8, "big") and raw[8:] == y.to_bytes(66, "big")
    assert Share.from_bytes(raw) == share


def test_share_to_bytes_golden() -> None:
    raw = Share(3, 0x0102).to_bytes()
    assert raw.hex() == "0000000000000003" + "00" * 64 + "0102"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(73),
        bytes(75),
        bytes(8) + (1).to_bytes(66, "big"),  # x = 0
        (1).to_bytes(8, "big") + PRIME.to_bytes(66, "big"),  # y = p
        (1).to_bytes(8, "big") + b"\xff" * 66,  # y > p
        "x" * 74,
    ],
    ids=["empty", "73", "75", "x-0", "y-p", "y-max", "str"],
)
def test_share_from_bytes_malformed_raises_malformed_message(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        Share.from_bytes(data)


def test_share_from_bytes_largest_field_element_accepted() -> None:
    raw = (2**64 - 1).to_bytes(8, "big") + (PRIME - 1).to_bytes(66, "big")
    assert Share.from_bytes(raw) == Share(2**64 - 1, PRIME - 1)


def test_share_repr_hides_y() -> None:
    share = Share(2, 123456789)
    assert "123456789" not in repr(share)
    assert repr(share) == "Share(x=2)"


@pytest.mark.parametrize(
    ("x", "y", "error"),
    [
        (0, 1, ValueError),
        (2**64, 1, ValueError),
        (1, PRIME, ValueError),
        (1, -1, ValueError),
        (True, 1, TypeError),
        (1, 1.0, TypeError),
    ],
    ids=["x-0", "x-big", "y-p", "y-neg", "x-bool", "y-float"],
)
def test_share_out_of_range_raises(x: int, y: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        Share(x, y)


def test_share_is_frozen() -> None:
    share = Share(1, 1)
    with pytest.raises(AttributeError):
        share.y = 2  # type: ignore[misc]
