# SPDX-License-Identifier: Apache-2.0
"""Tests of secagg.data: synthetic non-IID data, holdout and the [data] loaders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpc_runtime.errors import ConfigError
from secagg.data import (
    dominant_classes,
    holdout,
    load_arrays,
    synthetic_classification,
)

REPO = Path(__file__).resolve().parents[2]


def test_synthetic_shapes_and_dtypes() -> None:
    X, y = synthetic_classification(1, 3, n_samples=50, n_features=7, n_classes=5)
    assert X.shape == (50, 7) and X.dtype == np.float32
    assert y.shape == (50,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() < 5
    assert np.isfinite(X).all()


def test_synthetic_same_seed_and_node_is_deterministic() -> None:
    a = synthetic_classification(2, 3, seed=7)
    b = synthetic_classification(2, 3, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_synthetic_other_seed_or_node_differs() -> None:
    X0, _ = synthetic_classification(0, 3, seed=0)
    assert not np.array_equal(X0, synthetic_classification(1, 3, seed=0)[0])
    assert not np.array_equal(X0, synthetic_classification(0, 3, seed=1)[0])


def test_synthetic_nodes_share_the_class_means() -> None:
    # The problem is global: per-class means agree across nodes (within noise).
    means = []
    for i in range(2):
        X, y = synthetic_classification(i, 2, n_samples=4000, skew=0.0, seed=3)
        means.append(np.stack([X[y == k].mean(axis=0) for k in range(4)]))
    assert np.abs(means[0] - means[1]).max() < 0.2


@pytest.mark.parametrize("skew", [0.0, 0.5, 0.8, 1.0])
def test_synthetic_label_skew_follows_skew(skew: float) -> None:
    n, c, nodes = 4000, 4, 3
    histograms = []
    for i in range(nodes):
        _, y = synthetic_classification(i, nodes, n_samples=n, n_classes=c, skew=skew)
        dom = dominant_classes(i, nodes, c)
        expected = skew + (1 - skew) * len(dom) / c
        assert abs(np.isin(y, dom).mean() - expected) < 0.03
        histograms.append(np.bincount(y, minlength=c) / n)
    spread = np.abs(histograms[0] - histograms[1]).sum()
    if skew == 0.0:
        assert spread < 0.1  # IID.
    else:
        assert spread > skew  # The label distributions differ.


def test_dominant_classes_cover_every_class_once() -> None:
    owners = [dominant_classes(i, 3, 4) for i in range(3)]
    assert sorted(c for o in owners for c in o) == [0, 1, 2, 3]
    assert [dominant_classes(i, 6, 4) for i in range(6)] == [
        [0],
        [1],
        [2],
        [3],
        [0],
        [1],
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"node_index": 3, "n_nodes": 3}, "node_index < n_nodes"),
        ({"node_index": -1, "n_nodes": 3}, "node_index >= 0"),
        ({"node_index": 0, "n_nodes": 3, "skew": 1.5}, r"skew in \[0, 1\]"),
        ({"node_index": 0, "n_nodes": 3, "n_classes": 1}, "n_classes >= 2"),
        ({"node_index": 0, "n_nodes": 3, "n_samples": 2.5}, "n_samples an integer"),
        ({"node_index": True, "n_nodes": 3}, "node_index an integer"),
    ],
)
def test_synthetic_bad_arguments_raise_config_error(
    kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        synthetic_classification(**kwargs)  # type: ignore[arg-type]


def test_holdout_splits_disjoint_and_deterministic() -> None:
    X = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    X_tr, X_te, y_tr, y_te = holdout(X, y, 0.25, seed=1)
    assert len(y_te) == 3 and len(y_tr) == 7  # ceil(2.5), as sklearn.
    assert sorted(np.concatenate([y_tr, y_te]).tolist()) == list(range(10))
    np.testing.assert_array_equal(X_te[:, 0], 2 * y_te)  # Rows stay aligned.
    np.testing.assert_array_equal(holdout(X, y, 0.25, seed=1)[3], y_te)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, "0.2"])
def test_holdout_bad_fraction_raises(fraction: object) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        holdout(np.zeros((10, 2)), np.zeros(10), fraction)  # type: ignore[arg-type]


def test_holdout_mismatched_rows_raises() -> None:
    with pytest.raises(ConfigError, match="same number of rows"):
        holdout(np.zeros((10, 2)), np.zeros(9), 0.2)


def test_load_synthetic_matches_the_function() -> None:
    X, y = load_arrays(
        {"kind": "synthetic", "node_index": 1, "n_nodes": 3, "n_samples": 40}, "."
    )
    X2, y2 = synthetic_classification(1, 3, n_samples=40)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)


def test_load_synthetic_missing_or_unknown_key_raises() -> None:
    with pytest.raises(ConfigError, match="missing key 'n_nodes'"):
        load_arrays({"kind": "synthetic", "node_index": 0})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['samples'\]"):
        load_arrays({"kind": "synthetic", "node_index": 0, "n_nodes": 2, "samples": 3})


def test_load_npz_relative_to_base_dir(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(6, 3))
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    np.savez(tmp_path / "d.npz", feats=X, labels=y)
    X2, y2 = load_arrays(
        {"kind": "npz", "path": "d.npz", "x": "feats", "y": "labels"}, tmp_path
    )
    assert X2.dtype == np.float32 and y2.dtype == np.int64
    np.testing.assert_allclose(X2, X, rtol=1e-6)
    np.testing.assert_array_equal(y2, y)


def test_load_npz_default_names_and_integral_float_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", X=np.ones((2, 2)), y=np.array([1.0, 3.0]))
    _, y = load_arrays({"kind": "npz", "path": "d.npz"}, tmp_path)
    assert y.tolist() == [1, 3] and y.dtype == np.int64


def test_load_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data file not found"):
        load_arrays({"kind": "npz", "path": "nope.npz"}, tmp_path)
    np.savez(tmp_path / "d.npz", X=np.ones((2, 2)), target=np.zeros(2))
    with pytest.raises(ConfigError, match=r"no array\(s\) \['y'\]"):
        load_arrays({"kind": "npz", "path": "d.npz"}, tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="cannot read as .npz"):
        load_arrays({"kind": "npz", "path": "bad.npz"}, tmp_path)
    np.savez(tmp_path / "f.npz", X=np.ones((2, 2)), y=np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="integer class labels"):
        load_arrays({"kind": "npz", "path": "f.npz"}, tmp_path)
    np.savez(tmp_path / "n.npz", X=np.ones((3, 2)), y=np.zeros(2, dtype=int))
    with pytest.raises(ConfigError, match="as many labels as feature rows"):
        load_arrays({"kind": "npz", "path": "n.npz"}, tmp_path)
    np.savez(tmp_path / "o.npz", X=np.array([None, 1], dtype=object), y=np.zeros(2))
    with pytest.raises(ConfigError, match="cannot read as .npz"):
        load_arrays({"kind": "npz", "path": "o.npz"}, tmp_path)


def test_load_csv_by_name_and_index(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,target,b\n1.5,0,2\n3,2,4\n-1,1,0.5\n")
    X, y = load_arrays({"kind": "csv", "path": "d.csv", "label": "target"}, tmp_path)
    assert X.dtype == np.float32 and X.tolist() == [[1.5, 2], [3, 4], [-1, 0.5]]
    assert y.dtype == np.int64 and y.tolist() == [0, 2, 1]
    X2, y2 = load_arrays({"kind": "csv", "path": "d.csv", "label": 1}, tmp_path)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)


def test_load_csv_without_header_negative_index(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("1;2;0\n3;4;1\n")
    X, y = load_arrays(
        {
            "kind": "csv",
            "path": "d.csv",
            "label": -1,
            "header": False,
            "delimiter": ";",
        },
        tmp_path,
    )
    assert X.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("text", "extra", "match"),
    [
        ("a,b\n1,0\n", {"label": "c"}, r"no column 'c' \(columns: \['a', 'b'\]\)"),
        ("a,b\n1,0\n", {"label": 5}, r"label a column index in \[-2, 2\)"),
        ("a,b\n1,0\n2\n", {"label": "b"}, "row 3 has 1 fields, expected 2"),
        ("a,b\n1,x\n", {"label": "b"}, "row 2 has a non-numeric field"),
        ("a,b\n", {"label": "b"}, "at least one data row"),
        ("a,b\n1,0.5\n", {"label": "b"}, "integer class labels"),
        ("a,b\n1,0\n", {"label": 1, "header": False}, "row 1 has a non-numeric"),
        ("1,0\n", {"label": "b", "header": False}, "give the column index"),
        ("a,b\n1,0\n", {"label": 1.0}, "column name .* or index"),
        ("a,b\n1,0\n", {"label": "b", "sep": ";"}, r"unknown key\(s\) \['sep'\]"),
        ("a,b\n1,0\n", {}, "column name .* or index"),
    ],
)
def test_load_csv_errors(
    tmp_path: Path, text: str, extra: dict[str, object], match: str
) -> None:
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_arrays({"kind": "csv", "path": "d.csv", **extra}, tmp_path)


def test_load_csv_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.csv: data file not found"):
        load_arrays({"kind": "csv", "path": "missing.csv", "label": 0}, tmp_path)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kind": "parquet", "path": "x"}, "expected data kind one of"),
        ({"path": "x"}, "got None"),
        ({"kind": "npz"}, "expected path a non-empty string"),
        ("train.npz", "expected a data spec table"),
    ],
)
def test_load_arrays_bad_spec_raises(spec: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_arrays(spec)  # type: ignore[arg-type]


def test_import_secagg_data_does_not_import_torch() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, secagg.data\nassert 'torch' not in sys.modules\n",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
