"""Shared-memory ("shm") and hierarchical allreduces on real MPI ranks, with forced node
groupings (PBM_RANKS_PER_NODE): 1x2, 1x4, 2x2, 4x1 and 3 ranks as 2+1."""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _ok(result, mode: str, ranks: int) -> None:
    for rank in range(ranks):
        assert f"OK {mode} rank {rank}" in result.stdout, result.stdout + result.stderr


def _run(ranks: int, per_node: int, *args: str, timeout_s: float = 180):
    return run_mpi(ranks, "hierarchical_worker.py", *args, timeout_s=timeout_s,
                   env={"PBM_RANKS_PER_NODE": str(per_node)})


@pytest.mark.parametrize("ranks,per_node,algorithms,large", [
    (1, 1, "shm,hierarchical,auto", "0"),
    (2, 2, "shm,hierarchical,auto", "1"),   # one node of 2
    (4, 4, "shm", "0"),                     # one node of 4
    (4, 2, "hierarchical,auto", "0"),       # 2 nodes x 2
    (4, 1, "hierarchical", "0"),            # 4 nodes x 1: the ring
    (3, 2, "hierarchical,auto", "1"),       # uneven: 2 + 1
])
def test_every_dtype_and_op_matches_float64_reference_on_forced_groupings(ranks, per_node, algorithms, large):
    _ok(_run(ranks, per_node, "exact", algorithms, large, timeout_s=300), "exact", ranks)


@pytest.mark.parametrize("ranks,per_node", [(2, 2), (4, 2), (3, 2)])
def test_zero_copy_buffers_skip_the_copy_in_and_fall_back_when_offsets_differ(ranks, per_node):
    _ok(_run(ranks, per_node, "zero_copy"), "zero_copy", ranks)


@pytest.mark.parametrize("ranks,per_node,algorithm", [(2, 2, "shm"), (4, 2, "hierarchical"),
                                                      (3, 2, "auto")])
def test_async_handles_overlap_several_allreduces(ranks, per_node, algorithm):
    _ok(_run(ranks, per_node, "async", algorithm), "async", ranks)


@pytest.mark.parametrize("op", ["sum", "avg"])
def test_compressed_hierarchical_applies_3lc_between_nodes_only(op):
    _ok(_run(4, 2, "compressed", op), "compressed", 4)


@pytest.mark.parametrize("ranks,per_node,algorithm", [(2, 2, "shm"), (4, 2, "hierarchical")])
def test_timeout_names_the_node_rank_that_never_joined(ranks, per_node, algorithm):
    result = _run(ranks, per_node, "timeout", algorithm, timeout_s=90)
    _ok(result, "timeout", ranks)
    assert f"waiting for rank {ranks - 1}" in result.stdout, result.stdout


@pytest.mark.parametrize("ranks,per_node,algorithm", [(2, 2, "shm"), (4, 2, "hierarchical")])
def test_mismatch_raises_on_every_rank_and_shm_across_nodes_is_refused(ranks, per_node, algorithm):
    _ok(_run(ranks, per_node, "mismatch", algorithm), "mismatch", ranks)
