"""Shared-memory ("shm") and hierarchical allreduces on real MPI ranks, with forced node
groupings: 1 rank, 1 node x 2, 1 x 4, 2 x 2, 4 x 1 and 3 ranks as 2 + 1.

Every rank regenerates every rank's input from the seeds, so the reference is the float64 sum
of all inputs computed locally; integers must match exactly, floats within a bound derived
from the dtype's epsilon. Timeouts, a rank stopped mid-stage and shutdown/init cycles stay
subprocess workers (tests/test_hierarchical.py).
"""

from __future__ import annotations

import numpy as np
import torch

import pybrain_mpi as pbm
from .helpers import grouping, nodes  # noqa: F401  (nodes: the fixture)
from pybrain_mpi.communication import context
from pybrain_mpi.compression import ThreeLC
from .threelc_reference import gradients, partitions, quantize_blocks

RANKS = (1, 2, 3, 4)
TIMEOUT_S = 900


F32_EPS = float(np.finfo(np.float32).eps)


EPS = {"float32": F32_EPS, "float64": float(np.finfo(np.float64).eps),
       "float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0**-7}


TORCH = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
         "bfloat16": torch.bfloat16, "int32": torch.int32, "int64": torch.int64}


def rank_input(count: int, dtype: str, seed: int, rank: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, rank])
    if dtype.startswith("int"):
        return torch.from_numpy(rng.integers(-1000, 1000, size=count)).to(TORCH[dtype])
    return torch.from_numpy(rng.standard_normal(count).astype(np.float32)).to(TORCH[dtype])


def expected(count: int, dtype: str, op: str, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, sum of |inputs|) in float64 (int64 for integers)."""
    inputs = [rank_input(count, dtype, seed, q).to(torch.float64 if not dtype.startswith("int")
                                                    else torch.int64).numpy() for q in range(n)]
    stack = np.stack(inputs)
    if op in ("sum", "avg"):
        reference = stack.sum(axis=0)
        if op == "avg":
            reference = reference / n
    else:
        reference = stack.min(axis=0) if op == "min" else stack.max(axis=0)
    return reference, np.abs(stack).sum(axis=0)


def check(result: torch.Tensor, count: int, dtype: str, op: str, seed: int, n: int, what: str) -> None:
    reference, abs_sum = expected(count, dtype, op, seed, n)
    assert result.dtype == TORCH[dtype] and result.numel() == count, what
    if dtype.startswith("int"):
        # integer sums wrap like MPI's; these inputs never overflow, so they are exact
        assert np.array_equal(result.numpy().astype(np.int64), reference), f"{what}: integers differ"
        return
    got = result.to(torch.float64).numpy()
    if op in ("min", "max"):
        assert np.array_equal(got, reference), f"{what}: min/max must be exact"
        return
    eps = EPS[dtype]
    # n-1 additions rounding in the accumulation type (float32 for 16-bit floats), one
    # rounding to the output type and one for the division of avg.
    accumulate = min(eps, F32_EPS) if dtype != "float64" else eps
    bound = (n * accumulate + 2 * eps) * abs_sum + 1e-30
    error = np.abs(got - reference)
    worst = int(np.argmax(error - bound)) if count else 0
    assert np.all(error <= bound), f"{what}: element {worst} off by {error[worst]:.3g} (allowed {bound[worst]:.3g})"


def same_on_every_rank(comm, tensor: torch.Tensor, what: str) -> None:
    blobs = comm.allgather(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    assert all(b == blobs[0] for b in blobs), f"{what}: ranks disagree bitwise"


def _exact(comm, algorithms: str, large: str) -> None:
    """Every dtype and op, odd sizes, in place, out of place and zero-copy, vs float64."""
    n, r = comm.Get_size(), comm.Get_rank()
    sizes = [1, 7, n - 1, 1000] + ([1_000_003] if large == "1" else [])
    sizes = sorted(set(s for s in sizes if s > 0))
    seed = 0
    for algorithm in algorithms.split(","):
        for dtype in TORCH:
            for op in ("sum", "avg", "min", "max"):
                if dtype.startswith("int") and op == "avg":
                    continue
                for count in sizes:
                    if count > 10_000 and (dtype != "float32" or op not in ("sum", "avg")):
                        continue  # the large size only for the common case: keeps 2 cores fast
                    seed += 1
                    x = rank_input(count, dtype, seed, r)
                    what = f"{algorithm} {dtype} {op} x{count} on {n} ranks"
                    original = x.clone()
                    out = pbm.allreduce(x, op=op, algorithm=algorithm, name="w")
                    assert torch.equal(x, original), f"{what}: out-of-place changed its input"
                    check(out, count, dtype, op, seed, n, what + " (out of place)")
                    same_on_every_rank(comm, out, what)
                    pbm.allreduce_(x, op=op, algorithm=algorithm)
                    assert torch.equal(x, out), f"{what}: in place differs from out of place"
                    shared = pbm.shared_empty(count, TORCH[dtype])
                    shared.copy_(original)
                    pbm.allreduce_(shared, op=op, algorithm=algorithm)
                    assert torch.equal(shared, out), f"{what}: zero-copy differs from copying path"
                    pbm.shared_reset()
    print(f"rank {r}: exact, shm bytes {pbm.shm_bytes()}, mpi bytes {pbm.bytes_sent()}")


def _zero_copy(comm) -> None:
    """Zero-copy needs equal offsets on the node; otherwise the copying path gives the same."""
    n, r = comm.Get_size(), comm.Get_rank()
    count = 300_001
    for skew in (False, True):
        pbm.shared_reset()
        if skew and pbm.local_rank() == 0:
            # padding of different sizes first: the buffers' offsets now differ by rank
            pbm.shared_empty(1024, torch.float32)
        elif skew:
            pbm.shared_empty(2048, torch.float32)
        x = pbm.shared_empty(count, torch.float32)
        x.copy_(rank_input(count, "float32", 99, r))
        numpy_view = pbm.shared_empty(count, "float32", torch=False)
        assert isinstance(numpy_view, np.ndarray) and numpy_view.shape == (count,)
        numpy_view[...] = x.numpy()
        shm_before = pbm.shm_bytes()
        pbm.allreduce_(x, algorithm="hierarchical" if pbm.cross_size() > 1 else "shm")
        check(x, count, "float32", "sum", 99, n, f"zero-copy skew={skew}")
        pbm.allreduce_(numpy_view, algorithm="auto")
        assert np.array_equal(numpy_view, x.numpy()), "numpy zero-copy buffer differs"
        moved = pbm.shm_bytes() - shm_before
        local = pbm.local_size()
        if local > 1:
            # Zero-copy moves only the copy-out, (L-1)/L of the buffer per call (two calls);
            # the copying path also copies its input in and its result out.
            copy_out = 2 * count * 4 * (local - 1) / local
            if skew:
                assert moved > 1.5 * copy_out, f"skewed buffers cannot be zero-copy, moved only {moved}"
            else:
                assert moved <= 1.01 * copy_out, f"zero-copy moved {moved} bytes, more than the copy-out"
    pbm.shared_reset()
    with_shape = pbm.shared_empty((3, 5), torch.bfloat16)
    assert with_shape.shape == (3, 5) and with_shape.dtype == torch.bfloat16


def _async(comm, algorithm: str) -> None:
    """Several async allreduces in flight at once return through the same Handle."""
    n, r = comm.Get_size(), comm.Get_rank()
    counts = [5, 70_001, 1000, 250_007]
    tensors = [rank_input(c, "float32", 500 + i, r) for i, c in enumerate(counts)]
    tensors.append(pbm.shared_empty(90_001, torch.float32))
    tensors[-1].copy_(rank_input(90_001, "float32", 600, r))
    handles = [pbm.allreduce_async_(t, op="avg", algorithm=algorithm, name=f"g{i}")
               for i, t in enumerate(tensors)]
    assert all(isinstance(h, pbm.Handle) for h in handles)
    for i, (handle, count) in enumerate(zip(handles, counts + [90_001])):
        result = handle.wait()
        assert result is tensors[i]
        check(result, count, "float32", "avg", 500 + i if i < 4 else 600, n, f"async {algorithm} #{i}")
        assert handle.done()


def _compressed(comm, ops: str) -> None:
    for op in ops.split(","):
        compressed_matches_simulation(comm, op)
    # partitions of >= 64 Ki float32: the final decode streams its windows into both buffers
    compressed_matches_simulation(comm, ops.split(",")[-1], count=300_007)
    # block scaling: one scale per 64 elements of each slice partition (partitions not
    # divisible by 64), and blocks of 7 on the streamed sizes
    compressed_matches_simulation(comm, ops.split(",")[0], block=64)
    compressed_matches_simulation(comm, ops.split(",")[-1], count=300_007, block=7)


def compressed_matches_simulation(comm, op: str, count: int = 10_007, block: int = 0) -> None:
    """3LC on the inter-node stage only: matches a simulation of node sum + per-slice 3LC
    (`block` > 0: one scale per block of that many elements of each partition)."""
    n, r = comm.Get_size(), comm.Get_rank()
    layout = context.current().engine.node_layout()
    nodes = layout["node_count"]
    assert nodes > 1, layout
    sparsity = 1.0
    codec = ThreeLC(sparsity, block=block)
    state = codec.new_state(np.zeros(count, np.float32))
    slices_n = layout["slices"]
    per_slice = -(-count // slices_n)  # ceil, then rounded up to 64 bytes of float32
    per = max(16, -(-per_slice // 16) * 16)
    slices = [slice(min(s * per, count), min((s + 1) * per, count)) for s in range(slices_n)]
    # node j holds world ranks j*k .. j*k+k-1 (consecutive forced grouping of k per node; the
    # last node may hold fewer); slice s belongs to local rank s % (ranks on that node)
    per_node = layout["slices"]  # the largest node's rank count: the forced grouping
    members = [list(range(j * per_node, min((j + 1) * per_node, n))) for j in range(nodes)]
    assert members[pbm.cross_rank()] == sorted(layout["node_world_ranks"]), (members, layout)
    residual = {(j, s): np.zeros(sl.stop - sl.start, np.float32) for j in range(nodes)
                for s, sl in enumerate(slices)}
    owner = {(j, s): None for j in range(nodes) for s in range(slices_n)}
    for step in range(4):
        grads = gradients(step, count, n)
        if step % 2:
            # zero-copy: the final 3LC decode stores straight into the node peer's buffer
            x = pbm.shared_empty(count, torch.float32)
            x.copy_(torch.from_numpy(grads[r]))
        else:
            x = torch.from_numpy(grads[r].copy())
        pbm.allreduce_(x, op=op, algorithm="hierarchical", compression=codec, state=state, name="grad")
        want = np.empty(count, np.float32)
        for s, sl in enumerate(slices):
            length = sl.stop - sl.start
            node_sums = []
            for j in range(nodes):
                acc = grads[members[j][0]][sl].copy()
                for q in members[j][1:]:
                    acc += grads[q][sl]
                node_sums.append(acc)
            parts = partitions(length, nodes)
            result = np.empty(length, np.float32)
            for p, part in enumerate(parts):
                # the owning node's own share stays exact (it never crosses the network)
                total = residual[(p, s)][part] + node_sums[p][part]
                residual[(p, s)][part] = 0
                for j in range(nodes):
                    if j == p:
                        continue
                    acc = residual[(j, s)][part] + node_sums[j][part]
                    qs, scale = quantize_blocks(acc, sparsity, block)
                    residual[(j, s)][part] = acc - qs * scale
                    total += qs * scale
                if owner[(p, s)] is None:
                    owner[(p, s)] = np.zeros(part.stop - part.start, np.float32)
                acc2 = owner[(p, s)] + total
                q2, scale2 = quantize_blocks(acc2, sparsity, block)
                owner[(p, s)] = acc2 - q2 * scale2
                result[part] = q2 * scale2
            want[sl] = result / np.float32(n) if op == "avg" else result
        tolerance = 4 * n * F32_EPS * (np.abs(want).max(initial=0) + 1)
        np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=tolerance, err_msg=f"step {step}")
        here = pbm.cross_rank()
        owned = [s for s in range(slices_n) if s % len(members[here]) == pbm.local_rank()]
        expected = np.concatenate([residual[(here, s)] for s in owned])
        assert state.hierarchical_residual.size == expected.size, (owned, state.hierarchical_residual.size)
        np.testing.assert_allclose(state.hierarchical_residual, expected,
                                   rtol=0, atol=tolerance, err_msg=f"residual, step {step}")
        same_on_every_rank(comm, x, f"compressed step {step}")
    # NaN/Inf on one rank: every rank raises (no timeout), and the ranks stay in step
    g = torch.ones(5000)
    if r == n - 1:
        g[1234] = float("inf")
    try:
        pbm.allreduce_(g, algorithm="hierarchical", compression=codec, state=codec.new_state(g),
                       name="fc.weight")
    except pbm.PbmError as error:
        assert "fc.weight" in str(error) and "NaN/Inf" in str(error), str(error)
    else:
        raise AssertionError(f"NaN/Inf not reported on rank {r}")
    assert torch.all(pbm.allreduce(torch.ones(300_000), algorithm="hierarchical") == n)
    # the flat path still uses the full-size residual of the same state class
    flat = codec.new_state(np.zeros(count, np.float32))
    y = torch.from_numpy(gradients(9, count, n)[r].copy())
    pbm.allreduce_(y, op=op, compression=codec, state=flat)
    assert flat.residual.size == count and flat.hierarchical_residual is None


def _mismatch(comm, algorithm: str) -> None:
    """A different count on one rank raises CollectiveMismatch on all; the next call works."""
    n, r = comm.Get_size(), comm.Get_rank()
    try:
        pbm.allreduce(np.ones(300_000 + (r == n - 1), dtype=np.float32), algorithm=algorithm, name="w")
    except pbm.CollectiveMismatch as error:
        assert f"rank {n - 1}:" in str(error) and "algorithm=" + algorithm in str(error), str(error)
    else:
        raise AssertionError(f"mismatch not detected on rank {r}")
    out = pbm.allreduce(np.ones(300_000, dtype=np.float32), algorithm=algorithm)
    assert np.all(out == n)
    if pbm.cross_size() > 1:
        try:
            pbm.allreduce(np.ones(10, dtype=np.float32), algorithm="shm")
        except pbm.PbmError as error:
            assert "hierarchical" in str(error), str(error)
        else:
            raise AssertionError("shm across nodes must be refused")


def _finite(comm, algorithm: str) -> None:
    """check_finite: the allreduce says whether its *result* is all finite, the same on every
    rank, for zero-copy shared buffers (checked inside the reduce), ordinary tensors and
    16-bit floats (checked by a scan); DDP hands it to the fused optimizer."""
    n, r = comm.Get_size(), comm.Get_rank()
    count = 100_003  # odd: the last slice is short
    pbm.shared_reset()
    for dtype in ("float32", "float64", "float16"):
        for shared in (True, False):
            if dtype == "float16" and shared:
                continue
            torch_dtype = getattr(torch, dtype)
            x = pbm.shared_empty(count, torch_dtype) if shared else torch.empty(count, dtype=torch_dtype)
            what = f"{algorithm} {dtype} shared={shared}"
            # clean inputs: finite, and the values are still right
            x.copy_(rank_input(count, dtype, 7, r))
            handle = pbm.allreduce_async_(x, algorithm=algorithm, check_finite=True)
            assert handle.finite is None or handle.done()
            handle.wait()
            check(x, count, dtype, "sum", 7, n, what)
            assert handle.finite is True, f"{what}: clean result reported {handle.finite}"
            # one Inf on rank 0 near the end (the last slice), one NaN on the last rank at the start
            for position, bad_rank, value in ((count - 2, 0, float("inf")), (3, n - 1, float("nan"))):
                x.copy_(rank_input(count, dtype, 7, r))
                if r == bad_rank:
                    x[position] = value
                handle = pbm.allreduce_async_(x, algorithm=algorithm, check_finite=True)
                handle.wait()
                assert handle.finite is False, f"{what}: {value} at {position} on rank {bad_rank} reported finite"
            # finite inputs whose sum overflows: the check is on the result, not the inputs
            if n > 1:
                x.fill_(torch.finfo(torch_dtype).max * 0.75)
                handle = pbm.allreduce_async_(x, algorithm=algorithm, check_finite=True)
                handle.wait()
                assert handle.finite is False, f"{what}: overflowing sum reported finite"
            # a clean call right after: earlier flags must not leak into it
            x.copy_(rank_input(count, dtype, 8, r))
            handle = pbm.allreduce_async_(x, algorithm=algorithm, check_finite=True)
            handle.wait()
            assert handle.finite is True, f"{what}: a stale non-finite flag leaked into the next call"
            # not asked: no answer
            handle = pbm.allreduce_async_(x, algorithm=algorithm)
            handle.wait()
            assert handle.finite is None
            flags = comm.allgather(True)
            assert all(flags)

    # DDP + fused optimizer: the step is skipped on every rank when any rank's gradient is Inf,
    # and with a clean gradient the hint gives the same update as the optimizer's own check.
    from pybrain_mpi.optim import FusedSGD

    torch.manual_seed(0)
    models = [pbm.DistributedDataParallel(torch.nn.Linear(33, 5), algorithm=algorithm, check_finite=True)
              for _ in range(2)]
    models[1].module.load_state_dict(models[0].module.state_dict())
    optimizers = [FusedSGD(m.parameters(), lr=0.1) for m in models]
    x = torch.randn(8, 33, generator=torch.Generator().manual_seed(r))
    for model, opt, hint in ((models[0], optimizers[0], True), (models[1], optimizers[1], False)):
        opt.zero_grad()
        model(x).square().sum().backward()
        assert model.grads_finite is True, model.grads_finite
        opt.step(grads_finite=model.grads_finite if hint else None)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b), "the grads_finite hint changed the update"
    before = [p.detach().clone() for p in models[0].parameters()]
    bad = x.clone()
    if r == 0:
        bad[0, 0] = float("inf")
    optimizers[0].zero_grad()
    models[0](bad).square().sum().backward()
    assert models[0].grads_finite is False, f"rank {r}: Inf on rank 0 not reported"
    optimizers[0].step(grads_finite=models[0].grads_finite)
    assert not optimizers[0].last_step_finite
    for p, old in zip(models[0].parameters(), before):
        assert torch.equal(p, old), "a skipped step wrote parameters"


# --- tests: one per node grouping, each running several checks ------------------------------

@grouping((1, 1))
def test_one_rank_is_the_identity_for_every_algorithm(comm, nodes):
    _exact(comm, "shm,hierarchical,auto", "0")


@grouping((2, 2))
def test_one_node_of_two_shm_exact_zero_copy_async_mismatch_and_finiteness(comm, nodes):
    # every dtype and op, odd sizes (1, 7, 1000, 1000003), in place / out of place / zero-copy
    _exact(comm, "shm,hierarchical,auto", "1")
    _zero_copy(comm)
    _async(comm, "shm")
    _mismatch(comm, "shm")
    _finite(comm, "shm")
    _finite(comm, "ring")


@grouping((4, 4))
def test_one_node_of_four_shm_exact_and_zero_copy(comm, nodes):
    _exact(comm, "shm", "0")
    _zero_copy(comm)
    _async(comm, "auto")


@grouping((4, 2))
def test_two_nodes_of_two_hierarchical_exact_async_mismatch_3lc_between_nodes_and_finiteness(comm, nodes):
    _exact(comm, "hierarchical,auto", "0")
    _zero_copy(comm)
    _async(comm, "hierarchical")
    _mismatch(comm, "hierarchical")
    _compressed(comm, "sum,avg")
    _finite(comm, "auto")


@grouping((4, 1))
def test_four_nodes_of_one_hierarchical_is_the_ring(comm, nodes):
    _exact(comm, "hierarchical", "0")
    _async(comm, "auto")


@grouping((3, 2))
def test_uneven_nodes_two_plus_one_hierarchical_exact_and_3lc_between_nodes(comm, nodes):
    _exact(comm, "hierarchical,auto", "1")
    _zero_copy(comm)
    _async(comm, "auto")
    _compressed(comm, "avg")
