"""pybrain_mpi.horovod follows horovod.torch semantics on real ranks: a Horovod script runs
with only its import line changed."""

from __future__ import annotations

import time

import pytest
import torch

import pybrain_mpi.horovod as hvd

RANKS = (2, 3)


@pytest.fixture(autouse=True)
def float64_single_thread():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    hvd.init()
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.parametrize("backward_passes", [1, 2])
def test_distributed_optimizer_recipe_trains_like_one_process_on_the_global_batch(backward_passes):
    n, r = hvd.size(), hvd.rank()
    torch.manual_seed(100 + r)  # different on every rank: broadcast_parameters must fix it
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    torch.manual_seed(100)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
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


def test_allreduce_averages_by_default_leaves_its_input_and_honours_ops_and_postscale():
    n, r = hvd.size(), hvd.rank()
    x = torch.full((4,), float(r))
    assert torch.allclose(hvd.allreduce(x), torch.full((4,), (n - 1) / 2))
    assert torch.equal(x, torch.full((4,), float(r)))
    assert torch.allclose(hvd.allreduce(x, op=hvd.Sum), torch.full((4,), float(sum(range(n)))))
    assert torch.allclose(hvd.allreduce(x, average=False), torch.full((4,), float(sum(range(n)))))
    assert torch.equal(hvd.allreduce(x, op=hvd.Max), torch.full((4,), float(n - 1)))
    y = x.clone()
    assert hvd.allreduce_(y, op=hvd.Sum, postscale_factor=2.0) is y
    assert torch.allclose(y, torch.full((4,), 2.0 * sum(range(n))))
    z = hvd.allreduce(torch.full((3,), 1.5), compression=hvd.Compression.fp16)
    assert z.dtype == torch.float64 and torch.allclose(z, torch.full((3,), 1.5))


def test_async_handles_poll_and_synchronize_return_the_output():
    n, r = hvd.size(), hvd.rank()
    handle = hvd.allreduce_async(torch.ones(1000) * r, op=hvd.Sum, name="async.one")
    while not hvd.poll(handle):
        pass
    assert torch.allclose(hvd.synchronize(handle), torch.full((1000,), float(sum(range(n)))))
    h2 = hvd.allreduce_async_(torch.ones(3), name="async.two")
    assert torch.allclose(hvd.synchronize(h2), torch.ones(3))


def test_broadcast_copies_and_in_place_forms():
    n, r = hvd.size(), hvd.rank()
    b = torch.arange(5.0) * (r + 1)
    assert torch.equal(hvd.broadcast(b, root_rank=n - 1), torch.arange(5.0) * n)
    assert torch.equal(b, torch.arange(5.0) * (r + 1))
    hvd.broadcast_(b, root_rank=0)
    assert torch.equal(b, torch.arange(5.0))
    assert torch.equal(hvd.synchronize(hvd.broadcast_async(torch.tensor([r]), 0)), torch.tensor([0]))


def test_allgather_concatenates_different_first_dimensions_and_objects():
    n, r = hvd.size(), hvd.rank()
    gathered = hvd.allgather(torch.full((r + 1, 2), float(r)))
    assert torch.equal(gathered, torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)]))
    assert torch.equal(hvd.allgather(torch.tensor([r], dtype=torch.int32)), torch.arange(n, dtype=torch.int32))
    assert hvd.broadcast_object({"epoch": r}, root_rank=n - 1) == {"epoch": n - 1}
    assert hvd.allgather_object(("rank", r)) == [("rank", k) for k in range(n)]


def test_adasum_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.allreduce(torch.ones(2), op=hvd.Adasum)


def test_topology_and_capability_probes():
    n = hvd.size()
    assert hvd.is_initialized() and hvd.mpi_threads_supported() and hvd.mpi_enabled()
    assert hvd.local_size() == n and hvd.cross_size() == 1 and hvd.cross_rank() == 0


def test_join_returns_the_rank_that_arrived_last():
    if hvd.rank() == hvd.size() - 1:
        time.sleep(0.5)
    assert hvd.join() == hvd.size() - 1


def test_collectives_are_matched_by_name_whatever_the_submission_order():
    n, r = hvd.size(), hvd.rank()
    names = [f"t{i}" for i in range(4)]
    order = names if r % 2 == 0 else list(reversed(names))
    handles = {name: hvd.allreduce_async(torch.full((8,), float(r + 1) * (10 ** i)), name=name, op=hvd.Sum)
               for i, name in [(names.index(m), m) for m in order]}
    total = n * (n + 1) / 2
    for i, name in enumerate(names):
        assert torch.equal(hvd.synchronize(handles[name]), torch.full((8,), total * 10 ** i))


def test_same_name_with_a_different_shape_raises_on_every_rank():
    shape = [6, 4] if hvd.rank() == 0 else [4, 6]  # same element count
    with pytest.raises(hvd.HorovodInternalError, match="shape"):
        hvd.allreduce(torch.ones(shape), name="reshaped")
    dtype = torch.int32 if hvd.rank() == 0 else torch.float32
    with pytest.raises(RuntimeError, match="dtype"):
        hvd.allgather(torch.ones(3, dtype=dtype), name="mixed_dtypes")


def test_joined_ranks_contribute_zeros_and_other_collectives_raise():
    n, r = hvd.size(), hvd.rank()
    if r == n - 1:
        last = hvd.join()
    else:
        summed = hvd.allreduce(torch.full((5,), float(r + 1)), name="with_joined", op=hvd.Sum)
        assert torch.equal(summed, torch.full((5,), sum(range(1, n)) * 1.0))  # the joined rank added zeros
        with pytest.raises(RuntimeError, match="joined"):
            hvd.allgather(torch.ones(2), name="gather_after_join")
        last = hvd.join()
    assert last != n - 1
    assert hvd.allgather_object(last) == [last] * n


def test_joined_rank_serves_every_call_of_a_repeated_name_so_later_calls_stay_paired():
    """The fast path (engine allreduces) with a joined rank: each call of a repeated name, in
    place or async, in different orders on different ranks, gets the joined rank's zeros
    exactly once, so the name's calls after the join still pair with the right ones."""
    n, r = hvd.size(), hvd.rank()
    active = n - 1  # ranks 0..n-2 keep training while rank n-1 has joined
    if r == n - 1:
        hvd.join()
    else:
        for step in range(3):
            x = torch.full((4,), float(r + 1 + step))
            hvd.allreduce_(x, name="repeated", op=hvd.Sum)
            assert torch.equal(x, torch.full((4,), float(sum(k + 1 + step for k in range(active)))))
            names = ["async_a", "async_b"] if r % 2 == 0 else ["async_b", "async_a"]
            handles = {m: hvd.allreduce_async(torch.full((3,), float(r + 1)), name=m, op=hvd.Average)
                       for m in names}
            for m in ("async_a", "async_b"):
                expected = sum(k + 1 for k in range(active)) / n  # Average divides by the full size
                assert torch.allclose(hvd.synchronize(handles[m]), torch.full((3,), expected), rtol=0, atol=1e-12)
        hvd.join()
    for name in ("repeated", "async_a", "async_b"):  # every rank back, the next call of each name
        total = hvd.allreduce(torch.full((2,), float(r + 1)), name=name, op=hvd.Sum)
        assert torch.equal(total, torch.full((2,), float(n * (n + 1) // 2)))


def test_second_call_of_an_uncollected_name_raises_on_every_rank_even_once_the_engine_is_done():
    """A name is in flight on a rank until the caller collects the call (synchronize, poll
    done, or a blocking call's return), as Horovod's duplicate-name check expects: the late
    rank's first call finishes in the engine as soon as it is made (the others' calls were
    waiting), and its second call must still raise there, not reach the engine unpaired
    (which timed out and left that rank's engine refusing every later collective)."""
    n, r = hvd.size(), hvd.rank()
    late = n - 1
    tensor = torch.full((5,), float(r + 1))
    handle = None
    for turn in (0, late):  # every rank but the last first, then the last one
        if (r != late) == (turn == 0):
            handle = hvd.allreduce_async(tensor, name="dup_uncollected", op=hvd.Sum)
            if r == late:
                request = hvd._handles[handle][0]
                deadline = time.monotonic() + 20
                while not request.event.is_set():  # the engine finished it: the window of the race
                    assert time.monotonic() < deadline, f"rank {r}: the first call never finished"
                    time.sleep(0.001)
            with pytest.raises(ValueError, match="already in flight"):
                hvd.allreduce_async(tensor, name="dup_uncollected", op=hvd.Sum)
        hvd.barrier()
    assert torch.equal(hvd.synchronize(handle), torch.full((5,), float(n * (n + 1) // 2)))
    # Collected: the name may be used again, and every rank's engine still pairs calls.
    for _ in range(2):
        assert torch.equal(hvd.allreduce(tensor, name="dup_uncollected", op=hvd.Sum),
                           torch.full((5,), float(n * (n + 1) // 2)))
    polled = hvd.allreduce_async(tensor, name="dup_polled", op=hvd.Sum)
    deadline = time.monotonic() + 20
    while not hvd.poll(polled):  # poll() seeing it done collects it too
        assert time.monotonic() < deadline, f"rank {r}: 'dup_polled' never finished"
        time.sleep(0.001)
    again = hvd.allreduce(tensor, name="dup_polled", op=hvd.Sum)
    assert torch.equal(again, torch.full((5,), float(n * (n + 1) // 2)))
    assert torch.equal(hvd.synchronize(polled), torch.full((5,), float(n * (n + 1) // 2)))


def test_same_name_with_different_scale_factors_or_dtypes_raises_on_every_rank():
    """The fast path compares what the engine's header does not carry (Horovod dtype, shape,
    scale factors) through the header's signature."""
    r = hvd.rank()
    with pytest.raises(hvd.HorovodInternalError, match="signature"):
        hvd.allreduce(torch.ones(4), name="prescaled", op=hvd.Sum, prescale_factor=1.0 + r)
    dtype = torch.uint8 if r == 0 else torch.int16  # both travel as int32
    with pytest.raises(hvd.HorovodInternalError, match="signature"):
        hvd.allreduce(torch.ones(4, dtype=dtype), name="narrow_ints", op=hvd.Sum)
    after = hvd.allreduce(torch.ones(4), name="after_mismatch", op=hvd.Sum)  # the ranks stay in step
    assert torch.equal(after, torch.full((4,), float(hvd.size())))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.bool, torch.bfloat16])
def test_every_horovod_dtype_is_reduced_broadcast_and_gathered_exactly(dtype):
    n, r = hvd.size(), hvd.rank()
    base = torch.tensor([0, 1, 2, 3, 4, 5])
    mine = (base + r).to(dtype) if dtype != torch.bool else (base % 2 == r % 2)
    summed = hvd.allreduce(mine, op=hvd.Sum, name=f"sum_{dtype}")
    expected = sum(((base + k).to(dtype) if dtype != torch.bool else (base % 2 == k % 2)).to(torch.float64)
                   for k in range(n))
    if dtype == torch.bool:
        assert torch.equal(summed, expected > 0)
    else:
        assert torch.equal(summed.to(torch.float64), expected.to(dtype).to(torch.float64))
    root = n - 1
    assert torch.equal(hvd.broadcast(mine, root, name=f"bcast_{dtype}"),
                       (base + root).to(dtype) if dtype != torch.bool else (base % 2 == root % 2))
    gathered = hvd.allgather(mine.reshape(2, 3), name=f"gather_{dtype}")
    assert gathered.dtype == dtype and gathered.shape == (2 * n, 3)
    assert torch.equal(gathered[2 * r:2 * r + 2].reshape(-1), mine)


def test_elastic_run_rolls_back_to_the_last_commit_after_a_failed_collective():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = hvd.elastic.TorchState(model, optimizer, step=0)
    attempts = []

    @hvd.elastic.run
    def train(state):
        attempts.append(state.step)
        while state.step < 4:
            with torch.no_grad():
                model.weight.add_(1.0)
            state.step += 1
            if state.step == 2:
                state.commit()
            if state.step == 3 and len(attempts) == 1:
                # A failed collective on every rank: the same name with different shapes.
                hvd.allreduce(torch.ones(2 + hvd.rank()), name="elastic_failure")
        return state.step

    start = model.weight.detach().clone()
    with torch.no_grad():
        start = hvd.broadcast(start, 0)
    assert train(state) == 4
    assert attempts == [0, 2]  # retried from the commit at step 2
    assert torch.equal(model.weight.detach(), start + 4.0)  # two steps before the commit, two after


def test_sync_batch_norm_matches_batch_norm_on_the_global_batch():
    n, r = hvd.size(), hvd.rank()
    torch.manual_seed(7)
    rows = [3 + k for k in range(n)]  # a different batch size on every rank
    full = torch.randn(sum(rows), 4, 5)
    mine = full[sum(rows[:r]):sum(rows[:r + 1])].clone().requires_grad_()
    sync = hvd.SyncBatchNorm(4)
    out = sync(mine)
    (out * torch.arange(5.0)).sum().backward()

    reference = torch.nn.BatchNorm1d(4)
    whole = full.clone().requires_grad_()
    ref_out = reference(whole)
    # The global loss is the sum of every rank's loss: its gradient on this rank's rows.
    (ref_out * torch.arange(5.0)).sum().backward()
    rows_mine = slice(sum(rows[:r]), sum(rows[:r + 1]))
    tol = 1e-10
    assert torch.allclose(out, ref_out[rows_mine], atol=tol, rtol=tol)
    assert torch.allclose(mine.grad, whole.grad[rows_mine], atol=1e-9, rtol=1e-9)
    assert torch.allclose(sync.running_mean, reference.running_mean, atol=tol)
    assert torch.allclose(sync.running_var, reference.running_var, atol=tol)
