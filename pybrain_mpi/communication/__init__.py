"""Communication: process context, topology and collectives over MPI."""

from .collectives import (ALGORITHMS, OPS, Handle, allreduce, allreduce_, allreduce_async_, barrier,
                          broadcast_, broadcast_async_)
from .context import (bytes_sent, comm, cross_rank, cross_size, init, is_initialized, local_rank,
                      local_size, rank, shm_bytes, shutdown, size)
from .objects import allgather_objects, broadcast_object, gather_objects
from .shared import shared_empty, shared_reset

__all__ = [
    "ALGORITHMS", "OPS", "Handle", "allreduce", "allreduce_", "allreduce_async_", "barrier",
    "broadcast_", "broadcast_async_", "bytes_sent", "comm", "cross_rank", "cross_size", "init",
    "is_initialized", "local_rank", "local_size", "rank", "shutdown", "size", "shm_bytes",
    "shared_empty", "shared_reset", "allgather_objects", "gather_objects", "broadcast_object",
]
