"""Tiny models a pipelined trainer run can split (``[model] name = "tests/pipeline_models.py:..."``)."""

from torch import nn


class SequentialAutoencoder(nn.Sequential):
    """Five layers (Linear, Tanh, Linear, Tanh, Linear) reconstructing a series of
    ``input_length`` points through ``hidden`` units: splits into 2 to 5 stages."""

    def __init__(self, input_length: int = 40, hidden: int = 12):
        super().__init__(nn.Linear(input_length, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                         nn.Tanh(), nn.Linear(hidden, input_length))


class NotSequential(nn.Module):
    """A model without stages (a pipelined run must refuse it)."""

    def __init__(self, input_length: int = 40):
        super().__init__()
        self.linear = nn.Linear(input_length, input_length)

    def forward(self, x):
        return self.linear(x)
