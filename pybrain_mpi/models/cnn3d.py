"""NaiveCNN3D: the plain 3D CNN used for structural-MRI regression.

Architecture (docs/background.md section 2, after the ABCD fluid-intelligence 3D CNN): four blocks
``Conv3d(k=3, padding=1, no bias) -> BatchNorm3d -> MaxPool3d(2) -> ReLU -> Dropout3d`` with 10, 20,
40, 80 output channels, then fully connected layers ``flat -> fc1 -> fc2 -> out`` (ReLU and
dropout between them). MSE loss is the caller's.

The fully connected widths are derived from the input size unless given: with the grid after
the four poolings ``g = (d // 16, h // 16, w // 16)`` and ``flat = 80 * prod(g)``,
``fc1 = max(16, flat // 22)`` and ``fc2 = max(8, fc1 // 2)``. At the original full-resolution grid of
11 x 11 x 11 (inputs 176..191 voxels per side) that is flat = 106,480 -> 4840 -> 2420 -> 1,
the published widths, and **527,199,651** parameters (the FC layers are 99.98%).

Parameter count::

    conv = sum(c_in * c_out * 27) + 2 * sum(c_out)   (BN weight+bias)  = 113,970
    (without batch norm the convolutions keep their biases: + sum(c_out) instead)
    fc   = flat * fc1 + fc1 + fc1 * fc2 + fc2 + fc2 * out + out

Default (``input_shape=(64, 64, 64)``, derived widths 232/116, 1 output): **1,329,187**.

For a model too large for one rank, :func:`naive_cnn3d_layers` gives the same layers as builders
(:class:`~pybrain_mpi.parallel.staged.StagedLayers`): a pipeline stage builds only its own, each
under its own seed, and a stage spread over several ranks holds the first FC layer as a
column-parallel block. ``NaiveCNN3D(seed=s)`` is the unsplit model with exactly those weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NaiveCNN3D", "naive_cnn3d_layers", "naive_cnn3d_parameter_count", "CNN3D_CHANNELS"]

CNN3D_CHANNELS = (10, 20, 40, 80)
_REDUCTION = 2 ** len(CNN3D_CHANNELS)
_MIN_FC1 = 16


def _derived_widths(input_shape) -> tuple[int, int, int]:
    grid = [int(s) // _REDUCTION for s in input_shape]
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"NaiveCNN3D: input_shape must be 3 sizes of at least {_REDUCTION} "
                         f"voxels (four 2x poolings), got {tuple(input_shape)}")
    flat = CNN3D_CHANNELS[-1] * math.prod(grid)
    # Small inputs would give fc widths of 1-3 units (easily all-dead ReLUs): keep a floor.
    fc1 = max(_MIN_FC1, flat // 22)
    return flat, fc1, max(_MIN_FC1 // 2, fc1 // 2)


def naive_cnn3d_parameter_count(input_shape=(64, 64, 64), in_channels: int = 1,
                                fc_widths=None, out_features: int = 1,
                                batch_norm: bool = True) -> int:
    """Number of trainable parameters of ``NaiveCNN3D`` with these arguments, in closed form."""
    flat, fc1, fc2 = _derived_widths(input_shape)
    if fc_widths is not None:
        fc1, fc2 = (int(w) for w in fc_widths)
    chans = [in_channels, *CNN3D_CHANNELS]
    conv = sum(chans[i] * chans[i + 1] * 27 for i in range(4))
    # With batch norm the conv bias is redundant (BN subtracts the mean): BN weight+bias
    # replace it; without batch norm each conv has its bias.
    conv += 2 * sum(CNN3D_CHANNELS) if batch_norm else sum(CNN3D_CHANNELS)
    fc = flat * fc1 + fc1 + fc1 * fc2 + fc2 + fc2 * out_features + out_features
    return conv + fc


def _conv_block(c_in: int, c_out: int, dropout: float, batch_norm: bool):
    def build(group):
        layers = [nn.Conv3d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm3d(c_out))
        layers += [nn.MaxPool3d(2), nn.ReLU(inplace=True), nn.Dropout3d(dropout)]
        return nn.Sequential(*layers)
    return build


def _first_fc(flat: int, fc1: int):
    def build(group):
        if group is None or group.size == 1:
            return nn.Linear(flat, fc1)
        from ..parallel.tensor import ColumnParallelLinear

        layer = ColumnParallelLinear.like_linear(flat, fc1, group=group, name="NaiveCNN3D fc1")
        # 98% of the parameters at 176^3: no block-sized temporary per micro-batch's backward.
        layer.accumulate_in_place = True
        return layer
    return build


def naive_cnn3d_layers(input_shape=(64, 64, 64), in_channels: int = 1, fc_widths=None,
                       out_features: int = 1, dropout: float = 0.1, batch_norm: bool = True, *,
                       seed: int | None = 0):
    """NaiveCNN3D's :meth:`~NaiveCNN3D.pipeline_layers` as builders, nothing built yet: a
    :class:`~pybrain_mpi.parallel.staged.StagedLayers` (the four conv blocks, then the head's
    eight layers). Arguments as :class:`NaiveCNN3D`'s. The first FC layer, built for a stage of
    several ranks, is a ``ColumnParallelLinear`` block of the unsplit layer's weights."""
    from ..parallel.staged import StagedLayers

    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"NaiveCNN3D: dropout must be in [0, 1), got {dropout}")
    flat, fc1, fc2 = _derived_widths(tuple(int(s) for s in input_shape))
    if fc_widths is not None:
        if len(fc_widths) != 2 or min(int(w) for w in fc_widths) < 1:
            raise ValueError(f"NaiveCNN3D: fc_widths must be two positive widths, got {fc_widths}")
        fc1, fc2 = (int(w) for w in fc_widths)
    chans = [int(in_channels), *CNN3D_CHANNELS]
    builders = [_conv_block(chans[i], chans[i + 1], dropout, batch_norm) for i in range(len(CNN3D_CHANNELS))]
    builders += [lambda g: nn.Flatten(), _first_fc(flat, fc1), lambda g: nn.ReLU(inplace=True),
                 lambda g: nn.Dropout(dropout), lambda g: nn.Linear(fc1, fc2), lambda g: nn.ReLU(inplace=True),
                 lambda g: nn.Dropout(dropout), lambda g: nn.Linear(fc2, int(out_features))]
    return StagedLayers(builders, seed=seed)


class NaiveCNN3D(nn.Module):
    """Four-block 3D CNN regressor (channels 10/20/40/80) with fully connected head.

    Args:
        input_shape: spatial size ``(D, H, W)`` of the input volumes/patches, each >= 16.
        in_channels: input channels (1 for a T1 volume).
        fc_widths: ``(fc1, fc2)``; default derived from ``input_shape`` (module docstring).
        out_features: regression outputs (1 in the original).
        dropout: dropout probability after each conv block and hidden FC layer.
        batch_norm: BatchNorm3d after each convolution.
        seed: None (default) draws the weights from the global RNG in order; an int builds each
            layer under its own seed, as :func:`naive_cnn3d_layers` (``seed=``) does stage by stage.

    ``forward(x)`` takes ``(N, C, D, H, W)`` (or ``(N, D, H, W)`` when ``in_channels == 1``)
    and returns ``(N, out_features)``. ``features`` is an ``nn.Sequential`` of the four conv
    blocks, so activation checkpointing can split it into segments.
    """

    def __init__(self, input_shape=(64, 64, 64), in_channels: int = 1, fc_widths=None,
                 out_features: int = 1, dropout: float = 0.1, batch_norm: bool = True, *,
                 seed: int | None = None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.in_channels = int(in_channels)
        layers = naive_cnn3d_layers(self.input_shape, in_channels, fc_widths, out_features, dropout,
                                    batch_norm, seed=seed).build_all()
        self.fc_widths = (layers[5].out_features, layers[8].out_features)
        blocks = len(CNN3D_CHANNELS)
        self.features = nn.Sequential(*layers[:blocks])
        self.head = nn.Sequential(*layers[blocks:])

    def pipeline_layers(self) -> list[nn.Module]:
        """The model as consecutive layers for :class:`pybrain_mpi.parallel.Pipeline`: the four
        conv blocks, then the head's layers. They take ``(N, C, D, H, W)`` inputs (no
        shape check or channel insertion, which ``forward`` does)."""
        return [*self.features, *self.head]

    def pipeline_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the first of :meth:`pipeline_layers` takes it: ``(N, D, H, W)`` gets its
        channel axis when ``in_channels == 1`` (as in :meth:`forward`)."""
        return x.unsqueeze(1) if x.dim() == 4 and self.in_channels == 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict ``(N, out_features)`` from a batch of volumes."""
        if x.dim() == 4 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() != 5 or tuple(x.shape[1:]) != (self.in_channels, *self.input_shape):
            raise ValueError(f"NaiveCNN3D expects (N, {self.in_channels}, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}; "
                             "set [model] input_shape to the patch size")
        return self.head(self.features(x))
