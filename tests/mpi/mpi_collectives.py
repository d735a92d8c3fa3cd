"""Collectives on real MPI ranks: 1, 2, 3 and 4 (4 oversubscribes 2 cores). Timeouts (a rank
that never joins) stay subprocess workers: tests/test_collectives.py."""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

import pybrain_mpi as pbm
from .helpers import grouping, nodes, on  # noqa: F401  (nodes: the fixture)
from pybrain_mpi.communication import context

RANKS = (1, 2, 3, 4)
TIMEOUT_S = 900


EPS = {
    np.float32: np.finfo(np.float32).eps,
    np.float64: np.finfo(np.float64).eps,
    np.float16: np.finfo(np.float16).eps,
    "bfloat16": 2.0**-7,
}


def random_input(count: int, dtype, seed: int, rank: int) -> np.ndarray:
    rng = np.random.default_rng([seed, rank])
    if dtype in (np.int32, np.int64):
        return rng.integers(-1000, 1000, size=count).astype(dtype)
    return rng.standard_normal(count).astype(dtype)


def check_float(result: np.ndarray, inputs_abs_sum: np.ndarray, reference: np.ndarray, eps: float,
                n: int, what: str) -> None:
    # Each partial sum rounds once per addition (n-1 of them, in float32 accumulation for
    # 16-bit types), plus one final rounding to the output type: bound relative to sum|x|.
    accumulate_eps = min(eps, float(np.finfo(np.float32).eps)) if eps > 1e-10 else eps
    bound = (n * accumulate_eps + eps) * inputs_abs_sum + 1e-30
    error = np.abs(result.astype(np.float64) - reference)
    worst = int(np.argmax(error - bound)) if error.size else 0
    assert np.all(error <= bound), (
        f"{what}: element {worst} off by {error[worst]:.3g} (allowed {bound[worst]:.3g})")


def _correctness(comm: MPI.Comm) -> None:
    """pbm.allreduce matches MPI_Allreduce (ints exactly, floats within dtype tolerance)."""
    n, r = comm.Get_size(), comm.Get_rank()
    sizes = [0, 1, 2, 3, n - 1, n + 1, 7, 13, 1000, 4099, 16385, 65537, 100003]
    sizes = sorted(set(s for s in sizes if s >= 0))
    dtypes = [np.float32, np.float64, np.float16, np.int32, np.int64, "bfloat16"]
    seed = 0
    for algorithm in ("ring", "mpi"):
        for dtype in dtypes:
            for op in ("sum", "avg", "min", "max"):
                if dtype in (np.int32, np.int64) and op == "avg":
                    continue
                for count in sizes:
                    seed += 1
                    base = random_input(count, np.float32 if dtype == "bfloat16" else dtype, seed, r)
                    if dtype == "bfloat16":
                        tensor = torch.from_numpy(base).to(torch.bfloat16)
                        exact = tensor.to(torch.float64).numpy()
                    else:
                        exact = base.astype(np.float64) if dtype not in (np.int32, np.int64) else base
                    what = f"{algorithm} {dtype if isinstance(dtype, str) else np.dtype(dtype).name} {op} x{count} on {n} ranks"
                    if dtype in (np.int32, np.int64):
                        expected = np.empty_like(base)
                        mpi_op = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op]
                        comm.Allreduce(base, expected, op=mpi_op)
                        got = pbm.allreduce(base, op=op, algorithm=algorithm)
                        assert got.dtype == base.dtype, what
                        assert np.array_equal(got, expected), f"{what}: differs from MPI_Allreduce"
                        continue
                    mpi_op = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op]
                    reference = np.empty_like(exact)
                    comm.Allreduce(exact, reference, op=mpi_op)
                    abs_sum = np.empty_like(exact)
                    comm.Allreduce(np.abs(exact), abs_sum, op=MPI.SUM)
                    if op == "avg":
                        reference /= n
                        abs_sum /= n
                    if dtype == "bfloat16":
                        out = pbm.allreduce(tensor, op=op, algorithm=algorithm)
                        assert out.dtype == torch.bfloat16, what
                        got = out.to(torch.float64).numpy()
                        eps = EPS["bfloat16"]
                    else:
                        got = pbm.allreduce(base, op=op, algorithm=algorithm)
                        assert got.dtype == base.dtype, what
                        eps = EPS[dtype]
                    if op in ("min", "max"):
                        assert np.array_equal(got.astype(np.float64), reference), f"{what}: differs"
                    else:
                        check_float(got, abs_sum, reference, eps, n, what)
                    # every rank holds bitwise the same result
                    gathered = comm.allgather(np.ascontiguousarray(got).tobytes())
                    assert all(g == gathered[0] for g in gathered), f"{what}: ranks disagree"


def _inplace(comm: MPI.Comm) -> None:
    """In-place and out-of-place, numpy and torch, contiguous and strided inputs."""
    n, r = comm.Get_size(), comm.Get_rank()
    for count in (5, 30001, 200003):
        base = random_input(count, np.float64, 99, r)
        expected = np.empty_like(base)
        comm.Allreduce(base, expected, op=MPI.SUM)
        # out of place leaves the input alone
        x = base.copy()
        y = pbm.allreduce(x)
        assert np.array_equal(x, base) and y is not x
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12 * n * np.abs(expected).max() + 1e-300)
        # in place on numpy returns the same object
        z = base.copy()
        assert pbm.allreduce_(z) is z
        np.testing.assert_allclose(z, expected, rtol=0, atol=1e-12 * n * np.abs(expected).max() + 1e-300)
        # strided numpy view, in place: only the viewed elements change
        wide = np.zeros(2 * count)
        wide[::2] = base
        pbm.allreduce_(wide[::2])
        np.testing.assert_allclose(wide[::2], expected, rtol=0, atol=1e-12 * n * np.abs(expected).max() + 1e-300)
        assert np.all(wide[1::2] == 0)
        # transposed torch tensor (non-contiguous), in place
        side = int(np.sqrt(count))
        t = torch.from_numpy(base[: side * side].reshape(side, side).copy()).t()
        assert not t.is_contiguous()
        expect_t = torch.from_numpy(expected[: side * side].reshape(side, side).copy()).t()
        out = pbm.allreduce_(t)
        assert out is t
        torch.testing.assert_close(t, expect_t, rtol=0, atol=1e-12 * n * float(np.abs(expected).max()) + 1e-300)
    # a tensor that requires grad is reduced without autograd complaints
    p = torch.nn.Parameter(torch.full((10,), float(r + 1)))
    pbm.allreduce_(p)
    assert torch.all(p.detach() == n * (n + 1) / 2)


def _async(comm: MPI.Comm) -> None:
    """allreduce_async_ runs on the progress thread while Python keeps computing."""
    n, r = comm.Get_size(), comm.Get_rank()
    count = 8_000_000
    x = torch.full((count,), float(r + 1))
    handle = pbm.allreduce_async_(x, name="big")
    # Python work while the collective runs: count iterations done before completion.
    work_iterations = 0
    acc = 0.0
    while not handle.done():
        acc += sum(i * 0.5 for i in range(200))
        work_iterations += 1
    assert handle.wait() is x
    assert torch.all(x == n * (n + 1) / 2), "async result wrong"
    assert work_iterations > 0, "async allreduce did not overlap any Python work"
    # several in flight complete in submission order with correct results
    tensors = [torch.full((1000 * (i + 1) + i,), float(r + i)) for i in range(6)]
    handles = [pbm.allreduce_async_(t, op="max") for t in tensors]
    for i, (t, h) in enumerate(zip(tensors, handles)):
        h.wait()
        assert torch.all(t == float(n - 1 + i)), f"async #{i} wrong"
    # mixing a blocking call after async ones keeps order
    a = torch.ones(50_000)
    ha = pbm.allreduce_async_(a)
    b = pbm.allreduce(torch.ones(7) * r, op="sum")
    ha.wait()
    assert torch.all(a == n) and torch.all(b == sum(range(n)))
    print(f"rank {r}: overlapped {work_iterations} python iterations")


def _mismatch(comm: MPI.Comm) -> None:
    """Different sizes or dtypes on one rank raise CollectiveMismatch on every rank."""
    n, r = comm.Get_size(), comm.Get_rank()
    for count_here, dtype_here, label in (
        (1000 + (r == n - 1), np.float32, "count"),  # small (inline) path
        (300_000 + 7 * (r == n - 1), np.float32, "count"),  # ring path
        (1000, np.float64 if r == n - 1 else np.float32, "dtype"),
    ):
        try:
            pbm.allreduce(np.ones(count_here, dtype=dtype_here), name="w")
        except pbm.CollectiveMismatch as error:
            text = str(error)
            assert f"rank {n - 1}:" in text and "rank 0:" in text, text
        else:
            raise AssertionError(f"{label} mismatch not detected on rank {r}")
        # the ranks stay in step: the next collective works
        ok = pbm.allreduce(np.ones(3, dtype=np.float32))
        assert np.all(ok == n)
    print(f"rank {r}: mismatches detected")


def _broadcast(comm: MPI.Comm) -> None:
    """broadcast_ from every root, barrier, topology queries, idempotent init."""
    n, r = comm.Get_size(), comm.Get_rank()
    pbm.init()  # second call is a no-op
    assert pbm.rank() == r and pbm.size() == n
    assert pbm.local_size() == n and pbm.local_rank() == r  # one machine
    assert pbm.cross_size() == 1 and pbm.cross_rank() == 0
    for root in range(n):
        for count in (0, 1, 17, 300_001):
            x = np.full(count, r, dtype=np.int64)
            pbm.broadcast_(x, root=root)
            assert np.all(x == root)
        t = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t() * (r + 1)
        pbm.broadcast_(t, root=root)
        assert torch.equal(t, torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t() * (root + 1))
    h = pbm.broadcast_async_(torch.full((5,), float(r)), root=n - 1)
    assert torch.all(h.wait() == n - 1)
    for _ in range(3):
        pbm.barrier()
    try:
        pbm.broadcast_(np.zeros(3), root=n)
    except ValueError as error:
        assert "root" in str(error)
    else:
        raise AssertionError("bad root accepted")
    sent_before = pbm.bytes_sent()
    pbm.allreduce(np.ones(1_000_000, dtype=np.float32))
    if n > 1:
        assert pbm.bytes_sent() - sent_before >= 4_000_000 * (n - 1) // n


def _topology(comm: MPI.Comm, ranks_per_node: str) -> None:
    """ranks_per_node groups consecutive ranks into emulated nodes."""
    k = int(ranks_per_node)
    n, r = comm.Get_size(), comm.Get_rank()
    pbm.shutdown()
    pbm.init(ranks_per_node=k)
    assert pbm.local_rank() == r % k, pbm.local_rank()
    assert pbm.local_size() == min(k, n - (r // k) * k)
    assert pbm.cross_rank() == r // k
    assert pbm.cross_size() == (n + k - 1) // k
    assert np.all(pbm.allreduce(np.ones(5)) == n)


# --- tests ---------------------------------------------------------------------------------

def test_allreduce_matches_mpi_allreduce_for_every_dtype_op_and_odd_sizes(comm):
    _correctness(comm)


@on(3)
def test_ring_with_tiny_chunks_pipelines_many_pieces_correctly(comm):
    # 4 KiB pieces: every ring segment of the larger sizes spans dozens of messages.
    engine = context.current().engine
    chunk = engine.ring_chunk_bytes
    engine.ring_chunk_bytes = 4096
    try:
        _correctness(comm)
    finally:
        engine.ring_chunk_bytes = chunk


@on(2, 3)
def test_in_place_out_of_place_and_strided_inputs(comm):
    _inplace(comm)


@on(2, 3)
def test_async_allreduce_overlaps_python_work_and_keeps_order(comm):
    _async(comm)


@on(2, 3, 4)
def test_size_or_dtype_mismatch_raises_on_every_rank(comm):
    _mismatch(comm)


@on(1, 2, 3)
def test_broadcast_barrier_and_topology(comm):
    _broadcast(comm)


@grouping((4, 2), (3, 2), (4, 1))
def test_forced_ranks_per_node_groups_consecutive_ranks(comm, nodes):
    _topology(comm, str(nodes))
