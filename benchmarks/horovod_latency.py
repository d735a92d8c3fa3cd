"""Latency of a small allreduce through pybrain_mpi.horovod against pybrain_mpi itself.

Run: ``mpiexec -n 2 python benchmarks/horovod_latency.py [--kib 4] [--calls 200]``.
Both paths are measured in the same run, interleaved in 10 blocks so a change in the machine's
load hits both alike (medians over all calls, after 20 warm-up calls each); rank 0 prints them
and their ratio. Horovod's allreduces of the global set take the engine directly (the fast
path, docs/horovod.md), so the difference is the shim's Python layer.
"""

import argparse
import statistics
import time

import torch

import pybrain_mpi as pbm
import pybrain_mpi.horovod as hvd


def timed_us(call, calls: int, times: list) -> None:
    """Appends the wall time of each of ``calls`` calls of ``call()`` to ``times`` (microseconds)."""
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)


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
    engine_times: list = []
    shim_times: list = []
    blocks = 10
    for _ in range(blocks):
        timed_us(lambda: pbm.allreduce_(x, op="sum", name="pbm"), max(1, args.calls // blocks), engine_times)
        timed_us(lambda: hvd.allreduce_(x, name="hvd"), max(1, args.calls // blocks), shim_times)
    engine, shim = statistics.median(engine_times), statistics.median(shim_times)
    if hvd.rank() == 0:
        print(f"{args.kib} KiB allreduce on {hvd.size()} ranks, median of {args.calls}: "
              f"pybrain_mpi {engine:.0f} us, pybrain_mpi.horovod {shim:.0f} us, ratio {shim / engine:.1f}")


if __name__ == "__main__":
    main()
