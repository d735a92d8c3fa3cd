"""Horovod-compatible API: ``import pybrain_mpi.horovod as hvd`` runs ``horovod.torch`` scripts.

Horovod's names, defaults, argument order, return values and semantics, executed by
pybrain-mpi on CPU tensors over MPI (``docs/horovod.md`` lists what is covered, what is
ignored and the results of Horovod's own test suite against this module):

* Collectives are matched **by name** across ranks, as in Horovod, so ranks may submit in
  different orders (gradient hooks, parameters used on some ranks only): allreduces of the
  global set go straight to pybrain-mpi's engine, which matches names natively (the fast
  path); the other collectives go through a background coordinator (:mod:`._coordinator`)
  that negotiates every cycle which names every rank has submitted and runs them in one
  agreed order. Unnamed calls are named ``<op>.noname.<n>`` by call
  order. Same name with a different dtype, shape, op or root: :class:`HorovodInternalError`
  (a :class:`~pybrain_mpi.CollectiveMismatch`) on every rank. Every wait is bounded by
  ``PBM_TIMEOUT_S`` and names the ranks that have not submitted.
* allreduce / allgather / broadcast / alltoall / reducescatter (and grouped, async and
  in-place forms) are differentiable; every Horovod dtype (uint8, int8, int16, int32, int64,
  float16, bfloat16, float32, float64, bool) works.
* ``join()``: a joined rank contributes zeros to the others' allreduces; other collectives
  raise on the ranks still running while a rank has joined.
* ``HOROVOD_FUSION_THRESHOLD`` (bytes of allreduces fused per cycle) and
  ``HOROVOD_CYCLE_TIME`` (ms between idle negotiation cycles) are honoured;
  ``HOROVOD_TIMELINE`` (and :func:`start_timeline`) write a Chrome-trace timeline on rank 0.
* Not available: Adasum (NotImplementedError), GPUs, Gloo; elastic training keeps a fixed MPI
  world (see :mod:`.elastic`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import pickle
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch

from .. import communication as _comm
from ..communication import context as _context
from ..errors import PbmError
from . import _coordinator as _coord
from ._coordinator import HorovodInternalError, Request

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size",
    "cross_rank", "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built",
    "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built", "is_homogeneous",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "sparse_allreduce_async",
    "allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall", "alltoall_async",
    "reducescatter", "reducescatter_async", "grouped_reducescatter", "grouped_reducescatter_async",
    "synchronize", "poll", "barrier", "join", "broadcast_object", "allgather_object",
    "broadcast_parameters", "broadcast_optimizer_state", "DistributedOptimizer", "Compression",
    "SyncBatchNorm", "HorovodInternalError", "HostsUpdatedInterrupt", "start_timeline", "stop_timeline",
    "ProcessSet", "global_process_set", "add_process_set", "remove_process_set", "elastic",
    "Average", "Sum", "Adasum", "Min", "Max", "Product",
]

# Reduction ops, as in horovod.common.basics.
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
_OP_WIRE = {Average: "sum", Sum: "sum", Min: "min", Max: "max", Product: "prod"}


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod's signal that the set of hosts changed; never raised in a fixed MPI world."""

    def __init__(self, skip_sync: bool = False):
        super().__init__("hosts updated")
        self.skip_sync = skip_sync


# -- process sets --------------------------------------------------------------------------


class ProcessSet:
    """A subset of ranks that collectives can be restricted to (``process_set=``)."""

    def __init__(self, ranks: Iterable[int] | None = None):
        self.ranks = sorted(int(r) for r in ranks) if ranks is not None else None
        self.process_set_id: int | None = None

    def size(self) -> int | None:
        """Number of ranks in the set (None before registration)."""
        return len(self.ranks) if self.ranks is not None else None

    def rank(self) -> int | None:
        """This process's rank within the set, or None if it is not a member."""
        if self.ranks is None or _context.current().rank not in self.ranks:
            return None
        return self.ranks.index(_context.current().rank)

    def included(self) -> bool:
        """Whether this process belongs to the set."""
        return self.ranks is not None and _context.current().rank in self.ranks

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet()
global_process_set.process_set_id = 0
_process_sets: dict[int, ProcessSet] = {}
_next_set_id = itertools.count(1)

# -- lifecycle and topology ------------------------------------------------------------

_coordinator: _coord.Coordinator | None = None
_counters: dict[str, itertools.count] = {}
_timeline: Any = None


def _engine_allreduce(tensor: torch.Tensor, op: str, name: str, timeout_s: float) -> None:
    _comm.allreduce_(tensor, op=op, name=name, timeout_s=timeout_s)


def _native() -> Any:
    from ..communication.collectives import _native as native

    return native()


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Initializes on ``comm`` (an mpi4py communicator or list of ranks; default WORLD).

    ``process_sets``: a list of :class:`ProcessSet` (or rank lists) to register at once.
    Idempotent while initialized.
    """
    global _coordinator
    if isinstance(comm, (list, tuple)):
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        comm = world.Create_group(world.Get_group().Incl(list(comm)))
    _comm.init(comm)
    if _coordinator is None:
        ctx = _context.current()
        _coordinator = _coord.Coordinator(ctx.comm, _engine_allreduce, ctx.timeout_s)
        _coordinator.engine, _coordinator.engine_core = ctx.engine, _native()
        global_process_set.ranks = list(range(ctx.size))
        path = os.environ.get("HOROVOD_TIMELINE")
        if path and path != "DYNAMIC":
            start_timeline(path, mark_cycles=os.environ.get("HOROVOD_TIMELINE_MARK_CYCLES", "0") == "1")
        for entry in process_sets or []:
            add_process_set(entry)


def shutdown() -> None:
    """Stops the coordinator (once every rank is stopping) and pybrain-mpi's engine."""
    global _coordinator
    if _coordinator is not None:
        stop_timeline()
        coordinator, _coordinator = _coordinator, None
        coordinator.stop()
        for set_id in list(_process_sets):
            _process_sets.pop(set_id).process_set_id = None
    _counters.clear()
    _comm.shutdown()


def is_initialized() -> bool:
    """Whether :func:`init` has been called (and :func:`shutdown` not since)."""
    return _coordinator is not None and _comm.is_initialized()


size = _comm.size
rank = _comm.rank
local_size = _comm.local_size
local_rank = _comm.local_rank
cross_size = _comm.cross_size
cross_rank = _comm.cross_rank


def is_homogeneous() -> bool:
    """Whether every node runs the same number of ranks."""
    return size() % local_size() == 0 and cross_size() * local_size() == size()


def mpi_threads_supported() -> bool:
    """Whether MPI runs with MPI_THREAD_MULTIPLE."""
    from mpi4py import MPI

    return _context.current().thread_level == MPI.THREAD_MULTIPLE


def _build_flag(name: str, value: Any, doc: str) -> Callable[[], Any]:
    """One of Horovod's build/feature queries, answering ``value`` (what pybrain-mpi is built with)."""

    def flag() -> Any:
        return value

    flag.__name__ = flag.__qualname__ = name
    flag.__doc__ = doc
    return flag


mpi_enabled = _build_flag("mpi_enabled", True, "Always True: pybrain-mpi runs over MPI.")
mpi_built = _build_flag("mpi_built", True, "Always True.")
gloo_enabled = _build_flag("gloo_enabled", False, "Always False: there is no Gloo controller.")
gloo_built = _build_flag("gloo_built", False, "Always False.")
nccl_built = _build_flag("nccl_built", 0, "0 (falsy; Horovod returns the NCCL version): collectives run over MPI "
                         "on CPU tensors.")
ddl_built = _build_flag("ddl_built", False, "Always False.")
ccl_built = _build_flag("ccl_built", False, "Always False.")
cuda_built = _build_flag("cuda_built", False, "Always False: CPU tensors only.")
rocm_built = _build_flag("rocm_built", False, "Always False.")


def _coordinator_or_init() -> _coord.Coordinator:
    if _coordinator is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return _coordinator


def _auto_name(kind: str, name: str | None) -> str:
    if name:
        return str(name)
    counter = _counters.setdefault(kind, itertools.count())
    return f"{kind}.noname.{next(counter)}"


def _set_of(process_set: Any) -> ProcessSet:
    ps = global_process_set if process_set is None else process_set
    if not isinstance(ps, ProcessSet) or ps.process_set_id is None:
        raise ValueError(f"rank {rank()}: {ps!r} is not a registered process set (use hvd.add_process_set)")
    if not ps.included():
        raise ValueError(f"rank {rank()}: this rank is not in process set {ps.process_set_id} ({ps.ranks})")
    return ps


def add_process_set(process_set: Any) -> ProcessSet:
    """Registers a process set (a :class:`ProcessSet` or a list of ranks) on every rank.

    Must be called by every rank with the same ranks, in the same order. Returns the set.
    """
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    coordinator = _coordinator_or_init()
    world = _context.current().size
    if not ps.ranks or any(not 0 <= r < world for r in ps.ranks) or len(set(ps.ranks)) != len(ps.ranks):
        raise ValueError(f"rank {rank()}: process set ranks {ps.ranks} must be distinct ranks of 0..{world - 1}")
    if ps.ranks == list(range(world)):
        raise ValueError("a process set with every rank is the global process set")
    for other in _process_sets.values():
        if other.ranks == ps.ranks:
            raise ValueError(f"a process set with ranks {ps.ranks} is already registered "
                             f"(id {other.process_set_id})")
    set_id = next(_next_set_id)
    # Every rank agrees on the ranks (a mismatch raises) before the communicator is split.
    desc_tensor = torch.zeros(world, dtype=torch.int64)
    desc_tensor[ps.ranks] = 1
    check = allreduce(desc_tensor, op=Min, name=f"add_process_set.{set_id}")
    if not torch.equal(check, desc_tensor):
        raise ValueError(f"rank {rank()}: add_process_set called with different ranks on different ranks")
    member = rank() in ps.ranks
    from mpi4py import MPI

    split = coordinator.admin.Split(color=0 if member else MPI.UNDEFINED, key=rank())
    coordinator.add_set(set_id, ps.ranks, split if member else None)
    ps.process_set_id = set_id
    _process_sets[set_id] = ps
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregisters a process set on every rank (collective); True if it was registered."""
    set_id = getattr(process_set, "process_set_id", None)
    if set_id in (None, 0) or set_id not in _process_sets:
        return False
    barrier()
    _coordinator_or_init().remove_set(set_id)
    _process_sets.pop(set_id, None)
    process_set.process_set_id = None
    return True


# -- compression -------------------------------------------------------------------------


class _NoneCompressor:
    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


class _FP16Compressor:
    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if tensor.dtype.is_floating_point:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor.to(ctx) if ctx is not None else tensor


class Compression:
    """Gradient compression for allreduce: ``Compression.none`` or ``Compression.fp16``."""

    none = _NoneCompressor
    fp16 = _FP16Compressor


# -- handles -------------------------------------------------------------------------------

_handles: dict[int, tuple[Request, Any]] = {}
_handle_ids = itertools.count(1)


def _register(request: Request, finish: Any) -> int:
    handle_id = next(_handle_ids)
    _handles[handle_id] = (request, finish)
    return handle_id


def poll(handle: int) -> bool:
    """True if the asynchronous operation behind ``handle`` has finished."""
    if handle not in _handles:
        raise ValueError(f"unknown or already synchronized handle {handle}")
    request = _handles[handle][0]
    done = request.event.is_set()
    if done and isinstance(request, _coord.FastRequest):
        request.collected = True  # seen done: its name may be used again on this rank
    return done


def synchronize(handle: int) -> Any:
    """Waits for an asynchronous operation and returns its output (bounded by PBM_TIMEOUT_S)."""
    if handle not in _handles:
        raise ValueError(f"unknown or already synchronized handle {handle}")
    request, finish = _handles.pop(handle)
    if isinstance(request, _GroupRequest):
        return finish(None)
    result = _coordinator_or_init().wait(request)
    return finish(result) if finish is not None else result


def _check_tensor(tensor: Any, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        raise ValueError(f"{what}: pybrain_mpi.horovod works on CPU tensors (got {tensor.device})")
    if tensor.dtype not in _coord.TORCH_DTYPES:
        raise TypeError(f"{what}: unsupported dtype {tensor.dtype}; supported: {sorted(_coord.DTYPES)}")
    return tensor


def _desc(kind: str, name: str, tensor: torch.Tensor, **extra: Any) -> dict:
    shape = list(tensor.shape)
    desc = {"kind": kind, "name": name, "dtype": str(tensor.dtype).replace("torch.", ""), "shape": shape,
            "ndim": len(shape), "count": tensor.numel(), "trailing": shape[1:],
            "rows": shape[0] if shape else 1, "row_bytes": _row_bytes(tensor)}
    desc.update(extra)
    return desc


def _row_bytes(tensor: torch.Tensor) -> int:
    per_row = 1
    for extent in tensor.shape[1:]:
        per_row *= extent
    return per_row * tensor.element_size()


def _scale(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor * factor`` in place with Horovod's arithmetic: float64 for integers (truncated
    back), float32 for 16-bit floats."""
    if factor == 1.0:
        return tensor
    if not tensor.dtype.is_floating_point:
        if tensor.dtype == torch.bool:
            raise TypeError("prescale/postscale factors do not apply to bool tensors")
        tensor.copy_((tensor.to(torch.float64) * factor).to(tensor.dtype))
    elif tensor.dtype in (torch.float16, torch.bfloat16):
        tensor.copy_((tensor.to(torch.float32) * torch.tensor(factor, dtype=torch.float32)).to(tensor.dtype))
    else:
        tensor.mul_(torch.tensor(factor, dtype=tensor.dtype))
    return tensor


def _resolve_op(average: bool | None, op: int | None, what: str = "allreduce") -> int:
    if average is not None and op is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if op is None:
        op = Average if average is None or average else Sum
    if op == Adasum:
        raise NotImplementedError(f"{what}: Adasum is not implemented by pybrain_mpi.horovod; use Average or Sum")
    if op not in _OP_WIRE:
        raise ValueError(f"{what}: unsupported reduction op {op}")
    return op


# -- allreduce -----------------------------------------------------------------------------


# The fast path's wire: dtypes the engine lacks travel as int32 (exact: sums of 8/16-bit
# integers over any world of fewer than 65536 ranks fit; Horovod's wrap-around is the cast back;
# a bool's sum/max is "any", its min "all").
_FAST_WIDEN = {torch.uint8, torch.int8, torch.int16, torch.bool}
_ENGINE_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                       torch.bfloat16: "bfloat16", torch.int32: "int32", torch.int64: "int64"}
_SIGNATURES: dict = {}
_FAST_ARGS: dict = {}
_FAST_CACHE_LIMIT = 4096


def _signature(dtype: torch.dtype, shape: tuple, op: int, prescale: float, postscale: float) -> int:
    """What ranks must agree on beyond the engine's own header (which compares element count,
    wire dtype and op): the Horovod dtype, shape, op and scale factors, as a nonzero 64-bit
    hash the engine compares across ranks (a difference raises on every rank)."""
    key = (dtype, shape, op, prescale, postscale)
    signature = _SIGNATURES.get(key)
    if signature is None:
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        signature = int.from_bytes(digest, "little") or 1
        if len(_SIGNATURES) >= _FAST_CACHE_LIMIT:
            _SIGNATURES.clear()
        _SIGNATURES[key] = signature
    return signature


def _engine_args(work: torch.Tensor, wire: str, name: str, signature: int) -> tuple[Any, Any]:
    """The engine's arguments and op for an allreduce of contiguous engine-dtype ``work``."""
    core = _native()
    op = getattr(core.ReduceOp, wire)
    args = core.AllreduceArgs(work.data_ptr(), work.numel(), getattr(core.DType, _ENGINE_DTYPE_NAMES[work.dtype]),
                              op, core.Algorithm.ring, _coord.fast_engine_name(name))
    args.signature = signature
    return args, op


def _fast_plan(out: torch.Tensor, name: str, op: int, prescale: float, postscale: float) -> tuple:
    """How the fast path runs an allreduce of contiguous ``out``: (engine args or None when
    ``out`` is widened, engine op, wire, signature, the postscale left to apply here). Cached
    per buffer, name, op and factors: a training loop's gradients and metrics repeat them."""
    key = (out.data_ptr(), out.dtype, out.shape, name, op, prescale, postscale)
    plan = _FAST_ARGS.get(key)
    if plan is None:
        signature = _signature(out.dtype, tuple(out.shape), op, float(prescale), float(postscale))
        wire, post = _OP_WIRE[op], float(postscale)
        if op == Average:
            if out.dtype.is_floating_point:
                wire = "avg"  # the engine divides by the world size itself
            else:
                post *= 1.0 / _context.current().size
        if out.dtype in _FAST_WIDEN:
            plan = (None, getattr(_native().ReduceOp, wire), wire, signature, post)
        else:
            args, engine_op = _engine_args(out, wire, name, signature)
            plan = (args, engine_op, wire, signature, post)
        if len(_FAST_ARGS) >= _FAST_CACHE_LIMIT:
            _FAST_ARGS.clear()
        _FAST_ARGS[key] = plan
    return plan


@dataclass(frozen=True)
class _Reduction:
    """What an allreduce call asks for, besides its tensor: Horovod's name, op (resolved),
    scale factors and process set."""

    name: str | None
    op: int
    prescale_factor: float = 1.0
    postscale_factor: float = 1.0
    process_set: Any = None

    @classmethod
    def of(cls, average: bool | None, name: str | None, op: int | None, prescale_factor: float,
           postscale_factor: float, process_set: Any) -> "_Reduction":
        """From a Horovod call's arguments (``average`` and ``op`` resolved as Horovod does)."""
        return cls(name, _resolve_op(average, op), prescale_factor, postscale_factor, process_set)


def _submit_allreduce(out: torch.Tensor, spec: _Reduction, target: torch.Tensor | None = None,
                      fast: bool = True, blocking: bool = False):
    """Submits an in-place allreduce of contiguous ``out``; returns (request, finish).

    Allreduces of the global set (op other than Product, ``fast``) take the fast path: the
    engine itself, which matches them by name (``blocking``: on the calling thread, done when
    this returns). The others are negotiated by the coordinator.
    """
    op, prescale_factor, postscale_factor = spec.op, spec.prescale_factor, spec.postscale_factor
    ps = _set_of(spec.process_set)
    name = _auto_name("allreduce", spec.name)
    _scale(out, prescale_factor)
    wire = _OP_WIRE[op]
    post = float(postscale_factor) * (1.0 / len(ps.ranks) if op == Average else 1.0)

    def finish(result: torch.Tensor) -> torch.Tensor:
        if post != 1.0:
            _scale(result, post)
        if target is not None:
            if target.data_ptr() != result.data_ptr():
                with torch.no_grad():
                    target.copy_(result)
            return target
        return result

    coordinator = _coordinator_or_init()
    if fast and ps.process_set_id == 0 and wire != "prod" and out.numel() > 0:
        args, engine_op, fast_wire, signature, fast_post = _fast_plan(out, name, op, prescale_factor,
                                                                      postscale_factor)
        work = out
        if args is None:  # widened: a new int32 buffer each call
            work = out.to(torch.int32)
            args, engine_op = _engine_args(work, fast_wire, name, signature)
        if fast_post != post:
            post = fast_post
        return coordinator.submit_fast(name, out, work, args, engine_op, blocking), finish
    fuse = (ps.process_set_id == 0 and out.dtype in _coord.ENGINE_DTYPES and wire in ("sum", "min", "max"))
    desc = _desc("allreduce", name, out, op=wire, prescale=float(prescale_factor),
                 postscale=float(postscale_factor), fuse=fuse)
    request = Request(name, "allreduce", ps.process_set_id, desc, out)
    coordinator.submit(request)
    return request, finish


def _contiguous_work(tensor: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not inplace:
        return tensor.detach().clone(memory_format=torch.contiguous_format), None
    if tensor.is_contiguous():  # the collective writes through a detached view of the same memory
        return (tensor.detach() if tensor.requires_grad else tensor), tensor
    return tensor.detach().contiguous(), tensor


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: Any = global_process_set) -> int:
    """Starts an in-place allreduce; returns a handle for :func:`synchronize` / :func:`poll`."""
    spec = _Reduction.of(average, name, op, prescale_factor, postscale_factor, process_set)
    return _register(*_start_allreduce(tensor, spec, inplace=True, blocking=False))


def _start_allreduce(tensor: torch.Tensor, spec: _Reduction, inplace: bool, blocking: bool):
    """Checks and submits an allreduce (in place or into a copy); returns (request, finish)."""
    _check_tensor(tensor, "allreduce")
    work, target = _contiguous_work(tensor, inplace)
    return _submit_allreduce(work, spec, target, blocking=blocking)


def _allreduce_now(tensor: torch.Tensor, spec: _Reduction, inplace: bool) -> torch.Tensor:
    """An allreduce the caller waits for: on the fast path it runs on the calling thread."""
    request, finish = _start_allreduce(tensor, spec, inplace, blocking=True)
    return finish(_coordinator_or_init().wait(request))


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set: Any = global_process_set) -> int:
    """Starts an allreduce into a new tensor; :func:`synchronize` returns it."""
    spec = _Reduction.of(average, name, op, prescale_factor, postscale_factor, process_set)
    return _register(*_start_allreduce(tensor, spec, inplace=False, blocking=False))


class _AllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, spec):
        ctx.spec = spec
        return _allreduce_now(tensor, spec, False)

    @staticmethod
    def backward(ctx, grad_output):
        # the gradient's allreduce is unnamed: named by its place among the unnamed calls
        grad = _allreduce_now(grad_output.contiguous(), replace(ctx.spec, name=None), False)
        return grad, None


def _wants_grad(tensor: torch.Tensor) -> bool:
    return tensor.requires_grad and torch.is_grad_enabled()


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set: Any = global_process_set) -> torch.Tensor:
    """Returns the average (default) or sum/min/max/product of ``tensor`` over all ranks.

    The input is unchanged; differentiable (the gradient is the allreduce of the gradient).
    """
    _check_tensor(tensor, "allreduce")
    spec = _Reduction.of(average, name, op, prescale_factor, postscale_factor, process_set)
    compressed, ctx = compression.compress(tensor)
    if _wants_grad(compressed):
        reduced = _AllreduceFn.apply(compressed, spec)
    else:
        reduced = _allreduce_now(compressed, spec, False)
    return compression.decompress(reduced, ctx)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: int | None = None,
               prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: Any = global_process_set) -> torch.Tensor:
    """Reduces ``tensor`` over all ranks in place (average by default) and returns it."""
    return _allreduce_now(tensor, _Reduction.of(average, name, op, prescale_factor, postscale_factor, process_set),
                          True)


def _group_names(name: str | None, count: int, kind: str) -> list[str | None]:
    if name is None:
        base = _auto_name("grouped_" + kind, None)
    else:
        base = name
    return [f"{base}.{i}" for i in range(count)]


def grouped_allreduce_async(tensors: list, average: bool | None = None, name: str | None = None,
                            op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: Any = global_process_set) -> int:
    """Starts allreduces of every tensor of ``tensors`` (into new tensors) as one group."""
    spec = _Reduction.of(average, name, op, prescale_factor, postscale_factor, process_set)
    return _start_group(allreduce_async, tensors, spec)


def grouped_allreduce_async_(tensors: list, average: bool | None = None, name: str | None = None,
                             op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: Any = global_process_set) -> int:
    """Starts in-place allreduces of every tensor of ``tensors`` as one group."""
    spec = _Reduction.of(average, name, op, prescale_factor, postscale_factor, process_set)
    return _start_group(allreduce_async_, tensors, spec)


def _start_group(start: Callable[..., int], tensors: list, spec: _Reduction) -> int:
    """Starts ``start`` (allreduce_async or allreduce_async_) on each tensor, named ``<name>.<i>``."""
    handles = [start(t, None, n, spec.op, spec.prescale_factor, spec.postscale_factor, spec.process_set)
               for t, n in zip(tensors, _group_names(spec.name, len(tensors), "allreduce"))]
    return _register_group(handles)


def _register_group(handles: list[int]) -> int:
    def finish(_: Any) -> list:
        return [synchronize(h) for h in handles]

    handle_id = next(_handle_ids)
    _handles[handle_id] = (_GroupRequest(handles), finish)
    return handle_id


class _GroupRequest:
    """The request of a grouped operation: done when every member is."""

    def __init__(self, handles: list[int]):
        self.handles = handles
        self.event = self
        self.error = None
        self.result = None
        self.submitted = 0.0

    def is_set(self) -> bool:
        return all(_handles[h][0].event.is_set() for h in self.handles if h in _handles)



def grouped_allreduce(tensors: list, average: bool | None = None, name: str | None = None,
                      compression: Any = Compression.none, op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: Any = global_process_set) -> list:
    """Allreduces every tensor of ``tensors``; returns new tensors (differentiable)."""
    op = _resolve_op(average, op)
    names = _group_names(name, len(tensors), "allreduce")
    return [allreduce(t, None, n, compression, op, prescale_factor, postscale_factor, process_set)
            for t, n in zip(tensors, names)]


def grouped_allreduce_(tensors: list, average: bool | None = None, name: str | None = None, op: int | None = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: Any = global_process_set) -> list:
    """Allreduces every tensor of ``tensors`` in place; returns them."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                                process_set))


def sparse_allreduce_async(tensor: torch.Tensor, name: str | None = None, op: int | None = None,
                           process_set: Any = global_process_set):
    """Starts the allreduce of a sparse COO tensor (an allgather of its indices and values);
    returns a callable that waits and returns the reduced sparse tensor."""
    op = _resolve_op(None, op)
    if op not in (Average, Sum):
        raise ValueError("sparse allreduce supports Average and Sum")
    name = _auto_name("sparse_allreduce", name)
    sparse = tensor.coalesce() if not tensor.is_coalesced() else tensor
    indices = sparse.indices().t().contiguous()
    values = sparse.values().contiguous()
    ps = _set_of(process_set)
    h_idx = allgather_async(indices, name=f"{name}.indices", process_set=ps)
    h_val = allgather_async(values, name=f"{name}.values", process_set=ps)

    def wait() -> torch.Tensor:
        all_indices = synchronize(h_idx)
        all_values = synchronize(h_val)
        if op == Average:
            all_values = all_values / len(ps.ranks)
        return torch.sparse_coo_tensor(all_indices.t(), all_values, size=tensor.shape).coalesce()

    return wait


# -- allgather -----------------------------------------------------------------------------


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: Any = global_process_set) -> int:
    """Starts an allgather (concatenation along dimension 0); :func:`synchronize` returns it."""
    _check_tensor(tensor, "allgather")
    ps = _set_of(process_set)
    name = _auto_name("allgather", name)
    work = tensor.detach().contiguous()
    if work.dim() == 0:
        work = work.reshape(1)
    request = Request(name, "allgather", ps.process_set_id, _desc("allgather", name, work), work)
    _coordinator_or_init().submit(request)
    return _register(request, None)


class _AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.ps = process_set
        handle = allgather_async(tensor, name, process_set)
        request = _handles[handle][0]
        out = synchronize(handle)
        ctx.rows = request.extra
        return out

    @staticmethod
    def backward(ctx, grad_output):
        reduced = synchronize(allreduce_async(grad_output.contiguous(), None, None, Average, 1.0, 1.0, ctx.ps))
        ps = _set_of(ctx.ps)
        mine = ps.ranks.index(rank())
        start = sum(ctx.rows[:mine])
        return reduced.narrow(0, start, ctx.rows[mine]), None, None


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: Any = global_process_set) -> torch.Tensor:
    """Concatenates every rank's ``tensor`` along dimension 0 (first dims may differ).

    Differentiable: each rank's gradient is its slice of the averaged incoming gradient.
    """
    _check_tensor(tensor, "allgather")
    if _wants_grad(tensor):
        return _AllgatherFn.apply(tensor, name, process_set)
    return synchronize(allgather_async(tensor, name, process_set))


def grouped_allgather_async(tensors: list, name: str | None = None, process_set: Any = global_process_set) -> int:
    """Starts allgathers of every tensor of ``tensors`` as one group."""
    handles = [allgather_async(t, n, process_set) for t, n in zip(tensors, _group_names(name, len(tensors), "allgather"))]
    return _register_group(handles)


def grouped_allgather(tensors: list, name: str | None = None, process_set: Any = global_process_set) -> list:
    """Allgathers every tensor of ``tensors`` (differentiable)."""
    return [allgather(t, n, process_set) for t, n in zip(tensors, _group_names(name, len(tensors), "allgather"))]


# -- broadcast -----------------------------------------------------------------------------


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: Any = global_process_set) -> int:
    """Starts an in-place broadcast from ``root_rank``; returns a handle."""
    _check_tensor(tensor, "broadcast")
    ps = _set_of(process_set)
    if root_rank not in ps.ranks:
        raise ValueError(f"rank {rank()}: broadcast root {root_rank} is not in process set {ps.ranks}")
    name = _auto_name("broadcast", name)
    work, target = _contiguous_work(tensor, True)
    request = Request(name, "broadcast", ps.process_set_id, _desc("broadcast", name, work, root=int(root_rank)), work)
    _coordinator_or_init().submit(request)

    def finish(result: torch.Tensor) -> torch.Tensor:
        if target is not None:
            if target.data_ptr() != result.data_ptr():
                with torch.no_grad():
                    target.copy_(result)
            return target
        return result

    return _register(request, finish)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: Any = global_process_set) -> int:
    """Starts a broadcast into a new tensor; :func:`synchronize` returns it."""
    return broadcast_async_(tensor.detach().clone(memory_format=torch.contiguous_format), root_rank, name, process_set)


class _BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root, ctx.ps = root_rank, process_set
        return synchronize(broadcast_async(tensor, root_rank, name, process_set))

    @staticmethod
    def backward(ctx, grad_output):
        reduced = synchronize(allreduce_async(grad_output.contiguous(), None, None, Average, 1.0, 1.0, ctx.ps))
        if rank() != ctx.root:
            reduced = reduced * 0
        return reduced, None, None, None


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: Any = global_process_set) -> torch.Tensor:
    """Overwrites ``tensor`` with its value on ``root_rank``; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: Any = global_process_set) -> torch.Tensor:
    """Returns ``root_rank``'s value of ``tensor``; the input is unchanged. Differentiable:
    the root receives the average of every rank's gradient, the others zero (Horovod's rule)."""
    _check_tensor(tensor, "broadcast")
    if _wants_grad(tensor):
        return _BroadcastFn.apply(tensor, root_rank, name, process_set)
    return synchronize(broadcast_async(tensor, root_rank, name, process_set))


# -- alltoall ------------------------------------------------------------------------------


def alltoall_async(tensor: torch.Tensor, splits: torch.Tensor | None = None, name: str | None = None,
                   process_set: Any = global_process_set) -> int:
    """Starts an alltoall: rows ``splits[i]`` of ``tensor`` go to the set's i-th rank
    (default: equal splits). :func:`synchronize` returns ``(received, received_splits)``."""
    _check_tensor(tensor, "alltoall")
    ps = _set_of(process_set)
    members = len(ps.ranks)
    work = tensor.detach().contiguous()
    if work.dim() == 0:
        raise ValueError("alltoall needs a tensor with at least one dimension")
    if splits is None:
        if work.shape[0] % members:
            raise ValueError(f"rank {rank()}: alltoall with equal splits needs the first dimension "
                             f"({work.shape[0]}) to be a multiple of the number of ranks ({members})")
        split_list = [work.shape[0] // members] * members
    else:
        if not isinstance(splits, torch.Tensor) or splits.dtype != torch.int32:
            raise ValueError("alltoall splits must be a torch.int32 tensor")
        split_list = [int(s) for s in splits.reshape(-1).tolist()]
        if len(split_list) != members or any(s < 0 for s in split_list):
            raise ValueError(f"alltoall splits must hold {members} non-negative entries, got {split_list}")
        if sum(split_list) > work.shape[0]:
            raise ValueError(f"rank {rank()}: alltoall splits sum to {sum(split_list)}, more than the first "
                             f"dimension {work.shape[0]}")
        if sum(split_list) < work.shape[0]:
            work = work[:sum(split_list)].contiguous()
    name = _auto_name("alltoall", name)
    request = Request(name, "alltoall", ps.process_set_id, _desc("alltoall", name, work), work, split_list)
    _coordinator_or_init().submit(request)
    return _register(request, None)


class _AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        ctx.ps = process_set
        out, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.received = received
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad_output, _):
        grad, _ = synchronize(alltoall_async(grad_output.contiguous(), ctx.received, None, ctx.ps))
        return grad, None, None, None


def alltoall(tensor: torch.Tensor, splits: torch.Tensor | None = None, name: str | None = None,
             process_set: Any = global_process_set):
    """Scatters rows of ``tensor`` to every rank and gathers theirs (differentiable).

    Returns the received tensor, and with ``splits`` given also the received splits.
    """
    _check_tensor(tensor, "alltoall")
    if _wants_grad(tensor):
        out, received = _AlltoallFn.apply(tensor, splits, name, process_set)
    else:
        out, received = synchronize(alltoall_async(tensor, splits, name, process_set))
    return (out, received) if splits is not None else out


# -- reducescatter ---------------------------------------------------------------------------


def _scatter_rows(total: int, members: int) -> list[int]:
    base, extra = divmod(total, members)
    return [base + (1 if i < extra else 0) for i in range(members)]


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, compression: Any = Compression.none,
                        op: int = Average, process_set: Any = global_process_set, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    """Starts a reduce-scatter: the reduction over ranks, split along dimension 0 (the first
    ranks get one row more when it does not divide); :func:`synchronize` returns this rank's part."""
    _check_tensor(tensor, "reducescatter")
    if tensor.dim() == 0:
        raise ValueError("reducescatter needs a tensor with at least one dimension")
    op = _resolve_op(None, op, "reducescatter")
    if op not in (Average, Sum):
        raise ValueError("reducescatter supports Average and Sum")
    ps = _set_of(process_set)
    name = _auto_name("reducescatter", name)
    work = tensor.detach().clone(memory_format=torch.contiguous_format)
    request, finish = _submit_allreduce(work, _Reduction(name, op, prescale_factor, postscale_factor, ps),
                                        fast=False)
    rows = _scatter_rows(tensor.shape[0], len(ps.ranks))
    mine = ps.ranks.index(rank())
    start = sum(rows[:mine])

    def scatter(result: torch.Tensor) -> torch.Tensor:
        return finish(result).narrow(0, start, rows[mine]).clone()

    handle = next(_handle_ids)
    _handles[handle] = (request, scatter)
    return handle


class _ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, spec):
        ctx.op, ctx.ps, ctx.pre, ctx.post = spec.op, spec.process_set, spec.prescale_factor, spec.postscale_factor
        return synchronize(reducescatter_async(tensor, spec.name, Compression.none, spec.op, spec.process_set,
                                               spec.prescale_factor, spec.postscale_factor))

    @staticmethod
    def backward(ctx, grad_output):
        grad = synchronize(allgather_async(grad_output.contiguous(), None, ctx.ps))
        # Horovod's rule: the gathered gradient, times the set size for Sum (as the gradient of
        # an allreduce-sum of identical gradients), unscaled for Average.
        factor = ctx.pre * ctx.post * (len(_set_of(ctx.ps).ranks) if ctx.op == Sum else 1.0)
        return grad * factor if factor != 1.0 else grad, None


def reducescatter(tensor: torch.Tensor, name: str | None = None, compression: Any = Compression.none,
                  op: int = Average, process_set: Any = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """This rank's part of the reduction over ranks (see :func:`reducescatter_async`); differentiable."""
    _check_tensor(tensor, "reducescatter")
    if tensor.dim() == 0:
        raise ValueError("reducescatter needs a tensor with at least one dimension")
    compressed, ctx = compression.compress(tensor)
    if _wants_grad(compressed):
        out = _ReducescatterFn.apply(compressed, _Reduction(name, op, prescale_factor, postscale_factor,
                                                            process_set))
    else:
        out = synchronize(reducescatter_async(compressed, name, Compression.none, op, process_set,
                                              prescale_factor, postscale_factor))
    return compression.decompress(out, ctx)


def grouped_reducescatter_async(tensors: list, name: str | None = None, compression: Any = Compression.none,
                                op: int = Average, process_set: Any = global_process_set,
                                prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> int:
    """Starts reduce-scatters of every tensor of ``tensors`` as one group."""
    handles = [reducescatter_async(t, n, compression, op, process_set, prescale_factor, postscale_factor)
               for t, n in zip(tensors, _group_names(name, len(tensors), "reducescatter"))]
    return _register_group(handles)


def grouped_reducescatter(tensors: list, name: str | None = None, compression: Any = Compression.none,
                          op: int = Average, process_set: Any = global_process_set,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list:
    """Reduce-scatters every tensor of ``tensors`` (differentiable)."""
    for t in tensors:
        _check_tensor(t, "grouped_reducescatter")
        if t.dim() == 0:
            raise ValueError("reducescatter needs tensors with at least one dimension")
    return [reducescatter(t, n, compression, op, process_set, prescale_factor, postscale_factor)
            for t, n in zip(tensors, _group_names(name, len(tensors), "reducescatter"))]


# -- barrier, join, objects ----------------------------------------------------------------


def barrier(process_set: Any = global_process_set) -> None:
    """Returns once every rank of the set has called it (bounded by PBM_TIMEOUT_S)."""
    ps = _set_of(process_set)
    name = _auto_name(f"barrier.{ps.process_set_id}", None)
    request = Request(name, "barrier", ps.process_set_id, {"kind": "barrier", "name": name}, None)
    coordinator = _coordinator_or_init()
    coordinator.submit(request)
    coordinator.wait(request)


def join(device: int = -1) -> int:
    """Marks this rank done: until every rank has joined, it serves the others' allreduces
    with zeros (their other collectives raise). Returns the last rank to join, on every rank."""
    return _coordinator_or_init().join()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: Any = global_process_set) -> Any:
    """Returns ``root_rank``'s Python object on every rank (pickled: trusted ranks only)."""
    name = _auto_name("broadcast_object", name)
    if rank() == root_rank:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
    else:
        length = torch.zeros(1, dtype=torch.int64)
    broadcast_(length, root_rank, f"{name}.sz", process_set)
    if rank() != root_rank:
        payload = torch.zeros(int(length.item()), dtype=torch.uint8)
    broadcast_(payload, root_rank, f"{name}.data", process_set)
    if rank() == root_rank:
        return obj
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=False)


def allgather_object(obj: Any, name: str | None = None, process_set: Any = global_process_set) -> list:
    """Returns the list of every rank's Python object, in rank order (pickled: trusted ranks only)."""
    name = _auto_name("allgather_object", name)
    data = pickle.dumps(obj)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    sizes = allgather(torch.tensor([len(data)], dtype=torch.int64), f"{name}.sz", process_set)
    gathered = allgather(payload, f"{name}.data", process_set)
    out, offset = [], 0
    for length in sizes.tolist():
        out.append(pickle.loads(gathered[offset:offset + length].numpy().tobytes()))
        offset += length
    return out


# -- parameters and optimizer state --------------------------------------------------------


def broadcast_parameters(params: Any, root_rank: int, process_set: Any = global_process_set) -> None:
    """Broadcasts a ``state_dict()`` or ``named_parameters()`` from ``root_rank`` in place."""
    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, list) or hasattr(params, "__iter__"):
        items = list(params)
        if items and not all(isinstance(entry, tuple) and len(entry) == 2 for entry in items):
            raise ValueError("invalid params of type: " + str(type(params)))
    else:
        raise ValueError("invalid params of type: " + str(type(params)))
    handles = []
    for name, value in items:
        if isinstance(value, torch.Tensor):
            handles.append(broadcast_async_(value.data if isinstance(value, torch.nn.Parameter) else value,
                                            root_rank, name=f"broadcast_parameters.{name}", process_set=process_set))
        else:
            raise ValueError(f"broadcast_parameters: {name} is a {type(value).__name__}, expected a tensor")
    for handle in handles:
        synchronize(handle)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int, prefix: str = "optimizer",
                              process_set: Any = global_process_set) -> None:
    """Makes every rank's optimizer state and hyperparameters equal to ``root_rank``'s.

    As in Horovod, an optimizer without state is first given one by a step on zero gradients
    (the parameters' ``.grad`` are set to zeros), so every rank holds the same state entries.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    state_dict = optimizer.state_dict()
    if len(state_dict["state"]) == 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in optimizer.state:
                    p.grad = p.data.new(p.size()).zero_()
                    if p.is_sparse if hasattr(p, "is_sparse") else False:
                        p.grad = p.grad.to_sparse()
        saved = [p.data.clone() for group in optimizer.param_groups for p in group["params"]]
        if hasattr(optimizer, "_parameter_names"):  # a DistributedOptimizer: step without allreduce
            super(optimizer.__class__, optimizer).step()
        else:
            optimizer.step()
        # A zero-gradient step must not move the parameters (weight decay would).
        for p, old in zip([p for group in optimizer.param_groups for p in group["params"]], saved):
            p.data.copy_(old)
    root_state = broadcast_object(optimizer.state_dict() if rank() == root_rank else None, root_rank,
                                  f"{prefix}.state", process_set)
    optimizer.load_state_dict(root_state)


# -- DistributedOptimizer ---------------------------------------------------------------


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the wrapped optimizer's class by :func:`DistributedOptimizer`."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, sparse_as_dense, process_set):
        super(self.__class__, self).__init__(params)
        self._compression = compression
        self._op = _resolve_op(None, op)
        self._predivide = gradient_predivide_factor
        self._sparse_as_dense = sparse_as_dense
        self._process_set = process_set
        # A rank outside the optimizer's process set trains alone (Horovod: no allreduce there).
        self._active = (process_set or global_process_set).included()
        all_params = [p for group in self.param_groups for p in group["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
            if any(not isinstance(entry, tuple) for entry in named):
                raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                                 "usually produced by model.named_parameters().")
            names = [n for n, _ in named]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: "
                                 + ", ".join(duplicates))
            by_id = {id(p): n for n, p in named}
            unnamed = [p for p in all_params if id(p) not in by_id]
            if unnamed:
                raise ValueError(f"named_parameters was specified, but one or more model parameters were "
                                 f"not named ({len(unnamed)} of the optimizer's parameters). Python object "
                                 "ids: " + ", ".join(str(id(p)) for p in unnamed))
        else:
            by_id = {id(p): f"allreduce.noname.{i}.{j}" for i, group in enumerate(self.param_groups)
                     for j, p in enumerate(group["params"])}
        self._parameter_names = by_id
        self.backward_passes_per_step = backward_passes_per_step
        self._delay = {id(p): backward_passes_per_step for p in all_params}
        self._pending: dict[int, tuple[torch.nn.Parameter, int, Any]] = {}
        self._synchronized = False
        self._should_synchronize = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook())
                       for p in all_params if p.requires_grad]

    def _make_hook(self):
        def hook(param: torch.nn.Parameter) -> None:
            if not self._active:
                return
            key = id(param)
            if key in self._pending and self._delay[key] <= 0:
                raise AssertionError("Gradients were computed more than backward_passes_per_step times "
                                     "before call to step(). Increase backward_passes_per_step to "
                                     "accumulate gradients locally.")
            self._delay[key] -= 1
            if self._delay[key] == 0:
                self._pending[key] = self._start(param)
        return hook

    def _start(self, param: torch.nn.Parameter):
        name = "DistributedOptimizer." + self._parameter_names[id(param)]
        grad = param.grad
        if grad.is_sparse:
            if self._sparse_as_dense:
                dense = grad.to_dense()
                handle = allreduce_async_(dense, None, name, self._op, process_set=self._process_set)
                return param, handle, ("sparse_as_dense", dense)
            return param, sparse_allreduce_async(grad, name, self._op, self._process_set), ("sparse", None)
        compressed, ctx = self._compression.compress(grad)
        prescale = 1.0 / self._predivide if self._op == Average and self._predivide != 1.0 else 1.0
        postscale = self._predivide if prescale != 1.0 else 1.0
        handle = allreduce_async_(compressed, None, name, self._op, prescale, postscale, self._process_set)
        return param, handle, ("dense", (compressed, ctx))

    def synchronize(self) -> None:
        """Waits for every gradient allreduce (starting those of parameters without a gradient
        on this rank, with zeros: ranks may use different parameters; names match them)."""
        if not self._active or (self._synchronized and not self._pending):
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._pending:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    self._pending[id(p)] = self._start(p)
        errors = []
        for key, (param, handle, (kind, extra)) in list(self._pending.items()):
            try:
                if kind == "sparse":
                    param.grad = handle()
                elif kind == "sparse_as_dense":
                    synchronize(handle)
                    param.grad = extra.to_sparse()
                else:
                    reduced = synchronize(handle)
                    compressed, ctx = extra
                    if reduced.data_ptr() != param.grad.data_ptr():
                        param.grad.copy_(self._compression.decompress(reduced, ctx))
            except BaseException as error:  # finish the others so no handle is left dangling
                errors.append(error)
            self._delay[key] = self.backward_passes_per_step
        self._pending.clear()
        if errors:
            raise errors[0]
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Inside the block, step() does not synchronize (call synchronize() yourself first)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to "
                              "consider using optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._pending:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it "
                                 "can cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Iterable | None = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: int = Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = global_process_set):
    """Wraps a torch optimizer so gradients are allreduced (averaged) during backward.

    Returns an instance of a subclass of ``optimizer``'s class, as Horovod does. Gradients
    of each parameter are allreduced, matched by parameter name, as soon as they are
    accumulated ``backward_passes_per_step`` times; ``step()`` waits for them first.
    ``num_groups``/``groups`` are accepted and ignored (the coordinator fuses by size).
    """
    if op == Adasum:
        raise NotImplementedError("Adasum is not implemented by pybrain_mpi.horovod; use Average or Sum")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
                  gradient_predivide_factor, sparse_as_dense, process_set)
    wrapped.load_state_dict(optimizer.state_dict()) if optimizer.state else None
    return wrapped


# -- timeline ----------------------------------------------------------------------------------

from ._timeline import start_timeline, stop_timeline  # noqa: E402
from .sync_batch_norm import SyncBatchNorm  # noqa: E402
from . import elastic  # noqa: E402
