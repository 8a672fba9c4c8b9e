# SPDX-License-Identifier: Apache-2.0
"""Local data sets for training plans: synthetic non-IID data and file loaders.

A node's ``[data]`` table in ``node.toml`` (DESIGN §1) names where its training
data lives; :func:`load_arrays` turns one such spec into ``(X, y)`` numpy arrays
(``X`` float32 ``[n, features]``, ``y`` int64 ``[n]``), which a training plan
(:mod:`secagg.plans`) consumes. Three kinds are supported::

    [data]
    train = { kind = "synthetic", node_index = 0, n_nodes = 3, seed = 0 }
    # or: { kind = "npz", path = "train.npz", x = "X", y = "y" }
    # or: { kind = "csv", path = "train.csv", label = "target" }

Paths are relative to the node directory (an absolute path is used as is).
Nothing is ever downloaded. Only numpy is needed here; torch is not imported.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np

from mpc_runtime.errors import ConfigError

__all__ = [
    "DATA_KINDS",
    "dominant_classes",
    "holdout",
    "load_arrays",
    "synthetic_classification",
]

#: The values of ``kind`` that :func:`load_arrays` accepts.
DATA_KINDS: Final = ("synthetic", "npz", "csv")

# Class means are drawn as N(0, _SEPARATION**2 I); with the defaults (20 features,
# 4 classes, unit-variance noise) this gives a Bayes accuracy of about 90 %: easy
# enough to learn in a few hundred SGD steps, hard enough that learning shows.
_SEPARATION: Final = 0.5
# CSV files we read are local training sets; a cap keeps a wrong path (a huge log)
# from exhausting memory.
_MAX_CSV_BYTES: Final = 1 << 30

_Arrays = tuple[np.ndarray, np.ndarray]


def _int_arg(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"expected {name} an integer, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"expected {name} >= {minimum}, got {value}")
    return int(value)


def _fraction_arg(value: object, name: str, *, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ConfigError(f"expected {name} a number, got {type(value).__name__}")
    v = float(value)
    ok = (0.0 < v < 1.0) if open_low else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1)" if open_low else "[0, 1]"
        raise ConfigError(f"expected {name} in {interval}, got {v}")
    return v


def dominant_classes(node_index: int, n_nodes: int, n_classes: int) -> list[int]:
    """The classes node ``node_index`` mostly sees in :func:`synthetic_classification`.

    With at most as many nodes as classes, node ``i`` owns the classes ``c`` with
    ``c % n_nodes == i`` (every class has one owner); with more nodes, node ``i``
    owns class ``i % n_classes``.
    """
    if n_nodes <= n_classes:
        return [c for c in range(n_classes) if c % n_nodes == node_index]
    return [node_index % n_classes]


def synthetic_classification(
    node_index: int,
    n_nodes: int,
    *,
    n_samples: int = 600,
    n_features: int = 20,
    n_classes: int = 4,
    seed: int = 0,
    skew: float = 0.8,
) -> _Arrays:
    """One node's share of a fixed classification problem, non-IID by label skew.

    The problem is the same for every node: class ``k`` has mean ``mu_k`` (drawn
    from ``seed`` alone, so all nodes share the true class means, and hence the
    Bayes-optimal linear classifier) and ``x = mu_y + N(0, I)``. Nodes differ in
    their label distribution: a fraction ``skew`` of the probability mass is
    spread evenly over the node's :func:`dominant_classes`, the rest evenly over
    all classes. ``skew=0`` is IID; ``skew=1`` shows a node only its dominant
    classes.

    Parameters
    ----------
    node_index, n_nodes : int
        Which node (``0 <= node_index < n_nodes``) of how many.
    n_samples, n_features, n_classes : int
        Rows, columns and number of classes (at least 1, 1 and 2).
    seed : int
        Fixes the class means; with ``node_index`` it fixes the node's samples.
    skew : float
        In ``[0, 1]``: the extra mass on the dominant classes.

    Returns
    -------
    X : numpy.ndarray
        float32, shape ``(n_samples, n_features)``.
    y : numpy.ndarray
        int64, shape ``(n_samples,)``, values in ``[0, n_classes)``.

    Raises
    ------
    ConfigError
        An argument of the wrong type or out of range.
    """
    n_nodes = _int_arg(n_nodes, "n_nodes", 1)
    node_index = _int_arg(node_index, "node_index", 0)
    if node_index >= n_nodes:
        raise ConfigError(
            f"expected node_index < n_nodes ({n_nodes}), got {node_index}"
        )
    n_samples = _int_arg(n_samples, "n_samples", 1)
    n_features = _int_arg(n_features, "n_features", 1)
    n_classes = _int_arg(n_classes, "n_classes", 2)
    seed = _int_arg(seed, "seed", 0)
    skew = _fraction_arg(skew, "skew", open_low=False)

    # Separate streams: [seed, 0] for the shared problem, [seed, 1, i] for node i,
    # so a node's samples do not depend on how many nodes there are.
    means = np.random.default_rng([seed, 0]).normal(
        0.0, _SEPARATION, size=(n_classes, n_features)
    )
    rng = np.random.default_rng([seed, 1, node_index])
    p = np.full(n_classes, (1.0 - skew) / n_classes)
    dominant = dominant_classes(node_index, n_nodes, n_classes)
    p[dominant] += skew / len(dominant)
    y = rng.choice(n_classes, size=n_samples, p=p / p.sum()).astype(np.int64)
    X = means[y] + rng.standard_normal((n_samples, n_features))
    return X.astype(np.float32), y


def holdout(
    X: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split rows into a training and a held-out set, like sklearn's train_test_split.

    Parameters
    ----------
    X, y : numpy.ndarray
        Same number of rows.
    fraction : float
        In ``(0, 1)``: the share of rows held out, rounded up (as sklearn does).
    seed : int
        Fixes the random permutation.

    Returns
    -------
    X_train, X_test, y_train, y_test : numpy.ndarray
        In sklearn's order. Both sides have at least one row.

    Raises
    ------
    ConfigError
        Mismatched lengths, ``fraction`` out of range, or too few rows to split.
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0]:
        raise ConfigError(
            f"expected X and y with the same number of rows, got shapes "
            f"{list(X.shape)} and {list(y.shape)}"
        )
    fraction = _fraction_arg(fraction, "fraction", open_low=True)
    seed = _int_arg(seed, "seed", 0)
    n = X.shape[0]
    n_test = math.ceil(fraction * n)
    if n_test >= n:
        raise ConfigError(
            f"expected enough rows to hold out {fraction} and keep some for "
            f"training, got {n}"
        )
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]


def _check_keys(spec: Mapping[str, object], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(spec) - allowed - {"kind"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in a {kind!r} data spec "
            f"(expected some of {sorted(allowed)})"
        )


def _path(spec: Mapping[str, object], base_dir: str | os.PathLike[str]) -> Path:
    value = spec.get("path")
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"expected path a non-empty string in a {spec['kind']!r} data spec, "
            f"got {value!r:.200}"
        )
    path = Path(base_dir) / value
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    return path


def _labels(values: np.ndarray, source: str) -> np.ndarray:
    """Return ``values`` as int64 labels; refuse non-integral or negative ones."""
    if values.dtype.kind in "iu":
        labels = values.astype(np.int64)
    elif values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ConfigError(
                f"{source}: expected integer class labels, got {int(bad.sum())} "
                f"non-integral value(s), the first at row {first}"
            )
        labels = values.astype(np.int64)
    else:
        raise ConfigError(
            f"{source}: expected integer class labels, got dtype {values.dtype}"
        )
    if labels.size and labels.min() < 0:
        raise ConfigError(f"{source}: expected class labels >= 0, got {labels.min()}")
    return labels


def _features(values: np.ndarray, source: str) -> np.ndarray:
    if values.dtype.kind not in "iuf":
        raise ConfigError(
            f"{source}: expected numeric features, got dtype {values.dtype}"
        )
    if values.ndim != 2:
        raise ConfigError(
            f"{source}: expected 2-D features [samples, features], "
            f"got shape {list(values.shape)}"
        )
    X = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(X).all():
        raise ConfigError(
            f"{source}: expected finite features, got "
            f"{int((~np.isfinite(X)).sum())} NaN or infinite value(s)"
        )
    return X


def _load_npz(spec: Mapping[str, object], base_dir: str | os.PathLike[str]) -> _Arrays:
    _check_keys(spec, {"path", "x", "y"}, "npz")
    path = _path(spec, base_dir)
    names = {key: spec.get(key, default) for key, default in (("x", "X"), ("y", "y"))}
    for key, name in names.items():
        if not isinstance(name, str):
            raise ConfigError(
                f"expected {key} an array name (str) in an 'npz' data spec, "
                f"got {type(name).__name__}"
            )
    try:
        # allow_pickle=False: a data file must not be able to run code.
        with np.load(path, allow_pickle=False) as archive:
            available = sorted(archive.files)
            missing = [n for n in names.values() if n not in available]
            if missing:
                raise ConfigError(
                    f"{path}: no array(s) {missing} (the file has {available})"
                )
            x_raw, y_raw = archive[str(names["x"])], archive[str(names["y"])]
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        # np.load raises OSError or ValueError (including pickled object arrays
        # refused by allow_pickle=False) for anything that is not a usable .npz.
        raise ConfigError(f"{path}: cannot read as .npz: {e}") from None
    X = _features(x_raw, f"{path}[{names['x']!r}]")
    if y_raw.ndim != 1:
        raise ConfigError(
            f"{path}[{names['y']!r}]: expected 1-D labels, "
            f"got shape {list(y_raw.shape)}"
        )
    return _same_rows(X, _labels(y_raw, f"{path}[{names['y']!r}]"), str(path))


def _load_csv(spec: Mapping[str, object], base_dir: str | os.PathLike[str]) -> _Arrays:
    _check_keys(spec, {"path", "label", "header", "delimiter"}, "csv")
    path = _path(spec, base_dir)
    label = spec.get("label")
    header = spec.get("header", True)
    delimiter = spec.get("delimiter", ",")
    if not isinstance(header, bool):
        raise ConfigError(
            f"expected header true or false in a 'csv' data spec, "
            f"got {type(header).__name__}"
        )
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ConfigError(
            f"expected delimiter one character in a 'csv' data spec, "
            f"got {delimiter!r:.20}"
        )
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ConfigError(
            "expected label a column name (str) or index (int) in a 'csv' data "
            f"spec, got {type(label).__name__}"
        )
    if isinstance(label, str) and not header:
        raise ConfigError(
            f"label {label!r} is a column name but header = false; "
            "give the column index instead"
        )
    if path.stat().st_size > _MAX_CSV_BYTES:
        raise ConfigError(f"{path}: expected at most {_MAX_CSV_BYTES} bytes")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot read as CSV: {e}") from None
    columns = [c.strip() for c in rows.pop(0)] if header and rows else None
    if not rows:
        raise ConfigError(f"{path}: expected at least one data row, got none")
    width = len(columns) if columns is not None else len(rows[0])
    if isinstance(label, str):
        assert columns is not None  # header is true here, checked above.
        if label not in columns:
            raise ConfigError(f"{path}: no column {label!r} (columns: {columns})")
        index = columns.index(label)
    else:
        if not -width <= label < width:
            raise ConfigError(
                f"{path}: expected label a column index in [{-width}, {width}), "
                f"got {label}"
            )
        index = label % width
    if width < 2:
        raise ConfigError(f"{path}: expected a label and at least one feature column")
    data = np.empty((len(rows), width), dtype=np.float64)
    first_line = 2 if columns is not None else 1
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ConfigError(
                f"{path}: row {i + first_line} has {len(row)} fields, expected {width}"
            )
        try:
            data[i] = [float(v) for v in row]
        except ValueError:
            raise ConfigError(
                f"{path}: row {i + first_line} has a non-numeric field"
            ) from None
    X = _features(np.delete(data, index, axis=1), str(path))
    return _same_rows(X, _labels(data[:, index], f"{path} column {label!r}"), str(path))


def _same_rows(X: np.ndarray, y: np.ndarray, source: str) -> _Arrays:
    if X.shape[0] != y.shape[0]:
        raise ConfigError(
            f"{source}: expected as many labels as feature rows, "
            f"got {y.shape[0]} and {X.shape[0]}"
        )
    if X.shape[0] == 0:
        raise ConfigError(f"{source}: expected at least one sample, got none")
    return X, y


def _load_synthetic(spec: Mapping[str, object]) -> _Arrays:
    params = {
        "node_index",
        "n_nodes",
        "n_samples",
        "n_features",
        "n_classes",
        "seed",
        "skew",
    }
    _check_keys(spec, params, "synthetic")
    for key in ("node_index", "n_nodes"):
        if key not in spec:
            raise ConfigError(f"missing key {key!r} in a 'synthetic' data spec")
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    return synthetic_classification(**kwargs)  # type: ignore[arg-type]


def load_arrays(
    spec: Mapping[str, object], base_dir: str | os.PathLike[str] = "."
) -> _Arrays:
    """Load one data set of a node's ``[data]`` table as ``(X, y)``.

    Parameters
    ----------
    spec : Mapping[str, object]
        A table with ``kind`` and that kind's keys:

        - ``"synthetic"``: ``node_index``, ``n_nodes`` (required) and optionally
          ``n_samples``, ``n_features``, ``n_classes``, ``seed``, ``skew``: see
          :func:`synthetic_classification`.
        - ``"npz"``: ``path``, and the array names ``x`` (default ``"X"``) and
          ``y`` (default ``"y"``). Pickled (object) arrays are refused.
        - ``"csv"``: ``path``, ``label`` (the label column's name, or its index,
          negative from the end), ``header`` (default true: the first row names
          the columns) and ``delimiter`` (default ``","``). Every other column is
          a feature; every field must be numeric.

        Unknown keys are refused.
    base_dir : str or os.PathLike
        The node directory; relative paths are resolved against it.

    Returns
    -------
    X : numpy.ndarray
        float32, ``[n_samples, n_features]``, finite.
    y : numpy.ndarray
        int64, ``[n_samples]``, non-negative integer labels.

    Raises
    ------
    ConfigError
        An unknown kind or key, a missing file, array or column, or data that is
        not numeric, not integral labels, or inconsistent; the message names the
        file and what was expected.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"expected a data spec table, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "synthetic":
        return _load_synthetic(spec)
    if kind == "npz":
        return _load_npz(spec, base_dir)
    if kind == "csv":
        return _load_csv(spec, base_dir)
    raise ConfigError(
        f"expected data kind one of {', '.join(map(repr, DATA_KINDS))}, "
        f"got {kind!r:.200}"
    )
