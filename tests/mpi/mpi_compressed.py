"""The two-stage 3LC-compressed allreduce on real MPI ranks.

The reference is the same two-stage algorithm simulated in NumPy float32 on every rank (each
rank can regenerate every rank's gradients from the seeds): first-stage 3LC with per-rank
residuals (the owner's own share of its partition exact), sum of the partitions in rank order
starting from that share, avg, second-stage 3LC with the owner's residual, decode. Results
must match it to float32 rounding and be bitwise equal across ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pybrain_mpi as pbm
from .helpers import WORLD, on
from pybrain_mpi.compression import Cast, ThreeLC
from .threelc_reference import gradients, partitions, quantize_blocks

RANKS = (1, 2, 3, 4)
TIMEOUT_S = 600


def _reference(comm, count_text: str, sparsity_text: str, op: str, block: int = 0) -> None:
    """`block` > 0: one scale per block of that many elements of each partition (blocks
    restart at every partition, as each partition is encoded on its own)."""
    n, r = comm.Get_size(), comm.Get_rank()
    count, sparsity = int(count_text), float(sparsity_text)
    codec = ThreeLC(sparsity, block=block)
    parts = partitions(count, n)
    # Residuals start nonzero (as after a resume with another rank layout): the owner's
    # share of its own partition must be delivered and cleared, the rest carried on.
    residual = [np.random.default_rng([99, q]).standard_normal(count).astype(np.float32) * 0.1
                for q in range(n)]
    owner_residual = [np.zeros(parts[p].stop - parts[p].start, np.float32) for p in range(n)]
    state = codec.new_state(np.zeros(count, np.float32))
    state.residual[:] = residual[r]
    input_total = np.zeros(count, np.float64)
    input_total += sum(res.astype(np.float64) for res in residual) / (n if op == "avg" else 1)
    sent_total = np.zeros(count, np.float64)
    for step in range(6):
        grads = gradients(step, count, n)
        x = torch.from_numpy(grads[r].copy())
        pbm.allreduce_(x, op=op, compression=codec, state=state, name="grad")
        expected = np.empty(count, np.float32)
        for p, part in enumerate(parts):
            # the owner's own share never crosses a wire: exact, its residual delivered
            total = residual[p][part] + grads[p][part]
            residual[p][part] = 0
            for q in range(n):
                if q == p:
                    continue
                acc = residual[q][part] + grads[q][part]
                qs, scale = quantize_blocks(acc, sparsity, block)
                residual[q][part] = acc - qs * scale
                total += qs * scale
            if op == "avg":
                total *= np.float32(1.0 / n)
            acc2 = owner_residual[p] + total
            q2, scale2 = quantize_blocks(acc2, sparsity, block)
            owner_residual[p] = acc2 - q2 * scale2
            expected[part] = q2 * scale2
        tolerance = 4 * n * np.finfo(np.float32).eps * (np.abs(expected).max(initial=0) + 1)
        np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=tolerance,
                                   err_msg=f"step {step}, {n} ranks, count {count}")
        np.testing.assert_allclose(state.residual, residual[r], rtol=0, atol=tolerance)
        blobs = comm.allgather(x.numpy().tobytes())
        assert all(b == blobs[0] for b in blobs), "ranks disagree"
        sent_total += x.numpy()
        input_total += sum(g.astype(np.float64) for g in grads) / (n if op == "avg" else 1)
    # error feedback: what was delivered tracks what was put in, up to the residuals
    leftover = sum(res.astype(np.float64) for res in residual) / (n if op == "avg" else 1)
    leftover_owner = np.concatenate(owner_residual).astype(np.float64)
    np.testing.assert_allclose(sent_total + leftover + leftover_owner, input_total, rtol=0, atol=1e-3)


def _traffic(comm) -> None:
    """3LC sends far fewer bytes than the plain ring for the same gradient."""
    n, r = comm.Get_size(), comm.Get_rank()
    count = 1_000_000
    g = torch.from_numpy(gradients(0, count, n)[r])
    before = pbm.bytes_sent()
    pbm.allreduce(g)
    plain = pbm.bytes_sent() - before
    codec = ThreeLC(1.5, block=0)
    state = codec.new_state(g)
    before = pbm.bytes_sent()
    pbm.allreduce(g, compression=codec, state=state)
    compressed = pbm.bytes_sent() - before
    assert compressed * 20 < plain, (plain, compressed)
    before = pbm.bytes_sent()
    pbm.allreduce(g, compression=Cast("bf16"))
    half = pbm.bytes_sent() - before
    assert half < 0.6 * plain, (plain, half)
    print(f"rank {r}: plain {plain} B, bf16 {half} B, 3lc {compressed} B")


def _errors(comm) -> None:
    """NaN on one rank raises on all; wrong state raises before any communication."""
    n, r = comm.Get_size(), comm.Get_rank()
    codec = ThreeLC(1.0)
    g = torch.ones(5000)
    if r == n - 1:
        g[1234] = float("inf")
    before = g.clone()
    try:
        pbm.allreduce_(g, compression=codec, state=codec.new_state(g), name="fc.weight")
    except pbm.PbmError as error:
        assert f"on rank {n - 1}" in str(error) and "fc.weight" in str(error), str(error)
    else:
        raise AssertionError("NaN/Inf not reported")
    assert torch.equal(g, before) or torch.isinf(g).any()
    try:
        pbm.allreduce_(torch.ones(10), compression=codec, state=codec.new_state(torch.ones(11)))
    except ValueError as error:
        assert "11" in str(error)
    else:
        raise AssertionError("state of the wrong size accepted")
    try:
        pbm.allreduce_(torch.ones(10), compression=codec)
    except TypeError as error:
        assert "new_state" in str(error)
    else:
        raise AssertionError("missing state accepted")
    # ranks still in step
    assert torch.all(pbm.allreduce(torch.ones(3)) == n)


def _convergence(comm, cache_dir: str) -> None:
    """DDP with 3LC reaches a held-out loss within 2% of uncompressed DDP (real fMRI).

    A small autoencoder on nitime's real voxel time series (the DCA workload of docs/background.md),
    300 SGD-momentum steps on 2 ranks, the same seeds and batches for both runs.
    """
    from pybrain_mpi.data.examples import prepare_dca_example

    torch.set_num_threads(1)
    n, r = comm.Get_size(), comm.Get_rank()
    if r == 0:
        prepare_dca_example(cache_dir)
    pbm.barrier()
    train, held = (torch.from_numpy(np.array(a)) for a in prepare_dca_example(cache_dir).load())

    def run(compression) -> tuple[float, int]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8),
                                    torch.nn.ReLU(), torch.nn.Linear(8, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 40))
        ddp = pbm.DistributedDataParallel(model, compression=compression)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        before = pbm.bytes_sent()
        for _ in range(300):
            idx = torch.randint(0, train.shape[0], (32 * n,), generator=g)[r * 32:(r + 1) * 32]
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(train[idx]), train[idx]).backward()
            opt.step()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(held), held).item(), pbm.bytes_sent() - before

    plain, plain_bytes = run(None)
    compressed, compressed_bytes = run(ThreeLC(1.0))
    gap = (compressed - plain) / plain
    print(f"rank {r}: held-out loss plain {plain:.4f}, 3LC {compressed:.4f} (gap {gap * 100:+.2f}%), "
          f"bytes sent plain {plain_bytes}, 3LC {compressed_bytes}")
    assert abs(gap) <= 0.02, f"3LC loss gap {gap * 100:.2f}% exceeds 2%"
    assert compressed_bytes * 5 < plain_bytes, (plain_bytes, compressed_bytes)


# --- tests ---------------------------------------------------------------------------------

REFERENCE_CASES = [(1, 1003, "1.0", "sum"), (2, 1003, "1.0", "avg"), (3, 50_001, "1.5", "avg"),
                   (4, 7, "1.9", "sum"), (3, 2, "1.0", "sum"), (2, 0, "1.0", "avg")]
# (ranks, count, sparsity, op, block): partitions not divisible by the block, a block of 1,
# blocks larger than a partition; one rank alone (its partition is the whole tensor).
BLOCK_CASES = [(1, 1003, "1.0", "sum", 64), (2, 1003, "1.0", "avg", 64), (2, 130, "1.0", "sum", 1), (2, 70_001, "1.0", "avg", 64),
               (3, 1003, "1.0", "sum", 64), (3, 50_001, "1.5", "avg", 7), (3, 100, "1.0", "avg", 4096),
               (4, 1003, "1.0", "avg", 64)]


@pytest.mark.parametrize("count,sparsity,op", [case[1:] for case in REFERENCE_CASES if case[0] == WORLD])
def test_matches_reference_two_stage_algorithm_with_error_feedback(comm, count, sparsity, op):
    _reference(comm, str(count), sparsity, op)


@pytest.mark.parametrize("count,sparsity,op,block", [case[1:] for case in BLOCK_CASES if case[0] == WORLD])
def test_block_scaled_matches_reference_two_stage_algorithm(comm, count, sparsity, op, block):
    _reference(comm, str(count), sparsity, op, block)


@on(2, 3)
def test_ranks_with_different_block_sizes_get_a_mismatch_error(comm):
    n, r = comm.Get_size(), comm.Get_rank()
    codec = ThreeLC(1.0, block=64 if r == 0 else 0)
    g = torch.ones(1000)
    with pytest.raises(pbm.CollectiveMismatch, match="block"):
        pbm.allreduce_(g, compression=codec, state=codec.new_state(g), name="mismatched")
    assert torch.all(pbm.allreduce(torch.ones(3)) == n)  # ranks still in step


@on(2)
def test_sends_far_fewer_bytes_than_the_plain_ring(comm):
    _traffic(comm)


@on(2, 3)
def test_nan_on_one_rank_raises_on_every_rank_and_bad_state_is_refused(comm):
    _errors(comm)


@on(2)
def test_ddp_with_3lc_trains_within_two_percent_of_uncompressed_on_real_fmri(comm, tmp_path):
    cache_dir = comm.bcast(str(tmp_path) if comm.Get_rank() == 0 else None)
    _convergence(comm, cache_dir)
