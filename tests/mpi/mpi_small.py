"""The small-message allreduce of one node (algorithm "small", and "auto" up to 64 KiB) on real
MPI ranks: 2, 3 and 4 (4 oversubscribes 2 cores). A stopped peer is a subprocess worker:
tests/test_small_allreduce.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

import pybrain_mpi as pbm
from pybrain_mpi.communication import context
from .helpers import regroup

RANKS = (2, 3, 4)
TIMEOUT_S = 900

EPS = {"float32": np.finfo(np.float32).eps, "float64": np.finfo(np.float64).eps,
       "float16": np.finfo(np.float16).eps, "bfloat16": 2.0**-7}
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64")
CAPACITY = 64 * 1024


def _input(count: int, dtype: str, seed: int, rank: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, rank])
    if dtype.startswith("int"):
        return torch.from_numpy(rng.integers(-1000, 1000, size=count).astype(dtype))
    values = torch.from_numpy(rng.standard_normal(count))
    return values.to(getattr(torch, dtype))


def _sizes(n: int, dtype: str) -> list[int]:
    esize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    largest = CAPACITY // esize
    return sorted({0, 1, 2, 3, n - 1, n + 1, 7, 13, 1000, 4099, largest - 3, largest})


def _check(comm: MPI.Comm, algorithm: str) -> None:
    """Every dtype, op and odd size against a float64 (ints: exact) reference; every rank holds
    bitwise the same result."""
    n, r = comm.Get_size(), comm.Get_rank()
    seed = 0
    for dtype in DTYPES:
        for op in ("sum", "avg", "min", "max"):
            if dtype.startswith("int") and op == "avg":
                continue
            for count in _sizes(n, dtype):
                seed += 1
                x = _input(count, dtype, seed, r)
                exact = x.to(torch.float64).numpy() if not dtype.startswith("int") else x.numpy()
                what = f"{algorithm} {dtype} {op} x{count} on {n} ranks"
                reference = np.empty_like(exact)
                mpi_op = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op]
                comm.Allreduce(exact, reference, op=mpi_op)
                got = pbm.allreduce(x, op=op, algorithm=algorithm)
                assert got.dtype == x.dtype and got.shape == x.shape, what
                if dtype.startswith("int") or op in ("min", "max"):
                    assert np.array_equal(got.to(torch.float64).numpy() if not dtype.startswith("int")
                                          else got.numpy(), reference), f"{what}: differs"
                else:
                    magnitude = np.empty_like(exact)
                    comm.Allreduce(np.abs(exact), magnitude, op=MPI.SUM)
                    if op == "avg":
                        reference /= n
                        magnitude /= n
                    # n - 1 additions in float32 (16-bit types) or the dtype, one final rounding
                    accumulate = min(EPS[dtype], float(np.finfo(np.float32).eps))
                    bound = (n * accumulate + EPS[dtype]) * magnitude + 1e-30
                    error = np.abs(got.to(torch.float64).numpy() - reference)
                    assert np.all(error <= bound), (
                        f"{what}: element {int(np.argmax(error - bound))} off by {error.max():.3g}")
                gathered = comm.allgather(got.view(torch.uint8).numpy().tobytes() if count else b"")
                assert all(g == gathered[0] for g in gathered), f"{what}: ranks disagree"


def test_small_matches_a_float64_reference_for_every_dtype_op_and_odd_size(comm):
    _check(comm, "small")


def test_auto_sends_small_messages_through_the_slots_without_any_mpi_message(comm):
    n, r = comm.Get_size(), comm.Get_rank()
    for count in (1, 1000, CAPACITY // 4):
        sent, shm = pbm.bytes_sent(), context.shm_bytes()
        x = torch.full((count,), float(r + 1))
        pbm.allreduce_(x, algorithm="auto", name="small.auto")
        assert torch.all(x == n * (n + 1) / 2), count
        assert pbm.bytes_sent() == sent, f"auto sent MPI messages for {count * 4} bytes"
        assert context.shm_bytes() - shm == count * 4, "auto did not take the small-message path"
    # Above the threshold "auto" takes the shared-memory node stage (or the ring), still exact.
    big = torch.full((CAPACITY // 4 + 1,), float(r + 1))
    pbm.allreduce_(big, algorithm="auto")
    assert torch.all(big == n * (n + 1) / 2)
    # PBM_SMALL_MAX_BYTES / small_max_bytes lowers the threshold: 0 turns the path off.
    engine = context.current().engine
    limit = engine.small_max_bytes
    engine.small_max_bytes = 0
    try:
        sent = pbm.bytes_sent()
        pbm.allreduce_(torch.ones(10), algorithm="auto")
        assert pbm.bytes_sent() > sent, "small_max_bytes = 0 still took the small path"
    finally:
        engine.small_max_bytes = limit


def test_async_and_check_finite_on_the_small_path(comm):
    n, r = comm.Get_size(), comm.Get_rank()
    handles = [pbm.allreduce_async_(torch.full((100 + k,), float(k)), algorithm="small", name=f"a{k}",
                                    check_finite=True) for k in range(5)]
    for k, handle in enumerate(handles):
        assert torch.all(handle.wait() == n * k) and handle.finite is True
    x = torch.ones(33)
    if r == n - 1:
        x[7] = float("inf")
    handle = pbm.allreduce_async_(x, algorithm="small", check_finite=True)
    handle.wait()
    assert handle.finite is False  # the same answer on every rank


def test_too_large_for_the_slots_is_refused_before_anything_runs(comm):
    with pytest.raises(pbm.PbmError, match="algorithm 'small' takes messages of at most 65536 bytes"):
        pbm.allreduce(torch.ones(CAPACITY // 4 + 1), algorithm="small")
    assert torch.all(pbm.allreduce(torch.ones(4), algorithm="small") == comm.Get_size())


def test_mismatch_in_the_slot_headers_raises_on_every_rank_naming_the_rank(comm):
    n, r = comm.Get_size(), comm.Get_rank()
    last = r == n - 1
    cases = (
        ("count", dict(x=torch.ones(100 + last)), {}),
        ("dtype", dict(x=torch.ones(100, dtype=torch.float64 if last else torch.float32)), {}),
        ("op", dict(x=torch.ones(100)), dict(op="max" if last else "sum")),
    )
    for label, tensors, options in cases:
        with pytest.raises(pbm.CollectiveMismatch) as raised:
            pbm.allreduce_(tensors["x"], algorithm="small", **{"name": "w", **options})
        text = str(raised.value)
        assert f"rank {n - 1} differs from rank 0" in text, (label, text)
        assert f"rank {n - 1}: #" in text and "rank 0: #" in text, (label, text)
        # the ranks stay in step: the next small allreduce works
        assert torch.all(pbm.allreduce(torch.ones(3), algorithm="small") == n), label


def test_different_names_in_the_slots_negotiate_and_give_the_right_sums(comm):
    """Two small allreduces submitted in swapped order on odd ranks: the slot headers show
    different names, every rank sees it, the engine negotiates an order, and each name gets
    its own sum (never the other one's data)."""
    n, r = comm.Get_size(), comm.Get_rank()
    values = {"p": torch.full((100,), float(r + 1)), "q": torch.full((37,), 10.0 * (r + 1))}
    order = ["p", "q"] if r % 2 == 0 else ["q", "p"]
    handles = [pbm.allreduce_async_(values[name], algorithm="small", name=name) for name in order]
    for handle in handles:
        handle.wait()
    total = n * (n + 1) / 2
    assert torch.all(values["p"] == total) and torch.all(values["q"] == 10 * total), (
        float(values["p"][0]), float(values["q"][0]))


def test_peer_in_a_collective_with_a_join_is_named_instead_of_a_hang(comm):
    """The last rank runs a large allreduce (with a join) where the others run a small one:
    the small ones withdraw from their slots and join by message, the ranks see each other's
    names and negotiate; neither call is ever submitted everywhere, so each times out naming
    the ranks that lack it (never pairing the two). Timed-out engines are started again."""
    n, r = comm.Get_size(), comm.Get_rank()
    try:
        with pytest.raises(pbm.CollectiveTimeout) as raised:
            if r == n - 1:
                pbm.allreduce(torch.ones(CAPACITY), algorithm="auto", name="big", timeout_s=3)
            else:
                pbm.allreduce(torch.ones(10), algorithm="auto", name="tiny", timeout_s=3)
        expected = list(range(n - 1)) if r == n - 1 else [n - 1]
        assert sorted(raised.value.missing_ranks) == expected, (raised.value.missing_ranks, str(raised.value))
        comm.Barrier()
    finally:
        regroup(None)
    assert torch.all(pbm.allreduce(torch.ones(5), algorithm="small") == n)


def test_small_and_joined_calls_in_swapped_order_give_the_right_answers(comm):
    """A small and a large allreduce submitted in swapped order on odd ranks: the small side
    withdraws, the names are negotiated and both sums are right."""
    n, r = comm.Get_size(), comm.Get_rank()
    tiny = torch.full((10,), float(r + 1))
    big = torch.full((CAPACITY // 4 + 5,), 2.0 * (r + 1))
    calls = [("tiny", tiny), ("big", big)] if r % 2 == 0 else [("big", big), ("tiny", tiny)]
    handles = [pbm.allreduce_async_(x, algorithm="auto", name=name) for name, x in calls]
    for handle in handles:
        handle.wait()
    total = n * (n + 1) / 2
    assert torch.all(tiny == total) and torch.all(big == 2 * total), (float(tiny[0]), float(big[0]))


def test_many_calls_in_a_row_reuse_the_two_slots_without_reading_stale_data(comm):
    n, r = comm.Get_size(), comm.Get_rank()
    # Ranks drift apart by up to a call (nothing synchronises them between calls): each call's
    # values differ, so a slot read one call early or late gives a wrong sum.
    for k in range(3000):
        count = 1 + (k * 37) % 2000
        x = torch.full((count,), float(k * n + r))
        pbm.allreduce_(x, algorithm="small")
        expected = float(k * n * n + n * (n - 1) // 2)
        assert torch.all(x == expected), (k, float(x[0]), expected)


def test_ddp_small_first_bucket_goes_through_the_slots_and_matches_the_average(comm):
    """DDP with algorithm="auto": a first bucket under 64 KiB is reduced on the small path (no
    MPI bytes, shared-memory bytes counted), and every gradient is the ranks' average."""
    n, r = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ddp = pbm.DistributedDataParallel(model, algorithm="auto", first_bucket_bytes=4096, bucket_bytes=4096)
    inputs = torch.randn(5, 16, generator=torch.Generator().manual_seed(r))
    sent, shm = pbm.bytes_sent(), context.shm_bytes()
    ddp(inputs).pow(2).sum().backward()
    assert pbm.bytes_sent() == sent, "a small bucket sent MPI messages"
    params = sum(p.numel() for p in model.parameters())
    assert context.shm_bytes() - shm == 4 * params, (context.shm_bytes() - shm, params)
    # reference: each rank's own gradient, averaged with MPI in float64
    reference = copy_model_grads(model, inputs)
    for p, g in zip(model.parameters(), reference):
        total = np.empty_like(g)
        comm.Allreduce(g, total, op=MPI.SUM)
        np.testing.assert_allclose(p.grad.double().numpy(), total / n, rtol=1e-5, atol=1e-6)


def copy_model_grads(model: torch.nn.Module, inputs: torch.Tensor) -> list[np.ndarray]:
    """This rank's own (unreduced) gradients of the same loss, from a plain copy of the model."""
    import copy

    plain = copy.deepcopy(model)
    for p in plain.parameters():
        p.grad = None
    plain(inputs).pow(2).sum().backward()
    return [p.grad.double().numpy() for p in plain.parameters()]
