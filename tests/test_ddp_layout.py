"""DistributedDataParallel keeps each gradient in its parameter's memory layout (one rank)."""

from __future__ import annotations

import torch

import pybrain_mpi as pbm
from pybrain_mpi.models import NaiveCNN3D


def test_channels_last_parameters_get_channels_last_gradients_and_fused_adam_matches_plain():
    torch.manual_seed(0)
    reference = NaiveCNN3D(input_shape=(16, 16, 16), dropout=0.0).to(memory_format=torch.channels_last_3d)
    wrapped_module = NaiveCNN3D(input_shape=(16, 16, 16), dropout=0.0).to(memory_format=torch.channels_last_3d)
    wrapped_module.load_state_dict(reference.state_dict())
    model = pbm.DistributedDataParallel(wrapped_module)
    fused = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    plain = torch.optim.Adam(reference.parameters(), lr=0.01)
    x = torch.randn(2, 1, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    for _ in range(2):
        fused.zero_grad(set_to_none=False)
        plain.zero_grad()
        model(x).square().mean().backward()
        reference(x).square().mean().backward()
        fused.step()
        plain.step()
    for (name, p), q in zip(wrapped_module.named_parameters(), reference.parameters()):
        if p.dim() == 5:
            assert p.grad.is_contiguous(memory_format=torch.channels_last_3d), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
