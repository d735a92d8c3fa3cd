"""Small Python objects exchanged between ranks with bounded waits.

Data preparation (converting a cohort on every rank, agreeing on what failed, gathering each
rank's peak memory) needs an allgather of small Python values. mpi4py's object collectives
wait forever for a rank that never arrives; these go through pybrain-mpi's own allreduce,
which has a deadline and names the ranks that did not join (:class:`CollectiveTimeout`).

An object allgather as two allreduces: the pickled sizes (one int64 per rank, each rank
filling its own slot), then a ``(ranks, width)`` int64 matrix in which each rank fills its own
row with its bytes and leaves the others zero, so the sum is every rank's bytes exactly. The
matrix is ``ranks x largest payload`` bytes: meant for messages, not data.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

__all__ = ["allgather_objects", "world"]


def world() -> tuple[int, int]:
    """``(rank, size)`` of the initialized pybrain-mpi world, else ``(0, 1)``."""
    from ..communication import context

    if context.is_initialized():
        return context.rank(), context.size()
    return 0, 1


def allgather_objects(value: Any, *, name: str, timeout_s: float | None = None) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank.

    ``name`` says what is exchanged in a timeout's message; ``timeout_s`` bounds each wait
    (default ``PBM_TIMEOUT_S``). A single process (or an uninitialized world) gets
    ``[value]`` without any communication.
    """
    rank, size = world()
    if size == 1:
        return [value]
    from ..communication.collectives import allreduce_

    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    lengths = np.zeros(size, dtype=np.int64)
    lengths[rank] = len(payload)
    allreduce_(lengths, op="sum", name=f"{name} (sizes)", timeout_s=timeout_s)
    width = max(1, -(-int(lengths.max()) // 8))
    rows = np.zeros((size, width), dtype=np.int64)
    rows[rank].view(np.uint8)[:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    allreduce_(rows, op="sum", name=name, timeout_s=timeout_s)
    return [pickle.loads(rows[r].view(np.uint8)[:int(lengths[r])].tobytes()) for r in range(size)]
