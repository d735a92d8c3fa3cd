"""Shared-memory ("shm") and hierarchical allreduces on real MPI ranks, with forced node
groupings (PBM_RANKS_PER_NODE): 1 rank, 1 node x 2, 1 x 4, 2 x 2, 4 x 1 and 3 ranks as 2 + 1.

Each launch runs several checks (tests/workers/hierarchical_worker.py mode_steps): starting
4 ranks on 2 cores costs more than most of the checks themselves.
"""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _run(ranks: int, per_node: int, *steps: str, timeout_s: float = 300, env: dict | None = None):
    result = run_mpi(ranks, "hierarchical_worker.py", "steps", *steps, timeout_s=timeout_s,
                     env={"PBM_RANKS_PER_NODE": str(per_node), **(env or {})})
    for rank in range(ranks):
        assert f"OK steps rank {rank}" in result.stdout, result.stdout + result.stderr
    return result


def test_one_rank_is_the_identity_for_every_algorithm():
    _run(1, 1, "exact:shm,hierarchical,auto:0")


def test_one_node_of_two_shm_exact_zero_copy_async_mismatch_and_finiteness():
    # every dtype and op, odd sizes (1, 7, 1000, 1000003), in place / out of place / zero-copy
    _run(2, 2, "exact:shm,hierarchical,auto:1", "zero_copy", "async:shm", "mismatch:shm",
         "finite:shm", "finite:ring")


def test_one_node_of_four_shm_exact_and_zero_copy():
    _run(4, 4, "exact:shm:0", "zero_copy", "async:auto")


def test_two_nodes_of_two_hierarchical_exact_async_mismatch_3lc_between_nodes_and_finiteness():
    _run(4, 2, "exact:hierarchical,auto:0", "zero_copy", "async:hierarchical",
         "mismatch:hierarchical", "compressed:sum,avg", "finite:auto")


def test_four_nodes_of_one_hierarchical_is_the_ring():
    _run(4, 1, "exact:hierarchical:0", "async:auto")


def test_uneven_nodes_two_plus_one_hierarchical_exact_and_3lc_between_nodes():
    _run(3, 2, "exact:hierarchical,auto:1", "zero_copy", "async:auto", "compressed:avg")


@pytest.mark.parametrize("algorithm", ["shm", "hierarchical"])
def test_timeout_names_the_node_rank_that_never_joined(algorithm):
    result = _run(2, 2 if algorithm == "shm" else 1, f"timeout:{algorithm}", timeout_s=90)
    assert "waiting for rank 1" in result.stdout, result.stdout


@pytest.mark.parametrize("path", ["copy", "zero_copy"])
def test_rank_stopped_inside_the_shared_memory_stage_is_named_and_nobody_hangs(path):
    result = _run(2, 2, f"stall:{path}", timeout_s=120, env={"PBM_TIMEOUT_S": "2"})
    assert "stalled mid-stage" in result.stdout and "waiting for node rank 1" in result.stdout, result.stdout


def test_shutdown_releases_shared_memory_and_init_again_works():
    result = _run(2, 2, "reinit")
    assert "resident MB after each cycle" in result.stdout, result.stdout


@pytest.mark.parametrize("ranks,per_node,algorithm", [(2, 2, "shm"), (3, 2, "hierarchical")])
def test_ddp_with_shared_memory_buckets_matches_one_process(ranks, per_node, algorithm):
    result = run_mpi(ranks, "ddp_worker.py", "equivalence", "sgd", "1", algorithm,
                     env={"PBM_RANKS_PER_NODE": str(per_node)})
    for rank in range(ranks):
        assert f"OK equivalence rank {rank}" in result.stdout, result.stdout + result.stderr
