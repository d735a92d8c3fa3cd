"""A stopped peer of the small-message allreduce (tests/test_small_allreduce.py): a pytest
suite under mpiexec cannot host it (its ranks agree on every outcome through a collective).
Every other check of the algorithm is in tests/mpi/mpi_small.py."""

from __future__ import annotations

import os
import signal
import time

import torch

import pybrain_mpi as pbm
from harness import run_worker


def mode_stopped(comm) -> None:
    """Rank 0 stops the last rank (SIGSTOP) and runs a 4 KiB small allreduce: it raises
    CollectiveTimeout at its deadline naming exactly the stopped rank, instead of spinning
    forever. Resumed, the stopped rank enters the call, finds rank 0's slot and returns."""
    n, r = comm.Get_size(), comm.Get_rank()
    pids = comm.allgather(os.getpid())
    x = torch.full((1024,), float(r + 1))
    comm.Barrier()
    if r == 0:
        # Not at once: the last rank may still owe the others its part of the barrier.
        time.sleep(0.5)
        os.kill(pids[n - 1], signal.SIGSTOP)
        started = time.monotonic()
        try:
            pbm.allreduce_(x, algorithm="auto", name="grad.small", timeout_s=2)
        except pbm.CollectiveTimeout as error:
            waited = time.monotonic() - started
            message = str(error)
            assert error.missing_ranks == [n - 1], (error.missing_ranks, message)
            assert "grad.small" in message and "small-message allreduce" in message, message
            assert 1.9 <= waited < 15, f"the timeout took {waited:.1f} s"
            print("stopped-peer message:", message, flush=True)
        else:
            raise AssertionError("no CollectiveTimeout although the last rank was stopped")
        finally:
            os.kill(pids[n - 1], signal.SIGCONT)
    elif r < n - 1:
        # The others wait for rank 0 to stop the last rank, then join it in the same call:
        # they time out too, naming the stopped rank.
        try:
            pbm.allreduce_(x, algorithm="auto", name="grad.small", timeout_s=2)
        except pbm.CollectiveTimeout as error:
            assert n - 1 in error.missing_ranks, (error.missing_ranks, str(error))
        else:
            raise AssertionError(f"rank {r}: no CollectiveTimeout although the last rank was stopped")
    else:
        # Stopped during this nap, before it enters the call; resumed after rank 0 gave up:
        # every peer's slot is there, so the call completes.
        time.sleep(3.0)
        pbm.allreduce_(x, algorithm="auto", name="grad.small", timeout_s=30)
        print("stopped rank resumed and finished", flush=True)
    comm.Barrier()


if __name__ == "__main__":
    run_worker(globals())
