"""Collective operations on torch tensors and numpy arrays.

Each call is executed by the native engine (csrc/collectives/engine.cpp), on the background
progress thread for ``*_async_`` calls, with the GIL released. Collectives are matched across
ranks by name (``name=``, or an unnamed call's place among this rank's unnamed calls): ranks
may submit named calls in different orders, and the engine runs each once every rank has
submitted it, in an order all ranks agree on (csrc/collectives/negotiation.h,
docs/negotiation.md). Calls of different names are never paired. Every wait is bounded by a
timeout that names the ranks that have not submitted the call, and calling a collective of
one name with a different shape, dtype or op on some rank raises :class:`CollectiveMismatch`
on all ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Iterator

from ..errors import CollectiveTimeout
from . import context
from ..core.buffers import Buffer, as_buffer, element_count, staged_buffer

__all__ = ["allreduce", "allreduce_", "allreduce_async_", "broadcast_", "broadcast_async_",
           "barrier", "Handle", "OPS", "ALGORITHMS"]

_core: Any = None  # the native core, loaded on first use (importing pybrain_mpi loads nothing)


def _native() -> Any:
    global _core
    if _core is None:
        from ..core.library import _core as core

        _core = core
    return _core


class _EnumNames(Mapping):
    """User strings -> the core's enum members (``"sum"`` -> ``ReduceOp.sum``), read from the
    enum the core exports on first use."""

    def __init__(self, enum: str):
        self._enum = enum
        self._table: dict | None = None

    def table(self) -> dict:
        if self._table is None:
            self._table = dict(getattr(_native(), self._enum).__members__)
        return self._table

    def __getitem__(self, name: str) -> Any:
        return self.table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table())

    def __len__(self) -> int:
        return len(self.table())

    def __repr__(self) -> str:
        return f"<{self._enum} names: {sorted(self.table())}>"


OPS = _EnumNames("ReduceOp")
ALGORITHMS = _EnumNames("Algorithm")


def _op(op: str, buffer: Buffer, name: str | None) -> Any:
    code = OPS.table().get(op)
    if code is None:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(OPS)}")
    if op == "avg" and buffer.dtype.is_integer:
        label = f"tensor '{name}'" if name else "tensor"
        raise TypeError(f"{label}: op='avg' needs a floating-point dtype; use op='sum' for integers")
    return code


def _algorithm(algorithm: str) -> Any:
    code = ALGORITHMS.table().get(algorithm)
    if code is None:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    return code


def _root(root: int, name: str | None, group: Any = None) -> int:
    world = context.size() if group is None else group.size
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


def _compressed_buffer(x: Any, compression: Any, state: Any, name: str | None) -> tuple[Buffer, Any]:
    """(buffer, wire) of an allreduce of ``x`` under ``compression``.

    A codec describes its own wire: ``compression.wire(state, count, name)`` returns what
    the core needs (``_core.Wire``: plain, 16-bit, or 3LC with its sparsity and state) and
    checks the state. A codec whose values travel in a tensor of its own (``Cast``: a 16-bit
    copy; a Horovod-style compressor) also has ``stage(x, name) -> (work, restore)``: the
    allreduce reduces ``work`` and ``restore`` writes the result back into ``x``.
    """
    describe = getattr(compression, "wire", None)
    if describe is None:
        raise TypeError("compression must be ThreeLC, Cast or NoCompression (a codec with wire()), got "
                        f"{type(compression).__name__}")
    wire = describe(state, element_count(x, name), name)
    stage = getattr(compression, "stage", None)
    if stage is None:
        return as_buffer(x, name), wire
    work, restore = stage(x, name)
    return staged_buffer(x, work, restore, name), wire


# Plain allreduces of the same buffer, op, algorithm and name (a training loop's buckets and
# metrics, every step) reuse one validated arguments object: building it costs more than the
# rest of the Python path of a 4 KiB allreduce. The engine copies what it needs at submission,
# so one object can serve calls still in flight.
_PLAIN_ARGS: dict = {}
_PLAIN_ARGS_LIMIT = 512


def _plain_args(buffer: Buffer, op: str, algorithm: str, name: str | None) -> Any:
    key = (buffer.address, buffer.count, buffer.dtype, op, algorithm, name)
    args = _PLAIN_ARGS.get(key)
    if args is None:
        args = _native().AllreduceArgs(buffer.address, buffer.count, buffer.dtype,
                                       _op(op, buffer, name), _algorithm(algorithm), name or "")
        if len(_PLAIN_ARGS) >= _PLAIN_ARGS_LIMIT:
            _PLAIN_ARGS.clear()
        _PLAIN_ARGS[key] = args
    return args


# The same for contiguous CPU torch tensors, keyed by what the tensor says of itself: such a
# tensor is its own buffer (in place, nothing to copy back), so a repeated call skips the
# adapter altogether. A 4 KiB allreduce's Python path is then about a third of what it was.
_TENSOR_ARGS: dict = {}


def _contiguous_tensor_args(x: Any, op: str, algorithm: str, name: str | None) -> Any:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor) or not x.is_cpu or not x.is_contiguous():
        return None
    key = (x.data_ptr(), x.numel(), x.dtype, op, algorithm, name)
    args = _TENSOR_ARGS.get(key)
    if args is None:
        args = _plain_args(as_buffer(x, name), op, algorithm, name)
        if len(_TENSOR_ARGS) >= _PLAIN_ARGS_LIMIT:
            _TENSOR_ARGS.clear()
        _TENSOR_ARGS[key] = args
    return args


def _engine_args(buffer: Buffer, op: str, algorithm: str, name: str | None, wire: Any = None,
                 check_finite: bool = False) -> Any:
    """The core's AllreduceArgs for ``buffer`` (the cached plain form when nothing is added)."""
    if wire is None and not check_finite:
        return _plain_args(buffer, op, algorithm, name)
    args = _native().AllreduceArgs(buffer.address, buffer.count, buffer.dtype,
                                   _op(op, buffer, name), _algorithm(algorithm), name or "")
    if wire is not None:
        args.wire = wire
    if check_finite:
        args.check_finite = True
    return args


def _run(args: Any, group: Any, timeout_s: float | None) -> None:
    """Runs one blocking allreduce on ``group``'s engine (all ranks when None)."""
    ctx = context.current() if group is None else group
    ctx.engine.allreduce(args, ctx.timeout_s if timeout_s is None else float(timeout_s))


def _buffer(x: Any, compression: Any, state: Any, name: str | None) -> tuple[Buffer, Any]:
    if compression is None:
        return as_buffer(x, name), None
    return _compressed_buffer(x, compression, state, name)


def allreduce_(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
               timeout_s: float | None = None, compression: Any = None, state: Any = None,
               group: Any = None) -> Any:
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
            ``"ring"`` with one rank per node), ``"small"`` (all ranks on one node, at most
            64 KiB: every rank writes its input into its own flagged shared-memory slot and
            reduces all slots itself, in rank order; no MPI message), or ``"auto"``:
            ``"small"`` on one node up to ``PBM_SMALL_MAX_BYTES`` (64 KiB), else ``"ring"`` below
            ``PBM_SHM_MIN_BYTES`` (default 64 KiB; such messages travel inside the join
            message) or with one rank per node, else ``"shm"`` on one node and
            ``"hierarchical"`` on several.
        name: what the call is matched by across ranks (and named by in errors): the k-th
            pending call of a name pairs with the k-th on every rank, in whatever order the
            ranks submitted them. Default: the call's place among this rank's unnamed calls,
            so unnamed calls pair in call order.
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
        group: a :class:`pybrain_mpi.parallel.Group` to reduce among its ranks only.
    """
    if compression is None:
        if group is None:  # the common case, without a call more on a microsecond path
            args = _contiguous_tensor_args(x, op, algorithm, name)
            if args is not None:
                ctx = context.current()
                ctx.engine.allreduce(args, ctx.timeout_s if timeout_s is None else float(timeout_s))
                return x
        buffer, wire = as_buffer(x, name), None
    else:
        buffer, wire = _compressed_buffer(x, compression, state, name)
    _run(_engine_args(buffer, op, algorithm, name, wire), group, timeout_s)
    return buffer.finish()


def allreduce(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
              timeout_s: float | None = None, compression: Any = None, state: Any = None) -> Any:
    """Like :func:`allreduce_` but returns a new tensor/array and leaves ``x`` unchanged."""
    buffer = as_buffer(x, name, copy=True)
    return allreduce_(buffer.work, op, algorithm, name=name, timeout_s=timeout_s,
                      compression=compression, state=state)


def allreduce_async_(x: Any, op: str = "sum", algorithm: str = "ring", *, name: str | None = None,
                     compression: Any = None, state: Any = None,
                     check_finite: bool = False, group: Any = None) -> Handle:
    """Starts an in-place allreduce on the progress thread and returns its :class:`Handle`.

    Takes the arguments of :func:`allreduce_`. Do not read or write ``x`` until
    ``handle.wait()`` returns.

    ``check_finite=True`` makes ``handle.finite`` tell, after ``wait()``, whether every
    element of the result is finite (the same answer on every rank), so an optimizer can skip
    its own Inf/NaN pass. The zero-copy shared-memory path (``algorithm="shm"``/``"auto"`` on
    a buffer from :func:`pbm.shared_empty`, float32/float64) checks inside its reduce pass at no
    extra memory traffic; every other path reads the result once more.

    ``group``: a :class:`pybrain_mpi.parallel.Group` (a sub-communicator with its own engine,
    e.g. the data-parallel peers of a pipeline stage) instead of all ranks.
    """
    buffer, wire = _buffer(x, compression, state, name)
    ctx = context.current() if group is None else group
    return Handle(ctx.engine.allreduce_async(_engine_args(buffer, op, algorithm, name, wire, check_finite)),
                  buffer)


def broadcast_(x: Any, root: int = 0, *, name: str | None = None, timeout_s: float | None = None,
               group: Any = None) -> Any:
    """Overwrites ``x`` on every rank with its value on ``root``; returns ``x``.

    ``group``: a :class:`pybrain_mpi.parallel.Group` (``root`` is then a rank of the group)."""
    buffer = as_buffer(x, name)
    ctx = context.current() if group is None else group
    ctx.engine.broadcast(buffer.address, buffer.count, buffer.dtype, _root(root, name, group),
                         name or "", ctx.timeout_s if timeout_s is None else float(timeout_s))
    return buffer.finish()


def broadcast_async_(x: Any, root: int = 0, *, name: str | None = None) -> Handle:
    """Starts :func:`broadcast_` on the progress thread and returns its :class:`Handle`."""
    buffer = as_buffer(x, name)
    operation = context.current().engine.broadcast_async(buffer.address, buffer.count, buffer.dtype,
                                                         _root(root, name), name or "")
    return Handle(operation, buffer)


def barrier(timeout_s: float | None = None) -> None:
    """Returns once every rank has called it; raises :class:`CollectiveTimeout` naming the
    ranks that did not arrive within ``timeout_s``."""
    context.current().engine.barrier(_timeout(timeout_s))
