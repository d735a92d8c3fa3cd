"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary.

Slurm sends SIGUSR1 before a job's time limit (``--signal``) and SIGTERM when it preempts or
cancels a job; either may reach only some ranks. The handler only sets a flag; the trainer
adds the flag to the small allreduce it runs every step anyway, so all ranks see "someone was
asked to stop" after the same step, write one checkpoint together and exit 0.

MPICH's ``mpiexec -disable-auto-cleanup`` also sends SIGUSR1: to the surviving ranks, when a
rank's process has ended. That one is not a preemption request (a checkpoint needs every
rank). The two are told apart by looking at the peers: :meth:`StopRequest.watch_peers` records
every rank's process (host, pid, start time); a SIGUSR1 that arrives while a peer process on
this host has ended is MPICH's failure notice. The handler then records the lost ranks instead
of a stop request, and :meth:`StopRequest.check_peers` (called by the trainer at each step
boundary) raises :class:`~pybrain_mpi.PeerFailure` naming them. (A failed peer on another
host cannot be seen from here: that rank's SIGUSR1 counts as a stop request, and the step's
allreduce then fails naming the lost rank, within ``PBM_TIMEOUT_S``.)
"""

from __future__ import annotations

import os
import signal
import socket
import sys

__all__ = ["StopRequest", "PREEMPTION_SIGNALS", "process_identity", "process_ended"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _start_ticks(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks)`` of process ``pid`` from /proc, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name in (...) may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def process_identity() -> tuple[str, int, int]:
    """``(host name, pid, start time)`` of this process: what :func:`process_ended` checks."""
    found = _start_ticks(os.getpid())
    return socket.gethostname(), os.getpid(), found[1] if found else -1


def process_ended(identity: tuple[str, int, int]) -> bool:
    """Whether the process of ``identity`` (from :func:`process_identity`, same host) has
    ended: gone, a zombie, or its pid reused by a process started later."""
    _, pid, start = identity
    found = _start_ticks(pid)
    if found is None:
        return True
    state, ticks = found
    return state in ("Z", "X", "x") or (start >= 0 and ticks != start)


class StopRequest:
    """Installs handlers for :data:`PREEMPTION_SIGNALS` that record the request.

    Use as a context manager; the previous handlers come back on exit. ``requested`` is the
    signal number received first (0: none); ``lost_ranks`` the ranks whose end MPICH
    announced with SIGUSR1 (see the module's docstring).
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.requested = 0
        self.lost_ranks: list[int] = []
        self._peers: list[tuple[int, tuple[str, int, int]]] = []
        self._previous: dict[int, object] = {}

    def watch_peers(self, identities: list[tuple[str, int, int]]) -> None:
        """Records every rank's :func:`process_identity` (index = rank), so a SIGUSR1 sent
        because a peer process on this host ended is recognised as MPICH's failure notice."""
        host = socket.gethostname()
        self._peers = [(r, ident) for r, ident in enumerate(identities)
                       if r != self.rank and ident[0] == host]

    def _ended_peers(self) -> list[int]:
        return [r for r, ident in self._peers if process_ended(ident)]

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGUSR1 and self._peers:
            lost = self._ended_peers()
            if lost:
                self.lost_ranks = sorted(set(self.lost_ranks) | set(lost))
                sys.stderr.write(
                    f"pybrain-mpi: rank {self.rank} received SIGUSR1 while the process of rank"
                    f"{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} has ended: "
                    "MPICH's notice of a failed rank (mpiexec -disable-auto-cleanup), not a "
                    "preemption request\n")
                sys.stderr.flush()
                return
        if not self.requested:
            self.requested = signum
            sys.stderr.write(f"pybrain-mpi: rank {self.rank} received "
                             f"{signal.Signals(signum).name}; checkpointing at the next step\n")
            sys.stderr.flush()

    def check_peers(self) -> None:
        """Raises :class:`~pybrain_mpi.PeerFailure` naming the lost ranks once MPICH's
        failure notice was received: training cannot continue, nor checkpoint together."""
        if self.lost_ranks:
            from ..errors import PeerFailure

            ranks = ", ".join(map(str, self.lost_ranks))
            raise PeerFailure(
                f"rank {self.rank}: the process of rank{'s' if len(self.lost_ranks) > 1 else ''} "
                f"{ranks} ended (MPICH's SIGUSR1 notice under mpiexec -disable-auto-cleanup); "
                "stopping without a checkpoint: the last one written stays valid, resume from it "
                "with --resume", self.lost_ranks)

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
