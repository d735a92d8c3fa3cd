"""Multi-rank checks of pbm.DistributedDataParallel (run by tests/test_ddp.py).

Each rank trains on its shard of a global batch; it also trains a local copy on the whole
global batch (the single-process reference) and compares parameters.
"""

from __future__ import annotations

import time
import warnings

import torch

import pybrain_mpi as pbm
from harness import run_worker

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)


def make_model(seed: int = 0, hidden: int = 24) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 5), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 28, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3),
    )


def global_batch(step: int, per_rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(per_rank * n, 1, 32, generator=g)
    y = torch.randn(per_rank * n, 3, generator=g)
    return x, y


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4)


def mode_equivalence(comm, optimizer_kind: str, bucket_kib: str = "1", algorithm: str = "ring") -> None:
    """n ranks with per-rank batches == 1 rank on the concatenated batch, 20 steps."""
    n, r = comm.Get_size(), comm.Get_rank()
    per_rank = 4
    # Different initial weights per rank: the wrap-time broadcast must make them equal.
    model = make_model(seed=r)
    reference = make_model(seed=0)
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=int(bucket_kib) * 1024, first_bucket_bytes=512,
                                      algorithm=algorithm)
    opt = make_optimizer(optimizer_kind, ddp.parameters())
    ref_opt = make_optimizer(optimizer_kind, reference.parameters())
    loss_fn = torch.nn.MSELoss()
    for step in range(20):
        x, y = global_batch(step, per_rank, n)
        mine = slice(r * per_rank, (r + 1) * per_rank)
        opt.zero_grad(set_to_none=(step % 2 == 0))  # both styles of zeroing
        loss_fn(ddp(x[mine]), y[mine]).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(reference(x), y).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    assert len(ddp.bucket_sizes_bytes) > 1, ddp.bucket_sizes_bytes
    # all ranks bitwise identical
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert all(t == flat.numpy().tobytes() for t in comm.allgather(flat.numpy().tobytes()))


def mode_no_sync(comm) -> None:
    """Gradient accumulation: two no_sync micro-batches plus one synced == reference."""
    n, r = comm.Get_size(), comm.Get_rank()
    model, reference = make_model(0), make_model(0)
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=2048)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        for micro in range(3):
            x, y = global_batch(10 * step + micro, 2, n)
            mine = slice(r * 2, (r + 1) * 2)
            if micro < 2:
                with ddp.no_sync():
                    loss_fn(ddp(x[mine]), y[mine]).backward()
            else:
                loss_fn(ddp(x[mine]), y[mine]).backward()
            (loss_fn(reference(x), y) / n).backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-11)


def mode_overlap(comm) -> None:
    """Bucket allreduces start before backward ends (recorded timestamps)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(256, 256), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=300_000, first_bucket_bytes=100_000)
    x = torch.randn(64, 256)
    early = 0
    for _ in range(3):
        ddp.zero_grad()
        ddp(x).pow(2).mean().backward()
        backward_end = ddp.backward_finished_at
        early = max(early, sum(1 for b in ddp.timeline if b["launched_at"] < backward_end))
    assert len(ddp.timeline) >= 4, ddp.timeline
    assert early >= 2, f"only {early} of {len(ddp.timeline)} buckets launched before backward ended"
    print(f"rank {comm.Get_rank()}: {early}/{len(ddp.timeline)} buckets started during backward")


def mode_unused(comm) -> None:
    """A parameter used only on rank 0 neither hangs nor desynchronizes the ranks."""
    n, r = comm.Get_size(), comm.Get_rank()

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)

        def forward(self, x, use_b):
            return self.b(self.a(x)) if use_b else self.a(x)

    torch.manual_seed(0)
    model = Branchy()
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=64, first_bucket_bytes=64)
    x = torch.ones(2, 4)
    for _ in range(3):
        ddp.zero_grad(set_to_none=True)
        ddp(x, use_b=(r == 0)).sum().backward()
    # rank 0's gradient of b, averaged with zeros from the others
    torch.manual_seed(0)
    ref = Branchy()
    ref(x, True).sum().backward()
    torch.testing.assert_close(model.b.weight.grad, ref.b.weight.grad / n)


def mode_mismatch(comm) -> None:
    """A rank with a different model raises CollectiveMismatch naming the parameter."""
    n, r = comm.Get_size(), comm.Get_rank()
    model = make_model(0, hidden=24 if r != n - 1 else 25)
    try:
        pbm.DistributedDataParallel(model)
    except pbm.CollectiveMismatch as error:
        text = str(error)
        assert "3.weight" in text and f"rank {n - 1}" in text, text
        print(f"rank {r}: {text.splitlines()[0]}")
    else:
        raise AssertionError("model mismatch not detected")


def mode_stall(comm) -> None:
    """A slow rank triggers a stall warning naming it; training then completes."""
    n, r = comm.Get_size(), comm.Get_rank()
    model = make_model(0)
    ddp = pbm.DistributedDataParallel(model, stall_warn_s=0.5)
    x, y = global_batch(0, 2, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if r == n - 1:
            time.sleep(2.5)
        torch.nn.functional.mse_loss(ddp(x[:2]), y[:2]).backward()
    if r == 0:
        stalls = [str(w.message) for w in caught if "has waited" in str(w.message)]
        assert stalls and f"[{n - 1}]" in stalls[0], [str(w.message) for w in caught]
        print(f"stall warning: {stalls[0]}")


if __name__ == "__main__":
    run_worker(globals())
