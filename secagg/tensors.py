# SPDX-License-Identifier: Apache-2.0
"""A torch ``state_dict`` as one flat vector for secure aggregation, and back.

Nodes mask one 1-D float32/float64 vector per stream (DESIGN §4); a model is a
``state_dict``. :func:`flatten` concatenates its floating tensors, in
``state_dict`` order, into one new numpy vector and returns a :class:`TensorLayout`
that says where each tensor lives; :func:`unflatten` turns a vector of that
layout (typically the aggregated mean) back into tensors of the original dtypes
and shapes. The layout is plain data (:meth:`TensorLayout.to_dict`, JSON and
msgpack friendly) so it can travel in a request, and :func:`layout_digest` binds
it into one with SHA-256.

Choices (and why):

- **Vector dtype.** float64 if any tensor is float64, else float32. float32 holds
  every float16, bfloat16 and float32 value exactly, so nothing is lost; float64
  is used only when needed, because a float64 tensor would lose precision in
  float32 and float32 halves the memory and copies of the common case. An empty
  vector (no floating tensor) is float32.
- **Aggregated entries** are the tensors of dtype float16, bfloat16, float32 or
  float64 (the ones the vector represents exactly). Other floating dtypes (the
  float8 family) are refused rather than silently left out of the average.
- **Non-floating entries** (integer, bool and complex tensors, e.g. BatchNorm's
  ``num_batches_tracked``) are *not* put in the vector and never travel in the
  clear: a node's batch counter would reveal how much data it trained on, which
  secure aggregation must hide, and an integer counter is not meaningfully
  averaged anyway. The layout records only their name, dtype and shape;
  :func:`unflatten` takes their values from ``like`` (the global model's
  ``state_dict``, which the researcher already has) and raises if ``like`` is
  missing. So such buffers keep the global model's values across rounds (for
  BatchNorm, ``num_batches_tracked`` only matters with ``momentum=None``). Complex
  tensors follow the same rule: masking works on real vectors.
- **Narrowing.** :func:`unflatten` converts with torch (``Tensor.to``), which
  rounds to nearest, ties to even, and overflows to ±inf. torch converts float64
  to float16/bfloat16 *through float32*, so that path rounds twice; in rare
  halfway cases the result is one unit in the last place off the correctly
  rounded value. A float32 vector of float16/bfloat16 tensors is converted once.

torch is imported lazily, so ``import secagg`` never imports it; install it with
``pip install 'secagg[train]'``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from mpc_runtime.encoding import encode
from mpc_runtime.messages import TENSOR_DTYPES, Tensor

if TYPE_CHECKING:
    import torch

__all__ = [
    "AGGREGATED_DTYPES",
    "ExcludedEntry",
    "TensorEntry",
    "TensorLayout",
    "flatten",
    "from_wire",
    "layout_digest",
    "to_wire",
    "unflatten",
]

#: The dtypes whose tensors go into the vector, by torch name (without ``torch.``).
AGGREGATED_DTYPES: Final = frozenset({"float16", "bfloat16", "float32", "float64"})
_VECTOR_DTYPES: Final = frozenset({"float32", "float64"})


def _require_torch() -> None:
    """Import torch on first use, with an installation hint if it is missing."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "secagg.tensors needs torch: pip install 'secagg[train]'"
        ) from e


def _dtype_name(dtype: torch.dtype) -> str:
    # str(torch.float32) is "torch.float32"; the layout stores the bare name.
    return str(dtype).removeprefix("torch.")


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected {what} to be a str, got {type(value).__name__}")
    return value


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {what} to be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"expected {what} >= 0, got {value}")
    return value


def _check_shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise TypeError(
            f"expected the shape of {what} to be a list or tuple, "
            f"got {type(value).__name__}"
        )
    return tuple(_check_int(d, f"a dimension of {what}") for d in value)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One floating tensor: ``vector[offset : offset + size]`` reshaped to ``shape``.

    Parameters
    ----------
    name : str
        The ``state_dict`` key.
    dtype : str
        The torch dtype name without ``torch.``: one of :data:`AGGREGATED_DTYPES`.
    shape : tuple of int
        The tensor's shape (``()`` for a 0-d tensor).
    offset, size : int
        Where the tensor starts in the vector and how many elements it has
        (``size`` is the product of ``shape``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    size: int

    def __post_init__(self) -> None:
        _check_name(self.name, "an entry name")
        _check_name(self.dtype, f"the dtype of {self.name!r}")
        if self.dtype not in AGGREGATED_DTYPES:
            raise ValueError(
                f"expected the dtype of {self.name!r} to be one of "
                f"{sorted(AGGREGATED_DTYPES)}, got {self.dtype!r}"
            )
        object.__setattr__(self, "shape", _check_shape(self.shape, repr(self.name)))
        _check_int(self.offset, f"the offset of {self.name!r}")
        _check_int(self.size, f"the size of {self.name!r}")
        if self.size != math.prod(self.shape):
            raise ValueError(
                f"expected the size of {self.name!r} to be {math.prod(self.shape)} "
                f"(shape {list(self.shape)}), got {self.size}"
            )


@dataclass(frozen=True, slots=True)
class ExcludedEntry:
    """One non-floating tensor, left out of the vector and taken from ``like``.

    Parameters
    ----------
    name : str
        The ``state_dict`` key.
    dtype : str
        The torch dtype name without ``torch.`` (e.g. ``"int64"``, ``"bool"``).
    shape : tuple of int
        The tensor's shape.
    position : int
        Its index in ``state_dict`` order, so :func:`unflatten` restores the order.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    position: int

    def __post_init__(self) -> None:
        _check_name(self.name, "an entry name")
        _check_name(self.dtype, f"the dtype of {self.name!r}")
        if self.dtype in AGGREGATED_DTYPES:
            raise ValueError(
                f"expected a non-floating dtype for excluded entry {self.name!r}, "
                f"got {self.dtype!r}"
            )
        object.__setattr__(self, "shape", _check_shape(self.shape, repr(self.name)))
        _check_int(self.position, f"the position of {self.name!r}")


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """Where each tensor of a ``state_dict`` lives in the flat vector.

    Made by :func:`flatten`; consumed by :func:`unflatten`. Validated on
    construction, so a layout read with :meth:`from_dict` from a request is
    consistent: entries are contiguous from offset 0 in ``state_dict`` order,
    names are unique, and ``vector_dtype`` follows the rule of the module
    docstring.

    Parameters
    ----------
    vector_dtype : str
        ``"float64"`` if any entry is float64, else ``"float32"``.
    entries : tuple of TensorEntry
        The floating tensors, in ``state_dict`` order.
    excluded : tuple of ExcludedEntry
        The non-floating tensors (not in the vector).
    """

    vector_dtype: str
    entries: tuple[TensorEntry, ...]
    excluded: tuple[ExcludedEntry, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "excluded", tuple(self.excluded))
        for e in self.entries:
            if not isinstance(e, TensorEntry):
                raise TypeError(f"expected TensorEntry, got {type(e).__name__}")
        for x in self.excluded:
            if not isinstance(x, ExcludedEntry):
                raise TypeError(f"expected ExcludedEntry, got {type(x).__name__}")
        expected = _vector_dtype_for(e.dtype for e in self.entries)
        if self.vector_dtype != expected:
            raise ValueError(
                f"expected vector_dtype {expected!r} for these entries, "
                f"got {self.vector_dtype!r}"
            )
        offset = 0
        for e in self.entries:
            if e.offset != offset:
                raise ValueError(
                    f"expected the offset of {e.name!r} to be {offset}, got {e.offset}"
                )
            offset += e.size
        names = [e.name for e in self.entries] + [x.name for x in self.excluded]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"expected unique entry names, got duplicates {dup}")
        positions = sorted(x.position for x in self.excluded)
        if len(set(positions)) != len(positions) or (
            positions and positions[-1] >= len(names)
        ):
            raise ValueError(
                f"expected distinct excluded positions below {len(names)}, "
                f"got {positions}"
            )

    @property
    def size(self) -> int:
        """The length of the vector: the sum of the entries' sizes."""
        return sum(e.size for e in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Every ``state_dict`` key, in ``state_dict`` order."""
        out: list[str] = [e.name for e in self.entries]
        for x in sorted(self.excluded, key=lambda x: x.position):
            out.insert(x.position, x.name)
        return tuple(out)

    def to_dict(self) -> dict[str, object]:
        """Return the layout as JSON/msgpack-friendly data (str, int, list, dict)."""
        return {
            "vector_dtype": self.vector_dtype,
            "entries": [
                {
                    "name": e.name,
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "offset": e.offset,
                    "size": e.size,
                }
                for e in self.entries
            ],
            "excluded": [
                {
                    "name": x.name,
                    "dtype": x.dtype,
                    "shape": list(x.shape),
                    "position": x.position,
                }
                for x in self.excluded
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TensorLayout:
        """Rebuild a layout from :meth:`to_dict`'s output, validating every field.

        Raises
        ------
        TypeError
            A field of the wrong type.
        ValueError
            Missing or unknown keys, or an inconsistent layout.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a mapping, got {type(data).__name__}")
        _check_keys(data, {"vector_dtype", "entries", "excluded"}, "a layout")
        entries, excluded = data["entries"], data["excluded"]
        if not isinstance(entries, (list, tuple)) or not isinstance(
            excluded, (list, tuple)
        ):
            raise TypeError("expected 'entries' and 'excluded' to be lists")
        tensor_keys = {"name", "dtype", "shape", "offset", "size"}
        excluded_keys = {"name", "dtype", "shape", "position"}
        for e in entries:
            _check_keys(e, tensor_keys, "an entry")
        for x in excluded:
            _check_keys(x, excluded_keys, "an excluded entry")
        return cls(
            vector_dtype=_check_name(data["vector_dtype"], "vector_dtype"),
            entries=tuple(TensorEntry(**e) for e in entries),
            excluded=tuple(ExcludedEntry(**x) for x in excluded),
        )


def _check_keys(data: object, keys: set[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"expected {what} to be a mapping, got {type(data).__name__}")
    if set(data) != keys:
        raise ValueError(
            f"expected {what} with keys {sorted(keys)}, got {sorted(map(str, data))}"
        )


def _vector_dtype_for(dtypes: Iterable[str]) -> str:
    return "float64" if any(d == "float64" for d in dtypes) else "float32"


def layout_digest(layout: TensorLayout) -> bytes:
    """Return SHA-256 over the layout's canonical encoding (DESIGN §3 ``encode``).

    Two layouts have the same digest exactly when they are equal, so a request can
    bind the layout its vector follows.
    """
    return hashlib.sha256(
        encode(
            "layout",
            layout.vector_dtype,
            [
                [e.name, e.dtype, list(e.shape), e.offset, e.size]
                for e in layout.entries
            ],
            [[x.name, x.dtype, list(x.shape), x.position] for x in layout.excluded],
        )
    ).digest()


def flatten(state_dict: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, TensorLayout]:
    """Concatenate the floating tensors of ``state_dict`` into one new 1-D vector.

    Parameters
    ----------
    state_dict : Mapping[str, torch.Tensor]
        A model's ``state_dict()`` (any device; gradients are ignored).

    Returns
    -------
    vector : numpy.ndarray
        A new, writable, C-contiguous 1-D float32 or float64 array (float64 if any
        tensor is float64): the float16/bfloat16/float32/float64 tensors, each
        flattened in row-major order, in ``state_dict`` order. It shares no memory
        with the tensors.
    layout : TensorLayout
        Where each tensor lives; the non-floating entries are listed but not in
        the vector (see the module docstring).

    Raises
    ------
    ImportError
        torch is not installed.
    TypeError
        A key that is not a str or a value that is not a tensor.
    ValueError
        A sparse tensor or an unsupported floating dtype (float8).
    """
    _require_torch()
    import torch

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a mapping, got {type(state_dict).__name__}")
    floating: list[tuple[str, torch.Tensor]] = []
    entries: list[TensorEntry] = []
    excluded: list[ExcludedEntry] = []
    offset = 0
    for position, (name, tensor) in enumerate(state_dict.items()):
        _check_name(name, "a state_dict key")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"expected a torch.Tensor for {name!r}, got {type(tensor).__name__}"
            )
        if tensor.layout != torch.strided:
            raise ValueError(
                f"expected a dense (strided) tensor for {name!r}, got {tensor.layout}"
            )
        dtype = _dtype_name(tensor.dtype)
        shape = tuple(int(d) for d in tensor.shape)
        if dtype in AGGREGATED_DTYPES:
            size = math.prod(shape)
            entries.append(TensorEntry(name, dtype, shape, offset, size))
            floating.append((name, tensor))
            offset += size
        elif tensor.is_floating_point():
            raise ValueError(
                f"expected {name!r} to be one of {sorted(AGGREGATED_DTYPES)} or "
                f"non-floating, got {dtype}"
            )
        else:
            excluded.append(ExcludedEntry(name, dtype, shape, position))
    layout = TensorLayout(
        _vector_dtype_for(e.dtype for e in entries), tuple(entries), tuple(excluded)
    )
    vector = np.empty(offset, dtype=layout.vector_dtype)
    out = torch.from_numpy(vector)
    for entry, (_, tensor) in zip(entries, floating, strict=True):
        # copy_ converts dtype and device and honours strides, so each tensor is
        # read once; widening to float32/float64 is exact.
        piece = out[entry.offset : entry.offset + entry.size]
        piece.view(entry.shape).copy_(tensor.detach())
    return vector, layout


def unflatten(
    vector: np.ndarray,
    layout: TensorLayout,
    *,
    like: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Turn a vector of ``layout`` back into a ``state_dict``.

    Parameters
    ----------
    vector : numpy.ndarray
        1-D, ``layout.size`` elements, of dtype ``layout.vector_dtype`` or float64
        (the dtype of an aggregated sum or mean; a float32 vector for a float64
        layout is refused because it has lost precision).
    layout : TensorLayout
        The layout :func:`flatten` returned.
    like : Mapping[str, torch.Tensor], optional
        A ``state_dict`` of the same model (the global model on the researcher):
        required when the layout has non-floating entries, whose values are copied
        from it. When given, its keys must be the layout's and each tensor's dtype
        and shape must match; every output tensor is placed on the device of its
        ``like`` counterpart (CPU otherwise).

    Returns
    -------
    dict[str, torch.Tensor]
        In ``state_dict`` order, each tensor of its original dtype and shape, with
        its own memory (no aliasing of ``vector`` or ``like``), no gradient.
        Narrowing rounds as described in the module docstring.

    Raises
    ------
    ImportError
        torch is not installed.
    TypeError
        ``vector`` is not a numpy array, or ``layout`` not a :class:`TensorLayout`.
    ValueError
        Wrong ndim, length or dtype of ``vector``; ``like`` missing for a
        non-floating entry, or not matching the layout (names, dtypes, shapes).
    """
    _require_torch()
    import torch

    if not isinstance(layout, TensorLayout):
        raise TypeError(f"expected a TensorLayout, got {type(layout).__name__}")
    if not isinstance(vector, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(vector).__name__}")
    if vector.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got ndim={vector.ndim}")
    if vector.shape[0] != layout.size:
        raise ValueError(
            f"expected a vector of {layout.size} elements for this layout, "
            f"got {vector.shape[0]}"
        )
    accepted = sorted({layout.vector_dtype, "float64"})
    if vector.dtype.kind != "f" or vector.dtype.name not in accepted:
        raise ValueError(
            f"expected a vector of dtype {' or '.join(accepted)} for this layout, "
            f"got {vector.dtype.name}"
        )
    if like is not None:
        _check_like(like, layout)
    elif layout.excluded:
        names = [x.name for x in layout.excluded]
        raise ValueError(
            f"expected like= (the global model's state_dict) to supply the "
            f"non-floating entries {names}, which are not aggregated; got None"
        )
    out: dict[str, torch.Tensor] = {}
    for entry in layout.entries:
        # A fresh native-order copy per tensor: no aliasing of the caller's vector,
        # no tensor sharing storage with another, and torch.from_numpy never sees
        # a read-only array (it warns on one).
        piece = np.array(
            vector[entry.offset : entry.offset + entry.size],
            dtype=vector.dtype.newbyteorder("="),
            copy=True,
        )
        tensor = torch.from_numpy(piece).view(entry.shape)
        # Tensor.to rounds to nearest, ties to even (through float32 for float64 to
        # float16/bfloat16: see the module docstring).
        tensor = tensor.to(getattr(torch, entry.dtype))
        if like is not None:
            tensor = tensor.to(like[entry.name].device)
        out[entry.name] = tensor
    for x in layout.excluded:
        assert like is not None  # Checked above.
        out[x.name] = like[x.name].detach().clone()
    return {name: out[name] for name in layout.names}


def _check_like(like: Mapping[str, torch.Tensor], layout: TensorLayout) -> None:
    _require_torch()
    import torch

    if not isinstance(like, Mapping):
        raise TypeError(f"expected like to be a mapping, got {type(like).__name__}")
    names = layout.names
    if set(like) != set(names):
        missing = sorted(set(names) - set(like))
        extra = sorted(set(like) - set(names), key=str)
        raise ValueError(
            f"expected like to have the layout's keys; missing {missing}, "
            f"unexpected {extra}"
        )
    specs = [(e.name, e.dtype, e.shape) for e in layout.entries] + [
        (x.name, x.dtype, x.shape) for x in layout.excluded
    ]
    for name, dtype, shape in specs:
        t = like[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"expected a torch.Tensor for like[{name!r}], got {type(t).__name__}"
            )
        got = (_dtype_name(t.dtype), tuple(int(d) for d in t.shape))
        if got != (dtype, shape):
            raise ValueError(
                f"expected like[{name!r}] of dtype {dtype} and shape {list(shape)}, "
                f"got {got[0]} and {list(got[1])}"
            )


def to_wire(state_dict: Mapping[str, torch.Tensor]) -> tuple[Tensor, ...]:
    """The global model as request weights: one :class:`~mpc_runtime.messages.Tensor`
    per ``state_dict`` entry, in order.

    The researcher sends its *global* model to the nodes this way (it is not
    secret from them). bfloat16 tensors travel as float32 (exact; numpy has no
    bfloat16); every other dtype travels as itself, non-floating buffers included.

    Raises
    ------
    ImportError
        torch is not installed.
    TypeError, ValueError
        Not a mapping of tensors, or a dtype the wire cannot carry (complex,
        float8).
    """
    _require_torch()
    import torch

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a mapping, got {type(state_dict).__name__}")
    out = []
    for name, tensor in state_dict.items():
        _check_name(name, "a state_dict key")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"expected a torch.Tensor for {name!r}, got {type(tensor).__name__}"
            )
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        if _dtype_name(t.dtype) not in TENSOR_DTYPES:
            raise ValueError(
                f"expected {name!r} of a dtype the wire carries "
                f"({sorted(TENSOR_DTYPES)} or bfloat16), got {_dtype_name(t.dtype)}"
            )
        data = t.contiguous().numpy()  # np.ascontiguousarray would make 0-d 1-d.
        le = data.astype(data.dtype.newbyteorder("<"), copy=False)
        out.append(Tensor(name=name, data=le))
    return tuple(out)


def from_wire(
    tensors: Iterable[Tensor], like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Request weights back into a ``state_dict`` shaped like ``like``.

    Parameters
    ----------
    tensors
        The weights of a round request (:func:`to_wire` on the researcher).
    like
        The ``state_dict`` of a fresh model of the same plan: names, shapes and
        dtypes are taken from it and must match.

    Returns
    -------
    dict[str, torch.Tensor]
        In ``like``'s order, each tensor of ``like``'s dtype, with its own memory.

    Raises
    ------
    ValueError
        Names differ (missing or unexpected ones are listed), a shape differs, or
        a floating tensor arrives for a non-floating one or the reverse, or an
        integer buffer arrives with another dtype. Only names, dtypes and shapes
        are in the message, never values.
    """
    _require_torch()
    import torch

    got = {t.name: t for t in tensors}
    if set(got) != set(like):
        missing = sorted(set(like) - set(got))
        extra = sorted(set(got) - set(like))
        raise ValueError(
            f"the weights do not match the model: missing {missing}, unexpected {extra}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, ref in like.items():
        data = got[name].data
        if tuple(data.shape) != tuple(ref.shape):
            raise ValueError(
                f"expected {name!r} of shape {list(ref.shape)}, got {list(data.shape)}"
            )
        want = _dtype_name(ref.dtype)
        if ref.is_floating_point() != (data.dtype.kind == "f") or (
            not ref.is_floating_point() and data.dtype.name != want
        ):
            raise ValueError(f"expected {name!r} of dtype {want}, got {data.dtype}")
        piece = np.array(data, dtype=data.dtype.newbyteorder("="), copy=True)
        out[name] = torch.from_numpy(piece).to(ref.dtype)
    return out
