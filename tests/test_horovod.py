"""pybrain_mpi.horovod follows horovod.torch semantics (real MPI ranks)."""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _ok(result, mode: str, ranks: int) -> None:
    for rank in range(ranks):
        assert f"OK {mode} rank {rank}" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("ranks", [2, 3])
def test_horovod_collectives_have_horovod_defaults_and_return_values(ranks):
    _ok(run_mpi(ranks, "horovod_worker.py", "collectives"), "collectives", ranks)


@pytest.mark.parametrize("ranks,passes", [(2, 1), (3, 1), (2, 2)])
def test_distributed_optimizer_recipe_trains_like_one_process(ranks, passes):
    _ok(run_mpi(ranks, "horovod_worker.py", "train", str(passes)), "train", ranks)
