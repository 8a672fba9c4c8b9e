# SPDX-License-Identifier: Apache-2.0
"""secagg's secure aggregation inside Flower: a client Mod and a fit workflow.

Install with ``pip install secagg[flower]`` (tested with flwr 1.41 and 1.42; see
``docs/flower.md``). The change to a Flower app that uses ``NumPyClient`` and
``DefaultWorkflow`` is two lines::

    app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
    DefaultWorkflow(fit_workflow=SecureAggregationWorkflow(timeout=30))(grid, ctx)

Target: Flower's legacy ``DefaultWorkflow`` / ``LegacyContext`` API, the one in
which ``NumPyClient`` and Flower's own ``SecAggPlusWorkflow`` live (the Message
API's strategies have no fit-workflow hook to replace).
"""

from __future__ import annotations

import logging
from importlib import metadata

try:
    _FLWR_VERSION = metadata.version("flwr")
except metadata.PackageNotFoundError:  # pragma: no cover - without the extra
    raise ImportError(
        "secagg.integrations.flower needs Flower: pip install 'secagg[flower]'"
    ) from None

from ._client import (
    NODE_CONFIG_DIR,
    make_secure_aggregation_mod,
    secure_aggregation_mod,
)
from ._grid import InProcessGrid, Traffic
from ._server import FlowerRoundResult, SecureAggregationWorkflow

__all__ = [
    "FLWR_TESTED",
    "NODE_CONFIG_DIR",
    "FlowerRoundResult",
    "InProcessGrid",
    "SecureAggregationWorkflow",
    "Traffic",
    "make_secure_aggregation_mod",
    "secure_aggregation_mod",
]

#: The flwr releases this integration is tested with (the ``flower`` extra's pin).
FLWR_TESTED = (">=1.41", "<1.43")


def _check_version() -> None:
    version = tuple(int(p) for p in _FLWR_VERSION.split(".")[:2] if p.isdigit())
    if not (1, 41) <= version < (1, 43):
        logging.getLogger(__name__).warning(
            "flwr %s is outside the tested range %s", _FLWR_VERSION, FLWR_TESTED
        )


_check_version()
