"""Collectives on real MPI processes: 1, 2, 3 and 4 ranks (4 oversubscribes 2 cores)."""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _ok_on_every_rank(result, mode: str, ranks: int) -> None:
    for rank in range(ranks):
        assert f"OK {mode} rank {rank}" in result.stdout, result.stdout


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_allreduce_matches_mpi_allreduce_for_every_dtype_op_and_odd_sizes(ranks):
    result = run_mpi(ranks, "collectives_worker.py", "correctness", timeout_s=400)
    _ok_on_every_rank(result, "correctness", ranks)


def test_ring_with_tiny_chunks_pipelines_many_pieces_correctly():
    # 4 KiB pieces: every ring segment of the larger sizes spans dozens of messages.
    result = run_mpi(3, "collectives_worker.py", "correctness", timeout_s=400,
                     env={"PBM_RING_CHUNK_BYTES": "4096"})
    _ok_on_every_rank(result, "correctness", 3)


@pytest.mark.parametrize("ranks", [2, 3])
def test_in_place_out_of_place_and_strided_inputs(ranks):
    _ok_on_every_rank(run_mpi(ranks, "collectives_worker.py", "inplace"), "inplace", ranks)


@pytest.mark.parametrize("ranks", [2, 3])
def test_async_allreduce_overlaps_python_work_and_keeps_order(ranks):
    result = run_mpi(ranks, "collectives_worker.py", "async")
    _ok_on_every_rank(result, "async", ranks)
    assert "overlapped" in result.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_timeout_names_the_ranks_that_did_not_join(ranks):
    result = run_mpi(ranks, "collectives_worker.py", "timeout", timeout_s=60)
    _ok_on_every_rank(result, "timeout", ranks)
    missing = ", ".join(str(r) for r in range(1, ranks))
    assert f"waiting for rank{'s' if ranks > 2 else ''} {missing}" in result.stdout, result.stdout


@pytest.mark.parametrize("ranks", [3, 4])
def test_timeout_names_only_the_rank_that_stayed_away(ranks):
    _ok_on_every_rank(run_mpi(ranks, "collectives_worker.py", "partial_join", timeout_s=90),
                      "partial_join", ranks)


def test_async_wait_timeout_names_missing_ranks():
    result = run_mpi(3, "collectives_worker.py", "async_timeout", timeout_s=60)
    _ok_on_every_rank(result, "async_timeout", 3)
    assert "ranks that have not joined: 1, 2" in result.stdout, result.stdout


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_size_or_dtype_mismatch_raises_on_every_rank(ranks):
    result = run_mpi(ranks, "collectives_worker.py", "mismatch")
    _ok_on_every_rank(result, "mismatch", ranks)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_broadcast_barrier_and_topology(ranks):
    _ok_on_every_rank(run_mpi(ranks, "collectives_worker.py", "broadcast"), "broadcast", ranks)


@pytest.mark.parametrize("ranks,per_node", [(4, 2), (3, 2), (4, 1)])
def test_forced_ranks_per_node_groups_consecutive_ranks(ranks, per_node):
    result = run_mpi(ranks, "collectives_worker.py", "topology", str(per_node))
    _ok_on_every_rank(result, "topology", ranks)
