# SPDX-License-Identifier: Apache-2.0
"""The whole secagg exception tree (DESIGN §5), re-exported by :mod:`secagg`."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "SecAggError",
    "ConfigError",
    "ShapeMismatch",
    "PolicyRefused",
    "ProtocolError",
    "MalformedMessage",
    "VersionMismatch",
    "UnexpectedMessage",
    "ContextMismatch",
    "AuthenticationError",
    "RoundAborted",
    "ThresholdError",
    "PhaseTimeout",
    "ClippingWarning",
]


class SecAggError(Exception):
    """Base of every secagg error.

    Parameters
    ----------
    message
        Human-readable text. It never contains key material, seeds, shares or
        vector contents.
    phase
        The protocol phase the error belongs to, when there is one.
    round
        The round counter, when the error belongs to a round.
    nodes
        The node ids the error is about (silent, refusing, misbehaving), sorted.
    """

    def __init__(
        self,
        message: str = "",
        *,
        phase: str | None = None,
        round: int | None = None,  # noqa: A002 - the name DESIGN §5 fixes
        nodes: Iterable[str] = (),
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.round = round
        self.nodes: tuple[str, ...] = tuple(sorted(nodes))


class ConfigError(SecAggError, ValueError):
    """Bad arguments, ids or files."""


class ShapeMismatch(SecAggError, ValueError):
    """Nodes returned arrays of different shapes."""


class PolicyRefused(SecAggError):
    """A node's policy refused the request (e.g. it refuses secure aggregation)."""


class ProtocolError(SecAggError):
    """A peer broke the protocol."""


class MalformedMessage(ProtocolError, ValueError):
    """A message that cannot be decoded. The only error ``framing.decode`` raises."""


class VersionMismatch(MalformedMessage):
    """A message of another protocol version."""


class UnexpectedMessage(ProtocolError):
    """A message for the wrong phase, round or context, or a replay."""


class ContextMismatch(ProtocolError):
    """Nodes do not hold the same context transcript.

    ``fields`` names what differs (e.g. ``("transcript",)``), never its value.
    """

    def __init__(
        self, message: str = "", *, fields: Iterable[str] = (), **kw: object
    ) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.fields: tuple[str, ...] = tuple(fields)


class AuthenticationError(SecAggError):
    """A bad signature or AEAD tag. Carries no detail, so it is no oracle."""


class RoundAborted(SecAggError):
    """The round ended without a sum; nothing secret was revealed."""


class ThresholdError(RoundAborted):
    """Fewer than the threshold t of nodes survived."""


class PhaseTimeout(RoundAborted, TimeoutError):
    """A phase's deadline passed; ``nodes`` are the silent ones."""


class ClippingWarning(UserWarning):
    """Values fell outside [-c, c] and were clipped. Never an error."""
