"""EncodingMLP: image features -> per-voxel/vertex fMRI responses.

The Algonauts-style encoding head (docs/background.md section 2): frozen backbone features go
through ``fc1 -> fc2 -> fc3`` (fc3 has one output per voxel or vertex); each hidden layer is
followed by optional BatchNorm1d, an optional activation (ReLU or Tanh) and dropout.

Parameter count: ``in*h1 + h1 + h1*h2 + h2 + h2*out + out`` plus ``2*(h1 + h2)`` with batch
norm. Default (``in_features=768``, ``hidden=(1024, 1024)``, ``out_features=20000``,
batch norm): **22,341,152** -- fc3 dominates, which makes this the communication-heavy model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EncodingMLP", "encoding_mlp_parameter_count", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "none": None}


def encoding_mlp_parameter_count(in_features: int = 768, hidden=(1024, 1024),
                                 out_features: int = 20000, batch_norm: bool = True) -> int:
    """Number of trainable parameters of ``EncodingMLP`` with these arguments, in closed form."""
    h1, h2 = hidden
    total = in_features * h1 + h1 + h1 * h2 + h2 + h2 * out_features + out_features
    return total + (2 * (h1 + h2) if batch_norm else 0)


class EncodingMLP(nn.Module):
    """Three-layer MLP encoding model.

    Args:
        in_features: backbone feature size.
        hidden: widths of fc1 and fc2.
        out_features: voxels/vertices predicted by fc3.
        activation: "relu", "tanh" or "none" (linear hidden layers).
        batch_norm: BatchNorm1d after fc1 and fc2.
        dropout: dropout probability after each hidden layer (0 disables).

    ``forward(x)`` maps ``(N, in_features)`` to ``(N, out_features)``.
    """

    def __init__(self, in_features: int = 768, hidden=(1024, 1024), out_features: int = 20000,
                 activation: str = "relu", batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"EncodingMLP: activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {activation!r}")
        if len(hidden) != 2:
            raise ValueError(f"EncodingMLP: hidden must be two widths (fc1, fc2), got {hidden}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"EncodingMLP: dropout must be in [0, 1), got {dropout}")
        self.in_features = int(in_features)
        widths = [self.in_features, *(int(h) for h in hidden)]
        layers = []
        for i in range(2):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if batch_norm:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            if ACTIVATIONS[activation] is not None:
                layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(widths[-1], int(out_features)))
        self.layers = nn.Sequential(*layers)

    @property
    def fc1(self) -> nn.Linear:
        """The first fully connected layer."""
        return [m for m in self.layers if isinstance(m, nn.Linear)][0]

    @property
    def fc2(self) -> nn.Linear:
        """The second fully connected layer."""
        return [m for m in self.layers if isinstance(m, nn.Linear)][1]

    @property
    def fc3(self) -> nn.Linear:
        """The output layer (one unit per voxel/vertex)."""
        return [m for m in self.layers if isinstance(m, nn.Linear)][2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict responses ``(N, out_features)`` from features ``(N, in_features)``."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"EncodingMLP expects (N, {self.in_features}), got {tuple(x.shape)}")
        return self.layers(x)
