"""Collective operations on torch tensors and numpy arrays.

Each call is executed by the native engine (csrc/collectives/engine.cpp): in submission
order on every rank, on the background progress thread for ``*_async_`` calls, with the
GIL released. Every wait is bounded by a timeout, and calling the same collective with a
different shape, dtype or op on some rank raises :class:`CollectiveMismatch` on all ranks.
"""

from __future__ import annotations

from typing import Any

from ..errors import CollectiveTimeout
from . import context
from .buffers import INT32, INT64, Buffer, as_buffer

__all__ = ["allreduce", "allreduce_", "allreduce_async_", "broadcast_", "broadcast_async_",
           "barrier", "Handle", "OPS", "ALGORITHMS"]

OPS = {"sum": 0, "avg": 1, "min": 2, "max": 3}
ALGORITHMS = {"ring": 0, "mpi": 1}


def _op_code(op: str, buffer: Buffer, name: str | None) -> int:
    code = OPS.get(op)
    if code is None:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(OPS)}")
    if code == 1 and buffer.dtype_code in (INT32, INT64):
        label = f"tensor '{name}'" if name else "tensor"
        raise TypeError(f"{label}: op='avg' needs a floating-point dtype; use op='sum' for integers")
    return code


def _algorithm_code(algorithm: str) -> int:
    code = ALGORITHMS.get(algorithm)
    if code is None:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    return code


def _root(root: int, name: str | None) -> int:
    world = context.size()
    if not 0 <= int(root) < world:
        label = f"tensor '{name}'" if name else "broadcast"
        raise ValueError(f"{label}: root {root} is not a rank of a world of size {world}")
    return int(root)


def _timeout(timeout_s: float | None) -> float:
    return context.current().timeout_s if timeout_s is None else float(timeout_s)


class Handle:
    """A collective running in the background, returned by the ``*_async_`` functions.

    Keeps the tensor (and any temporary copy) alive until the collective is done.
    """

    def __init__(self, operation: Any, buffer: Buffer):
        self._operation = operation
        self._buffer = buffer
        self._result: Any = None
        self._finished = False

    def done(self) -> bool:
        """True once the collective has finished (successfully or not); never blocks."""
        return self._finished or self._operation.done()

    def wait(self, timeout_s: float | None = None) -> Any:
        """Waits for the collective and returns its result (the tensor/array, updated).

        Raises :class:`CollectiveTimeout` after ``timeout_s`` (default: the engine's
        ``PBM_TIMEOUT_S``), naming the ranks that have not joined, or the collective's own
        error (e.g. :class:`CollectiveMismatch`).
        """
        if self._finished:
            return self._result
        limit = _timeout(timeout_s)
        if not self._operation.wait(limit):
            waiting = self._operation.waiting_for()
            missing = ", ".join(map(str, waiting)) if waiting else "unknown"
            raise CollectiveTimeout(
                f"rank {context.rank()}: {self._operation.describe()} did not complete within "
                f"{limit:g} s ({self._operation.phase()}); ranks that have not joined: {missing}",
                waiting,
            )
        self._operation.check()
        self._result = self._buffer.finish()
        self._finished = True
        return self._result

    def __repr__(self) -> str:
        state = "done" if self.done() else self._operation.phase()
        return f"<pybrain_mpi.Handle {self._operation.describe()}: {state}>"


def _allreduce(buffer: Buffer, op: str, algorithm: str, name: str | None, async_op: bool,
               timeout_s: float | None) -> Any:
    ctx = context.current()
    return ctx.engine.allreduce(buffer.address, buffer.count, buffer.dtype_code,
                                _op_code(op, buffer, name), _algorithm_code(algorithm), name or "",
                                async_op, ctx.timeout_s if timeout_s is None else float(timeout_s))


def allreduce_(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
               timeout_s: float | None = None) -> Any:
    """Reduces ``x`` across all ranks in place and returns it.

    Args:
        x: torch CPU tensor or numpy array (float32/64, float16, bfloat16, int32/64);
            contiguous or not. 16-bit floats accumulate in float32.
        op: ``"sum"``, ``"avg"`` (floating types), ``"min"`` or ``"max"``.
        algorithm: ``"ring"`` (pybrain-mpi's pipelined ring) or ``"mpi"`` (MPI_Allreduce).
        name: tensor name used in error messages.
        timeout_s: raise :class:`CollectiveTimeout` after this long (default PBM_TIMEOUT_S).
    """
    buffer = as_buffer(x, name)
    _allreduce(buffer, op, algorithm, name, False, timeout_s)
    return buffer.finish()


def allreduce(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
              timeout_s: float | None = None) -> Any:
    """Like :func:`allreduce_` but returns a new tensor/array and leaves ``x`` unchanged."""
    buffer = as_buffer(x, name, copy=True)
    _allreduce(buffer, op, algorithm, name, False, timeout_s)
    return buffer.work


def allreduce_async_(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None) -> Handle:
    """Starts an in-place allreduce on the progress thread and returns its :class:`Handle`.

    Do not read or write ``x`` until ``handle.wait()`` returns.
    """
    buffer = as_buffer(x, name)
    operation = _allreduce(buffer, op, algorithm, name, True, None)
    return Handle(operation, buffer)


def broadcast_(x: Any, root: int = 0, *, name: str | None = None, timeout_s: float | None = None) -> Any:
    """Overwrites ``x`` on every rank with its value on ``root``; returns ``x``."""
    buffer = as_buffer(x, name)
    context.current().engine.broadcast(buffer.address, buffer.count, buffer.dtype_code, _root(root, name),
                                       name or "", False, _timeout(timeout_s))
    return buffer.finish()


def broadcast_async_(x: Any, root: int = 0, *, name: str | None = None) -> Handle:
    """Starts :func:`broadcast_` on the progress thread and returns its :class:`Handle`."""
    buffer = as_buffer(x, name)
    operation = context.current().engine.broadcast(buffer.address, buffer.count, buffer.dtype_code,
                                                   _root(root, name), name or "", True, 0.0)
    return Handle(operation, buffer)


def barrier(timeout_s: float | None = None) -> None:
    """Returns once every rank has called it; raises :class:`CollectiveTimeout` naming the
    ranks that did not arrive within ``timeout_s``."""
    context.current().engine.barrier(_timeout(timeout_s))
