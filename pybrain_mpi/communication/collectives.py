"""Collective operations on torch tensors and numpy arrays.

Each call is executed by the native engine (csrc/collectives/engine.cpp): in submission
order on every rank, on the background progress thread for ``*_async_`` calls, with the
GIL released. Every wait is bounded by a timeout, and calling the same collective with a
different shape, dtype or op on some rank raises :class:`CollectiveMismatch` on all ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CollectiveTimeout
from . import context
from .buffers import INT32, INT64, Buffer, as_buffer

__all__ = ["allreduce", "allreduce_", "allreduce_async_", "broadcast_", "broadcast_async_",
           "barrier", "Handle", "OPS", "ALGORITHMS"]

OPS = {"sum": 0, "avg": 1, "min": 2, "max": 3}
ALGORITHMS = {"ring": 0, "mpi": 1, "shm": 2, "hierarchical": 3, "auto": 4}
_HIERARCHICAL = 3
_AUTO = 4
_ITEMSIZE = {0: 4, 1: 8, 2: 2, 3: 2, 4: 4, 5: 8}  # by buffers.py dtype code


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
        self._cast_back_into: Any = None  # Cast compression: the caller's full-precision tensor

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
        target = self._cast_back_into
        if target is not None:  # a Cast-compressed allreduce: widen into the caller's tensor
            if isinstance(target, np.ndarray):
                target[...] = self._result
            else:
                target.detach().copy_(self._result)
            self._result = target
        self._finished = True
        return self._result

    @property
    def finite(self) -> bool | None:
        """For an allreduce started with ``check_finite=True``, once finished: whether every
        element of the result is finite (the same on every rank). None otherwise."""
        if not self.done():
            return None
        code = self._operation.finite()
        return None if code < 0 else bool(code)

    def __repr__(self) -> str:
        state = "done" if self.done() else self._operation.phase()
        return f"<pybrain_mpi.Handle {self._operation.describe()}: {state}>"


def _threelc_args(compression: Any, state: Any, buffer: Buffer, name: str | None,
                  algorithm: int) -> tuple:
    """(sparsity, residual address, owner residual address) for a 3LC allreduce."""
    from ..compression.codecs import ThreeLCState

    label = f"tensor '{name}'" if name else "tensor"
    if not isinstance(state, ThreeLCState):
        raise TypeError(f"{label}: a ThreeLC allreduce needs state=codec.new_state(tensor), kept "
                        "across steps (it holds the error-feedback residuals)")
    if state.count != buffer.count:
        raise ValueError(f"{label} has {buffer.count} elements but its ThreeLC state was made for "
                         f"{state.count}; keep one state per tensor")
    ctx = context.current()
    state.steps += 1
    if algorithm != _AUTO:
        nbytes = buffer.count * _ITEMSIZE[buffer.dtype_code]
        if ctx.engine.resolve_algorithm(algorithm, nbytes) == _HIERARCHICAL:
            # 3LC on the inter-node stage only: residuals cover the slices this rank owns.
            first, second = ctx.engine.threelc_state_sizes(buffer.count, buffer.dtype_code)
            residual, owner = state.hierarchical_residuals_for(first, second)
            return compression.sparsity, residual.ctypes.data, owner.ctypes.data
    owner = state.owner_residual_for(ctx.size, ctx.rank)
    return compression.sparsity, state.residual.ctypes.data, owner.ctypes.data


def _allreduce(buffer: Buffer, op: str, algorithm: str, name: str | None, async_op: bool,
               timeout_s: float | None, compression: Any = None, state: Any = None,
               half_wire: bool = False, check_finite: bool = False) -> Any:
    ctx = context.current()
    op_code = _op_code(op, buffer, name)
    algorithm_code = _algorithm_code(algorithm)
    timeout = ctx.timeout_s if timeout_s is None else float(timeout_s)
    if compression is not None:
        sparsity, residual, owner = _threelc_args(compression, state, buffer, name, algorithm_code)
        return ctx.engine.allreduce(buffer.address, buffer.count, buffer.dtype_code, op_code,
                                    algorithm_code, name or "", async_op, timeout, sparsity,
                                    residual, owner, False, check_finite)
    # positional arguments: pybind11 parses keywords noticeably slower on this hot path
    return ctx.engine.allreduce(buffer.address, buffer.count, buffer.dtype_code, op_code,
                                algorithm_code, name or "", async_op, timeout, 0.0, 0, 0, half_wire,
                                check_finite)


def _split_compression(compression: Any) -> tuple[Any, Any]:
    """(3LC codec or None, cast dtype or None) for a ``compression=`` argument."""
    if compression is None:
        return None, None
    from ..compression.codecs import Cast, NoCompression, ThreeLC

    if isinstance(compression, NoCompression):
        return None, None
    if isinstance(compression, ThreeLC):
        return compression, None
    if isinstance(compression, Cast):
        return None, compression.dtype
    raise TypeError(f"compression must be ThreeLC, Cast or NoCompression, got {type(compression).__name__}")


def _cast_copy(x: Any, wire: str) -> Any:
    """A 16-bit copy of x for a Cast-compressed allreduce (16-bit sums accumulate in float32)."""
    if isinstance(x, np.ndarray):
        if wire != "fp16":
            raise TypeError("numpy arrays can be cast to fp16 only (numpy has no bfloat16); use a torch tensor")
        return x.astype(np.float16)
    import torch

    return x.detach().to(torch.bfloat16 if wire == "bf16" else torch.float16)


def allreduce_(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
               timeout_s: float | None = None, compression: Any = None, state: Any = None) -> Any:
    """Reduces ``x`` across all ranks in place and returns it.

    Args:
        x: torch CPU tensor or numpy array (float32/64, float16, bfloat16, int32/64);
            contiguous or not. 16-bit floats accumulate in float32.
        op: ``"sum"``, ``"avg"`` (floating types), ``"min"`` or ``"max"``.
        algorithm: ``"ring"`` (pybrain-mpi's pipelined ring), ``"mpi"`` (MPI_Allreduce),
            ``"shm"`` (all ranks on one node: reduce-scatter and allgather through MPI
            shared memory; zero-copy for tensors from :func:`pybrain_mpi.shared_empty`),
            ``"hierarchical"`` (shared-memory node stage, then a ring between nodes for each
            node slice, then a shared-memory allgather; it is ``"shm"`` on one node and
            ``"ring"`` with one rank per node), or ``"auto"``: ``"ring"`` below
            ``PBM_SHM_MIN_BYTES`` (default 64 KiB; such messages travel inside the join
            message) or with one rank per node, else ``"shm"`` on one node and
            ``"hierarchical"`` on several.
        name: tensor name used in error messages.
        timeout_s: raise :class:`CollectiveTimeout` after this long (default PBM_TIMEOUT_S).
        compression: ``None``; ``pbm.compression.Cast("bf16"|"fp16")`` (values travel and
            are summed as 16-bit, accumulating in float32); or
            ``pbm.compression.ThreeLC(sparsity)`` with ``state=codec.new_state(x)`` kept
            across steps: the two-stage compressed allreduce with error feedback
            (op "sum"/"avg", float32/bfloat16/float16); the owner of each partition adds
            its own share exactly (only what crosses a wire is quantized). With ``"hierarchical"`` on several
            nodes 3LC compresses only the inter-node stage (the node stage is exact) and the
            state holds residuals for the slices this rank owns; with ``"shm"`` (one node)
            nothing is compressed; ``"auto"`` runs the flat compressed allreduce.
    """
    threelc, wire = _split_compression(compression)
    if wire is not None:
        low = _cast_copy(x, wire)
        _allreduce(as_buffer(low, name), op, algorithm, name, False, timeout_s, half_wire=True)
        if isinstance(x, np.ndarray):
            x[...] = low
        else:
            x.detach().copy_(low)
        return x
    buffer = as_buffer(x, name)
    _allreduce(buffer, op, algorithm, name, False, timeout_s, threelc, state)
    return buffer.finish()


def allreduce(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
              timeout_s: float | None = None, compression: Any = None, state: Any = None) -> Any:
    """Like :func:`allreduce_` but returns a new tensor/array and leaves ``x`` unchanged."""
    buffer = as_buffer(x, name, copy=True)
    return allreduce_(buffer.work, op, algorithm, name=name, timeout_s=timeout_s,
                      compression=compression, state=state)


def allreduce_async_(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
                     compression: Any = None, state: Any = None,
                     check_finite: bool = False) -> Handle:
    """Starts an in-place allreduce on the progress thread and returns its :class:`Handle`.

    Takes the arguments of :func:`allreduce_`. Do not read or write ``x`` until
    ``handle.wait()`` returns.

    ``check_finite=True`` makes ``handle.finite`` tell, after ``wait()``, whether every
    element of the result is finite (the same answer on every rank), so an optimizer can skip
    its own Inf/NaN pass. The zero-copy shared-memory path (``algorithm="shm"``/``"auto"`` on
    a buffer from :func:`pbm.shared_empty`, float32/float64) checks inside its reduce pass at no
    extra memory traffic; every other path reads the result once more.
    """
    threelc, wire = _split_compression(compression)
    if wire is not None:
        low = _cast_copy(x, wire)
        low_buffer = as_buffer(low, name)
        handle = Handle(_allreduce(low_buffer, op, algorithm, name, True, None, half_wire=True,
                                   check_finite=check_finite), low_buffer)
        handle._cast_back_into = x
        return handle
    buffer = as_buffer(x, name)
    operation = _allreduce(buffer, op, algorithm, name, True, None, threelc, state,
                           check_finite=check_finite)
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
