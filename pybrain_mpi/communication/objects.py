"""Small Python objects exchanged between ranks, every wait bounded by the engine's deadline.

mpi4py's object collectives (``comm.gather``, ``comm.allgather``, ``comm.bcast``,
``comm.barrier``) wait forever for a rank that never arrives: a rank stopped (SIGSTOP) or
stuck in I/O freezes the others with no message. The helpers here carry pickled values
through pybrain-mpi's own collectives (:func:`~pybrain_mpi.allreduce_`,
:func:`~pybrain_mpi.broadcast_`), which run on the native engine with a deadline
(``PBM_TIMEOUT_S`` unless ``timeout_s`` says otherwise) and raise
:class:`~pybrain_mpi.CollectiveTimeout` naming the ranks that did not join, in a message
that says what was being exchanged (``name``).

Every rank must call the same helper with the same ``name`` and ``root``, in the same order
as its other collectives (they are collectives). Payloads travel as int64 words, so any
picklable value works; they are meant for messages, RNG states, residuals and metadata, not
bulk data. Only ever unpickle what your own ranks sent (these are not for untrusted peers).

- :func:`allgather_objects` -- every rank's value on every rank (two allreduces).
- :func:`gather_objects` -- every rank's value on ``root`` (one broadcast per rank that has
  something to send; the others get ``None``).
- :func:`broadcast_object` -- ``root``'s value on every rank (two broadcasts).
- :func:`barrier` -- :func:`pybrain_mpi.barrier` under a name.

In a single process (or before :func:`pybrain_mpi.init`) they return at once without
communicating. They are public so that every layer (the trainer, the consistency checks, the
Horovod shim's ``broadcast_object``/``allgather_object``) can leave mpi4py's unbounded object
collectives behind.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

__all__ = ["allgather_objects", "gather_objects", "broadcast_object", "barrier", "world"]


def world() -> tuple[int, int]:
    """``(rank, size)`` of the initialized pybrain-mpi world, else ``(0, 1)``."""
    from . import context

    if context.is_initialized():
        return context.rank(), context.size()
    return 0, 1


def _words(payload: bytes) -> np.ndarray:
    """``payload`` in int64 words (zero-padded), the dtype every engine path takes."""
    words = np.zeros(max(1, -(-len(payload) // 8)), dtype=np.int64)
    words.view(np.uint8)[:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    return words


def _check_root(root: int, size: int, name: str) -> int:
    if not 0 <= int(root) < size:
        raise ValueError(f"{name}: root {root} is not a rank of a world of size {size}")
    return int(root)


def allgather_objects(value: Any, *, name: str, timeout_s: float | None = None,
                      group: Any = None) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank.

    ``name`` says what is exchanged in a timeout's message; ``timeout_s`` bounds each wait
    (default ``PBM_TIMEOUT_S``); ``group`` (a :class:`pybrain_mpi.parallel.Group`): among its
    ranks only, in group-rank order. Two allreduces: the pickled sizes (each rank fills its
    own slot), then a ``(ranks, width)`` int64 matrix in which each rank fills its own row
    and leaves the others zero, so the sum is every rank's bytes exactly.
    """
    rank, size = world() if group is None else (group.rank, group.size)
    if size == 1:
        return [value]
    from .collectives import allreduce_

    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    lengths = np.zeros(size, dtype=np.int64)
    lengths[rank] = len(payload)
    allreduce_(lengths, op="sum", name=f"{name} (sizes)", timeout_s=timeout_s, group=group)
    width = max(1, -(-int(lengths.max()) // 8))
    rows = np.zeros((size, width), dtype=np.int64)
    rows[rank].view(np.uint8)[:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    allreduce_(rows, op="sum", name=name, timeout_s=timeout_s, group=group)
    return [pickle.loads(rows[r].view(np.uint8)[:int(lengths[r])].tobytes()) for r in range(size)]


def gather_objects(value: Any, root: int = 0, *, name: str,
                   timeout_s: float | None = None) -> list | None:
    """Every rank's ``value`` (picklable), in rank order, on ``root``; ``None`` elsewhere.

    Unlike :func:`allgather_objects`, no rank holds more than one other rank's payload at a
    time: after an allreduce of the sizes, each rank's bytes travel in a broadcast of their
    own (rooted at that rank; ranks other than ``root`` drop them). Meant for per-rank state
    that only one rank writes (RNG states, 3LC residuals, timeline events in a checkpoint).
    Each wait is bounded by ``timeout_s`` (default ``PBM_TIMEOUT_S``) and a timeout names
    the ranks that did not join and ``name``.
    """
    rank, size = world()
    root = _check_root(root, size, name)
    if size == 1:
        return [value]
    from .collectives import allreduce_, broadcast_

    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    lengths = np.zeros(size, dtype=np.int64)
    lengths[rank] = len(payload)
    allreduce_(lengths, op="sum", name=f"{name} (sizes)", timeout_s=timeout_s)
    gathered: list = [None] * size
    for sender in range(size):
        if sender == root:
            gathered[sender] = value if rank == root else None
            continue
        words = _words(payload) if rank == sender else \
            np.zeros(max(1, -(-int(lengths[sender]) // 8)), dtype=np.int64)
        broadcast_(words, root=sender, name=f"{name} (rank {sender})", timeout_s=timeout_s)
        if rank == root:
            gathered[sender] = pickle.loads(words.view(np.uint8)[:int(lengths[sender])].tobytes())
    return gathered if rank == root else None


def broadcast_object(value: Any, root: int = 0, *, name: str, timeout_s: float | None = None) -> Any:
    """``root``'s ``value`` (picklable) on every rank (the others' ``value`` is ignored).

    Two broadcasts (the size, then the bytes), each bounded by ``timeout_s`` (default
    ``PBM_TIMEOUT_S``); a timeout names the ranks that did not join and ``name``.
    """
    rank, size = world()
    root = _check_root(root, size, name)
    if size == 1:
        return value
    from .collectives import broadcast_

    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL) if rank == root else b""
    length = np.array([len(payload)], dtype=np.int64)
    broadcast_(length, root=root, name=f"{name} (size)", timeout_s=timeout_s)
    words = _words(payload) if rank == root else \
        np.zeros(max(1, -(-int(length[0]) // 8)), dtype=np.int64)
    broadcast_(words, root=root, name=name, timeout_s=timeout_s)
    if rank == root:
        return value
    return pickle.loads(words.view(np.uint8)[:int(length[0])].tobytes())


def barrier(*, name: str = "barrier", timeout_s: float | None = None) -> None:
    """Returns once every rank has called it; a :class:`~pybrain_mpi.CollectiveTimeout`
    after ``timeout_s`` (default ``PBM_TIMEOUT_S``) names the ranks that did not arrive and
    says what the barrier was for (``name``)."""
    rank, size = world()
    if size == 1:
        return
    from ..errors import CollectiveTimeout
    from .collectives import barrier as engine_barrier

    try:
        engine_barrier(timeout_s)
    except CollectiveTimeout as error:
        raise CollectiveTimeout(f"{name}: {error}", error.missing_ranks) from None
