"""Latency of a small allreduce through pybrain_mpi.horovod against pybrain_mpi itself.

Run: ``mpiexec -n 2 python benchmarks/horovod_latency.py [--kib 4] [--calls 200]``.
Both paths are measured in the same run (medians after 20 warm-up calls each); rank 0 prints
them and their ratio. The Horovod path pays one negotiation cycle of the name-matching
coordinator per collective (docs/horovod.md).
"""

import argparse
import statistics
import time

import torch

import pybrain_mpi as pbm
import pybrain_mpi.horovod as hvd


def median_us(call, calls: int) -> float:
    """Median wall time of ``call()`` in microseconds."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    """Measures and prints both medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kib", type=int, default=4)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    hvd.init()
    x = torch.ones(args.kib * 256)  # float32
    for _ in range(20):
        hvd.allreduce_(x, name="hvd")
        pbm.allreduce_(x, op="sum", name="pbm")
    engine = median_us(lambda: pbm.allreduce_(x, op="sum", name="pbm"), args.calls)
    shim = median_us(lambda: hvd.allreduce_(x, name="hvd"), args.calls)
    if hvd.rank() == 0:
        print(f"{args.kib} KiB allreduce on {hvd.size()} ranks, median of {args.calls}: "
              f"pybrain_mpi {engine:.0f} us, pybrain_mpi.horovod {shim:.0f} us, ratio {shim / engine:.1f}")


if __name__ == "__main__":
    main()
