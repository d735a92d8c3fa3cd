"""pybrain_mpi.data across real MPI ranks."""

from __future__ import annotations

from conftest import run_mpi
from data_fixtures import converted, nilearn_mni


def test_two_ranks_shard_samples_and_allreduce_grid_predictions_back_into_the_volume():
    store = converted(nilearn_mni("gm"), "gm.zarr", chunks=(32, 32, 32))
    result = run_mpi(2, "data_shard_worker.py", store, timeout_s=150)
    assert result.stdout.count(": ok,") == 2
