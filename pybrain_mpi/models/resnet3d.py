"""ResNet50_3D: a bottleneck ResNet-50 with 3D convolutions, for volume regression.

The variant the 3D-CNN study compared against (docs/background.md section 2, "~47M parameters, did
worse"): stem ``Conv3d(7, stride 2) -> BN -> ReLU -> MaxPool3d(3, stride 2)``, then stages of
[3, 4, 6, 3] bottleneck blocks (1x1x1 reduce, 3x3x3, 1x1x1 expand by 4, BN after each, identity
or 1x1x1-conv+BN shortcut) with widths ``w, 2w, 4w, 8w`` (strides 1, 2, 2, 2), global average
pooling and a linear head. All convolutions are bias-free (BN follows them).

Parameter count for the default (``width=64``, ``in_channels=1``, ``out_features=1``):
**46,157,121** (:func:`resnet50_3d_parameter_count` gives the closed form for any setting).
``features`` is an ``nn.Sequential`` (stem, four stages' blocks flattened) so activation
checkpointing can segment it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet50_3D", "resnet50_3d_parameter_count", "RESNET50_BLOCKS"]

RESNET50_BLOCKS = (3, 4, 6, 3)
_EXPANSION = 4


def resnet50_3d_parameter_count(width: int = 64, in_channels: int = 1,
                                out_features: int = 1) -> int:
    """Number of trainable parameters of ``ResNet50_3D`` with these arguments, in closed form."""
    total = in_channels * width * 343 + 2 * width          # stem conv + BN
    c_in = width
    for stage, n_blocks in enumerate(RESNET50_BLOCKS):
        mid = width * 2 ** stage
        c_out = mid * _EXPANSION
        for block in range(n_blocks):
            total += c_in * mid + 2 * mid                   # 1x1x1 reduce + BN
            total += mid * mid * 27 + 2 * mid               # 3x3x3 + BN
            total += mid * c_out + 2 * c_out                # 1x1x1 expand + BN
            if block == 0:                                  # projection shortcut + BN
                total += c_in * c_out + 2 * c_out
            c_in = c_out
    return total + c_in * out_features + out_features


class Bottleneck3D(nn.Module):
    """1x1x1 -> 3x3x3 (stride) -> 1x1x1 bottleneck with a residual shortcut."""

    def __init__(self, in_channels: int, mid_channels: int, stride: int):
        super().__init__()
        out_channels = mid_channels * _EXPANSION
        self.conv1 = nn.Conv3d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid_channels)
        self.conv2 = nn.Conv3d(mid_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(mid_channels)
        self.conv3 = nn.Conv3d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output ``relu(F(x) + shortcut(x))``."""
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50_3D(nn.Module):
    """Bottleneck 3D ResNet-50 regressor.

    Args:
        in_channels: input channels (1 for T1).
        out_features: regression outputs.
        width: channels of the first stage (64 in ResNet-50); every stage scales with it.

    ``forward(x)`` takes ``(N, C, D, H, W)`` (or ``(N, D, H, W)`` with one channel), any
    any spatial size (five stride-2 reductions, then global average pooling), and returns ``(N, out_features)``.
    """

    def __init__(self, in_channels: int = 1, out_features: int = 1, width: int = 64):
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"ResNet50_3D: width must be >= 1, got {width}")
        self.in_channels = int(in_channels)
        layers = [nn.Conv3d(self.in_channels, width, 7, stride=2, padding=3, bias=False),
                  nn.BatchNorm3d(width), nn.ReLU(inplace=True),
                  nn.MaxPool3d(3, stride=2, padding=1)]
        c_in = width
        for stage, n_blocks in enumerate(RESNET50_BLOCKS):
            mid = width * 2 ** stage
            for block in range(n_blocks):
                stride = 2 if (block == 0 and stage > 0) else 1
                layers.append(Bottleneck3D(c_in, mid, stride))
                c_in = mid * _EXPANSION
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(c_in, int(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict ``(N, out_features)`` from a batch of volumes."""
        if x.dim() == 4 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNet50_3D expects (N, {self.in_channels}, D, H, W), "
                             f"got {tuple(x.shape)}")
        return self.fc(self.pool(self.features(x)).flatten(1))
