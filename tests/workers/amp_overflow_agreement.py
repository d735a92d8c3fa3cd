"""2 ranks: only rank 1 gets an Inf gradient; both must skip the step and back off together,
then both apply the next (clean) step. Exits non-zero on any disagreement."""

import sys

import torch

import pybrain_mpi as pbm
from pybrain_mpi import optim
from pybrain_mpi.amp import LossScaler

pbm.init()
rank = pbm.rank()
kind = sys.argv[1]
torch.manual_seed(0)  # identical initial weights on both ranks
model = torch.nn.Linear(8, 4)
opt = (optim.FusedSGD if kind == "fused" else torch.optim.SGD)(model.parameters(), lr=0.1)
scaler = LossScaler(init_scale=64.0)
before = [p.detach().clone() for p in model.parameters()]

x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
scaler.scale(model(x).square().mean()).backward()
if rank == 1:
    model.bias.grad[2] = float("inf")
scaler.step(opt)
assert scaler.found_inf(), f"rank {rank}: did not see rank 1's overflow"
scaler.update()
assert scaler.get_scale() == 32.0, f"rank {rank}: scale {scaler.get_scale()}"
for p, b in zip(model.parameters(), before):
    assert torch.equal(p.detach(), b), f"rank {rank}: parameters changed on a skipped step"

opt.zero_grad()
scaler.scale(model(x).square().mean()).backward()
scaler.step(opt)
assert not scaler.found_inf(), f"rank {rank}: clean step reported as overflow"
scaler.update()
assert not torch.equal(model.weight.detach(), before[0]), f"rank {rank}: clean step not applied"
print(f"rank {rank} agreed", flush=True)
pbm.shutdown()
