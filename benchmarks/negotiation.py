"""What matching collectives by name costs when ranks submit in different orders.

    mpiexec -n 2 python benchmarks/negotiation.py                  # 4 KiB, 200 pairs
    mpiexec -n 3 python benchmarks/negotiation.py --bytes 64K --pairs 100

Each iteration submits two async allreduces ("a", "b", float32, the given size) and waits
for both. "same" submits them in the same order on every rank: the join confirms the names
and nothing is negotiated (the steady state). "swapped" submits them in the opposite order
on odd ranks: the first join shows different names and the ranks negotiate (one or more
rounds, docs/negotiation.md). Both run in the same job, interleaved in blocks; the table
shows the median time per pair on the slowest rank and the negotiation rounds per pair.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", default="4K", help="size of each allreduce (4K, 64K, ...)")
    parser.add_argument("--pairs", type=int, default=200, help="measured pairs per variant")
    args = parser.parse_args()

    import numpy as np

    import pybrain_mpi as pbm
    from pybrain_mpi.communication import context

    pbm.init()
    r, n = pbm.rank(), pbm.size()
    count = max(1, parse_size(args.bytes) // 4)
    a = np.ones(count, dtype=np.float32)
    b = np.ones(count, dtype=np.float32)
    engine = context.current().engine

    def pair(swapped: bool) -> None:
        if swapped and r % 2:
            hb = pbm.allreduce_async_(b, name="b")
            ha = pbm.allreduce_async_(a, name="a")
        else:
            ha = pbm.allreduce_async_(a, name="a")
            hb = pbm.allreduce_async_(b, name="b")
        ha.wait()
        hb.wait()

    times: dict[str, list[float]] = {"same": [], "swapped": []}
    rounds: dict[str, int] = {"same": 0, "swapped": 0}
    for variant in times:  # warm-up
        for _ in range(10):
            pair(variant == "swapped")
    block = 20
    for start in range(0, args.pairs, block):
        for variant in times:
            for _ in range(min(block, args.pairs - start)):
                pbm.barrier()
                before = engine.negotiation_rounds
                t0 = time.perf_counter()
                pair(variant == "swapped")
                elapsed = time.perf_counter() - t0
                rounds[variant] += engine.negotiation_rounds - before
                slowest = np.array([elapsed])
                pbm.allreduce_(slowest, op="max", name="slowest")
                times[variant].append(float(slowest[0]))
    if r == 0:
        print(f"{n} ranks, two async allreduces of {args.bytes} per pair, {args.pairs} pairs per variant")
        print(f"{'order':<10} {'median us/pair':>15} {'rounds/pair':>12}")
        for variant, values in times.items():
            print(f"{variant:<10} {statistics.median(values) * 1e6:>15.1f} {rounds[variant] / len(values):>12.2f}")
        ratio = statistics.median(times["swapped"]) / statistics.median(times["same"])
        print(f"swapped / same: {ratio:.2f}x")
    pbm.shutdown()


if __name__ == "__main__":
    main()
