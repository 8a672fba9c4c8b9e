# SPDX-License-Identifier: Apache-2.0
"""Tests of secagg.tensors: a torch state_dict <-> one flat vector and back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from mpc_runtime import framing  # noqa: E402
from mpc_runtime.messages import RoundRequest, StreamSpec  # noqa: E402
from secagg.tensors import (  # noqa: E402 (after the importorskip on purpose)
    ExcludedEntry,
    TensorEntry,
    TensorLayout,
    flatten,
    from_wire,
    layout_digest,
    to_wire,
    unflatten,
)

REPO = Path(__file__).resolve().parents[2]
FLOATS = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
OTHERS = {"int64": torch.int64, "bool": torch.bool, "complex64": torch.complex64}
# Integer views of the same width, for bitwise comparison of floats.
_BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise equality, except that any NaN equals any NaN (payloads may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.device == want.device
    if want.dtype not in _BITS:
        assert torch.equal(got, want)
        return
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = _BITS[want.dtype]
    # Comparing bit patterns (not values) also tells -0.0 from 0.0.
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]):
    assert list(got) == list(want)
    for name in want:
        assert_same_tensor(got[name], want[name])


def _model() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 2),
    )


def _trained_model(seed: int, steps: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


# ------------------------------------------------------------------ hypothesis

_SPECIAL = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf")])
_VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), _SPECIAL)
_SHAPE = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def state_dicts(draw: st.DrawFn, others: bool = True) -> dict[str, torch.Tensor]:
    kinds = list(FLOATS) + (list(OTHERS) if others else [])
    n = draw(st.integers(0, 6))
    sd: dict[str, torch.Tensor] = {}
    for i in range(n):
        kind = draw(st.sampled_from(kinds))
        shape = draw(_SHAPE)
        size = int(np.prod(shape, dtype=np.int64))
        if kind in FLOATS:
            values = draw(st.lists(_VALUE, min_size=size, max_size=size))
            base = torch.tensor(values, dtype=torch.float64).reshape(shape)
            # Narrowing here only makes the input; it may overflow to ±inf.
            tensor = base.to(FLOATS[kind])
        else:
            ints = draw(
                st.lists(st.integers(-(2**40), 2**40), min_size=size, max_size=size)
            )
            tensor = torch.tensor(ints, dtype=torch.int64).reshape(shape)
            tensor = tensor.to(OTHERS[kind])
        sd[f"layer{i}.{kind}"] = tensor
    return sd


@given(state_dicts())
def test_flatten_unflatten_random_state_dict_round_trips_bitwise(sd):
    vector, layout = flatten(sd)
    got = unflatten(vector, layout, like=sd)
    assert_same_state(got, sd)
    for name in sd:
        assert got[name].data_ptr() != sd[name].data_ptr() or sd[name].numel() == 0


@given(state_dicts(others=False))
def test_flatten_random_floats_vector_follows_dtype_rule(sd):
    vector, layout = flatten(sd)
    wide = any(t.dtype == torch.float64 for t in sd.values())
    assert vector.dtype == (np.float64 if wide else np.float32)
    assert layout.vector_dtype == vector.dtype.name
    assert vector.ndim == 1 and vector.flags.c_contiguous and vector.flags.writeable
    assert vector.shape == (sum(t.numel() for t in sd.values()),)
    # The vector is each tensor widened exactly, in order.
    for entry, (name, tensor) in zip(layout.entries, sd.items(), strict=True):
        assert entry.name == name and entry.shape == tuple(tensor.shape)
        piece = torch.from_numpy(vector[entry.offset : entry.offset + entry.size])
        assert_same_tensor(piece, tensor.reshape(-1).to(piece.dtype))
    # Without non-floating entries, like= is not needed.
    assert_same_state(unflatten(vector, layout), sd)


@given(state_dicts())
def test_layout_to_dict_from_dict_json_msgpack_round_trips(sd):
    _, layout = flatten(sd)
    as_json = json.loads(json.dumps(layout.to_dict()))
    as_msgpack = msgpack.unpackb(msgpack.packb(layout.to_dict(), use_bin_type=True))
    assert TensorLayout.from_dict(as_json) == layout
    assert TensorLayout.from_dict(as_msgpack) == layout
    assert layout_digest(TensorLayout.from_dict(as_json)) == layout_digest(layout)
    assert layout.names == tuple(sd)


# ------------------------------------------------------------------ real model


def test_flatten_unflatten_torch_model_loads_strict_and_same_outputs():
    node = _trained_model(seed=1, steps=3)
    vector, layout = flatten(node.state_dict())
    fresh = _model()
    restored = unflatten(vector, layout, like=node.state_dict())
    fresh.load_state_dict(restored, strict=True)
    node.eval()
    fresh.eval()
    x = torch.randn(32, 4)
    with torch.no_grad():
        assert torch.equal(fresh(x), node(x))
    assert_same_state(restored, node.state_dict())


def test_flatten_torch_model_num_batches_tracked_excluded_from_vector():
    node = _trained_model(seed=2, steps=3)
    sd = node.state_dict()
    vector, layout = flatten(sd)
    floats = [n for n, t in sd.items() if t.is_floating_point()]
    assert [e.name for e in layout.entries] == floats
    assert layout.excluded == (ExcludedEntry("1.num_batches_tracked", "int64", (), 6),)
    assert vector.size == sum(sd[n].numel() for n in floats) == layout.size
    assert layout.vector_dtype == "float32" and vector.dtype == np.float32


def test_unflatten_torch_model_num_batches_tracked_comes_from_like():
    node = _trained_model(seed=3, steps=3)
    vector, layout = flatten(node.state_dict())
    global_model = _trained_model(seed=4, steps=7)
    like = global_model.state_dict()
    restored = unflatten(vector, layout, like=like)
    assert restored["1.num_batches_tracked"].item() == 7
    assert node.state_dict()["1.num_batches_tracked"].item() == 3
    # A copy: loading the result never shares the global model's buffer.
    assert (
        restored["1.num_batches_tracked"].data_ptr()
        != like["1.num_batches_tracked"].data_ptr()
    )
    # The floating entries come from the vector, not from like.
    assert torch.equal(restored["0.weight"], node.state_dict()["0.weight"])


def test_unflatten_non_floating_entry_without_like_raises():
    vector, layout = flatten(_model().state_dict())
    with pytest.raises(ValueError, match=r"like=.*num_batches_tracked.*got None"):
        unflatten(vector, layout)


def test_flatten_torch_model_vector_does_not_alias_parameters():
    model = _model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    vector, _ = flatten(model.state_dict())
    vector[:] = 123.0
    assert_same_state(model.state_dict(), before)
    # keep_vars=True yields Parameters that require grad: still a plain copy.
    vector, _ = flatten(model.state_dict(keep_vars=True))
    vector[:] = -1.0
    assert_same_state(model.state_dict(), before)


def test_unflatten_result_does_not_alias_vector():
    model = _model()
    vector, layout = flatten(model.state_dict())
    restored = unflatten(vector, layout, like=model.state_dict())
    vector[:] = 7.0
    assert_same_state(restored, model.state_dict())


# ------------------------------------------------------------------ dtypes


def test_unflatten_float64_mean_for_float32_layout_rounds_like_torch():
    sd = {
        "h": torch.zeros(5, dtype=torch.float16),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "f": torch.zeros(5, dtype=torch.float32),
    }
    _, layout = flatten(sd)
    assert layout.vector_dtype == "float32"
    # The aggregated mean is float64; it is accepted and narrowed by torch.
    mean = np.linspace(-3.0, 3.0, 15) + 1e-9
    got = unflatten(mean, layout)
    src = torch.from_numpy(mean.copy())
    assert_same_tensor(got["h"], src[0:5].to(torch.float16))
    assert_same_tensor(got["b"], src[5:10].to(torch.bfloat16))
    assert_same_tensor(got["f"], src[10:15].to(torch.float32))


def test_flatten_mixed_float64_vector_is_float64_and_exact():
    sd = {
        "a": torch.tensor([1 / 3], dtype=torch.float64),
        "b": torch.tensor([1 / 3], dtype=torch.float32),
    }
    vector, layout = flatten(sd)
    assert vector.dtype == np.float64 and layout.vector_dtype == "float64"
    assert vector[0] == 1 / 3 and vector[1] == np.float32(1 / 3)
    assert_same_state(unflatten(vector, layout), sd)


def test_flatten_non_contiguous_tensor_row_major():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()
    vector, layout = flatten({"t": t})
    assert vector.tolist() == t.contiguous().reshape(-1).tolist()
    assert_same_tensor(unflatten(vector, layout)["t"], t.contiguous())


def test_flatten_empty_state_dict_empty_float32_vector():
    vector, layout = flatten({})
    assert vector.shape == (0,) and vector.dtype == np.float32
    assert unflatten(vector, layout) == {}


def test_unflatten_read_only_vector_no_warning():
    sd = {"w": torch.ones(3)}
    vector, layout = flatten(sd)
    vector.flags.writeable = False
    assert_same_state(unflatten(vector, layout), sd)


def test_unflatten_big_endian_vector_accepted():
    sd = {"w": torch.tensor([1.5, -2.0, 0.25])}
    vector, layout = flatten(sd)
    assert_same_state(unflatten(vector.astype(">f4"), layout), sd)


def test_flatten_float8_tensor_raises():
    with pytest.raises(ValueError, match=r"float8_e4m3fn"):
        flatten({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)})


def test_flatten_sparse_tensor_raises():
    with pytest.raises(ValueError, match=r"dense"):
        flatten({"w": torch.eye(2).to_sparse()})


def test_flatten_non_tensor_value_raises_type_error():
    with pytest.raises(TypeError, match=r"expected a torch.Tensor for 'w', got list"):
        flatten({"w": [1.0]})
    with pytest.raises(TypeError, match=r"key"):
        flatten({1: torch.zeros(1)})


# ------------------------------------------------------------------ bad input


def test_unflatten_wrong_length_raises_expected_and_got():
    vector, layout = flatten(_model().state_dict())
    like = _model().state_dict()
    with pytest.raises(
        ValueError, match=rf"expected .*{layout.size}.*got {vector.size - 1}"
    ):
        unflatten(vector[:-1], layout, like=like)
    with pytest.raises(
        ValueError, match=rf"expected .*{layout.size}.*got {vector.size + 1}"
    ):
        unflatten(np.zeros(vector.size + 1, np.float32), layout, like=like)


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.complex64, np.uint32])
def test_unflatten_wrong_dtype_raises_expected_and_got(dtype):
    vector, layout = flatten({"w": torch.zeros(4)})
    with pytest.raises(
        ValueError, match=rf"expected .*float32.*got {np.dtype(dtype).name}"
    ):
        unflatten(vector.astype(dtype), layout)


def test_unflatten_float32_vector_for_float64_layout_raises():
    vector, layout = flatten({"w": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"expected .*float64.*got float32"):
        unflatten(vector.astype(np.float32), layout)


def test_unflatten_2d_or_non_array_vector_raises():
    vector, layout = flatten({"w": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"expected a 1-D vector, got ndim=2"):
        unflatten(vector.reshape(2, 2), layout)
    with pytest.raises(TypeError, match=r"expected a numpy.ndarray, got list"):
        unflatten(vector.tolist(), layout)
    with pytest.raises(TypeError, match=r"expected a TensorLayout, got dict"):
        unflatten(vector, layout.to_dict())


def test_unflatten_like_of_other_model_raises_layout_mismatch():
    vector, layout = flatten(_model().state_dict())
    other = torch.nn.Sequential(
        torch.nn.Linear(4, 9),
        torch.nn.BatchNorm1d(9),
        torch.nn.ReLU(),
        torch.nn.Linear(9, 2),
    )
    with pytest.raises(
        ValueError, match=r"expected like\['0.weight'\] .*\[8, 4\].*\[9, 4\]"
    ):
        unflatten(vector, layout, like=other.state_dict())
    like = _model().state_dict()
    like["0.weight"] = like["0.weight"].double()
    with pytest.raises(ValueError, match=r"expected .*float32.*got float64"):
        unflatten(vector, layout, like=like)
    del like["0.weight"]
    with pytest.raises(ValueError, match=r"missing \['0.weight'\]"):
        unflatten(vector, layout, like=like)


def test_unflatten_like_extra_key_raises():
    sd = {"w": torch.zeros(2)}
    vector, layout = flatten(sd)
    with pytest.raises(ValueError, match=r"unexpected \['x'\]"):
        unflatten(vector, layout, like={**sd, "x": torch.zeros(1)})


def _layout_dict() -> dict:
    _, layout = flatten(_model().state_dict())
    return layout.to_dict()


@pytest.mark.parametrize(
    ("tamper", "error", "match"),
    [
        (lambda d: d["entries"][1].update(offset=31), ValueError, r"offset.*32.*31"),
        (lambda d: d["entries"][0].update(size=31), ValueError, r"size.*32.*31"),
        (lambda d: d.update(vector_dtype="float64"), ValueError, r"float32.*float64"),
        (lambda d: d["entries"][0].update(dtype="int64"), ValueError, r"int64"),
        (lambda d: d["excluded"][0].update(dtype="float32"), ValueError, r"float32"),
        (lambda d: d["excluded"][0].update(position=99), ValueError, r"position"),
        (lambda d: d["entries"][1].update(name="0.weight"), ValueError, r"duplicate"),
        (lambda d: d["entries"][0].update(shape=[8, True]), TypeError, r"bool"),
        (lambda d: d["entries"][0].update(shape=[-8, -4]), ValueError, r">= 0"),
        (lambda d: d["entries"][0].update(extra=1), ValueError, r"keys"),
        (lambda d: d.pop("excluded"), ValueError, r"keys"),
        (lambda d: d.update(entries="x"), TypeError, r"lists"),
    ],
)
def test_layout_from_dict_tampered_raises(tamper, error, match):
    data = _layout_dict()
    tamper(data)
    with pytest.raises(error, match=match):
        TensorLayout.from_dict(data)


def test_layout_digest_differs_for_different_layouts():
    _, a = flatten({"w": torch.zeros(2, 3)})
    _, b = flatten({"w": torch.zeros(3, 2)})
    _, c = flatten({"w": torch.zeros(2, 3, dtype=torch.float16)})
    _, d = flatten({"v": torch.zeros(2, 3)})
    digests = {layout_digest(x) for x in (a, b, c, d)}
    assert len(digests) == 4 and all(len(x) == 32 for x in digests)
    assert layout_digest(a) == layout_digest(flatten({"w": torch.ones(2, 3)})[1])


def test_layout_direct_construction_checks_entries():
    entry = TensorEntry("w", "float32", (2,), 0, 2)
    assert TensorLayout("float32", (entry,)).size == 2
    with pytest.raises(TypeError, match=r"expected TensorEntry"):
        TensorLayout("float32", ({"name": "w"},))  # type: ignore[arg-type]


# ------------------------------------------------------------------ lazy import


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_secagg_does_not_import_torch():
    run = _run(
        "import sys, secagg, secagg.tensors\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    assert run.returncode == 0, run.stderr


def test_flatten_without_torch_raises_import_error_with_hint():
    # sys.modules[name] = None makes `import torch` raise ImportError.
    run = _run(
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from secagg.tensors import flatten\n"
        "try:\n"
        "    flatten({})\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert run.returncode == 0, run.stderr
    assert "pip install 'secagg[train]'" in run.stdout


# ------------------------------------------------------------- request weights


def _wire_capable(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not v.is_complex()}


@given(state_dicts())
def test_to_wire_from_wire_round_trips_bitwise_through_the_decoder(sd):
    sd = _wire_capable(sd)
    weights = to_wire(sd)
    # Through the real codec, as a round request carries them.
    request = RoundRequest(
        context_id=bytes(32),
        round=1,
        sender="researcher",
        kind="plan",
        name="mlp",
        weights=weights,
        streams=(StreamSpec("weights", (1,)),),
    )
    decoded = framing.decode([bytes(f) for f in framing.encode(request)])
    like = {k: torch.zeros_like(v) for k, v in sd.items()}
    assert_same_state(from_wire(decoded.weights, like), sd)


def test_to_wire_bfloat16_travels_as_float32_and_complex_is_refused():
    (t,) = to_wire({"w": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)})
    assert t.data.dtype == np.float32
    with pytest.raises(ValueError, match="complex64"):
        to_wire({"z": torch.zeros(2, dtype=torch.complex64)})


def test_from_wire_refuses_other_names_shapes_and_kinds_by_name_only():
    sd = {"a": torch.ones(2, 3), "n": torch.tensor(7)}
    weights = to_wire(sd)
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['a'\]"):
        from_wire(weights, {"b": torch.ones(2, 3), "n": torch.tensor(0)})
    with pytest.raises(ValueError, match=r"'a' of shape \[3, 2\]"):
        from_wire(weights, {"a": torch.ones(3, 2), "n": torch.tensor(0)})
    with pytest.raises(ValueError, match=r"'n' of dtype int32"):
        from_wire(weights, {"a": torch.ones(2, 3), "n": torch.tensor(0).int()})
    with pytest.raises(ValueError, match=r"'a' of dtype int64"):
        from_wire(weights, {"a": torch.ones(2, 3).long(), "n": torch.tensor(0)})
