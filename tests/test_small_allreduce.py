"""A stopped peer of the small-message allreduce (algorithm "small"; "auto" up to 64 KiB on
one node) on real MPI ranks; correctness, mismatches and slot reuse run as the suite
tests/mpi/mpi_small.py."""

from __future__ import annotations

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_stopped_peer_is_named_at_the_deadline_and_nobody_hangs(ranks):
    result = run_mpi(ranks, "small_worker.py", "stopped", timeout_s=120)
    for rank in range(ranks):
        assert f"OK stopped rank {rank}" in result.stdout, result.stdout + result.stderr
    assert "stopped-peer message:" in result.stdout and f"waiting for rank {ranks - 1}" in result.stdout, result.stdout
    assert "stopped rank resumed and finished" in result.stdout, result.stdout
