"""A rank that never takes part in a set-up step; run under mpiexec by tests/test_failures.py.

Usage: init_failure_worker.py MODE PID_DIR, MODE one of ``init`` (the last rank never calls
``pbm.init``), ``group`` (it never builds a ``parallel.Group``), ``p2p`` (nor a
``parallel.Channel``). Every rank writes its pid to PID_DIR/rank<r>.pid. The absent rank
sleeps well past PBM_TIMEOUT_S and prints "LATE RANK EXITS" when it leaves; the others print a
"CAUGHT" line (type, ranks, message) and leave with ``sys.exit(3)`` while it still sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mpi4py import MPI

import pybrain_mpi as pbm
from pybrain_mpi.parallel import Channel, Group


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    mode, pid_dir = sys.argv[1], Path(sys.argv[2])
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    absent = rank == size - 1
    timeout_s = float(os.environ["PBM_TIMEOUT_S"])
    started = time.monotonic()
    try:
        if mode == "init":
            if absent:
                time.sleep(6 * timeout_s)
                _say("LATE RANK EXITS")
                os._exit(0)
            pbm.init()
        else:
            pbm.init()
            if absent:
                time.sleep(6 * timeout_s)
                _say("LATE RANK EXITS")
                os._exit(0)
            started = time.monotonic()
            Group(world) if mode == "group" else Channel(world)
    except pbm.CollectiveTimeout as error:
        _say(f"CAUGHT {type(error).__name__} ranks={error.missing_ranks} rank={rank}: "
             + " ".join(str(error).split()))
        _say(f"ELAPSED {time.monotonic() - started:.2f}")
        sys.exit(3)
    _say("NO ERROR")
    sys.exit(4)
