"""DCA: the 1D convolutional autoencoder for fMRI voxel time series.

Architecture (docs/background.md section 2, after the distributed convolutional autoencoder for
HCP task fMRI):

- encoder: four ``Conv1d`` layers (filters/kernel 32/21, 64/9, 128/9, 256/9), "same"
  padding, each followed by ReLU and ``MaxPool1d(2)`` that keeps its argmax *switches*;
  the last feature maps ``Z`` (256 x L4) are flattened and a fully connected layer maps
  them to the hidden code ``H``;
- decoder: a fully connected layer maps ``H`` back to feature maps ``Z'`` (same shape as
  ``Z``), then ``Conv1d`` 128/9, 64/9, 32/9 (each + ReLU) and 1/21 (linear output), each
  preceded by ``MaxUnpool1d`` at the stored switches (nearest-neighbour upsampling to the
  encoder's length when switches are absent, e.g. when decoding a code on its own).

Pooling floors odd lengths (284 -> 142 -> 71 -> 35 -> 17; 40 -> 20 -> 10 -> 5 -> 2); the
decoder unpools to the exact encoder lengths, so every input length >= 16 round-trips.

Parameter count (``conv`` is the same for every input length; ``F = 256 * L4``)::

    conv = 388,224 (encoder) + 387,969 (decoder) = 776,193
    fc   = (F * H + H) + (H * F + F)

Default (``input_length=284``, ``hidden_size=600``): L4 = 17, F = 4352,
fc = 5,227,352, total **6,003,545** -- the "about 6.0M" of the original system, which
is how the default hidden size of 600 was chosen. With ``input_length=40`` (nitime's
fMRI runs): L4 = 2, F = 512, total = 776,193 + 1025 * H + 512.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DCA", "dca_loss", "dca_parameter_count", "pooled_length", "DCA_ENCODER_LAYERS"]

# (out_channels, kernel_size) of the encoder convolutions; the decoder mirrors them.
DCA_ENCODER_LAYERS = ((32, 21), (64, 9), (128, 9), (256, 9))
_MIN_LENGTH = 2 ** len(DCA_ENCODER_LAYERS)


def _pooled_lengths(input_length: int) -> list[int]:
    """Sequence lengths before each pooling and after the last: [L0, L1, L2, L3, L4]."""
    lengths = [input_length]
    for _ in DCA_ENCODER_LAYERS:
        lengths.append(lengths[-1] // 2)
    return lengths


def pooled_length(input_length: int) -> int:
    """Length of the feature maps ``Z`` for a series of ``input_length`` points."""
    return _pooled_lengths(input_length)[-1]


def dca_parameter_count(input_length: int = 284, hidden_size: int = 600) -> int:
    """Number of trainable parameters of ``DCA(input_length, hidden_size)`` in closed form."""
    channels = [1] + [c for c, _ in DCA_ENCODER_LAYERS]
    kernels = [k for _, k in DCA_ENCODER_LAYERS]
    encoder = sum(channels[i] * channels[i + 1] * kernels[i] + channels[i + 1] for i in range(4))
    # Decoder convs map channels[i+1] -> channels[i] with the same kernel, bias of channels[i].
    decoder = sum(channels[i + 1] * channels[i] * kernels[i] + channels[i] for i in range(4))
    flat = channels[-1] * _pooled_lengths(input_length)[-1]
    fc = (flat * hidden_size + hidden_size) + (hidden_size * flat + flat)
    return encoder + decoder + fc


class DCA(nn.Module):
    """1D convolutional autoencoder with pooling switches for fMRI voxel time series.

    Args:
        input_length: time points per series (default 284, the HCP task runs); at least 16.
        hidden_size: size of the code ``H`` (default 600, giving 6,003,545 parameters at 284).

    ``forward(x)`` takes ``(N, L)`` or ``(N, 1, L)`` and returns ``(x_hat, (z, z_prime))``:
    the reconstruction with ``x``'s shape, the encoder's last feature maps ``Z`` and the
    decoder's first feature maps ``Z'`` (both ``(N, 256, L4)``). Feed them to
    :func:`dca_loss`. ``encode``/``decode`` expose the two halves.
    """

    def __init__(self, input_length: int = 284, hidden_size: int = 600):
        super().__init__()
        if int(input_length) < _MIN_LENGTH:
            raise ValueError(f"DCA: input_length={input_length} is too short; four 2x poolings "
                             f"need at least {_MIN_LENGTH} time points")
        if int(hidden_size) < 1:
            raise ValueError(f"DCA: hidden_size must be >= 1, got {hidden_size}")
        self.input_length = int(input_length)
        self.hidden_size = int(hidden_size)
        self.lengths = _pooled_lengths(self.input_length)
        channels = [1] + [c for c, _ in DCA_ENCODER_LAYERS]
        kernels = [k for _, k in DCA_ENCODER_LAYERS]
        # Odd kernels with padding k // 2 keep the length, so only pooling changes it.
        self.encoder_convs = nn.ModuleList(
            nn.Conv1d(channels[i], channels[i + 1], kernels[i], padding=kernels[i] // 2)
            for i in range(4))
        self.decoder_convs = nn.ModuleList(
            nn.Conv1d(channels[i + 1], channels[i], kernels[i], padding=kernels[i] // 2)
            for i in reversed(range(4)))
        self.feature_shape = (channels[-1], self.lengths[-1])
        flat = channels[-1] * self.lengths[-1]
        self.encoder_fc = nn.Linear(flat, self.hidden_size)
        self.decoder_fc = nn.Linear(self.hidden_size, flat)

    def _as_3d(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.input_length:
            raise ValueError(f"DCA(input_length={self.input_length}) expects input of shape "
                             f"(N, {self.input_length}) or (N, 1, {self.input_length}), got "
                             f"{tuple(x.shape)}; set [model] input_length to the series length")
        return x

    def encode(self, x: torch.Tensor):
        """Return ``(h, z, switches)``: code ``(N, H)``, feature maps ``Z`` and the 4 switch tensors."""
        out = self._as_3d(x)
        switches = []
        for conv in self.encoder_convs:
            out = F.relu(conv(out))
            out, idx = F.max_pool1d(out, 2, return_indices=True)
            switches.append(idx)
        z = out
        h = self.encoder_fc(z.flatten(1))
        return h, z, switches

    def decode(self, h: torch.Tensor, switches=None):
        """Return ``(x_hat, z_prime)`` from code ``h``; ``x_hat`` is ``(N, 1, L)``.

        With ``switches`` (from :meth:`encode`) each unpooling puts values back at the
        argmax positions; without them it upsamples by nearest neighbour.
        """
        z_prime = self.decoder_fc(h).view(h.shape[0], *self.feature_shape)
        out = z_prime
        n_layers = len(self.decoder_convs)
        for i, conv in enumerate(self.decoder_convs):
            # Decoder layer i undoes encoder pooling (3 - i): its output length is the length
            # that pooling started from, which restores odd lengths floored on the way down.
            target_length = self.lengths[n_layers - 1 - i]
            if switches is not None:
                out = F.max_unpool1d(out, switches[n_layers - 1 - i], 2,
                                     output_size=[target_length])
            else:
                out = F.interpolate(out, size=target_length, mode="nearest")
            out = conv(out)
            if i < n_layers - 1:
                out = F.relu(out)
        return out, z_prime

    def forward(self, x: torch.Tensor):
        """Reconstruct ``x``; returns ``(x_hat, (z, z_prime))`` with ``x_hat`` shaped like ``x``."""
        h, z, switches = self.encode(x)
        x_hat, z_prime = self.decode(h, switches)
        return x_hat.view(x.shape), (z, z_prime)


def dca_loss(x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, z_prime: torch.Tensor,
             lam: float = 0.006, reduction: str = "mean") -> torch.Tensor:
    """DCA loss ``0.5 * ||X - X_hat||^2 + 0.5 * lam * ||Z - Z'||^2``.

    The squared norms are sums over every element of a sample (time points, resp. channels
    x positions). ``reduction="mean"`` (default) averages this per-sample loss over the batch,
    so the loss and the learning rate do not depend on the batch size; ``reduction="sum"``
    sums it over the batch, i.e. the formula applied to the whole batch at once.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"dca_loss: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ")
    if z.shape != z_prime.shape:
        raise ValueError(f"dca_loss: z {tuple(z.shape)} and z_prime {tuple(z_prime.shape)} differ")
    total = 0.5 * (x - x_hat).pow(2).sum() + 0.5 * lam * (z - z_prime).pow(2).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / x.shape[0]
    raise ValueError(f"dca_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
