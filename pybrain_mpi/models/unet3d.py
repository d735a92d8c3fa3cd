"""UNet3D: the 3D U-Net for voxel segmentation of brain MRI and histology volumes.

Architecture (the 3D U-Net of Çiçek et al., MICCAI 2016, after Ronneberger et al.'s U-Net):
``depth`` resolution levels. Each encoder level is two ``Conv3d(k=3, padding=1)`` ->
normalisation -> ReLU; between levels a ``MaxPool3d(2)`` halves the grid and the channels
double (``width``, ``2*width``, ...). The decoder mirrors it: a ``ConvTranspose3d(k=2,
stride=2)`` doubles the grid, the encoder's feature maps of that level are concatenated
(skip connection) and two convolutions follow. A final ``1x1x1`` convolution gives
``out_channels`` logits per voxel.

Normalisation defaults to batch norm, as in the original 3D U-Net; the trainer's
DistributedDataParallel broadcasts rank 0's running statistics every step, so every rank
evaluates with the same ones. Instance norm is available, but it scales a patch of pure
background (scanner noise) to unit variance and so finds structure in noise: on the MNI152
cohort at 2 mm (``examples/unet3d_mni_cohort.toml``, 48 steps on 2 ranks, half the patches on
the brain) held-out Dice was 0.76 with instance norm, 0.986 with none and 0.988 with batch norm.

Input ``(N, C, D, H, W)`` (or ``(N, D, H, W)`` for one channel) with every spatial size a
multiple of ``2**(depth-1)``; output ``(N, out_channels, D, H, W)``.

Parameters (``w`` = width, ``c`` = in_channels, ``k`` = out_channels, ``depth`` levels, 27-tap
convolutions with bias; instance norm has no parameters, batch norm adds 2 per channel)::

    encoder level l (channels w_l = w * 2**l):  27 * (c_l * w_l + w_l * w_l) + 2 * w_l
    decoder level l: up 8 * w_{l+1} * w_l + w_l, then 27 * (2 w_l * w_l + w_l * w_l) + 2 w_l
    head: w * k + k

Default (depth 3, width 16, 1 -> 2 channels, batch norm): **339,906**.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet3D", "unet3d_parameter_count", "NORMS"]

NORMS = ("instance", "batch", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


def _block(c_in: int, c_out: int, norm: str, dropout: float) -> nn.Sequential:
    layers = [nn.Conv3d(c_in, c_out, 3, padding=1), _norm(norm, c_out), nn.ReLU(inplace=True),
              nn.Conv3d(c_out, c_out, 3, padding=1), _norm(norm, c_out), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout3d(dropout))
    return nn.Sequential(*layers)


def unet3d_parameter_count(in_channels: int = 1, out_channels: int = 2, depth: int = 3,
                           width: int = 16, norm: str = "batch") -> int:
    """Trainable parameters of ``UNet3D`` with these arguments, in closed form."""
    per_norm = 2 if norm == "batch" else 0
    widths = [width * 2 ** level for level in range(depth)]
    total, c = 0, in_channels
    for w in widths:
        total += 27 * (c * w + w * w) + 2 * w + 2 * per_norm * w
        c = w
    for level in range(depth - 2, -1, -1):
        w, w_up = widths[level], widths[level + 1]
        total += 8 * w_up * w + w
        total += 27 * (2 * w * w + w * w) + 2 * w + 2 * per_norm * w
    return total + width * out_channels + out_channels


class UNet3D(nn.Module):
    """3D U-Net (see the module docstring).

    Args:
        in_channels: image channels (e.g. 1 for a T1, 2 for T1 + T2).
        out_channels: classes (logits per voxel), incl. background.
        depth: resolution levels (>= 1; 3 halves the grid twice).
        width: channels of the first level (doubled at each level below).
        norm: ``"batch"`` (default), ``"instance"`` or ``"none"``.
        dropout: channel dropout after each block (0: none).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, depth: int = 3,
                 width: int = 16, norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        if int(depth) < 1 or int(width) < 1 or int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"UNet3D: depth, width, in_channels and out_channels must be >= 1, "
                             f"got {depth}, {width}, {in_channels}, {out_channels}")
        if norm not in NORMS:
            raise ValueError(f"UNet3D: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"UNet3D: dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.depth, self.width = int(depth), int(width)
        widths = [self.width * 2 ** level for level in range(self.depth)]
        self.down = nn.ModuleList()
        c = self.in_channels
        for w in widths:
            self.down.append(_block(c, w, norm, dropout))
            c = w
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for level in range(self.depth - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2))
            self.merge.append(_block(2 * widths[level], widths[level], norm, dropout))
        self.head = nn.Conv3d(widths[0], self.out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, D, H, W)``."""
        if x.dim() == 4 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet3D expects (N, {self.in_channels}, D, H, W), got "
                             f"{tuple(x.shape)}")
        bad = [n for n in x.shape[2:] if n % self.size_multiple]
        if bad:
            raise ValueError(f"UNet3D with depth {self.depth}: spatial sizes "
                             f"{list(x.shape[2:])} must be multiples of {self.size_multiple}; "
                             f"choose a patch size like {[max(self.size_multiple, n - n % self.size_multiple) for n in x.shape[2:]]}")
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)
