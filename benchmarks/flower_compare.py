# SPDX-License-Identifier: Apache-2.0
"""Benchmark: Flower's SecAgg+ against secagg's Flower integration, same vectors.

Both run in this process through Flower's own ``DefaultWorkflow`` and
``ClientApp`` (an ordinary ``NumPyClient`` returning a fixed float32 vector per
client), over :class:`secagg.integrations.flower.InProcessGrid`, which carries
every message through Flower's serialization and every client context through
its protobuf form, as a deployment does:

- Flower: ``SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=t)`` with
  ``secaggplus_mod`` (every client shares with every other, as secagg does);
- secagg: ``SecureAggregationWorkflow`` with ``secure_aggregation_mod``;

with the same n clients, threshold t = ⌊n/2⌋ + 1, clipping range c = 3 and
per-phase timeout. Columns (each the best of ``--rounds`` rounds after a first
one; secagg's first round also sets up its context, shown apart):

- ``round s``: the fit workflow's wall time for one round (every party shares
  this process and its 1-2 cores, so it adds the clients' work);
- ``mask s``: per client, the ClientApp time of the stage that produces the
  masked vector (Flower: ``collect_masked_vectors``; secagg: ``upload``), the
  user's ``fit`` excluded (it returns a precomputed vector);
- ``B/param``: what Flower carries for that upload (its deflated objects) per
  parameter;
- ``max err``: largest |aggregate - exact mean| over the parameters.

Run: ``python benchmarks/flower_compare.py [--quick] [--dims 100000 1000000]
[--clients 5 10] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from typing import Any

import numpy as np

try:
    import flwr
    from flwr.app import Context, Message, RecordDict
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
except ImportError:  # pragma: no cover
    sys.exit("flower_compare needs Flower: pip install -e '.[flower]'")

from mpc_runtime import masking
from secagg.integrations.flower import (
    InProcessGrid,
    SecureAggregationWorkflow,
    secure_aggregation_mod,
)

C = 3.0
TIMEOUT = 600.0
MASK_STAGE = {
    "flower": "secaggplus_configs:collect_masked_vectors",
    "secagg": "secagg:upload",
}


def _vectors(n: int, d: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    return [rng.uniform(-1.0, 1.0, d).astype(np.float32) for _ in range(n)]


class _Timed:
    """Wraps a ClientApp: ClientApp seconds per stage label, fit seconds apart."""

    def __init__(self, app: ClientApp, fit_seconds: list[float]) -> None:
        self.app = app
        self.fit_seconds = fit_seconds
        self.seconds: dict[str, list[float]] = {}

    def __call__(self, msg: Message, ctx: Context) -> Message:
        from secagg.integrations.flower._grid import _stage

        stage = _stage(msg)
        before = sum(self.fit_seconds)
        t0 = time.perf_counter()
        reply = self.app(msg, ctx)
        spent = time.perf_counter() - t0 - (sum(self.fit_seconds) - before)
        self.seconds.setdefault(stage, []).append(spent)
        return reply


def _client_app(vectors: list[np.ndarray], mod: Any, fit_seconds: list[float]) -> Any:
    class Client(NumPyClient):
        def __init__(self, i: int) -> None:
            self.i = i

        def fit(self, parameters: Any, config: Any) -> Any:
            t0 = time.perf_counter()
            out = [vectors[self.i].copy()]
            fit_seconds.append(time.perf_counter() - t0)
            return out, 1, {}

        def evaluate(self, parameters: Any, config: Any) -> Any:
            return 0.0, 1, {}

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["i"])).to_client()

    return _Timed(ClientApp(client_fn=client_fn, mods=[mod]), fit_seconds)


def _run(system: str, vectors: list[np.ndarray], rounds: int) -> dict[str, float]:
    n, d = len(vectors), vectors[0].size
    t = n // 2 + 1
    fit_seconds: list[float] = []
    if system == "flower":
        app = _client_app(vectors, secaggplus_mod, fit_seconds)
        inner: Any = SecAggPlusWorkflow(
            num_shares=n,
            reconstruction_threshold=t,
            clipping_range=C,
            timeout=TIMEOUT,
        )
    else:
        app = _client_app(vectors, secure_aggregation_mod, fit_seconds)
        # float64 to the strategy, as SecAgg+ does: same model sizes, and the
        # error column measures the aggregation, not a float32 cast.
        inner = SecureAggregationWorkflow(
            timeout=TIMEOUT, clipping_range=C, result_dtype="float64"
        )
    round_seconds: list[float] = []

    def fit_workflow(grid: Any, context: Any) -> None:
        t0 = time.perf_counter()
        inner(grid, context)
        round_seconds.append(time.perf_counter() - t0)

    grid = InProcessGrid(app, n, node_config=lambda i: {"i": i})
    strategy = FedAvg(
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(d, dtype=np.float32)]),
    )
    context = LegacyContext(
        context=Context(
            run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=1 + rounds),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, context)
    model = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            context.state.array_records["parameters"], keep_input=True
        )
    )[0]
    exact = np.mean(np.stack(vectors).astype(np.float64), axis=0)
    mask = app.seconds.get(MASK_STAGE[system], [0.0])
    upload = grid.traffic.up.get(MASK_STAGE[system], 0)
    per_round_clients = n * (1 + rounds)
    return {
        "first": round_seconds[0],
        "round": min(round_seconds[1:]),
        # Per client and round: the best round's clients are not separable, so
        # the mean over every client and round.
        "mask": float(np.mean(mask)),
        "bpp": upload / (per_round_clients * d),
        "err": float(np.max(np.abs(model.astype(np.float64) - exact))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 10^4, n = 5")
    parser.add_argument("--dims", type=int, nargs="*", default=None)
    parser.add_argument("--clients", type=int, nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    # Flower logs every round at INFO; secagg's TOFU pins warn by design.
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    dims = args.dims or ([10_000] if args.quick else [100_000, 1_000_000])
    clients = args.clients or ([5] if args.quick else [5, 10])
    print(
        f"# Flower SecAgg+ vs secagg over Flower: flwr {flwr.__version__}, "
        f"secagg masking IMPLEMENTATION={masking.IMPLEMENTATION}"
    )
    print(
        f"# machine: {platform.machine()} {platform.processor() or ''} "
        f"cpus={os.cpu_count()} python={sys.version.split()[0]}; "
        "every party in this process (InProcessGrid)"
    )
    print(
        f"# float32 vectors in [-1, 1], c = {C}, t = n//2 + 1, best of "
        f"{args.rounds} round(s) after the first; ratio = Flower / secagg"
    )
    cols = ("round s", "mask s", "B/param", "max err")
    header = f"{'d':>8} {'n':>3} {'system':>7} {'1st s':>8} " + " ".join(
        f"{c:>9}" for c in cols
    )
    print(header)
    for d in dims:
        for n in clients:
            vectors = _vectors(n, d)
            rows = {s: _run(s, vectors, args.rounds) for s in ("flower", "secagg")}
            for system, row in rows.items():
                print(
                    f"{d:>8} {n:>3} {system:>7} {row['first']:>8.3f} "
                    f"{row['round']:>9.3f} {row['mask']:>9.4f} {row['bpp']:>9.3f} "
                    f"{row['err']:>9.2e}"
                )
            f, s = rows["flower"], rows["secagg"]
            print(
                f"{d:>8} {n:>3} {'ratio':>7} {f['first'] / s['first']:>8.1f} "
                f"{f['round'] / s['round']:>9.1f} {f['mask'] / s['mask']:>9.1f} "
                f"{f['bpp'] / s['bpp']:>9.2f} {f['err'] / max(s['err'], 1e-300):>9.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
