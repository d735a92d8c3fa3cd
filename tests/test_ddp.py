"""pbm.DistributedDataParallel on real MPI ranks."""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _ok(result, mode: str, ranks: int) -> None:
    for rank in range(ranks):
        assert f"OK {mode} rank {rank}" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ranks_with_shards_match_one_process_on_the_whole_batch(ranks, optimizer):
    _ok(run_mpi(ranks, "ddp_worker.py", "equivalence", optimizer), "equivalence", ranks)


def test_single_rank_wrap_trains_like_the_plain_model():
    _ok(run_mpi(1, "ddp_worker.py", "equivalence", "sgd"), "equivalence", 1)


@pytest.mark.parametrize("ranks", [2, 3])
def test_no_sync_accumulates_gradients_locally(ranks):
    _ok(run_mpi(ranks, "ddp_worker.py", "no_sync"), "no_sync", ranks)


def test_bucket_allreduces_start_before_backward_ends():
    result = run_mpi(2, "ddp_worker.py", "overlap")
    _ok(result, "overlap", 2)


@pytest.mark.parametrize("ranks", [2, 3])
def test_parameter_unused_on_some_ranks_does_not_hang(ranks):
    _ok(run_mpi(ranks, "ddp_worker.py", "unused", timeout_s=120), "unused", ranks)


@pytest.mark.parametrize("ranks", [2, 3])
def test_different_models_raise_mismatch_naming_the_parameter(ranks):
    _ok(run_mpi(ranks, "ddp_worker.py", "mismatch"), "mismatch", ranks)


def test_slow_rank_triggers_stall_warning_naming_it():
    result = run_mpi(3, "ddp_worker.py", "stall")
    _ok(result, "stall", 3)
    assert "stall warning" in result.stdout
