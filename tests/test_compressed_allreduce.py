"""The two-stage 3LC-compressed allreduce on real MPI ranks."""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _ok(result, mode: str, ranks: int) -> None:
    for rank in range(ranks):
        assert f"OK {mode} rank {rank}" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("ranks,count,sparsity,op", [
    (1, 1003, "1.0", "sum"), (2, 1003, "1.0", "avg"), (3, 50_001, "1.5", "avg"),
    (4, 7, "1.9", "sum"), (3, 2, "1.0", "sum"), (2, 0, "1.0", "avg"),
])
def test_matches_reference_two_stage_algorithm_with_error_feedback(ranks, count, sparsity, op):
    result = run_mpi(ranks, "compressed_worker.py", "reference", str(count), sparsity, op)
    _ok(result, "reference", ranks)


def test_sends_far_fewer_bytes_than_the_plain_ring():
    _ok(run_mpi(2, "compressed_worker.py", "traffic"), "traffic", 2)


@pytest.mark.parametrize("ranks", [2, 3])
def test_nan_on_one_rank_raises_on_every_rank_and_bad_state_is_refused(ranks):
    _ok(run_mpi(ranks, "compressed_worker.py", "errors"), "errors", ranks)


def test_ddp_with_3lc_trains_within_two_percent_of_uncompressed_on_real_fmri(tmp_path):
    result = run_mpi(2, "compressed_worker.py", "convergence", str(tmp_path), timeout_s=240)
    _ok(result, "convergence", 2)
