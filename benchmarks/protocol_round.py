# SPDX-License-Identifier: Apache-2.0
"""Benchmark: context setup and secure-round time per phase (in-memory driver).

For n in {3, 10, 30} nodes and d = 10^6 float32 parameters, it times setup and
a round with no dropout and with 30% of the nodes dropped before upload, split
by server phase (wall time while the server was in that phase, which includes
the nodes' work, since all parties share this process). Timeouts are simulated
by the driver and cost no time. ``--quick`` uses small sizes.

Run: ``python benchmarks/protocol_round.py [--quick] [--nodes 3 10] [--dim 1000000]``
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

import numpy as np

from mpc_runtime import masking
from mpc_runtime.memory import MemoryNetwork, Phase
from mpc_runtime.messages import StreamSpec

PHASES = ("round.keys", "round.upload", "round.survivors", "round.unmask")


def _run(n: int, d: int, *, dropped_fraction: float, repeats: int) -> dict[str, float]:
    ids = [f"node-{i:02d}" for i in range(n)]
    rng = np.random.default_rng(0)
    data = {v: rng.uniform(-1, 1, size=d).astype(np.float32) for v in ids}
    net = MemoryNetwork(ids, inputs=lambda v, req: {"weights": data[v]}, timeout=30.0)
    t0 = time.perf_counter()
    net.setup()
    setup = time.perf_counter() - t0
    drops = {v: Phase.UPLOAD for v in ids[: round(n * dropped_fraction)]}
    best: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = net.run_round(streams=[StreamSpec("weights", (d,))], drop=drops)
        total = time.perf_counter() - t0
        assert len(result.contributors) == n - len(drops)
        row = {p: net.counters.phase_seconds.get(p, 0.0) for p in PHASES}
        row["total"] = total
        if not best or total < best["total"]:
            best = row
    best["setup"] = setup
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (n in 3, 5; d = 10^4)"
    )
    parser.add_argument("--nodes", type=int, nargs="*", default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    # Dropouts are logged as warnings by design; keep the table readable.
    logging.basicConfig(level=logging.ERROR)
    nodes = args.nodes or ([3, 5] if args.quick else [3, 10, 30])
    d = args.dim or (10_000 if args.quick else 1_000_000)
    repeats = args.repeats or (3 if args.quick else 2)
    print(
        "# secagg protocol round benchmark: "
        f"masking IMPLEMENTATION={masking.IMPLEMENTATION}"
    )
    print(
        f"# machine: {platform.machine()} {platform.processor() or ''} "
        f"cpus={os.cpu_count()} python={sys.version.split()[0]}; "
        "all parties in one process (in-memory driver)"
    )
    print(f"# d = {d} float32, ring 32, best of {repeats}; seconds")
    header = f"{'n':>3} {'dropped':>7} {'setup':>8} " + " ".join(
        f"{p.split('.')[1]:>9}" for p in PHASES
    )
    print(header + f" {'round':>8} {'M param/s':>9}")
    for n in nodes:
        for fraction in (0.0, 0.3):
            row = _run(n, d, dropped_fraction=fraction, repeats=repeats)
            dropped = round(n * fraction)
            rate = (n - dropped) * d / row["total"] / 1e6
            print(
                f"{n:>3} {dropped:>7} {row['setup']:>8.3f} "
                + " ".join(f"{row[p]:>9.3f}" for p in PHASES)
                + f" {row['total']:>8.3f} {rate:>9.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
