"""Data-parallel training: gradients averaged across ranks while backward still runs.

``DistributedDataParallel`` follows the design of PyTorch DDP and Horovod (docs/background.md
section 3, "tensor fusion" and "overlap"):

1. At wrap time every rank checks it holds the same parameters (names, shapes, dtypes),
   then rank 0's parameters and buffers are broadcast so all replicas start equal.
2. Parameters are grouped into buckets in reverse registration order (roughly the order
   backward produces their gradients): the first bucket small (``first_bucket_bytes``) so
   communication starts early, the rest up to ``bucket_bytes``. Each bucket owns one flat
   buffer and every parameter's ``.grad`` is a view into it, so the flat buffer is what
   gets reduced (no packing copy in the common case).
3. A hook after each gradient's accumulation marks the parameter ready. When all of a
   bucket's parameters are ready, and all earlier buckets were launched, the bucket's
   allreduce starts on the progress thread, named after the bucket. The engine matches
   collectives by name, so ranks that launched in different orders would still pair the
   right buckets; launching strictly in bucket order keeps the sequence identical on every
   rank, which is the engine's fast path (no negotiation, docs/negotiation.md).
4. When backward ends, buckets not yet launched (parameters without a gradient in this
   pass) are launched with zeros for the missing gradients, and everything is waited for;
   a wait past ``PBM_STALL_WARN_S`` warns naming the bucket's tensors and the ranks that
   have not joined; past the engine timeout it raises CollectiveTimeout.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..communication import collectives, context
from ..communication.shared import shared_empty
from ..errors import CollectiveTimeout, PbmError
from .consistency import check_same_parameters

MiB = 1 << 20
_SHARED_MEMORY_ALGORITHMS = ("shm", "hierarchical", "auto")


@dataclass
class _Bucket:
    index: int
    dtype: torch.dtype
    params: list[torch.nn.Parameter]
    names: list[str]
    offsets: list[int]
    flat: torch.Tensor
    ready: set[int] = field(default_factory=set)  # positions in params that are ready
    handle: Any = None  # the bucket's allreduce (a pybrain_mpi.Handle) while a step runs
    state: Any = None  # compression state (3LC residuals), kept across steps
    launched_at: float = 0.0
    finished_at: float = 0.0

    def view(self, position: int) -> torch.Tensor:
        param = self.params[position]
        start = self.offsets[position]
        if param.is_contiguous():
            return self.flat[start:start + param.numel()].view_as(param)
        # A dense parameter in another layout (channels_last_3d): its gradient gets the same
        # strides, as torch DDP's bucket views do. A gradient laid out unlike its parameter
        # reaches the optimizer either way, and torch's fused optimizers (fused=True) then
        # update the wrong elements: they walk parameter and gradient storage in step.
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(param.shape, param.stride()) if n > 0)
        if span == param.numel() and all(st >= 0 for st in param.stride()):
            return self.flat.as_strided(param.shape, param.stride(), self.flat.storage_offset() + start)
        return self.flat[start:start + param.numel()].view_as(param)


def _flatten_broadcast(tensors: list[torch.Tensor], root: int, what: str, ranks: Any = None) -> None:
    """Broadcasts tensors from root with one collective per dtype (packed flat), among all
    ranks or the ranks of ``ranks`` (a pybrain_mpi.parallel.Group)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        if dtype == torch.bool:
            group_flat = torch.cat([t.detach().reshape(-1).to(torch.int32) for t in group])
        else:
            group_flat = torch.cat([t.detach().reshape(-1) for t in group])
        collectives.broadcast_(group_flat, root=root, name=f"{what} ({dtype})", group=ranks)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(group_flat[offset:offset + n].view_as(t).to(t.dtype))
                offset += n


class DistributedDataParallel(torch.nn.Module):
    """Wraps a module so its gradients are averaged across all ranks during backward.

    Args:
        module: the model; build it identically on every rank.
        bucket_bytes: target size of a gradient bucket (default 25 MiB, as PyTorch DDP).
        first_bucket_bytes: size of the first bucket, which is ready earliest (1 MiB).
        algorithm: allreduce algorithm: ``"ring"``, ``"mpi"``, ``"shm"`` (one node),
            ``"hierarchical"`` or ``"auto"`` (see :func:`pybrain_mpi.allreduce_`). With the
            shared-memory ones the gradient buckets are allocated in MPI shared memory
            (:func:`pybrain_mpi.shared_empty`), so the node stage reduces them without copying.
        compression: ``None``; ``pbm.compression.ThreeLC(sparsity)`` (two-stage 3LC
            allreduce with error feedback, one state per bucket); ``Cast("bf16"|"fp16")``
            (16-bit on the wire); or any object with Horovod's ``compress(tensor) ->
            (tensor, ctx)`` / ``decompress(tensor, ctx)``.
        broadcast_buffers: broadcast rank 0's buffers (e.g. batch-norm statistics) before
            every forward pass, as PyTorch DDP does.
        stall_warn_s: warn when a bucket waits longer than this (``PBM_STALL_WARN_S``, 60).
        check_finite: have every bucket's allreduce report whether its averaged gradient is
            all finite; after backward, ``grads_finite`` holds the answer (the same on every
            rank) for ``optimizer.step(grads_finite=model.grads_finite)`` of the fused
            optimizers, which then skip their own Inf/NaN pass. With ``algorithm="shm"``/
            ``"auto"`` on one node the check rides inside the reduce at no memory cost.
        group: a :class:`pybrain_mpi.parallel.Group`: average among its ranks only (the
            data-parallel peers of a pipeline stage, :class:`pybrain_mpi.parallel.Grid`).

    Use like ``torch.nn.parallel.DistributedDataParallel``; :meth:`no_sync` accumulates
    gradients locally for gradient accumulation.
    """

    def __init__(self, module: torch.nn.Module, *, bucket_bytes: int = 25 * MiB,
                 first_bucket_bytes: int = 1 * MiB, algorithm: str = "ring",
                 compression: Any = None, broadcast_buffers: bool = True,
                 stall_warn_s: float | None = None, check_finite: bool = False, group: Any = None):
        super().__init__()
        if not context.is_initialized():
            context.init()
        self.group = group
        if algorithm not in collectives.ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(collectives.ALGORITHMS)}")
        self.module = module
        self.algorithm = algorithm
        self.compression = compression
        self.broadcast_buffers = broadcast_buffers
        self.check_finite = bool(check_finite)
        # The allreduce codec of every bucket: a pybrain_mpi.compression codec as given, a
        # Horovod-style compress/decompress object through its adapter, or None.
        from ..compression.codecs import Compressor, HorovodCompression, ThreeLC

        self._codec = compression if compression is None or isinstance(compression, Compressor) \
            else HorovodCompression(compression)
        # A Horovod-style compressor's tensor says nothing about the gradient's finiteness.
        self._check_finite = self.check_finite and not isinstance(self._codec, HorovodCompression)
        # After a synchronized backward with check_finite: whether every averaged gradient is
        # finite (None when unknown: check_finite off, no_sync, or Horovod-style compression).
        self.grads_finite: bool | None = None
        self.stall_warn_s = float(stall_warn_s if stall_warn_s is not None
                                  else os.environ.get("PBM_STALL_WARN_S", 60))
        self._sync = True
        self._in_backward = False
        self._next_to_launch = 0
        self.timeline: list[dict] = []  # per-bucket launch/finish times of the last step
        self.backward_finished_at = 0.0  # when autograd finished the last backward pass

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise PbmError("DistributedDataParallel: the module has no parameter that requires grad")
        check_same_parameters(list(module.named_parameters()) + list(module.named_buffers()), group=group)
        _flatten_broadcast([p for _, p in module.named_parameters()] + [b for _, b in module.named_buffers()],
                           root=0, what="initial parameters and buffers", ranks=group)
        # 3LC scales each allreduce by its largest value, so a bucket mixing tensors whose
        # gradients differ by orders of magnitude starves the small ones (they wait in the
        # residual until they reach half the largest): per_tensor gives each its own bucket.
        per_tensor = isinstance(compression, ThreeLC) and compression.per_tensor
        self._buckets = self._build_buckets(named, bucket_bytes, first_bucket_bytes,
                                            shared=algorithm in _SHARED_MEMORY_ALGORITHMS,
                                            per_tensor=per_tensor)
        if isinstance(compression, ThreeLC):
            for bucket in self._buckets:
                bucket.state = compression.new_state(bucket.flat, name=f"bucket {bucket.index}")
        self._where: dict[int, tuple[int, int]] = {}
        for bucket in self._buckets:
            for position, param in enumerate(bucket.params):
                self._where[id(param)] = (bucket.index, position)
                param.grad = bucket.view(position)  # gradients accumulate straight into buckets
                param.grad.zero_()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient_ready) for _, p in named]

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def _build_buckets(named: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int,
                       first_bucket_bytes: int, shared: bool = False, per_tensor: bool = False) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        pending: dict[torch.dtype, tuple[list, list]] = {}

        def close(dtype: torch.dtype) -> None:
            params, names = pending.pop(dtype)
            offsets, total = [], 0
            for p in params:
                offsets.append(total)
                total += p.numel()
            if shared:
                # Zero-copy node stage: every rank builds the same buckets in the same order,
                # so each bucket sits at the same offset of every node rank's segment.
                flat = shared_empty(total, dtype)
                flat.zero_()
            else:
                flat = torch.zeros(total, dtype=dtype)
            buckets.append(_Bucket(len(buckets), dtype, params, names, offsets, flat))

        for name, param in reversed(named):
            params, names = pending.setdefault(param.dtype, ([], []))
            params.append(param)
            names.append(name)
            limit = first_bucket_bytes if not buckets else bucket_bytes
            if per_tensor or sum(p.numel() for p in params) * param.element_size() >= limit:
                close(param.dtype)
        for dtype in list(pending):
            close(dtype)
        return buckets

    # -- forward ------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.broadcast_buffers and self._sync:
            self.sync_buffers()
        return self.module(*args, **kwargs)

    def sync_buffers(self) -> None:
        """Gives every rank rank 0's buffers (batch-norm running statistics and the like).

        ``forward`` does this before each synchronised step; a training forward then updates
        each rank's statistics from its own batch, so call this before using ``module``
        directly (evaluation, export) to have every rank hold the model rank 0 checkpoints.
        Collective over the wrapper's ranks (its ``group``, else the world); a no-op on one
        rank or a module without buffers."""
        ranks = context.size() if self.group is None else self.group.size
        if ranks > 1:
            buffers = [b for b in self.module.buffers()]
            if buffers:
                _flatten_broadcast(buffers, root=0, what="module buffers", ranks=self.group)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulates gradients locally (no communication) inside the block."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # -- backward hooks -----------------------------------------------------------------
    def _on_gradient_ready(self, param: torch.nn.Parameter) -> None:
        bucket_index, position = self._where[id(param)]
        bucket = self._buckets[bucket_index]
        view = bucket.view(position)
        if param.grad is None or param.grad.data_ptr() != view.data_ptr():
            # zero_grad(set_to_none=True) replaced the view: bring the gradient home.
            if param.grad is not None:
                view.copy_(param.grad)
            param.grad = view
        if not self._sync:
            self.grads_finite = None  # local accumulation: nothing was checked
            return
        if not self._in_backward:
            self.grads_finite = None
            self._in_backward = True
            self._next_to_launch = 0
            self.timeline = []
            for b in self._buckets:
                b.ready.clear()
                b.handle = None
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        bucket.ready.add(position)
        self._launch_ready_buckets()

    def _launch(self, bucket: _Bucket) -> None:
        bucket.launched_at = time.perf_counter()
        label = f"bucket {bucket.index} ({len(bucket.params)} tensors: {bucket.names[0]}"
        label += ", ...)" if len(bucket.params) > 1 else ")"
        bucket.handle = collectives.allreduce_async_(bucket.flat, op="avg", algorithm=self.algorithm,
                                                     name=label[:60], compression=self._codec,
                                                     state=bucket.state, check_finite=self._check_finite,
                                                     group=self.group)

    def _launch_ready_buckets(self) -> None:
        while (self._next_to_launch < len(self._buckets)
               and len(self._buckets[self._next_to_launch].ready) == len(self._buckets[self._next_to_launch].params)):
            self._launch(self._buckets[self._next_to_launch])
            self._next_to_launch += 1

    def _finish_backward(self) -> None:
        self.backward_finished_at = time.perf_counter()
        self._in_backward = False
        # Parameters that got no gradient in this pass (unused on this rank): their share is
        # zero, and their buckets must still be reduced, in order, so the ranks stay in step.
        for bucket in self._buckets[self._next_to_launch:]:
            for position, param in enumerate(bucket.params):
                if position not in bucket.ready:
                    if param.grad is None or param.grad.data_ptr() != bucket.view(position).data_ptr():
                        bucket.view(position).zero_()
                        param.grad = bucket.view(position)
                    bucket.ready.add(position)
        self._launch_ready_buckets()
        for bucket in self._buckets:
            self._wait(bucket)
        if self.check_finite:
            flags = [b.handle.finite for b in self._buckets]
            self.grads_finite = None if None in flags else all(flags)
        self.timeline = [
            {"bucket": b.index, "tensors": len(b.params), "bytes": b.flat.numel() * b.flat.element_size(),
             "launched_at": b.launched_at, "finished_at": b.finished_at}
            for b in self._buckets
        ]

    def _wait(self, bucket: _Bucket) -> None:
        handle = bucket.handle
        started = time.monotonic()
        limit = (context.current() if self.group is None else self.group).timeout_s
        warned = False
        while True:
            remaining = limit - (time.monotonic() - started)
            step = remaining if warned else min(self.stall_warn_s, remaining)
            try:
                handle.wait(timeout_s=max(step, 0.0))
                break
            except CollectiveTimeout as error:
                if warned or time.monotonic() - started >= limit:
                    raise
                warned = True
                warnings.warn(
                    f"rank {context.rank()}: gradient bucket {bucket.index} ({', '.join(bucket.names[:4])}"
                    f"{', ...' if len(bucket.names) > 4 else ''}) has waited {self.stall_warn_s:g} s; "
                    f"ranks that have not submitted it: {error.missing_ranks or 'unknown'}",
                    RuntimeWarning, stacklevel=2)
        bucket.finished_at = time.perf_counter()

    def remove_hooks(self) -> None:
        """Detaches the gradient hooks (the wrapped module then trains locally)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def compression_state_dict(self) -> dict[str, Any]:
        """Every 3LC residual of every bucket, of every path that has run (flat, and both
        stages of the hierarchical allreduce), for an exact resume from a checkpoint."""
        out: dict[str, Any] = {}
        for bucket in self._buckets:
            if bucket.state is not None:
                for key, residual in bucket.state.state_dict().items():
                    out[f"bucket{bucket.index}.{key}"] = torch.from_numpy(residual)
        return out

    def load_compression_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`compression_state_dict` returned (same model and ranks)."""
        for bucket in self._buckets:
            if bucket.state is None:
                continue
            prefix = f"bucket{bucket.index}."
            key = prefix + "residual"
            if key not in state:
                raise PbmError(f"compression state has no {key}: saved with another model or compression")
            bucket.state.load_state_dict({k[len(prefix):]: v.numpy() for k, v in state.items() if k.startswith(prefix)})

    @staticmethod
    def fold_compression_states(states: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
        """The 3LC state one rank of a new world carries, from every old rank's
        :meth:`compression_state_dict` (a checkpoint resumed on another world size).

        What the old world had not transmitted yet, in units of the averaged gradient, is
        ``U = mean over old ranks of residual + the owners' residuals laid end to end`` (the
        first stage's residuals are summed, then divided by the world size; each owner's
        second-stage residual is its even partition of the already averaged tensor). Every new
        rank's first-stage ``residual`` is set to ``U``, so the new world's average delivers
        exactly ``U``, and the second stage starts from zero (nothing is lost: it was folded).
        The hierarchical path's residuals are laid out by the old run's node placement, which
        the checkpoint does not record: they are zeroed, and returned in the notes by key.
        Returns ``(state, notes)``.
        """
        world = len(states)
        folded: dict[str, Any] = {}
        notes: list[str] = []
        keys = sorted({k for state in states for k in state})
        buckets = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".residual")})
        for bucket in buckets:
            firsts = [state.get(f"{bucket}.residual") for state in states]
            if any(f is None for f in firsts):
                raise PbmError(f"compression state of {bucket} is missing on some old ranks")
            count = firsts[0].numel()
            total = sum(f.double().reshape(-1) for f in firsts) / world
            owners = [state.get(f"{bucket}.owner_residual") for state in states]
            if any(o is not None for o in owners):
                per, extra = divmod(count, world)
                for r, owner in enumerate(owners):
                    begin, length = r * per + min(r, extra), per + (1 if r < extra else 0)
                    if owner is None or owner.numel() != length:
                        notes.append(f"{bucket}.owner_residual of old rank {r} (unexpected layout)")
                        continue
                    total[begin:begin + length] += owner.double().reshape(-1)
            folded[f"{bucket}.residual"] = total.to(torch.float32)
            for kind in ("hierarchical_residual", "hierarchical_owner_residual"):
                if any(f"{bucket}.{kind}" in state for state in states):
                    notes.append(f"{bucket}.{kind}")
        return folded, notes

    @property
    def bucket_sizes_bytes(self) -> list[int]:
        """Sizes of the gradient buckets, in launch order."""
        return [b.flat.numel() * b.flat.element_size() for b in self._buckets]
