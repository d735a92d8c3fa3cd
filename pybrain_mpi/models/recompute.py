"""Activation checkpointing for sequential models, built on torch.utils.checkpoint.

    y = pbm.models.recompute.checkpoint_sequential(model, "sqrt", x)
    model = pbm.models.recompute.CheckpointedSequential(model, segments="sqrt")

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
(in-place activations, downsampling earlier, or :class:`TiledSegment`, which runs a
full-resolution conv+activation+pool block tile by tile so its activations never exist at
full size). Random operations
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


# --- tiled segments ------------------------------------------------------------------------

_POINTWISE = (torch.nn.ReLU, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.GELU, torch.nn.SiLU,
              torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Identity)


def _tiling_plan(layers: list) -> tuple[int, int]:
    """(halo, downsample) of a run of 3D layers that can be computed tile by tile.

    Allowed: Conv3d with stride 1, odd kernels, "same" zero padding (kernel // 2) and no
    dilation; pointwise activations; and pooling (MaxPool3d/AvgPool3d with kernel == stride,
    no padding) as the last layers. The halo is the receptive-field radius in input voxels;
    the downsample factor is the product of the pooling strides."""
    halo, down, pooled = 0, 1, False
    for index, layer in enumerate(layers):
        where = f"TiledSegment: layer {index} ({type(layer).__name__})"
        if isinstance(layer, torch.nn.Conv3d):
            if pooled:
                raise ValueError(f"{where}: a convolution after pooling cannot be tiled here; end the segment at the pool")
            k = layer.kernel_size
            if (layer.stride != (1, 1, 1) or layer.dilation != (1, 1, 1) or any(n % 2 == 0 for n in k)
                    or layer.padding != tuple(n // 2 for n in k) or layer.padding_mode != "zeros"):
                raise ValueError(f"{where}: only stride 1, odd kernels and 'same' zero padding tile exactly "
                                 f"(got kernel {k}, stride {layer.stride}, padding {layer.padding}, "
                                 f"dilation {layer.dilation}, padding_mode {layer.padding_mode!r})")
            halo += max(k) // 2
        elif isinstance(layer, (torch.nn.MaxPool3d, torch.nn.AvgPool3d)):
            kernel = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,) * 3
            stride = layer.stride if isinstance(layer.stride, tuple) else (layer.stride,) * 3
            padding = layer.padding if isinstance(layer.padding, tuple) else (layer.padding,) * 3
            if len(set(kernel)) != 1 or kernel != stride or any(padding) or getattr(layer, "ceil_mode", False):
                raise ValueError(f"{where}: pooling must be cubic with stride == kernel and no padding")
            if isinstance(layer, torch.nn.MaxPool3d) and layer.dilation not in (1, (1, 1, 1)):
                raise ValueError(f"{where}: dilated pooling cannot be tiled")
            down *= kernel[0]
            pooled = True
        elif not isinstance(layer, _POINTWISE):  # pointwise layers are local anywhere
            raise ValueError(f"{where}: not tileable (BatchNorm needs whole-volume statistics, dropout "
                             "would draw different masks in the recomputation; keep them outside)")
    return halo, down


def _tiles(size: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


class _TiledRun(torch.autograd.Function):
    """Forward tile by tile without keeping activations; backward recomputes each tile."""

    @staticmethod
    def forward(ctx, tiled, x, *params):
        ctx.tiled = tiled
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _TiledRun._sweep(tiled, x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.tiled.segment.parameters()]
        grads = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        _TiledRun._sweep(ctx.tiled, x, grad_out, grads, grad_x)
        return (None, grad_x, *grads)

    @staticmethod
    def _sweep(tiled, x, grad_out=None, grads=None, grad_x=None):
        """One pass over the output tiles of ``tiled`` (a :class:`TiledSegment`). Each output tile's values depend only on input
        voxels within ``halo`` of its input region, so computing the segment on that region
        (zero padding at its cut faces) and cropping the halo off gives exact values; at the
        volume's own faces the region ends where the full computation pads, so they match
        too. Without ``grad_out``: assembles the output. With it: recomputes each tile with
        autograd and accumulates parameter and input gradients (tiles overlap in the input;
        their contributions add)."""
        segment, tile, halo, down = tiled.segment, tiled.tile, tiled.halo, tiled.downsample
        spatial = x.shape[2:]
        out = None
        params = [p for p in segment.parameters()]
        for z0, z1 in _tiles(spatial[0], tile):
            for y0, y1 in _tiles(spatial[1], tile):
                for x0, x1 in _tiles(spatial[2], tile):
                    box = ((z0, z1), (y0, y1), (x0, x1))
                    # halo-extended region, on the pooling grid so the tile pools like the whole
                    lo = [max(0, (a - halo) // down * down) for a, _ in box]
                    hi = [min(n, -(-(b + halo) // down) * down) for (_, b), n in zip(box, spatial)]
                    piece = x[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                    # the tile's own voxels inside the computed region, in output units
                    crop = tuple(slice((a - l) // down, (b - l) // down) for (a, b), l in zip(box, lo))
                    target = tuple(slice(a // down, b // down) for a, b in box)
                    if grad_out is None:
                        result = segment(piece)[(slice(None), slice(None)) + crop]
                        if out is None:
                            out = result.new_empty(result.shape[:2] + tuple(n // down for n in spatial))
                        out[(slice(None), slice(None)) + target] = result
                        continue
                    piece = piece.detach().requires_grad_(grad_x is not None)
                    with torch.enable_grad():
                        result = segment(piece)[(slice(None), slice(None)) + crop]
                    wanted = [piece] if grad_x is not None else []
                    wanted += [p for p in params if p.requires_grad]
                    got = torch.autograd.grad(result, wanted, grad_out[(slice(None), slice(None)) + target],
                                              allow_unused=True)
                    got = list(got)
                    if grad_x is not None:
                        g = got.pop(0)
                        if g is not None:
                            grad_x[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += g
                    for index, p in enumerate(params):
                        if p.requires_grad:
                            g = got.pop(0)
                            if g is not None:
                                grads[index] += g
        return out


class TiledSegment(torch.nn.Module):
    """Runs a full-resolution 3D block (convolutions, activations, a final pooling) in
    spatial tiles, so its activations never exist at full size: in forward each tile is
    computed and only its pooled output kept; in backward each tile is recomputed and its
    gradients accumulated. Exact (same values as the untiled block, up to float rounding of
    the gradient sums), at the cost of recomputing the tiles' halos and one extra forward.

    This is the answer to the layer checkpointing cannot help: a 3D CNN's first block on
    128^3 inputs, whose full-resolution outputs set the peak (benchmarks/checkpointing.py,
    config ``tiled``).

    Args:
        module: an ``nn.Sequential`` (or list) of Conv3d (stride 1, odd kernel, "same" zero
            padding), pointwise activations and cubic pooling (stride == kernel) at the end.
            BatchNorm and dropout are refused: per-tile statistics and per-tile random masks
            would change the result.
        tile: edge of an output-aligned input tile in voxels (a multiple of the pooling
            factor). Larger tiles recompute less halo and use more memory.

    Input: ``(N, C, D, H, W)`` with D, H, W divisible by the pooling factor.
    """

    def __init__(self, module: torch.nn.Module | Sequence, tile: int = 64):
        super().__init__()
        layers = _layers(module)
        self.segment = module if isinstance(module, torch.nn.Module) else torch.nn.Sequential(*layers)
        self.halo, self.downsample = _tiling_plan(layers)
        self.tile = int(tile)
        if self.tile <= 0 or self.tile % self.downsample:
            raise ValueError(f"TiledSegment: tile {tile} must be a positive multiple of the pooling factor "
                             f"{self.downsample}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"TiledSegment expects (N, C, D, H, W), got shape {tuple(x.shape)}")
        if any(n % self.downsample for n in x.shape[2:]):
            raise ValueError(f"TiledSegment: spatial size {tuple(x.shape[2:])} is not divisible by the "
                             f"pooling factor {self.downsample}")
        params = list(self.segment.parameters())
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
            with torch.no_grad():
                return _TiledRun._sweep(self, x)
        return _TiledRun.apply(self, x, *params)


__all__ = ["CheckpointedSequential", "POLICIES", "TiledSegment", "checkpoint_sequential", "segments_for_policy"]
