# SPDX-License-Identifier: Apache-2.0
"""Flower ServerApp: Flower's DefaultWorkflow with secagg's fit workflow.

``python examples/flower/server_app.py`` runs this ServerApp and 5 ClientApps
in one process (no Ray) with :class:`secagg.integrations.flower.InProcessGrid`.
In a Flower app project, point ``serverapp``/``clientapp`` at ``app`` in this
file and in ``client_app.py`` and use ``flwr run`` as usual.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow

from secagg.integrations.flower import SecureAggregationWorkflow

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Three rounds of FedAvg whose fit rounds aggregate with secagg."""
    num_rounds = int(context.run_config.get("num-server-rounds", 3))
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=1.0, min_available_clients=5)
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy
    )
    # The one change on the server side: this fit workflow (in place of Flower's
    # SecAggPlusWorkflow, or of the default one).
    workflow = DefaultWorkflow(
        fit_workflow=SecureAggregationWorkflow(timeout=30, clipping_range=3.0)
    )
    workflow(grid, legacy)


def run_in_process(num_clients: int = 5, num_rounds: int = 3) -> None:
    """Run the ServerApp against ``num_clients`` in-process ClientApps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from client_app import app as client_app

    from secagg.integrations.flower import InProcessGrid

    grid = InProcessGrid(
        client_app,
        num_clients,
        node_config=lambda i: {"partition-id": i, "num-partitions": num_clients},
    )
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"num-server-rounds": num_rounds},
    )
    app(grid, context)


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("secagg.integrations.flower._server").setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # Flower has its own handler.
    run_in_process()
