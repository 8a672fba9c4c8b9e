# SPDX-License-Identifier: Apache-2.0
"""secagg: secure aggregation for federated learning; the server learns only the sum."""

from mpc_runtime import __version__
from mpc_runtime.errors import (
    AuthenticationError,
    ClippingWarning,
    ConfigError,
    ContextMismatch,
    MalformedMessage,
    PhaseTimeout,
    PolicyRefused,
    ProtocolError,
    RoundAborted,
    SecAggError,
    ShapeMismatch,
    ThresholdError,
    UnexpectedMessage,
    VersionMismatch,
)
from mpc_runtime.masking import ClipStats

from .experiment import Experiment
from .secure_aggregation import SecureAggregation, SumResult

__all__ = [
    "__version__",
    "AuthenticationError",
    "ClipStats",
    "ClippingWarning",
    "ConfigError",
    "ContextMismatch",
    "Experiment",
    "MalformedMessage",
    "PhaseTimeout",
    "PolicyRefused",
    "ProtocolError",
    "RoundAborted",
    "SecAggError",
    "SecureAggregation",
    "ShapeMismatch",
    "SumResult",
    "ThresholdError",
    "UnexpectedMessage",
    "VersionMismatch",
]
