"""Optimizers and loss scaling: what runs after the gradient allreduce.

- :mod:`.fused`: ``FusedSGD``, ``FusedAdam``, ``FusedAdamW``, ``FusedAdagrad`` (torch.optim's
  arguments and state_dict format; averaging, unscaling, the Inf/NaN check and clipping
  folded into one native update pass).
- :mod:`.loss_scaling`: :class:`LossScaler`, dynamic loss scaling whose skip decision every
  rank agrees on (also reachable as ``pbm.amp``).

    opt = pbm.optim.FusedAdam(model.parameters(), lr=1e-3)
    scaler = pbm.optim.LossScaler()
"""

from .fused import FusedAdagrad, FusedAdam, FusedAdamW, FusedSGD, grad_sq_norm_and_finite
from .loss_scaling import LossScaler

__all__ = ["FusedSGD", "FusedAdam", "FusedAdamW", "FusedAdagrad", "grad_sq_norm_and_finite",
           "LossScaler"]
