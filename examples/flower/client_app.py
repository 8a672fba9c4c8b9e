# SPDX-License-Identifier: Apache-2.0
"""Flower ClientApp: an ordinary NumPyClient; secagg's Mod is the only addition.

Each client fits a logistic regression (numpy only) on its own synthetic
partition. Nothing in ``LogisticClient`` knows about secure aggregation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient

from secagg.integrations.flower import secure_aggregation_mod

N_FEATURES = 20


def load_partition(partition_id: int, num_partitions: int) -> tuple[Any, Any]:
    """A synthetic binary task; each partition sees its own samples."""
    truth = np.random.default_rng(0).normal(size=N_FEATURES)
    rng = np.random.default_rng(1 + partition_id + 1000 * num_partitions)
    x = rng.normal(size=(200, N_FEATURES))
    y = (x @ truth + 0.5 * rng.normal(size=200) > 0).astype(np.float64)
    return x, y


class LogisticClient(NumPyClient):
    """Plain gradient descent on the logistic loss."""

    def __init__(self, x: Any, y: Any, epochs: int = 5, lr: float = 0.5) -> None:
        self.x, self.y, self.epochs, self.lr = x, y, epochs, lr

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [np.zeros(N_FEATURES, dtype=np.float32), np.zeros(1, dtype=np.float32)]

    def _loss(self, w: Any, b: Any) -> tuple[float, float]:
        p = 1.0 / (1.0 + np.exp(-(self.x @ w + b)))
        loss = -np.mean(
            self.y * np.log(p + 1e-12) + (1 - self.y) * np.log(1 - p + 1e-12)
        )
        return float(loss), float(np.mean((p > 0.5) == self.y))

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        w, b = parameters[0].astype(np.float64), parameters[1].astype(np.float64)
        for _ in range(self.epochs):
            p = 1.0 / (1.0 + np.exp(-(self.x @ w + b)))
            w -= self.lr * self.x.T @ (p - self.y) / len(self.y)
            b -= self.lr * np.mean(p - self.y)
        loss, _ = self._loss(w, b)
        return [w.astype(np.float32), b.astype(np.float32)], len(self.y), {"loss": loss}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        loss, accuracy = self._loss(parameters[0], parameters[1])
        return loss, len(self.y), {"accuracy": accuracy}


def client_fn(context: Context) -> Any:
    """Flower's usual client_fn: the partition comes from the node's config."""
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    return LogisticClient(*load_partition(partition_id, num_partitions)).to_client()


# The one change on the client side: add secagg's Mod (in place of Flower's
# ``secaggplus_mod``, or to a ClientApp that had no secure aggregation).
app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
