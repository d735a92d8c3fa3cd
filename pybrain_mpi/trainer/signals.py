"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary.

Slurm sends SIGUSR1 before a job's time limit (``--signal``) and SIGTERM when it preempts or
cancels a job; either may reach only some ranks. The handler only sets a flag; the trainer
adds the flag to the small allreduce it runs every step anyway, so all ranks see "someone was
asked to stop" after the same step, write one checkpoint together and exit 0.
"""

from __future__ import annotations

import signal
import sys

__all__ = ["StopRequest", "PREEMPTION_SIGNALS"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for :data:`PREEMPTION_SIGNALS` that record the request.

    Use as a context manager; the previous handlers come back on exit. ``requested`` is the
    signal number received first (0: none).
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.requested = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        if not self.requested:
            self.requested = signum
            sys.stderr.write(f"pybrain-mpi: rank {self.rank} received "
                             f"{signal.Signals(signum).name}; checkpointing at the next step\n")
            sys.stderr.flush()

    def __enter__(self) -> "StopRequest":
        if self._previous:
            return self  # already installed (the trainer installs it before its set-up)
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
