"""pbm.parallel: a pipeline stage stopped or killed mid-step (real MPI ranks, through
tests/workers/pipeline_worker.py), and the pure helpers (balanced partition, even blocks).
Pipelines, hybrid grids and tensor-split layers on 2, 3 and 4 ranks: tests/mpi/mpi_pipeline.py.
"""

from __future__ import annotations

import itertools
import time

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("ranks,stage,schedule", [(2, 1, "gpipe"), (3, 2, "1f1b"), (4, 1, "gpipe")],
                         ids=["2ranks-last", "3ranks-last", "4ranks-second"])
def test_stage_stopped_mid_step_is_named_by_every_other_rank(ranks, stage, schedule):
    """Ranks that wait for a neighbour which itself waits for the stopped stage name the
    stopped stage too (the chain of waits), within the deadline plus the grace period."""
    result = run_mpi(ranks, "pipeline_worker.py", "stop", str(stage), schedule, timeout_s=240)
    out = result.stdout
    for rank in range(ranks):
        assert f"OK stop rank {rank}" in out, out + result.stderr
        if rank != stage:
            assert f"rank {rank} timed out after" in out and f"waiting for rank {stage}" in out, out


def test_stage_killed_mid_step_ends_the_job_without_a_hang():
    """SIGKILL: MPICH's launcher ends every rank (nothing is left waiting on the dead one)."""
    started = time.monotonic()
    result = run_mpi(3, "pipeline_worker.py", "kill", "1", "1f1b", timeout_s=240, check=False)
    assert result.returncode != 0, result.stdout
    assert "rank 1 halts itself (SIGKILL)" in result.stdout, result.stdout + result.stderr
    assert "OK kill" not in result.stdout, result.stdout
    assert time.monotonic() - started < 200


def test_partition_balanced_is_optimal_and_contiguous():
    from pybrain_mpi.parallel import partition_balanced

    costs = [5.0, 1.0, 1.0, 1.0, 4.0, 2.0, 2.0]
    for stages in range(1, len(costs) + 1):
        sizes = partition_balanced(costs, stages)
        assert len(sizes) == stages and sum(sizes) == len(costs) and min(sizes) >= 1, sizes

        def worst(split):
            bounds = [0, *itertools.accumulate(split)]
            return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

        best = min(worst(split) for split in itertools.product(range(1, len(costs) + 1), repeat=stages)
                   if sum(split) == len(costs))
        assert worst(sizes) == best, (stages, sizes, best)
    with pytest.raises(ValueError, match="cannot split 7 layers into 8"):
        partition_balanced(costs, 8)


def test_even_split_covers_every_feature_once():
    from pybrain_mpi.parallel.tensor import even_split

    for total, parts in [(11, 3), (4840, 4), (5, 5), (7, 2)]:
        blocks = [even_split(total, parts, i) for i in range(parts)]
        assert blocks[0][0] == 0 and blocks[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        sizes = [e - s for s, e in blocks]
        assert max(sizes) - min(sizes) <= 1, sizes
