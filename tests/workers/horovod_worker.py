"""A horovod.torch-style script run unchanged except for the import (tests/test_horovod.py)."""

from __future__ import annotations

import sys

import torch

import pybrain_mpi.horovod as hvd

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)


def training_matches_reference(backward_passes: int) -> None:
    """The canonical Horovod recipe trains like one process on the global batch."""
    n, r = hvd.size(), hvd.rank()
    torch.manual_seed(100 + r)  # different on every rank: broadcast_parameters must fix it
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    torch.manual_seed(100)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * n / n, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         backward_passes_per_step=backward_passes)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step in range(6):
        optimizer.zero_grad()
        ref_opt.zero_grad()
        for micro in range(backward_passes):
            g = torch.Generator().manual_seed(step * 10 + micro)
            x, y = torch.randn(3 * n, 6, generator=g), torch.randn(3 * n, 2, generator=g)
            mine = slice(3 * r, 3 * (r + 1))
            torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            torch.nn.functional.mse_loss(reference(x), y).backward()
        optimizer.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert type(optimizer).__name__ == "SGD" and isinstance(optimizer, torch.optim.SGD)


def collectives_semantics() -> None:
    n, r = hvd.size(), hvd.rank()
    x = torch.full((4,), float(r))
    # allreduce averages by default and leaves its input alone
    assert torch.allclose(hvd.allreduce(x), torch.full((4,), (n - 1) / 2))
    assert torch.equal(x, torch.full((4,), float(r)))
    assert torch.allclose(hvd.allreduce(x, op=hvd.Sum), torch.full((4,), float(sum(range(n)))))
    assert torch.allclose(hvd.allreduce(x, average=False), torch.full((4,), float(sum(range(n)))))
    assert torch.equal(hvd.allreduce(x, op=hvd.Max), torch.full((4,), float(n - 1)))
    y = x.clone()
    assert hvd.allreduce_(y, op=hvd.Sum, postscale_factor=2.0) is y
    assert torch.allclose(y, torch.full((4,), 2.0 * sum(range(n))))
    # fp16 compression round trip keeps the dtype
    z = hvd.allreduce(torch.full((3,), 1.5), compression=hvd.Compression.fp16)
    assert z.dtype == torch.float64 and torch.allclose(z, torch.full((3,), 1.5))
    # async handles: poll then synchronize returns the output
    handle = hvd.allreduce_async(torch.ones(1000) * r, op=hvd.Sum, name="async.one")
    while not hvd.poll(handle):
        pass
    assert torch.allclose(hvd.synchronize(handle), torch.full((1000,), float(sum(range(n)))))
    h2 = hvd.allreduce_async_(torch.ones(3), name="async.two")
    assert torch.allclose(hvd.synchronize(h2), torch.ones(3))
    # broadcast / broadcast_
    b = torch.arange(5.0) * (r + 1)
    assert torch.equal(hvd.broadcast(b, root_rank=n - 1), torch.arange(5.0) * n)
    assert torch.equal(b, torch.arange(5.0) * (r + 1))
    hvd.broadcast_(b, root_rank=0)
    assert torch.equal(b, torch.arange(5.0))
    assert torch.equal(hvd.synchronize(hvd.broadcast_async(torch.tensor([r]), 0)), torch.tensor([0]))
    # allgather with different first dimensions
    mine = torch.full((r + 1, 2), float(r))
    gathered = hvd.allgather(mine)
    expected = torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)])
    assert torch.equal(gathered, expected), gathered
    assert torch.equal(hvd.allgather(torch.tensor([r], dtype=torch.int32)), torch.arange(n, dtype=torch.int32))
    # objects
    assert hvd.broadcast_object({"epoch": r}, root_rank=n - 1) == {"epoch": n - 1}
    assert hvd.allgather_object(("rank", r)) == [("rank", k) for k in range(n)]
    # Adasum is refused clearly
    try:
        hvd.allreduce(x, op=hvd.Adasum)
    except NotImplementedError as error:
        assert "Adasum" in str(error)
    else:
        raise AssertionError("Adasum accepted")
    # topology and capabilities
    assert hvd.is_initialized() and hvd.mpi_threads_supported() and hvd.mpi_enabled()
    assert hvd.local_size() == n and hvd.cross_size() == 1 and hvd.cross_rank() == 0
    # join returns the rank that arrived last
    import time
    if r == n - 1:
        time.sleep(0.5)
    assert hvd.join() == n - 1


def main() -> None:
    hvd.init()
    mode = sys.argv[1]
    if mode == "train":
        training_matches_reference(int(sys.argv[2]))
    else:
        collectives_semantics()
    print(f"OK {mode} rank {hvd.rank()}")
    hvd.shutdown()


if __name__ == "__main__":
    main()
