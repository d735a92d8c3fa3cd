"""Multi-rank timeouts of pybrain_mpi collectives; run under mpiexec by tests/test_collectives.py.

Ranks that stay away on purpose cannot run inside a pytest suite under mpiexec (the suite's
ranks agree on every outcome through a collective), so these stay subprocess workers; every
other multi-rank collective check is in tests/mpi/mpi_collectives.py.

Usage: collectives_worker.py MODE [args]. Each mode asserts and exits non-zero on failure,
printing "OK <mode>" on success so the test can also check every rank got there.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

import pybrain_mpi as pbm
from harness import run_worker


def mode_timeout(comm: MPI.Comm) -> None:
    """Rank 0 allreduces alone: CollectiveTimeout names every other rank as missing."""
    n, r = comm.Get_size(), comm.Get_rank()
    if r == 0:
        started = time.monotonic()
        try:
            pbm.allreduce(np.ones(10, dtype=np.float32), name="lonely", timeout_s=1.5)
        except pbm.CollectiveTimeout as error:
            elapsed = time.monotonic() - started
            assert error.missing_ranks == list(range(1, n)), error.missing_ranks
            assert "lonely" in str(error) and "rank 0" in str(error), str(error)
            assert 1.4 <= elapsed < 10, elapsed
            print("timeout message:", error)
        else:
            raise AssertionError("no CollectiveTimeout")
    comm.Barrier()


def mode_partial_join(comm: MPI.Comm) -> None:
    """Only the last rank stays away: the others' timeouts name exactly that rank."""
    n, r = comm.Get_size(), comm.Get_rank()
    if r != n - 1:
        try:
            pbm.allreduce(np.ones(50_000, dtype=np.float32), name="grad", timeout_s=1.5)
        except pbm.CollectiveTimeout as error:
            assert error.missing_ranks == [n - 1], error.missing_ranks
        else:
            raise AssertionError("no CollectiveTimeout")
    comm.Barrier()


def mode_async_timeout(comm: MPI.Comm) -> None:
    """Handle.wait(timeout_s) raises CollectiveTimeout listing the ranks not yet joined."""
    n, r = comm.Get_size(), comm.Get_rank()
    if r == 0:
        handle = pbm.allreduce_async_(np.ones(100_000, dtype=np.float32), name="grad.fc")
        try:
            handle.wait(timeout_s=1.0)
        except pbm.CollectiveTimeout as error:
            assert error.missing_ranks == list(range(1, n)), error.missing_ranks
            assert "grad.fc" in str(error), str(error)
            print("async timeout message:", error)
        else:
            raise AssertionError("no CollectiveTimeout from wait")
    comm.Barrier()


if __name__ == "__main__":
    run_worker(globals())
