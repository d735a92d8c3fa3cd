"""Parameter-server ranks that die on purpose; run under ``mpiexec -disable-auto-cleanup`` by
tests/test_parameter_server.py.

Usage: ps_worker.py MODE OUT_DIR. Every rank writes its pid to OUT_DIR/rank<r>.pid (so the test
can clean up) and what it saw to OUT_DIR/result<r>.json, then leaves with ``os._exit`` (a normal
exit would wait in MPI_Finalize for the dead rank).

- ``worker_killed`` (3 ranks: 1 server + 2 workers): worker rank 2 calls ``os._exit`` after 5
  steps; the server must finish with worker rank 1 and report rank 2 lost.
- ``server_killed`` (4 ranks: 2 servers + 2 workers): server rank 1 ``os._exit``s once it has
  applied 10 pushes; every worker must raise CollectiveTimeout naming rank 1.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

import pybrain_mpi as pbm
from pybrain_mpi.parallel import ParameterServer

MODE, OUT = sys.argv[1], Path(sys.argv[2])
SETUP_TIMEOUT_S = 60.0  # pbm.init and the channel rendezvous (not the deadlines under test)


def _write(rank: int, result: dict) -> None:
    (OUT / f"result{rank}.json").write_text(json.dumps(result))
    sys.stdout.write(f"RESULT rank {rank}: {json.dumps(result)}\n")
    sys.stdout.flush()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _train(ps: ParameterServer, steps: int, die_after: int | None = None, pause_s: float = 0.0) -> None:
    for step in range(steps):
        if die_after is not None and step == die_after:
            _write(pbm.rank(), {"died_at_step": step, "time": time.time()})
            os._exit(1)
        ps.begin_step()
        g = torch.Generator().manual_seed(100 * ps.worker + step)
        x = torch.randn(8, 16, generator=g)
        torch.nn.functional.mse_loss(ps.model(x), x[:, :4]).backward()
        ps.step()
        time.sleep(pause_s)
    ps.finish()


def _server(optimizer, servers: int, worker_timeout_s: float) -> ParameterServer:
    ps = ParameterServer(_model(), optimizer, servers=servers, worker_timeout_s=worker_timeout_s,
                         timeout_s=SETUP_TIMEOUT_S)
    ps.channel.timeout_s = float(os.environ.get("PBM_TIMEOUT_S", "4"))
    return ps


def main() -> None:
    # Under -disable-auto-cleanup MPICH tells the survivors of a dead rank with SIGUSR1, whose
    # default action would end them: these ranks must carry on.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Set-up (the init and channel rendezvous) gets a generous deadline of its own: on a loaded
    # machine the ranks' torch imports alone can be seconds apart. The deadlines under test are
    # the channel's (PBM_TIMEOUT_S) and the server's (PS_WORKER_TIMEOUT_S), set after it.
    pbm.init(timeout_s=SETUP_TIMEOUT_S)
    rank = pbm.rank()
    (OUT / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    adagrad = functools.partial(torch.optim.Adagrad, lr=0.05)
    worker_timeout_s = float(os.environ.get("PS_WORKER_TIMEOUT_S", "3"))
    if MODE == "worker_killed":
        ps = _server(adagrad, 1, worker_timeout_s)
        if ps.is_server:
            report = ps.serve()
            _write(rank, {"report": report.as_dict(), "time": time.time()})
        else:
            _train(ps, 40, die_after=5 if rank == 2 else None, pause_s=0.02)
            _write(rank, {"stats": ps.stats(), "time": time.time()})
    elif MODE == "server_killed":
        ps = _server(adagrad, 2, worker_timeout_s)
        if ps.is_server:
            if rank == 1:
                serving = threading.Thread(target=ps.serve, daemon=True)
                serving.start()
                while ps.report.pushes_applied < 10:
                    time.sleep(0.001)
                _write(rank, {"killed_at_version": ps.report.pushes_applied, "time": time.time()})
                os._exit(1)
            report = ps.serve()
            _write(rank, {"report": report.as_dict(), "time": time.time()})
        else:
            started = time.time()
            try:
                _train(ps, 100000, pause_s=0.005)
                _write(rank, {"error": None, "time": time.time()})
            except (pbm.CollectiveTimeout, pbm.PeerFailure) as error:
                ranks = getattr(error, "missing_ranks", None) or getattr(error, "failed_ranks", None) or []
                _write(rank, {"error": type(error).__name__, "message": " ".join(str(error).split()),
                              "missing_ranks": list(ranks), "time": time.time(),
                              "started": started})
            except Exception as error:  # anything else is a failure the test shows
                _write(rank, {"error": type(error).__name__, "message": traceback.format_exc(),
                              "missing_ranks": list(getattr(error, "failed_ranks", []) or []),
                              "time": time.time(), "started": started})
    else:
        raise SystemExit(f"unknown mode {MODE}")
    os._exit(0)


if __name__ == "__main__":
    main()
