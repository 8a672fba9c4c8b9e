# SPDX-License-Identifier: Apache-2.0
"""Fixtures that run a masking test once per implementation this machine has."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from mpc_runtime import masking
from mpc_runtime.masking import _reference

try:
    from mpc_runtime.masking import _native
except ImportError:  # reported by test_native_extension_is_built
    _native = None  # type: ignore[assignment]

NATIVE_VARIANTS: tuple[str, ...] = _native.available() if _native is not None else ()
ALL_IMPLEMENTATIONS = ("reference", *NATIVE_VARIANTS)
# What SECAGG_KERNEL chose at import; fixtures put it back after each test.
CHOSEN_AT_IMPORT = masking.IMPLEMENTATION


def _restore() -> None:
    if _native is not None and CHOSEN_AT_IMPORT in NATIVE_VARIANTS:
        _native.select(CHOSEN_AT_IMPORT)


def use_implementation(name: str) -> ModuleType:
    """Point the facade at one implementation; returns its low-level module."""
    if name == "reference":
        return _reference
    assert _native is not None
    _native.select(name)
    return _native


@pytest.fixture(params=ALL_IMPLEMENTATIONS)
def implementation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """Run the test with ``masking``'s public functions bound to each implementation."""
    module = use_implementation(request.param)
    monkeypatch.setattr(masking, "_impl", module)
    monkeypatch.setattr(masking, "IMPLEMENTATION", request.param)
    yield request.param
    _restore()


@pytest.fixture(
    params=NATIVE_VARIANTS
    or [
        pytest.param(
            "none", marks=pytest.mark.skip(reason="no native variant runs here")
        )
    ]
)
def native_variant(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The compiled module with one variant selected (restored afterwards)."""
    module = use_implementation(request.param)
    yield module
    _restore()
