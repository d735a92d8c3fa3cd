"""Ranks that stop (SIGSTOP) or die (SIGKILL) on purpose; run under mpiexec by
tests/test_failures.py.

Usage: failure_worker.py MODE PID_DIR. Every rank writes its pid to PID_DIR/rank<r>.pid (so
the test can clean up whatever it stopped) and the error it caught to PID_DIR/report<r>.txt. The rank that stops itself is the last one; it
prints "RESUMED" if anyone ever lets it continue. The other ranks print a line starting with
"CAUGHT" and the error's type, ranks and message, then leave with ``sys.exit(3)``: the test
checks that they get out while the stopped rank is still stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

import pybrain_mpi as pbm
from pybrain_mpi.communication import objects


def _stop_last_rank(comm: MPI.Comm) -> None:
    """Warm the engine up on every rank, then the last rank stops itself (a real SIGSTOP)."""
    pbm.allreduce(np.ones(4, dtype=np.float32), name="warm-up")
    if comm.Get_rank() == comm.Get_size() - 1:
        os.kill(os.getpid(), signal.SIGSTOP)
        _say(f"RESUMED rank {comm.Get_rank()}")
        time.sleep(1)
        os._exit(0)
    time.sleep(0.5)  # the stop has landed


def _say(line: str) -> None:
    """One write per line: ranks' lines then never interleave in mpiexec's output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _report(error: BaseException) -> None:
    ranks = getattr(error, "missing_ranks", None)
    if ranks is None:
        ranks = getattr(error, "failed_ranks", None)
    line = f"CAUGHT {type(error).__name__} ranks={ranks} rank={pbm.rank()}: " \
        + " ".join(str(error).split())
    # Also in a file, written before anything else can happen: a launcher that kills the
    # survivors of a dead rank may drop output still on its way.
    (PID_DIR / f"report{pbm.rank()}.txt").write_text(line + "\n")
    _say(line)


def _stopped_peer(call) -> None:
    comm = MPI.COMM_WORLD
    _stop_last_rank(comm)
    started = time.monotonic()
    try:
        call(comm)
    except (pbm.CollectiveTimeout, pbm.PeerFailure) as error:
        _report(error)
        _say(f"ELAPSED {time.monotonic() - started:.2f}")
        sys.exit(3)
    _say("NO ERROR")
    sys.exit(4)


def mode_allreduce(comm):
    pbm.allreduce(np.ones(1000, dtype=np.float32), name="grad")


def mode_gather(comm):
    objects.gather_objects({"rng": list(range(10))}, 0, name="RNG states")


def mode_allgather(comm):
    objects.allgather_objects(comm.Get_rank(), name="host names")


def mode_broadcast(comm):
    objects.broadcast_object("config" if comm.Get_rank() == 0 else None, 0, name="the config")


def mode_barrier(comm):
    objects.barrier(name="before the epoch")


def mode_consistency(comm):
    model = torch.nn.Linear(3, 2)
    pbm.DistributedDataParallel(model)


STOPPED = {"allreduce", "gather", "allgather", "broadcast", "barrier", "consistency"}


def ring_peer_killed_mid_transfer() -> None:
    """2-rank ring: rank 1 dies (SIGKILL) while the ranks exchange a large tensor's chunks."""
    comm = MPI.COMM_WORLD
    signal.signal(signal.SIGUSR1, lambda *_: None)
    # 256 MiB: the ring takes 60 ms or more here (2-4 GB/s), so the kill 10 ms in lands
    # mid-transfer; with a shorter transfer it could finish first and prove nothing.
    data = np.ones(64_000_000, dtype=np.float32)
    pbm.allreduce(np.ones(4, dtype=np.float32), name="warm-up")
    if comm.Get_rank() == 1:
        pbm.allreduce_async_(data, name="grad.big", algorithm="ring")
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        pbm.allreduce_(data, name="grad.big", algorithm="ring")
    except (pbm.CollectiveTimeout, pbm.PeerFailure) as error:
        _report(error)
        sys.exit(3)
    except pbm.PbmError as error:  # any other failure is reported as such (and fails the test)
        _report(error)
        sys.exit(5)
    _say("NO ERROR")
    sys.exit(4)


def ring_peer_killed() -> None:
    """2-rank ring: rank 1 dies (SIGKILL) inside a large allreduce it has joined."""
    comm = MPI.COMM_WORLD
    # mpiexec -disable-auto-cleanup sends SIGUSR1 to survivors; its default action would end us.
    signal.signal(signal.SIGUSR1, lambda *_: None)
    pbm.allreduce(np.ones(4, dtype=np.float32), name="warm-up")
    data = np.ones(8_000_000, dtype=np.float32)
    if comm.Get_rank() == 1:
        # Joins (its header is sent), then dies waiting for rank 0: the allreduce cannot
        # have completed.
        pbm.allreduce_async_(data, name="grad.big", algorithm="ring")
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # rank 1 is dead by now
    try:
        pbm.allreduce_(data, name="grad.big", algorithm="ring")
    except (pbm.CollectiveTimeout, pbm.PeerFailure) as error:
        _report(error)
        sys.exit(3)
    _say("NO ERROR")
    sys.exit(4)


if __name__ == "__main__":
    mode, pid_dir = sys.argv[1], Path(sys.argv[2])
    PID_DIR = pid_dir
    pbm.init()
    (pid_dir / f"rank{pbm.rank()}.pid").write_text(str(os.getpid()))
    if mode == "ring_peer_killed":
        ring_peer_killed()
    elif mode == "ring_peer_killed_mid_transfer":
        ring_peer_killed_mid_transfer()

    elif mode in STOPPED:
        _stopped_peer(globals()[f"mode_{mode}"])
    else:
        raise SystemExit(f"unknown mode {mode}")
