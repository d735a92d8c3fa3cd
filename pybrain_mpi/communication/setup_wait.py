"""Bounded waits for the set-up steps that run before (or beside) an engine.

:func:`pybrain_mpi.init` and the constructors of :class:`pybrain_mpi.parallel.Group` and
:class:`pybrain_mpi.parallel.PointToPoint` exchange a few integers over an mpi4py
communicator and create communicators (``Split``, ``Split_type``, the engine's own ``Dup``).
Those are blocking MPI collectives: with a rank that never calls ``init`` (or stops before it),
the others would wait with no message for as long as it stays away. Before any of them, the
ranks here meet in a *rendezvous* bounded by the deadline: every rank sends its value to every
other rank with non-blocking point-to-point messages and polls for theirs until
``PBM_TIMEOUT_S``; a rank whose message has not arrived by then is named (as a world rank) in a
:class:`~pybrain_mpi.CollectiveTimeout` on every rank that waited for it. Once every rank has
arrived, the blocking set-up collectives that follow only wait for ranks that are known to be
there.

Point-to-point messages (rather than ``Iallgather``) are what tell *which* ranks are missing.
They use the tag :data:`SETUP_TAG` on the caller's communicator; a program that uses the same
tag on that communicator for its own messages while pybrain-mpi sets up could take them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..errors import CollectiveTimeout

__all__ = ["SETUP_TAG", "bounded_allgather_ints", "node_leader", "world_ranks_of"]

# Tag of the rendezvous messages ("PB" = 0x5042): within the 32767 every MPI library allows.
SETUP_TAG = 0x5042


def world_ranks_of(comm: Any, ranks: list[int]) -> list[int]:
    """``comm``'s ranks ``ranks`` as ranks of ``MPI.COMM_WORLD`` (local; no communication)."""
    from mpi4py import MPI

    if comm == MPI.COMM_WORLD or not ranks:
        return list(ranks)
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return [int(r) for r in MPI.Group.Translate_ranks(group, list(ranks), world)]
    finally:
        group.Free()
        world.Free()


def node_leader(local_comm: Any, comm: Any) -> int:
    """The lowest rank of ``comm`` in ``local_comm`` (a sub-communicator of it, e.g. the ranks
    sharing a node): computed from the groups, so no message and no wait."""
    from mpi4py import MPI

    local_group, group = local_comm.Get_group(), comm.Get_group()
    try:
        ranks = MPI.Group.Translate_ranks(local_group, list(range(local_comm.Get_size())), group)
    finally:
        local_group.Free()
        group.Free()
    return int(min(ranks))


def bounded_allgather_ints(comm: Any, values: list[int], *, timeout_s: float, what: str) -> list[list[int]]:
    """Every rank's ``values`` (the same number of integers on every rank), in rank order.

    A collective over ``comm`` made of non-blocking point-to-point messages, so its wait is
    bounded: after ``timeout_s`` it raises :class:`~pybrain_mpi.CollectiveTimeout` whose
    ``missing_ranks`` (world ranks) are the ranks whose values have not arrived, in a message
    that says ``what`` was being set up. The pending requests are cancelled first.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = np.asarray(values, dtype=np.int64)
    if size == 1:
        return [mine.tolist()]
    peers = [p for p in range(size) if p != rank]
    inbox = {p: np.empty(mine.size, dtype=np.int64) for p in peers}
    receives = {p: comm.Irecv(inbox[p], source=p, tag=SETUP_TAG) for p in peers}
    sends = [comm.Isend(mine, dest=p, tag=SETUP_TAG) for p in peers]
    deadline = time.monotonic() + timeout_s
    pending = set(peers)
    pause = 20e-6
    while True:
        for peer in list(pending):
            if receives[peer].Test():
                pending.discard(peer)
        # Our sends complete once each peer has taken them (every peer that sent to us has
        # posted its receive from us too, at the same time).
        if not pending and all(request.Test() for request in sends):
            break
        if time.monotonic() > deadline:
            _give_up([receives[p] for p in pending] + sends)
            missing_local = sorted(pending)
            if not missing_local:  # every value arrived but a peer never took ours
                missing_local = peers
            missing = world_ranks_of(comm, missing_local)
            me = world_ranks_of(comm, [rank])[0]
            error = CollectiveTimeout(
                f"rank {me}: {what}: rank{'s' if len(missing) != 1 else ''} "
                f"{', '.join(map(str, missing))} did not arrive within {timeout_s:g} s "
                f"(PBM_TIMEOUT_S); every rank must make this call (is one stopped, stuck or "
                f"on another code path?)", missing)
            raise error
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
    return [mine.tolist() if p == rank else inbox[p].tolist() for p in range(size)]


def _give_up(requests: list) -> None:
    """Cancels unfinished requests so nothing writes into freed buffers later."""
    for request in requests:
        try:
            if not request.Test():
                request.Cancel()
                request.Free()
        except Exception:  # noqa: BLE001 - MPICH may refuse to cancel a matched send; nothing to do
            pass
