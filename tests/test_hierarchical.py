"""Failure cases of the shared-memory ("shm") and hierarchical allreduces on real MPI ranks
(forced node groupings, PBM_RANKS_PER_NODE): a rank that never joins, a rank stopped inside the
shared-memory stage, shutdown/init cycles. Correctness on 1 rank, 1 node x 2, 1 x 4, 2 x 2,
4 x 1 and 3 ranks as 2 + 1 runs as the suite tests/mpi/mpi_hierarchical.py.
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
