"""Mixed precision: dynamic loss scaling with a fused unscale-and-check and a cross-rank decision.

    scaler = pbm.optim.LossScaler()   # also pbm.amp.LossScaler
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)          # skipped (on every rank) if any gradient is Inf/NaN
    scaler.update()

Dynamic loss scaling (docs/background.md section 4; Micikevicius et al., "Mixed Precision Training"):
keep float32 master weights, multiply the loss by S so small 16-bit gradients do not flush to
zero; if any gradient is Inf/NaN, skip the update and multiply S by ``backoff_factor``;
otherwise unscale by 1/S and update, and after ``growth_interval`` clean steps in a row
multiply S by ``growth_factor``. The skip decision is an allreduce(max) of each rank's
"found Inf/NaN" flag, so all ranks skip the same step and their weights never diverge.

Unscaling costs no extra pass with :mod:`pybrain_mpi.optim`'s fused optimizers: ``step``
hands them 1/S as ``grad_scale`` and the agreement as ``found_inf_fn``, so the check rides on
their gradient pre-pass and the unscaling on the update (``p.grad`` then stays scaled). For
any other optimizer the gradients are unscaled in place by one fused C++ pass that also
detects Inf/NaN (:meth:`LossScaler.unscale_and_check`), then ``optimizer.step()`` runs or not.

bfloat16 has float32's exponent range, so with ``torch.autocast("cpu", dtype=torch.bfloat16)``
overflow is rare and the scaler mostly guards against genuine Inf/NaN; with float16 it is
essential. The state dict uses torch.amp.GradScaler's keys, so either loads the other's.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .. import communication
from ..core.library import _core
from ..core.buffers import FLOAT32, FLOAT64, span
from .fused import _FusedOptimizer


_FLOAT32_MAX = torch.finfo(torch.float32).max


class LossScaler:
    """Dynamic loss scaler; see the module docstring.

    Args:
        init_scale: initial scale S.
        growth_factor: S is multiplied by this after ``growth_interval`` clean steps.
        backoff_factor: S is multiplied by this after a step with Inf/NaN gradients.
        growth_interval: number of consecutive clean steps before growing S.
        allreduce_fn: ``fn(flag) -> flag`` reducing a 1-element float32 tensor with max over
            all ranks. Default: :func:`pybrain_mpi.allreduce` when pybrain_mpi is initialized
            with more than one rank, else no communication.
        num_threads: threads for the unscale kernel (default torch.get_num_threads()).
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 allreduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 num_threads: int | None = None):
        if not init_scale > 0:
            raise ValueError(f"LossScaler: init_scale must be > 0, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"LossScaler: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"LossScaler: backoff_factor must be in (0, 1), got {backoff_factor}")
        if int(growth_interval) < 1:
            raise ValueError(f"LossScaler: growth_interval must be >= 1, got {growth_interval}")
        self._scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0
        self.allreduce_fn = allreduce_fn
        self.num_threads = num_threads
        self._found_inf: bool | None = None  # decision of the current iteration, once made
        self._unscaled = False
        self.skipped_steps = 0

    # ---- scaling ---------------------------------------------------------------------------

    def get_scale(self) -> float:
        """The current loss scale S."""
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Returns ``loss * S`` (call ``.backward()`` on it)."""
        return loss * self._scale

    def found_inf(self) -> bool:
        """Whether the current iteration's gradients held Inf/NaN on any rank (after step)."""
        return bool(self._found_inf)

    # ---- unscale and check -----------------------------------------------------------------

    def unscale_and_check(self, params_or_buffers: Any) -> bool:
        """Divides gradients by S in place; returns True when they are finite on every rank.

        Takes an optimizer, parameters (their ``.grad`` is unscaled; parameters without
        gradients are skipped) or gradient tensors themselves (e.g. flat bucket buffers:
        tensors that do not require grad). float32/float64 go through one fused C++ pass
        that unscales and detects Inf/NaN; other dtypes fall back to torch ops. Call it
        before clipping gradients yourself; :meth:`step` then does not unscale again.
        """
        if self._unscaled:
            raise RuntimeError("LossScaler.unscale_and_check was already called this iteration; "
                               "call update() after step() before unscaling again")
        inverse = 1.0 / self._scale
        threads = int(self.num_threads) if self.num_threads else torch.get_num_threads()
        finite = True
        for grad in _gradients(params_or_buffers):
            if grad.dtype in (torch.float32, torch.float64) and grad.is_contiguous() \
                    and grad.device.type == "cpu" and not grad.is_sparse:
                code = FLOAT32 if grad.dtype == torch.float32 else FLOAT64
                finite &= _core.unscale_and_check(span(grad, 0, grad.numel(), "gradient"),
                                                  grad.numel(), code, inverse, threads)
            else:
                grad.mul_(inverse)
                finite &= bool(torch.isfinite(grad).all())
        self._found_inf = self._agree(not finite)
        self._unscaled = True
        return not self._found_inf

    def _agree(self, local_found_inf: bool) -> bool:
        """All ranks' verdict: True if any rank found Inf/NaN (allreduce max of the flag)."""
        flag = torch.tensor([1.0 if local_found_inf else 0.0], dtype=torch.float32)
        if self.allreduce_fn is not None:
            flag = self.allreduce_fn(flag)
        elif communication.is_initialized() and communication.size() > 1:
            flag = communication.allreduce(flag, op="max", name="pbm.amp.found_inf", algorithm="auto")
        return bool(flag.reshape(-1)[0].item() > 0)

    # ---- step and update -------------------------------------------------------------------

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Runs ``optimizer.step(*args, **kwargs)`` unless a rank found Inf/NaN gradients.

        With a pbm.optim fused optimizer (and no prior :meth:`unscale_and_check`) the unscaling
        and the check are folded into its step (``grad_scale`` in kwargs is multiplied by 1/S,
        e.g. pass 1/world_size to average too). Returns what the optimizer's step returns, or
        None when skipped.
        """
        if isinstance(optimizer, _FusedOptimizer) and not self._unscaled:
            grad_scale = float(kwargs.pop("grad_scale", 1.0)) / self._scale
            result = optimizer.step(*args, grad_scale=grad_scale, found_inf_fn=self._agree, **kwargs)
            self._found_inf = not optimizer.last_step_finite
        else:
            if not self._unscaled:
                self.unscale_and_check(optimizer)
            result = None if self._found_inf else optimizer.step(*args, **kwargs)
        if self._found_inf:
            self.skipped_steps += 1
        return result

    def update(self) -> None:
        """Adjusts S after the iteration's step: back off after Inf/NaN, grow after
        ``growth_interval`` clean steps in a row. Call once per iteration."""
        if self._found_inf is None:
            raise RuntimeError("LossScaler.update() called before step() or unscale_and_check() "
                               "in this iteration")
        if self._found_inf:
            self._scale *= self._backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self._growth_interval:
                # Never grow past float32's range: an infinite S would make every step overflow
                # (torch.amp.GradScaler keeps the old scale in that case too).
                if self._scale * self._growth_factor <= _FLOAT32_MAX:
                    self._scale *= self._growth_factor
                self._growth_tracker = 0
        self._found_inf = None
        self._unscaled = False

    # ---- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Scale and growth state, with torch.amp.GradScaler's keys."""
        return {"scale": self._scale, "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict` (ours or torch.amp.GradScaler's)."""
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval",
                   "_growth_tracker"} - set(state_dict)
        if missing:
            raise KeyError(f"LossScaler.load_state_dict: missing keys {sorted(missing)}; expected "
                           "a dict from LossScaler.state_dict() or torch.amp.GradScaler.state_dict()")
        self._scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._growth_tracker = int(state_dict["_growth_tracker"])


def _gradients(source: Any) -> Iterable[torch.Tensor]:
    """The gradient tensors named by an optimizer, parameters, or gradient buffers."""
    if isinstance(source, torch.optim.Optimizer):
        source = [p for group in source.param_groups for p in group["params"]]
    elif isinstance(source, torch.Tensor):
        source = [source]
    for item in source:
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"LossScaler.unscale_and_check: expected an optimizer, parameters or "
                            f"gradient tensors, got {type(item).__name__}")
        if item.requires_grad:
            if item.grad is not None:
                yield item.grad
        else:
            yield item


__all__ = ["LossScaler"]
