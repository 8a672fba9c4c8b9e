# SPDX-License-Identifier: Apache-2.0
"""Flower parameters <-> the protocol's one stream, and the round request's binding."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import msgpack
import numpy as np

from mpc_runtime.errors import ConfigError
from mpc_runtime.messages import MAX_TENSORS, TENSOR_DTYPES, StreamSpec, Tensor

if TYPE_CHECKING:
    # collections.abc.Buffer needs Python 3.12; typeshed ships this stub.
    from typing_extensions import Buffer

__all__ = [
    "STREAM",
    "PLAN",
    "flatten",
    "unflatten",
    "weights_tensors",
    "weights_frames",
    "config_digest",
    "request_args",
    "stream_spec",
]

#: The one stream of a Flower round: every parameter of the model, flattened.
STREAM: Final = "params"
#: The request's plan name; its digest D_r binds the model and the fit config.
PLAN: Final = "flower/fit"


def flatten(arrays: Sequence[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """The arrays in order, raveled into one float vector.

    float32 when every array is float32 (the kernel reads it directly), else
    float64 (integer buffers such as BatchNorm's step counter are exact there).

    Raises
    ------
    TypeError
        An array is not real-valued numeric (complex, object, strings).
    """
    for a in arrays:
        if a.dtype.kind not in "biuf":
            raise TypeError(f"expected real numeric parameters, got dtype {a.dtype}")
    dtype = (
        np.float32
        if arrays and all(a.dtype == np.float32 for a in arrays)
        else np.float64
    )
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays])


def unflatten(
    vector: np.ndarray[Any, Any], shapes: Sequence[tuple[int, ...]]
) -> list[np.ndarray[Any, Any]]:
    """Split ``vector`` back into arrays of ``shapes`` (float64, copies)."""
    out = []
    start = 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(
            np.array(vector[start : start + size], dtype=np.float64).reshape(shape)
        )
        start += size
    if start != vector.size:
        raise ValueError(f"expected {start} values, got {vector.size}")
    return out


def stream_spec(arrays: Sequence[np.ndarray[Any, Any]]) -> StreamSpec:
    """The round's stream: as many values as the model has parameters.

    Raises
    ------
    ConfigError
        The model is empty (the stream's shape is unknown before training).
    """
    size = sum(int(a.size) for a in arrays)
    if size == 0:
        raise ConfigError(
            "secure aggregation needs the global model's shape before the round: "
            "give the strategy initial parameters (or let DefaultWorkflow fetch them)"
        )
    try:
        return StreamSpec(STREAM, (size,))
    except ValueError as e:
        raise ConfigError(f"model of {size} parameters: {e}") from None


def _little_endian(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if a.dtype.name not in TENSOR_DTYPES:
        raise ConfigError(f"model tensor dtype {a.dtype} cannot be bound into D_r")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def weights_tensors(arrays: Sequence[np.ndarray[Any, Any]]) -> list[Tensor]:
    """The global model as the round request's weights (named ``w0``, ``w1``, ...).

    Raises
    ------
    ConfigError
        A tensor's dtype cannot be bound (not a numeric dtype of the protocol).
    """
    if len(arrays) > MAX_TENSORS:
        raise ConfigError(
            f"expected a model of at most {MAX_TENSORS} tensors, got {len(arrays)}"
        )
    return [Tensor(f"w{i}", _little_endian(a)) for i, a in enumerate(arrays)]


def weights_frames(arrays: Sequence[np.ndarray[Any, Any]]) -> list[memoryview]:
    """The frames a request's weights travel in: little-endian bytes per tensor."""
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12.
    return [memoryview(cast("Buffer", _little_endian(a))).cast("B") for a in arrays]


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a fit config: sorted keys, typed values, msgpack.

    Flower config values are bool, int, float, str and bytes (DESIGN's JSON
    arguments cannot hold bytes), so the request binds this digest instead.
    """
    items = []
    for key in sorted(config):
        value = config[key]
        if isinstance(value, bool):
            tag = "bool"
        elif isinstance(value, int):
            tag = "int"
        elif isinstance(value, float):
            tag = "float"
        elif isinstance(value, str):
            tag = "str"
        elif isinstance(value, bytes):
            tag = "bytes"
        else:
            raise ConfigError(
                f"fit config {key!r}: unsupported value type {type(value).__name__}"
            )
        items.append([key, tag, value])
    packed: bytes = msgpack.packb(["flower-fit-config", items], use_bin_type=True)
    return hashlib.sha256(packed).hexdigest()


def request_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """The round request's args: the fit config's digest."""
    return {"fit_config_sha256": config_digest(config)}
