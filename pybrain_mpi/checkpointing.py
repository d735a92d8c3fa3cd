"""Activation checkpointing for sequential models, built on torch.utils.checkpoint.

    y = pbm.checkpointing.checkpoint_sequential(model, "sqrt", x)
    model = pbm.checkpointing.CheckpointedSequential(model, segments="sqrt")

The model's layers are cut into ``segments`` contiguous pieces. In the forward pass only each
piece's input is kept; the activations inside a piece are dropped and recomputed during
backward, when that piece's gradients are needed (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost"). The last piece is not checkpointed: backward starts there at once.

Trade-off: for n similar layers and k segments, stored activations drop from about n layer
outputs to about k + n/k (the k boundaries plus the one piece being recomputed), minimized by
k = sqrt(n) (the ``"sqrt"`` policy, O(sqrt(n)) memory); the price is one extra forward pass of
all but the last piece, typically +20-40% step time. It only pays when activations dominate
memory *and* are spread over many layers: when one early full-resolution layer holds most of
the bytes (a 3D CNN's first convolution on 128^3 patches), that layer's own output and its
recomputation set the peak and checkpointing cannot lower it; make that layer cheaper instead
(in-place activations, downsampling earlier, fused conv+activation+pool). Random operations
(dropout) replay the same random numbers; BatchNorm running statistics are updated twice per
step (once in the recomputation), as with any torch checkpointing.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.utils.checkpoint import checkpoint

POLICIES = ("sqrt", "none")


def segments_for_policy(num_layers: int, policy: int | str) -> int:
    """Number of segments for ``num_layers`` layers: an int (clamped to 1..num_layers),
    ``"sqrt"`` (about sqrt(num_layers), the memory-optimal choice for similar layers) or
    ``"none"`` (1 segment, i.e. no checkpointing)."""
    if num_layers < 1:
        raise ValueError("segments_for_policy: the model has no layers to checkpoint")
    if isinstance(policy, str):
        if policy == "sqrt":
            return max(1, min(num_layers, round(math.sqrt(num_layers))))
        if policy == "none":
            return 1
        raise ValueError(f"unknown checkpointing policy {policy!r}; use an int or one of {POLICIES}")
    if int(policy) < 1:
        raise ValueError(f"segments must be >= 1, got {policy}")
    return min(int(policy), num_layers)


def _layers(module: torch.nn.Module | Sequence) -> list:
    if isinstance(module, torch.nn.Sequential):
        return list(module.children())
    if isinstance(module, (list, tuple)):
        return list(module)
    raise TypeError(f"checkpoint_sequential takes a torch.nn.Sequential or a list of modules, "
                    f"got {type(module).__name__}; wrap the layers in nn.Sequential")


def _run(layers: list, x: Any) -> Any:
    for layer in layers:
        x = layer(x)
    return x


def checkpoint_sequential(module: torch.nn.Module | Sequence, segments: int | str, input: Any,
                          use_reentrant: bool = False, preserve_rng_state: bool = True) -> Any:
    """Runs ``module`` (nn.Sequential or list of layers) on ``input`` with all but the last of
    ``segments`` pieces checkpointed; ``segments`` is an int or a policy (``"sqrt"``).

    Gradients are identical to running the module plainly. Without grad mode (evaluation) it
    simply runs the layers.
    """
    layers = _layers(module)
    count = segments_for_policy(len(layers), segments)
    if count == 1 or not torch.is_grad_enabled():
        return _run(layers, input)
    # Near-equal contiguous pieces: the first (len % count) pieces get one extra layer.
    base, extra = divmod(len(layers), count)
    bounds, start = [], 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    x = input
    for start, end in bounds[:-1]:
        x = checkpoint(_run, layers[start:end], x, use_reentrant=use_reentrant,
                       preserve_rng_state=preserve_rng_state)
    start, end = bounds[-1]
    return _run(layers[start:end], x)


class CheckpointedSequential(torch.nn.Module):
    """A sequential model whose forward uses :func:`checkpoint_sequential` while training.

    Args:
        module: the nn.Sequential to run (its parameters and state_dict keys are kept under
            ``.module``).
        segments: int or policy (``"sqrt"``, ``"none"``).
        use_reentrant: passed to torch.utils.checkpoint (False: the recommended implementation).
    """

    def __init__(self, module: torch.nn.Sequential, segments: int | str = "sqrt",
                 use_reentrant: bool = False):
        super().__init__()
        self.module = module
        self.segments = segments
        self.use_reentrant = use_reentrant

    def forward(self, x: Any) -> Any:
        """Checkpointed while training with grad enabled, plain otherwise."""
        if self.training:
            return checkpoint_sequential(self.module, self.segments, x, self.use_reentrant)
        return self.module(x)


__all__ = ["CheckpointedSequential", "POLICIES", "checkpoint_sequential", "segments_for_policy"]
