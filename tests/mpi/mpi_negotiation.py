"""Collectives matched by name on real MPI ranks (csrc/collectives/negotiation.h).

Ranks may submit collectives in different orders: each runs once every rank has submitted
its name, with the right data. A call a rank skips, or names differently, is never paired with
another of the same shape: it times out naming the rank that did not submit it. The same name
with another size, dtype or op raises CollectiveMismatch on every rank, naming the rank and
both descriptions. DDP with parameters used on some ranks only, in data-dependent order, gives
the gradients of a float64 reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import pybrain_mpi as pbm
from pybrain_mpi.communication import context

RANKS = (2, 3, 4)
TIMEOUT_S = 400

# Inline (travels inside the join), ring, and an odd ring size that no rank count divides.
SIZES = (1000, 300_007)


def _rounds() -> int:
    return context.current().engine.negotiation_rounds


def _value(index: int, rank: int) -> float:
    # Distinct per name and rank; sums of a few of them are exact in float32.
    return float(1 + index * 16 + rank)


def _expected(index: int, n: int) -> float:
    return sum(_value(index, q) for q in range(n))


def _order(count: int, rank: int) -> list[int]:
    """A rank-dependent order: rotated by the rank, reversed on odd ranks."""
    order = [(i + rank) % count for i in range(count)]
    return order[::-1] if rank % 2 else order


def _restart() -> None:
    """A fresh engine on every rank after a test left one broken (a name never matched)."""
    pbm.shutdown()
    pbm.init()


@pytest.mark.parametrize("algorithm", ["ring", "mpi", "shm", "auto"])
def test_swapped_order_gives_the_right_answer_for_every_name(algorithm):
    n, r = pbm.size(), pbm.rank()
    names = [f"t{i}" for i in range(6)]
    tensors = {}
    for i in range(len(names)):
        size = SIZES[i % len(SIZES)]
        dtype = torch.float32 if i % 3 else torch.float64
        tensors[i] = torch.full((size,), _value(i, r), dtype=dtype)
    before = _rounds()
    handles = {i: pbm.allreduce_async_(tensors[i], name=names[i], algorithm=algorithm)
               for i in _order(len(names), r)}
    for i in range(len(names)):  # waited for in yet another order
        handles[i].wait()
        assert torch.all(tensors[i] == _expected(i, n)), (names[i], tensors[i][:3], _expected(i, n))
    assert _rounds() > before, "ranks submitted in different orders, but nothing was negotiated"


def test_same_order_runs_without_negotiating():
    """The steady state: ranks that submit in the same order never negotiate."""
    n, r = pbm.size(), pbm.rank()
    before = _rounds()
    for step in range(3):
        tensors = [torch.full((SIZES[i % 2],), _value(i, r)) for i in range(5)]
        handles = [pbm.allreduce_async_(t, name=f"bucket {i}") for i, t in enumerate(tensors)]
        metric = pbm.allreduce(torch.tensor([float(r)]), name="loss")
        for i, (t, h) in enumerate(zip(tensors, handles)):
            h.wait()
            assert torch.all(t == _expected(i, n))
        assert metric.item() == sum(range(n))
        pbm.barrier()
    assert _rounds() == before, f"{_rounds() - before} negotiation rounds for calls in the same order"


def test_blocking_call_meets_an_async_call_submitted_in_the_other_order():
    n, r = pbm.size(), pbm.rank()
    for size in SIZES:
        x = torch.full((size,), _value(0, r))
        y = torch.full((size,), _value(1, r))
        if r == 0:
            hx = pbm.allreduce_async_(x, name="x")
            pbm.allreduce_(y, name="y")
            hx.wait()
        else:
            hy = pbm.allreduce_async_(y, name="y")
            pbm.allreduce_(x, name="x")
            hy.wait()
        assert torch.all(x == _expected(0, n)) and torch.all(y == _expected(1, n))


def test_broadcasts_and_allreduces_in_swapped_order():
    n, r = pbm.size(), pbm.rank()
    root = n - 1
    w = np.full(17, r, dtype=np.int64)
    g = np.full(1000, _value(3, r), dtype=np.float32)
    if r % 2:
        hb = pbm.broadcast_async_(w, root=root, name="weights")
        hg = pbm.allreduce_async_(g, name="grad")
    else:
        hg = pbm.allreduce_async_(g, name="grad")
        hb = pbm.broadcast_async_(w, root=root, name="weights")
    hb.wait()
    hg.wait()
    assert np.all(w == root) and np.all(g == _expected(3, n))


def test_unnamed_calls_are_named_by_their_order_among_unnamed_calls():
    """Unnamed calls pair in call order, whatever named calls lie between them."""
    n, r = pbm.size(), pbm.rank()
    u1 = torch.full((1000,), _value(0, r))
    u2 = torch.full((1000,), _value(1, r))
    named = torch.full((1000,), _value(2, r))
    if r == 0:
        handles = [pbm.allreduce_async_(named, name="named"), pbm.allreduce_async_(u1), pbm.allreduce_async_(u2)]
    else:
        handles = [pbm.allreduce_async_(u1), pbm.allreduce_async_(u2), pbm.allreduce_async_(named, name="named")]
    for h in handles:
        h.wait()
    assert torch.all(u1 == _expected(0, n))
    assert torch.all(u2 == _expected(1, n))
    assert torch.all(named == _expected(2, n))


def test_long_names_that_share_a_prefix_are_different_collectives():
    """Names are compared whole, not as the 63 characters a header shows."""
    n, r = pbm.size(), pbm.rank()
    prefix = "encoder.layers." + "x" * 80
    a = torch.full((1000,), _value(0, r))
    b = torch.full((1000,), _value(1, r))
    if r == 0:
        ha, hb = pbm.allreduce_async_(a, name=prefix + ".a"), pbm.allreduce_async_(b, name=prefix + ".b")
    else:
        hb, ha = pbm.allreduce_async_(b, name=prefix + ".b"), pbm.allreduce_async_(a, name=prefix + ".a")
    ha.wait()
    hb.wait()
    assert torch.all(a == _expected(0, n)) and torch.all(b == _expected(1, n))


def test_repeated_name_pairs_the_kth_call_with_the_kth_call():
    n, r = pbm.size(), pbm.rank()
    first = torch.full((1000,), _value(0, r))
    second = torch.full((1000,), _value(1, r))
    other = torch.full((1000,), _value(2, r))
    if r == 0:
        handles = [pbm.allreduce_async_(first, name="loss"), pbm.allreduce_async_(other, name="other"),
                   pbm.allreduce_async_(second, name="loss")]
    else:
        handles = [pbm.allreduce_async_(other, name="other"), pbm.allreduce_async_(first, name="loss"),
                   pbm.allreduce_async_(second, name="loss")]
    for h in handles:
        h.wait()
    assert torch.all(first == _expected(0, n))
    assert torch.all(second == _expected(1, n))
    assert torch.all(other == _expected(2, n))


def test_skipped_call_times_out_naming_the_rank_and_never_pairs():
    """The last rank skips "first": "second" and "third" are right everywhere, "first"
    times out on the others naming the last rank, and its tensor is left as it was."""
    n, r = pbm.size(), pbm.rank()
    skipper = n - 1
    first = torch.full((1000,), _value(0, r))
    second = torch.full((1000,), _value(1, r))
    third = torch.full((300_007,), _value(2, r))
    h_first = None if r == skipper else pbm.allreduce_async_(first, name="first")
    h_second = pbm.allreduce_async_(second, name="second")
    h_third = pbm.allreduce_async_(third, name="third")
    h_second.wait()
    h_third.wait()
    try:
        assert torch.all(second == _expected(1, n))
        assert torch.all(third == _expected(2, n))
        if h_first is not None:
            with pytest.raises(pbm.CollectiveTimeout) as caught:
                h_first.wait(timeout_s=2.0)
            assert caught.value.missing_ranks == [skipper], caught.value.missing_ranks
            assert "'first'" in str(caught.value)
            assert torch.all(first == _value(0, r)), "a call nobody else submitted changed its tensor"
    finally:
        _restart()
    assert pbm.allreduce(torch.ones(3), name="after restart").tolist() == [float(n)] * 3


def test_same_shape_under_different_names_is_never_paired():
    n, r = pbm.size(), pbm.rank()
    x = torch.full((1000,), _value(0, r))
    handle = pbm.allreduce_async_(x, name=f"only on rank {r}")
    try:
        with pytest.raises(pbm.CollectiveTimeout) as caught:
            handle.wait(timeout_s=2.0)
        assert caught.value.missing_ranks == [q for q in range(n) if q != r], caught.value.missing_ranks
        assert torch.all(x == _value(0, r)), "a call paired with another name's data"
    finally:
        _restart()


MISMATCHES = {
    # label: (count, dtype, op) on the last rank; the others call (1000, float32, "sum")
    "element count": (1001, np.float32, "sum"),
    "dtype": (1000, np.float64, "sum"),
    "op": (1000, np.float32, "max"),
    "ring element count": (300_008, np.float32, "sum"),
}


@pytest.mark.parametrize("swapped", [False, True], ids=["same-order", "swapped-order"])
@pytest.mark.parametrize("label", list(MISMATCHES))
def test_same_name_with_another_size_dtype_or_op_raises_on_every_rank(label, swapped):
    n, r = pbm.size(), pbm.rank()
    count, dtype, op = MISMATCHES[label]
    base = 300_007 if label.startswith("ring") else 1000
    mine = (count, dtype, op) if r == n - 1 else (base, np.float32, "sum")
    w = np.ones(mine[0], dtype=mine[1])
    other = np.full(1000, _value(1, r), dtype=np.float32)
    if swapped and r % 2:
        h_other = pbm.allreduce_async_(other, name="other")
        h_w = pbm.allreduce_async_(w, op=mine[2], name="w")
    else:
        h_w = pbm.allreduce_async_(w, op=mine[2], name="w")
        h_other = pbm.allreduce_async_(other, name="other")
    with pytest.raises(pbm.CollectiveMismatch) as caught:
        h_w.wait()
    text = str(caught.value)
    assert f"rank {n - 1} called" in text and "rank 0 called" in text, text
    assert label.split()[-1] in text or label in text, text
    theirs = f"{np.dtype(mine[1]).name} x {mine[0]}, op={mine[2]}"
    ours = f"float32 x {base}, op=sum"
    assert theirs in text and ours in text, text
    assert np.all(w == 1), "a mismatched collective moved data"
    # the ranks stay in step: the other name was right, and later calls work
    h_other.wait()
    assert np.all(other == _expected(1, n))
    assert np.all(pbm.allreduce(np.ones(3, dtype=np.float32), name="after mismatch") == n)


# --- DDP -------------------------------------------------------------------------------------

class Routed(torch.nn.Module):
    """Branches applied in an order and subset chosen by the data and the rank."""

    def __init__(self, width: int = 6, branches: int = 4):
        super().__init__()
        self.branches = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(branches))
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, route: list[int]) -> torch.Tensor:
        for k in route:
            x = torch.tanh(self.branches[k](x))
        return self.head(x)


def _route(x: torch.Tensor, rank: int, step: int, branches: int) -> list[int]:
    used = [k for k in range(branches) if (k + rank + step) % 3 != 0]  # rank-dependent unused
    return used[::-1] if float(x.sum()) > 0 else used  # data-dependent order


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(100 * step + rank))


def test_ddp_with_rank_dependent_unused_parameters_matches_a_float64_reference():
    n, r = pbm.size(), pbm.rank()
    torch.manual_seed(0)
    model = Routed()
    reference = copy.deepcopy(model).double()
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=64, first_bucket_bytes=64)
    assert len(ddp.bucket_sizes_bytes) >= 5, ddp.bucket_sizes_bytes
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    eps = torch.finfo(torch.float32).eps
    for step in range(4):
        opt.zero_grad(set_to_none=(step % 2 == 0))
        x = _batch(r, step)
        ddp(x, _route(x, r, step, len(model.branches))).pow(2).mean().backward()
        # the reference: every rank's loss in float64, gradients averaged over the ranks
        reference.zero_grad(set_to_none=True)
        for q in range(n):
            xq = _batch(q, step)
            (reference(xq.double(), _route(xq, q, step, len(model.branches))).pow(2).mean() / n).backward()
        for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
            want = torch.zeros_like(ref) if ref.grad is None else ref.grad
            scale = float(want.abs().max()) + 1.0
            torch.testing.assert_close(p.grad.double(), want, rtol=64 * eps, atol=64 * eps * scale,
                                       msg=lambda m: f"step {step}, {name}: {m}")
        opt.step()
        with torch.no_grad():
            for ref in reference.parameters():
                if ref.grad is not None:
                    ref -= lr * ref.grad
    ddp.remove_hooks()


def test_engine_without_progress_thread_refuses_different_names_on_every_rank():
    """Without a progress thread (MPI lacking MPI_THREAD_MULTIPLE) a call runs as it is made,
    so calls of different names cannot wait for each other: they raise CollectiveMismatch on
    every rank instead of pairing."""
    from mpi4py import MPI

    from pybrain_mpi.communication.collectives import ALGORITHMS, OPS, _native
    from pybrain_mpi.core.buffers import as_buffer

    n, r = pbm.size(), pbm.rank()
    core = _native()
    engine = core.Engine(MPI.COMM_WORLD.py2f(), 30.0, False)
    try:
        arrays = {name: np.full(1000, _value(i, r), dtype=np.float32) for i, name in enumerate("ab")}
        buffers = {name: as_buffer(a) for name, a in arrays.items()}  # kept alive while in use
        order = "ab" if r % 2 == 0 else "ba"
        for name in order:
            b = buffers[name]
            args = core.AllreduceArgs(b.address, b.count, b.dtype, OPS["sum"], ALGORITHMS["ring"], name)
            operation = engine.allreduce_async(args)
            assert operation.wait(30.0)
            with pytest.raises(pbm.CollectiveMismatch, match="different names"):
                operation.check()
        assert all(np.all(a == _value(i, r)) for i, a in enumerate(arrays.values())), "data moved"
        # the same order still works there
        b = buffers["a"]
        operation = engine.allreduce_async(core.AllreduceArgs(b.address, b.count, b.dtype, OPS["sum"],
                                                              ALGORITHMS["ring"], "a"))
        assert operation.wait(30.0)
        operation.check()
        assert np.all(arrays["a"] == _expected(0, n))
    finally:
        engine.shutdown()
