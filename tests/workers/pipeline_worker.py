"""A pipeline stage stopped (SIGSTOP) or killed (SIGKILL) in the middle of a step
(tests/test_pipeline.py). Cannot run inside a pytest suite under mpiexec: its ranks agree on
every outcome through a collective. Every other pipeline check is tests/mpi/mpi_pipeline.py.

Usage: pipeline_worker.py stop|kill STAGE SCHEDULE. The warm-up steps run under the launch's
PBM_TIMEOUT_S; the step in which a stage halts under a deadline of TIMEOUT_S.
"""

from __future__ import annotations

import os
import signal
import time

import torch

import pybrain_mpi as pbm
from harness import run_worker

TIMEOUT_S = 4.0
GRACE_S = 2.0  # half the timeout: how long a timed-out rank collects the others' notices


def _pipeline(schedule: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(2 * pbm.size())])
    return model, pbm.parallel.Pipeline(model, balance=[2] * pbm.size(), micro_batches=4, schedule=schedule)


def _halt_on_micro_batch(pipe, micro: int, how: int) -> None:
    """A forward hook on the stage's first layer that stops/kills this process at `micro`."""
    calls = {"n": 0}

    def hook(module, inputs):
        calls["n"] += 1
        if calls["n"] == micro + 1:
            print(f"rank {pbm.rank()} halts itself ({signal.Signals(how).name}) in micro-batch {micro}", flush=True)
            os.kill(os.getpid(), how)

    pipe.stage_module[0].register_forward_pre_hook(hook)


def mode_stop(comm, stage: str, schedule: str) -> None:
    """Stage STAGE stops itself in the forward of micro-batch 2 of the third step: every other
    rank's wait ends in CollectiveTimeout naming exactly it, even ranks that wait for a
    neighbour that is itself waiting for it. Then it is resumed and nobody hangs."""
    target, r = int(stage), comm.Get_rank()
    pids = comm.allgather(os.getpid())
    others = comm.Split(color=int(r == target), key=r)
    _, pipe = _pipeline(schedule)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    for _ in range(2):
        pipe.step(x, y)
    pipe.channel.timeout_s = TIMEOUT_S  # the warm-up steps ran under the launch's PBM_TIMEOUT_S
    if r == target:
        _halt_on_micro_batch(pipe, 2, signal.SIGSTOP)
    started = time.monotonic()
    try:
        pipe.step(x, y)
    except pbm.CollectiveTimeout as error:
        waited = time.monotonic() - started
        message = str(error)
        if r != target:
            assert error.missing_ranks == [target], (error.missing_ranks, message)
            assert f"waiting for rank {target}" in message and f"rank {r}:" in message, message
            assert waited < TIMEOUT_S + GRACE_S + 10, f"the timeout took {waited:.1f} s"
            print(f"rank {r} timed out after {waited:.1f} s: {message}", flush=True)
        else:
            print(f"rank {r} (resumed) timed out: {message}", flush=True)
    else:
        if r != target:
            raise AssertionError(f"rank {r}: no CollectiveTimeout although rank {target} was stopped")
        print(f"rank {r} (resumed) finished its step", flush=True)
    if r != target:
        others.Barrier()  # every other rank has timed out: resume the stopped one
        if others.Get_rank() == 0:
            os.kill(pids[target], signal.SIGCONT)
    comm.Barrier()


def mode_kill(comm, stage: str, schedule: str) -> None:
    """Stage STAGE kills itself mid-step: the launcher ends the job (nobody hangs)."""
    target, r = int(stage), comm.Get_rank()
    _, pipe = _pipeline(schedule)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    pipe.step(x, y)
    pipe.channel.timeout_s = TIMEOUT_S
    if r == target:
        _halt_on_micro_batch(pipe, 2, signal.SIGKILL)
    try:
        pipe.step(x, y)
    except pbm.CollectiveTimeout as error:
        print(f"rank {r} timed out: {error}", flush=True)
        assert error.missing_ranks == [target], (error.missing_ranks, str(error))
        raise SystemExit(3)
    raise AssertionError(f"rank {r}: the step finished although rank {target} was killed")


if __name__ == "__main__":
    run_worker(globals())
