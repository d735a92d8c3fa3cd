"""pybrain_mpi.data across real MPI ranks: samplers pick up the world from pbm.init(), shards
are disjoint and cover the epoch, and grid predictions allreduced over the ranks rebuild the
volume. Data: nilearn's MNI152 grey-matter map, converted to Zarr by rank 0."""

from __future__ import annotations

import numpy as np
import pytest

import pybrain_mpi as pbm
import pybrain_mpi.data as pbd
from data_fixtures import converted, nilearn_mni

RANKS = (2, 3)


@pytest.fixture(scope="module")
def gm_store(comm):
    # Rank 0 converts; the others wait for its path (converting concurrently into one place
    # would race).
    path = converted(nilearn_mni("gm"), "gm.zarr", chunks=(32, 32, 32)) if comm.Get_rank() == 0 else None
    return comm.bcast(path, root=0)


def test_uniform_sampler_shards_are_disjoint_and_cover_the_epoch_without_remainder(gm_store, comm):
    vol = pbd.Volume(gm_store)
    uniform = pbd.UniformSampler(vol, (16, 16, 16), 37, seed=5)
    assert (uniform.rank, uniform.world_size) == (pbm.rank(), pbm.size())
    everyone = comm.allgather([spec.index for spec in uniform])
    flat = [i for shard in everyone for i in shard]
    assert len(set(flat)) == len(flat), f"shards overlap: {everyone}"
    assert sorted(flat) == list(range(37 // pbm.size() * pbm.size()))


def test_shuffled_sampler_shards_are_disjoint_equal_and_reshuffled_each_epoch(comm):
    sampler = pbd.ShuffledSampler(103, 8, seed=5)
    assert (sampler.rank, sampler.world_size) == (pbm.rank(), pbm.size())
    shards = comm.allgather(sampler.shard(0).tolist())
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat) == 103 // pbm.size() * pbm.size()
    assert comm.allgather(sampler.shard(1).tolist()) != shards


def test_grid_predictions_allreduced_over_ranks_rebuild_the_volume(gm_store):
    vol = pbd.Volume(gm_store)
    grid = pbd.GridSampler(vol, (64, 64, 64), overlap=8)
    aggregator = pbd.GridAggregator(vol.shape, (64, 64, 64), "gaussian")
    for batch in pbd.PatchLoader(vol, grid, batch_size=3, threads=2):
        aggregator.add(batch["start"], batch["image"][:, 0] * 2.0)  # a "prediction": twice the input
    aggregator.allreduce_()
    np.testing.assert_allclose(aggregator.result(), vol.read().astype(np.float64) * 2.0,
                               rtol=1e-12, atol=1e-9)
