"""``hvd.SyncBatchNorm``: batch normalization with statistics over every rank's batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training-mode mean and variance are those of the global batch.

    Per-channel sums, sums of squares and counts are allreduced (a differentiable
    allreduce, so the backward pass is synchronized too); ranks may hold different batch
    sizes. Eval mode, or a world of one rank, is plain batch norm with running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_set=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from . import Sum, allreduce, global_process_set, size

        self._check_input_dim(input)
        if not self.training or size() == 1:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training or not self.track_running_stats, self.momentum or 0.0, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        work = input.to(torch.float64) if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.full((1,), input.numel() // channels, dtype=work.dtype)
        stats = torch.cat([work.sum(dims), (work * work).sum(dims), count])
        total = allreduce(stats, op=Sum, name=None, process_set=self.process_set or global_process_set)
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels:2 * channels] / n - mean * mean
        if self.track_running_stats:
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                unbiased = var * n / (n - 1) if float(n) > 1 else var
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (work - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape).to(out.dtype) + self.bias.view(shape).to(out.dtype)
        return out.to(input.dtype)
