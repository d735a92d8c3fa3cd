"""Horovod-compatible API: ``import pybrain_mpi.horovod as hvd`` runs ``horovod.torch`` scripts.

Covers the common surface of ``horovod.torch`` with Horovod's names, defaults, argument
order and return values, executed by pybrain-mpi's engine (so every wait has a timeout and
mismatched tensors raise instead of hanging):

    init, shutdown, is_initialized, size, rank, local_size, local_rank, cross_size,
    cross_rank, mpi_threads_supported, mpi_enabled, mpi_built, gloo_enabled, nccl_built,
    allreduce, allreduce_, allreduce_async, allreduce_async_, synchronize, poll,
    broadcast, broadcast_, broadcast_async, broadcast_async_, allgather, broadcast_object,
    allgather_object, broadcast_parameters, broadcast_optimizer_state,
    DistributedOptimizer, Compression.none / .fp16, Average / Sum / Min / Max / Adasum, join.

Differences, stated: ``process_set`` other than the global one is not supported;
``Adasum`` raises NotImplementedError; ``join()`` waits for every rank and returns the
rank that joined last, but ranks that have joined do not serve other ranks' later
allreduces with zeros (those time out naming the joined ranks): give every rank the same
number of steps.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterable

import torch

from . import communication as _comm
from .communication import context as _context
from .errors import PbmError

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size",
    "cross_rank", "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "nccl_built",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "synchronize", "poll",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "allgather",
    "broadcast_object", "allgather_object", "broadcast_parameters", "broadcast_optimizer_state",
    "DistributedOptimizer", "Compression", "Average", "Sum", "Adasum", "Min", "Max", "Product", "join",
    "global_process_set",
]

# Reduction ops, as in horovod.common.basics.
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
_OP_NAMES = {Average: "avg", Sum: "sum", Min: "min", Max: "max"}
global_process_set = None  # only the global set of ranks is supported

# -- lifecycle and topology ------------------------------------------------------------


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Initializes on ``comm`` (an mpi4py communicator or list of ranks; default WORLD)."""
    if process_sets not in (None, [], ()):
        raise NotImplementedError("pybrain_mpi.horovod supports only the global process set")
    if isinstance(comm, (list, tuple)):
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        comm = world.Create_group(world.Get_group().Incl(list(comm)))
    _comm.init(comm)


shutdown = _comm.shutdown
is_initialized = _comm.is_initialized
size = _comm.size
rank = _comm.rank
local_size = _comm.local_size
local_rank = _comm.local_rank
cross_size = _comm.cross_size
cross_rank = _comm.cross_rank


def mpi_threads_supported() -> bool:
    """Whether MPI runs with MPI_THREAD_MULTIPLE."""
    from mpi4py import MPI

    return _context.current().thread_level == MPI.THREAD_MULTIPLE


def mpi_enabled() -> bool:
    """Always True: pybrain-mpi runs over MPI."""
    return True


def mpi_built() -> bool:
    """Always True."""
    return True


def gloo_enabled() -> bool:
    """Always False: there is no gloo controller."""
    return False


def nccl_built() -> bool:
    """Always False: collectives run over MPI on CPU tensors."""
    return False


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

_handles: dict[int, tuple[Any, Any]] = {}
_handle_ids = itertools.count(1)


def _resolve_op(average: bool | None, op: int | None) -> int:
    if average is not None and op is not None:
        raise ValueError("specify either average or op, not both")
    if op is None:
        op = Average if average is None or average else Sum
    if op == Adasum:
        raise NotImplementedError("Adasum is not implemented by pybrain_mpi.horovod; use Average or Sum")
    if op not in _OP_NAMES:
        raise ValueError(f"unsupported reduction op {op}")
    return op


def _register(handle: Any, finish: Any) -> int:
    handle_id = next(_handle_ids)
    _handles[handle_id] = (handle, finish)
    return handle_id


def poll(handle: int) -> bool:
    """True if the asynchronous operation behind ``handle`` has finished."""
    if handle not in _handles:
        raise ValueError(f"unknown or already synchronized handle {handle}")
    return _handles[handle][0].done()


def synchronize(handle: int) -> torch.Tensor:
    """Waits for an asynchronous operation and returns its output tensor."""
    if handle not in _handles:
        raise ValueError(f"unknown or already synchronized handle {handle}")
    inner, finish = _handles.pop(handle)
    inner.wait()
    return finish()


def _integer_average(tensor: torch.Tensor) -> bool:
    return not tensor.dtype.is_floating_point


def _start_allreduce(tensor: torch.Tensor, op: int, name: str | None, prescale_factor: float,
                     postscale_factor: float) -> tuple[Any, Any]:
    """Starts an in-place allreduce of ``tensor`` and returns (handle, finish())."""
    if prescale_factor != 1.0:
        tensor.mul_(prescale_factor)
    op_name = _OP_NAMES[op]
    integer_avg = op == Average and _integer_average(tensor)
    handle = _comm.allreduce_async_(tensor, op="sum" if integer_avg else op_name, name=name)

    def finish() -> torch.Tensor:
        if integer_avg:
            tensor.copy_(torch.div(tensor, size(), rounding_mode="floor"))
        if postscale_factor != 1.0:
            tensor.mul_(postscale_factor)
        return tensor

    return handle, finish


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: Any = global_process_set) -> int:
    """Starts an in-place allreduce; returns a handle for :func:`synchronize` / :func:`poll`."""
    handle, finish = _start_allreduce(tensor, _resolve_op(average, op), name, prescale_factor, postscale_factor)
    return _register(handle, finish)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set: Any = global_process_set) -> int:
    """Starts an allreduce into a new tensor; :func:`synchronize` returns it."""
    return allreduce_async_(tensor.detach().clone(), average, name, op, prescale_factor, postscale_factor)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: int | None = None,
               prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: Any = global_process_set) -> torch.Tensor:
    """Averages (default) or sums ``tensor`` over all ranks in place and returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor))


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set: Any = global_process_set) -> torch.Tensor:
    """Returns the average (default) or sum of ``tensor`` over all ranks; input unchanged."""
    compressed, ctx = compression.compress(tensor)
    reduced = synchronize(allreduce_async(compressed, average, name, op, prescale_factor, postscale_factor))
    return compression.decompress(reduced, ctx)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: Any = global_process_set) -> int:
    """Starts an in-place broadcast from ``root_rank``; returns a handle."""
    handle = _comm.broadcast_async_(tensor, root=root_rank, name=name)
    return _register(handle, lambda: tensor)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: Any = global_process_set) -> int:
    """Starts a broadcast into a new tensor; :func:`synchronize` returns it."""
    return broadcast_async_(tensor.detach().clone(), root_rank, name)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: Any = global_process_set) -> torch.Tensor:
    """Overwrites ``tensor`` with its value on ``root_rank``; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: Any = global_process_set) -> torch.Tensor:
    """Returns ``root_rank``'s value of ``tensor``; the input is unchanged."""
    return synchronize(broadcast_async(tensor, root_rank, name))


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: Any = global_process_set) -> torch.Tensor:
    """Concatenates every rank's ``tensor`` along dimension 0 (first dims may differ)."""
    ctx = _context.current()
    label = f"allgather '{name}'" if name else "allgather"
    # Agree on everything but the first dimension through the engine (bounded wait,
    # mismatch error), then move the data with MPI_Allgatherv.
    trailing = list(tensor.shape[1:]) if tensor.dim() else []
    meta = torch.tensor([tensor.dim()] + trailing[:6] + [0] * (6 - len(trailing[:6])), dtype=torch.int64)
    low = _comm.allreduce(meta, op="min", name=label)
    high = _comm.allreduce(meta, op="max", name=label)
    if not torch.equal(low, high) or len(trailing) > 6:
        raise PbmError(f"rank {ctx.rank}: {label}: tensors must agree in every dimension but the first; "
                       f"this rank has shape {list(tensor.shape)}")
    counts = torch.zeros(ctx.size, dtype=torch.int64)
    counts[ctx.rank] = tensor.numel()
    counts = _comm.allreduce(counts, op="sum", name=label)
    data = tensor.detach().contiguous()
    raw = data.view(torch.uint8) if data.numel() else data.reshape(0).to(torch.uint8)
    item = data.element_size()
    out = torch.empty(int(counts.sum()) * item, dtype=torch.uint8)
    ctx.comm.Allgatherv(raw.numpy(), [out.numpy(), (counts * item).tolist()])
    per_row = 1
    for extent in trailing:
        per_row *= extent
    rows = int(counts.sum()) // max(per_row, 1)
    result = out.view(tensor.dtype)
    return result.reshape([rows] + trailing) if tensor.dim() else result


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: Any = global_process_set) -> Any:
    """Returns ``root_rank``'s Python object on every rank (pickled; trusted ranks only)."""
    _comm.barrier()
    return _context.current().comm.bcast(obj, root=root_rank)


def allgather_object(obj: Any, name: str | None = None, process_set: Any = global_process_set) -> list:
    """Returns the list of every rank's Python object, in rank order."""
    _comm.barrier()
    return _context.current().comm.allgather(obj)


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Broadcasts a ``state_dict()`` or ``named_parameters()`` from ``root_rank`` in place."""
    items = sorted(params.items()) if isinstance(params, dict) else list(params)
    for name, value in items:
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                broadcast_(value.data if isinstance(value, torch.nn.Parameter) else value, root_rank, name=name)
        else:
            raise ValueError(f"broadcast_parameters: {name} is a {type(value).__name__}, expected a tensor")


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int, prefix: str = "optimizer") -> None:
    """Makes every rank's optimizer state (and hyperparameters) equal to ``root_rank``'s."""
    state = broadcast_object(optimizer.state_dict() if rank() == root_rank else None, root_rank, prefix)
    optimizer.load_state_dict(state)


def join(device: int = -1) -> int:
    """Blocks until every rank has called join; returns the rank that joined last."""
    ctx = _context.current()
    if ctx.size == 1:
        return 0
    tag = 7707
    if ctx.rank == 0:
        from mpi4py import MPI

        last = 0
        for _ in range(ctx.size - 1):
            status = MPI.Status()
            ctx.comm.recv(source=MPI.ANY_SOURCE, tag=tag, status=status)
            last = status.Get_source()
    else:
        ctx.comm.send(ctx.rank, dest=0, tag=tag)
        last = None
    return int(broadcast_object(last, 0))


# -- DistributedOptimizer ---------------------------------------------------------------


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into the wrapped optimizer's class by :func:`DistributedOptimizer`."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor):
        super(self.__class__, self).__init__(params)
        self._compression = compression
        self._op = _resolve_op(None, op)
        self._predivide = gradient_predivide_factor
        all_params = [p for group in self.param_groups for p in group["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
            if any(not isinstance(entry, tuple) for entry in named):
                raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, "
                                 "e.g. model.named_parameters()")
            names = {id(p): n for n, p in named}
            unnamed = [p for p in all_params if id(p) not in names]
            if unnamed:
                raise ValueError(f"named_parameters is missing {len(unnamed)} parameter(s) of the optimizer")
        else:
            names = {id(p): f"allreduce.noname.{i}" for i, p in enumerate(all_params)}
        self._parameter_names = names
        self.backward_passes_per_step = backward_passes_per_step
        self._delay = {id(p): backward_passes_per_step for p in all_params}
        self._pending: dict[int, tuple[torch.nn.Parameter, Any, Any, Any]] = {}
        self._synchronized = False
        self._should_synchronize = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook())
                       for p in all_params if p.requires_grad]

    def _make_hook(self):
        def hook(param: torch.nn.Parameter) -> None:
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
        grad = param.grad
        compressed, ctx = self._compression.compress(grad)
        prescale = 1.0 / self._predivide if self._op == Average and self._predivide != 1.0 else 1.0
        postscale = self._predivide if prescale != 1.0 else 1.0
        if compressed.data_ptr() != grad.data_ptr():
            handle, finish = _start_allreduce(compressed, self._op, self._parameter_names[id(param)], prescale, postscale)
        else:
            handle, finish = _start_allreduce(grad, self._op, self._parameter_names[id(param)], prescale, postscale)
        return param, handle, finish, ctx

    def synchronize(self) -> None:
        """Waits for every gradient allreduce (starting those of unused parameters)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._pending:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    self._pending[id(p)] = self._start(p)
        for key, (param, handle, finish, ctx) in list(self._pending.items()):
            handle.wait()
            reduced = finish()
            if reduced.data_ptr() != param.grad.data_ptr():
                param.grad.copy_(self._compression.decompress(reduced, ctx))
            self._delay[key] = self.backward_passes_per_step
        self._pending.clear()
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

    Returns an instance of a subclass of ``optimizer``'s class, as Horovod does; the wrapped
    optimizer's state starts fresh (wrap before training). Gradients of each parameter are
    allreduced as soon as they are accumulated ``backward_passes_per_step`` times;
    ``step()`` waits for them first.
    """
    if op == Adasum:
        raise NotImplementedError("Adasum is not implemented by pybrain_mpi.horovod; use Average or Sum")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
               gradient_predivide_factor)
