"""Fused optimizers: torch.optim's SGD, Adam, AdamW and Adagrad over flat float32 buffers.

    opt = pbm.optim.FusedAdam(model.parameters(), lr=1e-3)
    loss.backward()
    opt.step(grad_scale=1 / world_size, max_grad_norm=1.0)   # average + clip + check + update
    opt.zero_grad(set_to_none=False)                         # keeps grads as flat views

Why: torch's ``fused=True`` CPU step already runs at the memory-bandwidth floor, so these
earn their place by doing more per pass over memory. ``step`` makes exactly two passes:

1. ``grad_sq_norm_and_finite`` reads every gradient once, giving the global norm (for
   clipping) and whether any gradient is Inf/NaN. Nothing is written.
2. If all gradients are finite, one fused kernel per group multiplies each gradient by
   ``grad_scale`` (averaging 1/n, loss-scale unscaling 1/S and the clipping coefficient folded
   into one number; the sign for ``maximize`` too) and applies the optimizer update, split
   across ``num_threads`` cores. If not, nothing is written and ``last_step_finite`` is False.

The Inf/NaN test must come before any write because a bad value may sit at the end of the
buffer while Adam/Adagrad updates already applied to the start cannot be undone exactly.

Layout: when the optimizer is built, each parameter group's parameters are moved into one
contiguous float32 buffer and every ``p.data`` becomes a view into it; the optimizer state
(``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``sum``) lives in
flat buffers of the same layout, and gradients are gathered into a flat gradient buffer
(``p.grad`` is re-pointed to its view, so with ``zero_grad(set_to_none=False)`` later
backward passes accumulate straight into it and nothing is copied). A data-parallel
wrapper hands over an already reduced flat gradient with :meth:`step_flat`, bucket by
bucket. State dicts have torch.optim's format (same keys, dtypes and shapes) and load into
torch.optim and back.

Differences from torch.optim: parameters must be dense float32 CPU tensors; ``foreach`` and
``fused`` are accepted and ignored (this is always fused); ``capturable`` and
``differentiable`` are not supported; and the whole step is skipped when any gradient is
Inf/NaN (torch.optim would write NaNs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..core.buffers import span
from ..core.library import _core


def _threads(num_threads: int | None) -> int:
    return int(num_threads) if num_threads else torch.get_num_threads()


def grad_sq_norm_and_finite(flat_grad: torch.Tensor, scale: float = 1.0,
                            num_threads: int | None = None) -> tuple[float, bool]:
    """One read of a contiguous float32 tensor: (sum of (g*scale)^2, all finite).

    The squared norm is accumulated in float64. Use it to compute a global gradient norm
    over several buffers (sum the results, then ``sqrt``) before :meth:`step_flat`.
    """
    _check_flat(flat_grad, "flat_grad")
    return _core.grad_sq_norm_and_finite(span(flat_grad, 0, flat_grad.numel(), "flat_grad"),
                                         flat_grad.numel(), float(scale), _threads(num_threads))


def _check_flat(tensor: torch.Tensor, name: str) -> None:
    if not (isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
            and tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_sparse):
        raise TypeError(f"{name} must be a contiguous float32 CPU tensor, got "
                        f"{getattr(tensor, 'dtype', type(tensor))} on "
                        f"{getattr(tensor, 'device', '?')}")


@dataclass(frozen=True)
class _Part:
    """Parameters ``first:last`` of a flat group and where their gradients are: element k of
    the group's layout is ``grad[k - grad_offset]``."""

    first: int
    last: int
    grad: torch.Tensor
    grad_offset: int

    def gradients(self, begin: int, n: int) -> Any:
        """The core's span over the gradients of layout elements ``begin : begin + n``."""
        return span(self.grad, begin - self.grad_offset, n, "gradients")


@dataclass
class _FlatGroup:
    """One parameter group laid out flat: params[i] is elements offsets[i]:offsets[i+1]."""

    params: list
    offsets: list
    param: torch.Tensor
    grad: torch.Tensor
    state: dict = field(default_factory=dict)  # state key -> flat float32 tensor

    def buffer(self, key: str) -> torch.Tensor:
        """The flat state buffer ``key``, allocated (zeros) on first use: state that a
        configuration never needs (momentum 0, amsgrad off) costs no memory."""
        if key not in self.state:
            self.state[key] = torch.zeros_like(self.param)
        return self.state[key]

    def view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        p = self.params[index]
        return flat[self.offsets[index]:self.offsets[index + 1]].view(p.shape)


class _FusedOptimizer(torch.optim.Optimizer):
    """Shared bookkeeping: flat buffers, the two-pass step, state-dict synchronisation."""

    # Per-parameter state tensors kept in flat buffers, in torch.optim's key names.
    _flat_state_keys: tuple = ()

    def __init__(self, params: Any, defaults: dict, num_threads: int | None):
        if defaults.get("differentiable"):
            raise ValueError(f"{type(self).__name__} does not support differentiable=True; "
                             "use torch.optim for higher-order optimization")
        if defaults.get("capturable"):
            raise ValueError(f"{type(self).__name__} runs on CPU and does not support "
                             "capturable=True")
        super().__init__(params, defaults)
        self.num_threads = num_threads
        self.last_step_finite = True
        self.last_grad_norm: float | None = None
        self._flat: list[_FlatGroup] = [self._flatten(i, g) for i, g in enumerate(self.param_groups)]
        self._state_in_flat = False

    # ---- layout ---------------------------------------------------------------------------

    def _flatten(self, group_index: int, group: dict) -> _FlatGroup:
        params = group["params"]
        for i, p in enumerate(params):
            if p.dtype != torch.float32 or p.device.type != "cpu" or p.is_sparse:
                raise TypeError(
                    f"{type(self).__name__}: parameter {i} of group {group_index} (shape "
                    f"{tuple(p.shape)}) is a {p.dtype} tensor on {p.device}; fused optimizers take "
                    "dense float32 CPU parameters. Keep fp32 master weights (autocast handles "
                    "bf16 compute) or use torch.optim for this group.")
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        flat_param = torch.empty(offsets[-1], dtype=torch.float32)
        flat = _FlatGroup(list(params), offsets, flat_param, torch.zeros_like(flat_param))
        with torch.no_grad():
            for i, p in enumerate(params):
                view = flat.view(flat_param, i)
                view.copy_(p)
                p.data = view  # the Parameter object stays the same; its storage is now flat
                if p.grad is not None:
                    flat.view(flat.grad, i).copy_(p.grad)
                    p.grad = flat.view(flat.grad, i)
        return flat

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group as torch.optim does and lays it out flat."""
        super().add_param_group(param_group)
        if hasattr(self, "_flat"):
            index = len(self.param_groups) - 1
            self._flat.append(self._flatten(index, self.param_groups[index]))

    def flat_param(self, group_index: int) -> torch.Tensor:
        """The contiguous float32 buffer holding group ``group_index``'s parameters."""
        return self._flat[group_index].param

    def flat_grad(self, group_index: int) -> torch.Tensor:
        """The group's flat gradient buffer (``p.grad`` are views into it when possible)."""
        return self._flat[group_index].grad

    def param_offsets(self, group_index: int) -> list[int]:
        """Element offsets of the group's parameters in its flat buffers (len = params + 1)."""
        return list(self._flat[group_index].offsets)

    # ---- state -----------------------------------------------------------------------------

    def _sync_state(self) -> None:
        """Moves per-parameter state (e.g. just loaded from a state_dict) into the flat buffers."""
        if self._state_in_flat:
            return
        for flat in self._flat:
            for i, p in enumerate(flat.params):
                state = self.state.get(p)
                if not state:
                    continue
                for key in self._flat_state_keys:
                    value = state.get(key)
                    if value is None:
                        continue
                    view = flat.view(flat.buffer(key), i)
                    if value.data_ptr() != view.data_ptr():
                        view.copy_(value.detach().reshape(view.shape))
                        state[key] = view
                if "step" in state and not torch.is_tensor(state["step"]):
                    state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        self._state_in_flat = True

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of this class or of the matching torch.optim optimizer."""
        super().load_state_dict(state_dict)
        self._state_in_flat = False
        self._sync_state()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim; ``set_to_none=False`` zeroes the flat buffers in place and keeps
        ``p.grad`` as views, so the next backward accumulates straight into them."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        for flat in self._flat:
            flat.grad.zero_()
            for i, p in enumerate(flat.params):
                view = flat.view(flat.grad, i)
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view

    # ---- stepping --------------------------------------------------------------------------

    def _gather_grads(self, flat: _FlatGroup, group_index: int) -> list[tuple[int, int]]:
        """Copies gradients that are not already views into the flat buffer; returns the runs
        [first, last) of consecutive parameters that have gradients (torch skips the others)."""
        runs: list[tuple[int, int]] = []
        start = None
        for i, p in enumerate(flat.params):
            grad = p.grad
            if grad is None:
                if start is not None:
                    runs.append((start, i))
                    start = None
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__}: parameter {i} of group {group_index} "
                                   "has a sparse gradient; fused optimizers take dense gradients")
            view = flat.view(flat.grad, i)
            if grad.data_ptr() != view.data_ptr():
                view.copy_(grad)
                p.grad = view
            if start is None:
                start = i
        if start is not None:
            runs.append((start, len(flat.params)))
        return runs

    @torch.no_grad()
    def step(self, closure: Callable | None = None, grad_scale: float = 1.0,
             max_grad_norm: float | None = None,
             found_inf_fn: Callable[[bool], bool] | None = None,
             grads_finite: bool | None = None) -> Any:
        """One optimizer step over all groups; returns the closure's loss (or None).

        grad_scale: multiplies every gradient inside the update (1/world_size to average a
            summed gradient, 1/loss_scale to unscale; both together as their product).
        max_grad_norm: clip the gradients (after scaling) to this global L2 norm, as
            torch.nn.utils.clip_grad_norm_ does; the norm is stored in ``last_grad_norm``.
        found_inf_fn: called with "this rank found Inf/NaN" and returns the decision for all
            ranks (e.g. an allreduce max), so every rank skips the same step.
        grads_finite: the gradients' finiteness when it is already known, e.g.
            ``DistributedDataParallel(..., check_finite=True).grads_finite``, which the
            allreduce computed inside its own reduce pass (the same on every rank). True skips
            the separate Inf/NaN read pass (unless clipping needs the norm or
            ``|grad_scale| > 1`` could overflow); False skips the step.

        When any gradient is Inf/NaN the step is skipped: nothing is written, step counts
        stay, and ``last_step_finite`` is False.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_state()
        threads = _threads(self.num_threads)
        plans = []
        sq_norm, finite = 0.0, grads_finite is not False
        known = grads_finite is not None and max_grad_norm is None and abs(float(grad_scale)) <= 1.0
        for index, (group, flat) in enumerate(zip(self.param_groups, self._flat)):
            runs = self._gather_grads(flat, index)
            plans.append(runs)
            if known:
                continue  # the allreduce already checked every element
            for first, last in runs:
                begin, end = flat.offsets[first], flat.offsets[last]
                part_sq, part_finite = _core.grad_sq_norm_and_finite(
                    span(flat.grad, begin, end - begin, "gradients"), end - begin,
                    float(grad_scale), threads)
                sq_norm += part_sq
                finite = finite and part_finite
        if found_inf_fn is not None:
            finite = not found_inf_fn(not finite)
        self.last_step_finite = finite
        self.last_grad_norm = math.sqrt(sq_norm) if finite else float("nan")
        if not finite:
            return loss
        scale = float(grad_scale)
        if max_grad_norm is not None:
            # Same coefficient as torch.nn.utils.clip_grad_norm_.
            scale *= min(1.0, float(max_grad_norm) / (self.last_grad_norm + 1e-6))
        for group, flat, runs in zip(self.param_groups, self._flat, plans):
            for first, last in runs:
                self._update(group, flat, _Part(first, last, flat.grad, 0), scale, threads)
        return loss

    @torch.no_grad()
    def step_flat(self, group_index: int, flat_grad: torch.Tensor, grad_scale: float = 1.0,
                  offset: int = 0, check_finite: bool = True) -> bool:
        """Updates the parameters of one group from an already flat gradient; returns finite.

        ``flat_grad`` (contiguous float32) holds the gradients of elements
        ``offset : offset + flat_grad.numel()`` of the group's flat layout
        (:meth:`param_offsets`), which must start and end on parameter boundaries, so a
        data-parallel bucket can be applied as soon as its allreduce finishes. ``p.grad`` is
        not read. With ``check_finite`` the gradient is checked first (one extra read) and
        nothing is written when it holds Inf/NaN; pass False when the caller already knows.
        """
        _check_flat(flat_grad, "flat_grad")
        if not 0 <= group_index < len(self._flat):
            raise IndexError(f"group_index {group_index} out of range: the optimizer has "
                             f"{len(self._flat)} parameter groups")
        flat = self._flat[group_index]
        end = offset + flat_grad.numel()
        try:
            first, last = flat.offsets.index(offset), flat.offsets.index(end)
        except ValueError:
            raise ValueError(
                f"step_flat: elements [{offset}, {end}) of group {group_index} do not start and "
                f"end on parameter boundaries; boundaries are {flat.offsets[:8]}"
                f"{'...' if len(flat.offsets) > 8 else ''} (see param_offsets())") from None
        if first >= last:
            return True
        self._sync_state()
        threads = _threads(self.num_threads)
        if check_finite:
            _, finite = _core.grad_sq_norm_and_finite(
                span(flat_grad, 0, flat_grad.numel(), "flat_grad"), flat_grad.numel(),
                float(grad_scale), threads)
            if not finite:
                self.last_step_finite = False
                return False
        self._update(self.param_groups[group_index], flat, _Part(first, last, flat_grad, offset),
                     float(grad_scale), threads)
        return True

    def _update(self, group: dict, flat: _FlatGroup, part: "_Part", scale: float, threads: int) -> None:
        """Applies the update to params[part.first:part.last], whose gradients ``part`` holds."""
        raise NotImplementedError

    def _advance_steps(self, flat: _FlatGroup, first: int, last: int) -> list[tuple[int, int, float]]:
        """Increments 'step' of params[first:last]; returns runs (first, last, step) of equal
        step count (one run unless some parameters skipped steps)."""
        steps = [self.state[flat.params[i]]["step"] for i in range(first, last)]
        torch._foreach_add_(steps, 1.0)
        values = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
        runs, start = [], first
        for k in range(1, len(values) + 1):
            if k == len(values) or values[k] != values[k - 1]:
                runs.append((start, first + k, values[k - 1]))
                start = first + k
        return runs



class FusedSGD(_FusedOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize), fused.

    Same constructor arguments and defaults as torch.optim.SGD, plus ``num_threads``
    (default: torch.get_num_threads() at each step). See the module docstring for the
    two-pass step, :meth:`step`'s ``grad_scale``/``max_grad_norm`` and :meth:`step_flat`.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 num_threads: int | None = None):
        if lr < 0.0 or momentum < 0.0 or weight_decay < 0.0:
            raise ValueError(f"FusedSGD: lr ({lr}), momentum ({momentum}) and weight_decay "
                             f"({weight_decay}) must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("FusedSGD: nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        self._flat_state_keys = ("momentum_buffer",)
        super().__init__(params, defaults, num_threads)

    def _update(self, group, flat, part, scale, threads):
        first, last = part.first, part.last
        momentum = float(group["momentum"])
        sign = -1.0 if group["maximize"] else 1.0
        # Parameters whose momentum buffer exists continue it; the others start it with the
        # gradient (torch's first step). Consecutive parameters in the same situation run as one.
        def initialized(i: int) -> bool:
            return self.state[flat.params[i]].get("momentum_buffer") is not None

        runs, start = [], first
        for i in range(first + 1, last + 1):
            if i == last or initialized(i) != initialized(start):
                runs.append((start, i, momentum != 0 and initialized(start)))
                start = i
        buffer = flat.buffer("momentum_buffer") if momentum != 0 else None
        for a, b, started in runs:
            begin, end = flat.offsets[a], flat.offsets[b]
            n = end - begin
            _core.sgd_step(span(flat.param, begin, n, "parameters"),
                           part.gradients(begin, n),
                           span(buffer, begin, n, "momentum_buffer") if buffer is not None else 0, n,
                           _core.SgdParams(lr=float(group["lr"]), momentum=momentum,
                                           dampening=float(group["dampening"]),
                                           weight_decay=float(group["weight_decay"]),
                                           nesterov=bool(group["nesterov"]),
                                           momentum_initialized=started, grad_scale=sign * scale),
                           threads)
            if buffer is not None and not started:
                for i in range(a, b):
                    self.state[flat.params[i]]["momentum_buffer"] = flat.view(buffer, i)


class FusedAdam(_FusedOptimizer):
    """torch.optim.Adam (amsgrad, weight_decay, maximize, decoupled_weight_decay), fused.

    Same constructor arguments and defaults as torch.optim.Adam, plus ``num_threads``.
    Bias correction as torch: step size lr/(1-beta1^t), denominator
    sqrt(v)/sqrt(1-beta2^t) + eps. See the module docstring.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, num_threads: int | None = None):
        if not (lr >= 0.0 and eps >= 0.0 and weight_decay >= 0.0
                and 0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{type(self).__name__}: invalid hyperparameters lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}: need "
                             "lr, eps, weight_decay >= 0 and 0 <= beta < 1")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        self._flat_state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        super().__init__(params, defaults, num_threads)

    def _update(self, group, flat, part, scale, threads):
        first, last = part.first, part.last
        amsgrad = bool(group["amsgrad"])
        for i in range(first, last):
            state = self.state[flat.params[i]]
            if not state:  # torch's lazy state initialisation, as views of the flat buffers
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = flat.view(flat.buffer("exp_avg"), i)
                state["exp_avg_sq"] = flat.view(flat.buffer("exp_avg_sq"), i)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = flat.view(flat.buffer("max_exp_avg_sq"), i)
        beta1, beta2 = (float(b) for b in group["betas"])
        sign = -1.0 if group["maximize"] else 1.0
        for a, b, step in self._advance_steps(flat, first, last):
            begin, end = flat.offsets[a], flat.offsets[b]
            n = end - begin
            _core.adam_step(span(flat.param, begin, n, "parameters"),
                            part.gradients(begin, n),
                            (span(flat.buffer("exp_avg"), begin, n, "exp_avg"),
                             span(flat.buffer("exp_avg_sq"), begin, n, "exp_avg_sq"),
                             span(flat.buffer("max_exp_avg_sq"), begin, n, "max_exp_avg_sq")
                             if amsgrad else 0), n,
                            _core.AdamParams(lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                             eps=float(group["eps"]),
                                             weight_decay=float(group["weight_decay"]),
                                             decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                                             amsgrad=amsgrad, step=step, grad_scale=sign * scale),
                            threads)


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2), fused. See FusedAdam."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 num_threads: int | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, num_threads=num_threads)


class FusedAdagrad(_FusedOptimizer):
    """torch.optim.Adagrad (lr_decay, weight_decay, initial_accumulator_value, eps,
    maximize), fused. Same constructor arguments and defaults as torch.optim.Adagrad, plus
    ``num_threads``. Like torch, the state ('step', 'sum') is created at construction."""

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 num_threads: int | None = None):
        if not (lr >= 0.0 and lr_decay >= 0.0 and weight_decay >= 0.0
                and initial_accumulator_value >= 0.0 and eps >= 0.0):
            raise ValueError(f"FusedAdagrad: invalid hyperparameters lr={lr}, lr_decay={lr_decay}, "
                             f"weight_decay={weight_decay}, initial_accumulator_value="
                             f"{initial_accumulator_value}, eps={eps}: all must be >= 0")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach,
                        maximize=maximize, differentiable=differentiable, fused=fused)
        self._flat_state_keys = ("sum",)
        super().__init__(params, defaults, num_threads)
        for group, flat in zip(self.param_groups, self._flat):
            self._init_group_state(group, flat)
        self._state_in_flat = True

    def _init_group_state(self, group: dict, flat: _FlatGroup) -> None:
        flat.buffer("sum").fill_(float(group["initial_accumulator_value"]))
        for i, p in enumerate(flat.params):
            state = self.state[p]
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["sum"] = flat.view(flat.buffer("sum"), i)

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group and creates its state at once, as torch.optim.Adagrad does."""
        super().add_param_group(param_group)
        if hasattr(self, "_flat"):
            self._init_group_state(self.param_groups[-1], self._flat[-1])

    def _update(self, group, flat, part, scale, threads):
        first, last = part.first, part.last
        sign = -1.0 if group["maximize"] else 1.0
        for a, b, step in self._advance_steps(flat, first, last):
            begin, end = flat.offsets[a], flat.offsets[b]
            n = end - begin
            _core.adagrad_step(span(flat.param, begin, n, "parameters"),
                               part.gradients(begin, n),
                               span(flat.buffer("sum"), begin, n, "sum"), n,
                               _core.AdagradParams(lr=float(group["lr"]),
                                                   lr_decay=float(group["lr_decay"]),
                                                   weight_decay=float(group["weight_decay"]),
                                                   eps=float(group["eps"]), step=step,
                                                   grad_scale=sign * scale),
                               threads)


__all__ = ["FusedSGD", "FusedAdam", "FusedAdamW", "FusedAdagrad", "grad_sq_norm_and_finite"]
