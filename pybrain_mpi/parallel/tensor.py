"""Tensor-split fully connected layers over a rank group, for a layer too large for one rank.

``ColumnParallelLinear`` keeps a block of the output features on each rank (the weight's rows),
``RowParallelLinear`` a block of the input features (the weight's columns). Blocks are the even
split of the features over the group (sizes differ by at most one). Every rank sees the same
input and, by default, the same full output, so either layer replaces an ``nn.Linear`` in an
otherwise replicated model; ``gather_output=False`` / ``input_is_parallel=True`` chain a column-
then row-parallel pair without materialising the hidden activation (one allreduce per pair).

Exactness: the column-parallel output is assembled by an allreduce of zero-padded blocks (adding
zeros is exact), so forward and gradients equal the unsplit layer's; the row-parallel output sums
the ranks' partial products, equal to the unsplit layer's up to summation order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..communication import collectives, context

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "even_split"]


def even_split(total: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, end)`` of block ``index`` of ``total`` items split into ``parts`` blocks whose
    sizes differ by at most one (the larger ones first)."""
    base, extra = divmod(int(total), int(parts))
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _group_of(group: Any) -> tuple[int, int]:
    if group is None:
        if not context.is_initialized():
            context.init()
        return context.rank(), context.size()
    return group.rank, group.size


def _allreduce_sum(x: torch.Tensor, group: Any, name: str) -> torch.Tensor:
    out = x.detach().contiguous().clone()
    collectives.allreduce_(out, op="sum", name=name, group=group)
    return out


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the gradient is summed over the group (the input is replicated)."""

    @staticmethod
    def forward(ctx, x, group, name):  # noqa: D102
        ctx.group, ctx.name = group, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _allreduce_sum(grad, ctx.group, ctx.name + " input grad"), None, None


class _ReduceFromGroup(torch.autograd.Function):
    """Sum over the group forward; identity backward (the output gradient is replicated)."""

    @staticmethod
    def forward(ctx, x, group, name):  # noqa: D102
        return _allreduce_sum(x, group, name + " output")

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None, None


class _LinearAccumulating(torch.autograd.Function):
    """``linear(x, W, b)`` whose backward adds the weight and bias gradients into ``W.grad`` /
    ``b.grad`` in place once they exist (one BLAS ``addmm_``), instead of returning a new
    gradient of the weight's size for autograd to add: over M micro-batches no temporary as
    large as the layer. The first backward after ``zero_grad(set_to_none=True)`` returns it."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias = weight, bias
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        rows, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = grad_b = None
        with torch.no_grad():
            if weight.grad is None:
                grad_w = rows.t() @ inputs
            else:
                weight.grad.addmm_(rows.t(), inputs)
            if bias is not None:
                if bias.grad is None:
                    grad_b = rows.sum(0)
                else:
                    bias.grad.add_(rows.sum(0))
        return grad_x, grad_w, grad_b


def _uniform(shape, bound: float, dtype, initialize: bool = True) -> nn.Parameter:
    # initialize False (from_linear): no draw, so the global RNG stays in step across ranks
    # whatever the size of each rank's block.
    tensor = torch.empty(shape, dtype=dtype)
    return nn.Parameter(tensor.uniform_(-bound, bound) if initialize else tensor)


def _draw_like_linear(weight: torch.Tensor, bias: torch.Tensor | None, start: int, rows: int, fan_in: int,
                      chunk_elements: int = 1 << 24) -> None:
    """Fills ``weight`` (rows ``[start, start + len(weight))`` of a ``rows x fan_in`` layer) and
    ``bias`` (that block of it) as ``nn.Linear.reset_parameters`` fills the whole layer from the
    global RNG: kaiming-uniform weight rows in order, then the bias; other rows are drawn into a
    scratch chunk and dropped. CPU ``uniform_`` draws serially, so chunks continue the stream."""
    # The bounds exactly as nn.init.kaiming_uniform_(a=sqrt(5)) and nn.Linear compute them.
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    w_bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    b_bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    end = start + weight.shape[0]
    step = max(1, chunk_elements // max(1, fan_in))
    with torch.no_grad():
        scratch = torch.empty((min(step, rows), fan_in), dtype=weight.dtype)
        row = 0
        while row < rows:
            n = min(step, rows - row)
            block = scratch[:n].uniform_(-w_bound, w_bound)
            lo, hi = max(row, start), min(row + n, end)
            if lo < hi:
                weight[lo - start:hi - start].copy_(block[lo - row:hi - row])
            row += n
        if bias is not None:
            full = torch.empty(rows, dtype=bias.dtype).uniform_(-b_bound, b_bound)
            bias.copy_(full[start:end])


class ColumnParallelLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` with the output features split over ``group``
    (a :class:`~pybrain_mpi.parallel.Group`, default all ranks).

    ``gather_output=True`` returns the full output on every rank; False returns this rank's
    block ``[out_start, out_end)`` (feed it to a ``RowParallelLinear(input_is_parallel=True)``).
    Initialised like ``nn.Linear`` block by block; :meth:`from_linear` copies a full layer,
    :meth:`like_linear` draws exactly the unsplit layer's block without building it.

    ``accumulate_in_place = True`` (default False) adds each backward's weight gradient into
    ``weight.grad`` in place (no temporary of the block's size per micro-batch); the gradient
    hooks of the weight then see the first backward only, so not for DDP (Pipeline refuses a
    data group with a multi-rank stage).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: Any = None,
                 gather_output: bool = True, dtype: torch.dtype | None = None, name: str = "column linear",
                 _initialize: bool = True):
        super().__init__()
        self.group, self.gather_output, self.name = group, bool(gather_output), name
        self.accumulate_in_place = False
        rank, size = _group_of(group)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.out_start, self.out_end = even_split(out_features, size, rank)
        bound = 1.0 / math.sqrt(in_features)
        dtype = dtype or torch.get_default_dtype()
        self.weight = _uniform((self.out_end - self.out_start, in_features), bound, dtype, _initialize)
        self.bias = _uniform((self.out_end - self.out_start,), bound, dtype, _initialize) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: Any = None, gather_output: bool = True) -> "ColumnParallelLinear":
        """This rank's block of a full ``nn.Linear`` (the same layer on every rank)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group=group,
                    gather_output=gather_output, dtype=linear.weight.dtype, _initialize=False)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[layer.out_start:layer.out_end])
            if layer.bias is not None:
                layer.bias.copy_(linear.bias[layer.out_start:layer.out_end])
        return layer

    @classmethod
    def like_linear(cls, in_features: int, out_features: int, bias: bool = True, *, group: Any = None,
                    gather_output: bool = True, name: str = "column linear") -> "ColumnParallelLinear":
        """This rank's block of the weights ``nn.Linear(in_features, out_features)`` would draw
        from the global RNG now, without materialising the full layer: the draws run in row
        chunks through the same stream (keeping this block's rows), so the RNG ends where
        ``nn.Linear`` leaves it and the block is bitwise the unsplit layer's (default dtype)."""
        layer = cls(in_features, out_features, bias, group=group, gather_output=gather_output, name=name,
                    _initialize=False)
        _draw_like_linear(layer.weight, layer.bias, layer.out_start, out_features, in_features)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b``: full (gather_output) or this rank's block of the output features."""
        x = _CopyToGroup.apply(x, self.group, self.name)
        if self.accumulate_in_place and torch.is_grad_enabled():
            local = _LinearAccumulating.apply(x, self.weight, self.bias)
        else:
            local = nn.functional.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return local
        pad = (self.out_start, self.out_features - self.out_end)
        return _ReduceFromGroup.apply(nn.functional.pad(local, pad), self.group, self.name)


class RowParallelLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` with the input features split over ``group``.

    Takes the full input (``input_is_parallel=False``) or this rank's block of it
    ``[in_start, in_end)``; returns the full output on every rank (the partial products are
    summed by one allreduce; the bias is added once, after the sum).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: Any = None,
                 input_is_parallel: bool = False, dtype: torch.dtype | None = None, name: str = "row linear",
                 _initialize: bool = True):
        super().__init__()
        self.group, self.input_is_parallel, self.name = group, bool(input_is_parallel), name
        rank, size = _group_of(group)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.in_start, self.in_end = even_split(in_features, size, rank)
        bound = 1.0 / math.sqrt(in_features)
        dtype = dtype or torch.get_default_dtype()
        self.weight = _uniform((out_features, self.in_end - self.in_start), bound, dtype, _initialize)
        self.bias = _uniform((out_features,), bound, dtype, _initialize) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: Any = None, input_is_parallel: bool = False) -> "RowParallelLinear":
        """This rank's block of a full ``nn.Linear`` (the same layer on every rank)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group=group,
                    input_is_parallel=input_is_parallel, dtype=linear.weight.dtype, _initialize=False)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, layer.in_start:layer.in_end])
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` over all input features, the same on every rank."""
        if not self.input_is_parallel:
            x = _CopyToGroup.apply(x, self.group, self.name)[..., self.in_start:self.in_end]
        partial = nn.functional.linear(x, self.weight)
        out = _ReduceFromGroup.apply(partial, self.group, self.name)
        return out if self.bias is None else out + self.bias
