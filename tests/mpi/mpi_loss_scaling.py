"""pbm.optim.LossScaler across ranks: an overflow on one rank makes every rank skip the step
and back off together; the next clean step is applied everywhere."""

from __future__ import annotations

import pytest
import torch

import pybrain_mpi as pbm
from pybrain_mpi import optim
from pybrain_mpi.optim import LossScaler

RANKS = (2, 3)


@pytest.mark.parametrize("optimizer_kind", ["torch", "fused"])
def test_every_rank_skips_and_backs_off_when_only_the_last_rank_overflows(optimizer_kind):
    torch.manual_seed(0)  # identical initial weights on every rank
    model = torch.nn.Linear(8, 4)
    make = optim.FusedSGD if optimizer_kind == "fused" else torch.optim.SGD
    opt = make(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=64.0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(pbm.rank()))

    scaler.scale(model(x).square().mean()).backward()
    if pbm.rank() == pbm.size() - 1:
        model.bias.grad[2] = float("inf")
    scaler.step(opt)
    assert scaler.found_inf()
    scaler.update()
    assert scaler.get_scale() == 32.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))

    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    assert not scaler.found_inf()
    scaler.update()
    assert not torch.equal(model.weight.detach(), before[0])
