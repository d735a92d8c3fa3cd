"""Collective timeouts on real MPI processes (ranks that stay away on purpose). Everything
else about the collectives on 1-4 ranks runs as the suite tests/mpi/mpi_collectives.py."""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _ok_on_every_rank(result, mode: str, ranks: int) -> None:
    for rank in range(ranks):
        assert f"OK {mode} rank {rank}" in result.stdout, result.stdout


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
