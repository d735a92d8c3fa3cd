"""Failure cases of the shared-memory and hierarchical allreduces (tests/test_hierarchical.py):
a rank that never joins, a rank stopped (SIGSTOP) inside the shared-memory stage, and
shutdown/init cycles. These cannot run inside a pytest suite under mpiexec (its ranks agree on
every outcome through a collective); every other check of these algorithms is in
tests/mpi/mpi_hierarchical.py.

Run with PBM_RANKS_PER_NODE to force a grouping.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import pybrain_mpi as pbm
from harness import run_worker
from pybrain_mpi.communication import context


def mode_timeout(comm, algorithm: str) -> None:
    """The last rank never joins: the others' CollectiveTimeout names exactly it."""
    n, r = comm.Get_size(), comm.Get_rank()
    if r != n - 1:
        started = time.monotonic()
        try:
            pbm.allreduce(np.ones(200_000, dtype=np.float32), algorithm=algorithm, name="grad.w",
                          timeout_s=1.5)
        except pbm.CollectiveTimeout as error:
            assert error.missing_ranks == [n - 1], error.missing_ranks
            assert "grad.w" in str(error) and f"rank {r}" in str(error), str(error)
            assert 1.4 <= time.monotonic() - started < 20
            print("timeout message:", error)
        else:
            raise AssertionError("no CollectiveTimeout")
    comm.Barrier()


def mode_stall(comm, path: str) -> None:
    """A rank stopped (SIGSTOP) in the middle of the shared-memory stage, after it joined:
    the other rank's wait ends with CollectiveTimeout naming it and the phase, instead of
    spinning forever; once the stopped rank is resumed, neither rank hangs.

    Rank 0 watches its own buffer (a strided sample) to catch the stage in the middle: the
    reduced values land there as the owners of the slices (zero-copy) or rank 0's copy-out
    of each round (copy path, cut into 64 KiB rounds here) get through them. Once a tenth
    of the sample is reduced, rank 0 stops rank 1."""
    import os
    import signal

    n, r = comm.Get_size(), comm.Get_rank()
    assert n == 2 and pbm.local_size() == 2, "stall runs on one node of two ranks"
    pids = comm.allgather(os.getpid())
    if path == "zero_copy":
        # 512 MiB: the stage takes tens of ms, so rank 0's watcher (sharing two cores with
        # both progress threads) sees it start long before it ends.
        count = 128 * 2**20
        pbm.shared_reset()
        x = pbm.shared_empty(count, torch.float32)
    else:
        count = 64 * 2**20 // 4  # 64 MiB
        context.current().engine.shm_chunk_bytes = 64 * 1024
        x = torch.empty(count, dtype=torch.float32)
    x.fill_(1.0)
    comm.Barrier()
    started = time.monotonic()
    # The engine's deadline (PBM_TIMEOUT_S=2 for this launch) ends the shared-memory waits;
    # the Python-side waits below allow longer, so the error seen is the engine's.
    handle = pbm.allreduce_async_(x, algorithm="shm", name="grad.stall")
    if r == 0:
        view = x.numpy()
        sample = view[::4099]
        while (sample == 2.0).mean() < 0.1:
            if handle.done():
                raise AssertionError("the allreduce finished before rank 1 could be stopped")
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            handle.wait(timeout_s=30)
        except pbm.CollectiveTimeout as error:
            message = str(error)
            assert error.missing_ranks == [1], (error.missing_ranks, message)
            assert "grad.stall" in message and "shared-memory" in message, message
            assert "join" not in message, f"stopped after joining, yet the error blames the join: {message}"
            done = int((view == 2.0).sum())  # counted while rank 1 is still stopped
            waited = time.monotonic() - stopped_at
            assert waited < 15, f"the timeout took {waited:.1f} s"
            print("stall message:", message, flush=True)
        else:
            raise AssertionError("no CollectiveTimeout although rank 1 was stopped mid-stage")
        finally:
            os.kill(pids[1], signal.SIGCONT)
        assert 0 < done < count, f"rank 1 was not stopped mid-stage ({done} of {count} reduced)"
        print(f"stalled mid-stage: {done} of {count} elements reduced", flush=True)
    else:
        # Resumed: the other rank has left, so this one finishes (it was past its last wait)
        # or times out naming rank 0. Either way it returns.
        try:
            handle.wait(timeout_s=30)
            print("rank 1 resumed and finished", flush=True)
        except pbm.CollectiveTimeout as error:
            assert error.missing_ranks == [0], (error.missing_ranks, str(error))
            print("rank 1 resumed and timed out:", error, flush=True)
    assert time.monotonic() - started < 60
    comm.Barrier()


def mode_reinit(comm) -> None:
    """shutdown() then init() again, four times, with shared buffers and the copy path's
    arena in use each time: results stay exact and the old shared memory does not stay
    resident (it did before shutdown handed its pages back: about 70 MB more per cycle)."""
    def resident_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    n = comm.Get_size()
    sizes = []
    # One ordinary tensor for all cycles: a fresh 16 MiB torch tensor per cycle would add
    # glibc heap growth (its mmap threshold adapts) that has nothing to do with pybrain-mpi.
    y = torch.empty(4 * 2**20)  # 16 MiB, copy path (arena)
    for cycle in range(4):
        if cycle:
            pbm.init()
        x = pbm.shared_empty(8 * 2**20, torch.float32)  # 32 MiB, zero-copy
        x.fill_(1.0)
        pbm.allreduce_(x, algorithm="shm")
        y.fill_(1.0)
        pbm.allreduce_(y, algorithm="shm")
        assert bool((x == n).all()) and bool((y == n).all()), f"cycle {cycle}: wrong sums"
        del x
        pbm.shutdown()
        sizes.append(resident_mb())
    growth = sizes[-1] - sizes[0]
    print(f"resident MB after each cycle: {[round(v) for v in sizes]}", flush=True)
    # Kept resident, the 32 MiB buffer, the copy path's arena and the peer's mapped segment
    # add about 70 MB per cycle (216 MB over three); glibc's heap adds up to ~15 MB per cycle.
    assert growth < 100, f"shared memory stays resident across shutdown/init: +{growth:.0f} MB {sizes}"
    pbm.init()


def mode_steps(comm, *steps: str) -> None:
    """Runs several modes in one launch ("exact:shm,auto:0", "async:shm", ...): starting
    4 ranks on 2 cores costs more than most checks."""
    for step in steps:
        name, *args = step.split(":")
        globals()[f"mode_{name}"](comm, *args)
        print(f"step {name} done on rank {comm.Get_rank()}", flush=True)


if __name__ == "__main__":
    run_worker(globals())
