"""Multi-rank check of pybrain_mpi.data: samplers take rank/world from pbm.init(), shards are
disjoint, and a GridAggregator allreduced over ranks reconstructs the volume.

Usage: mpiexec -n N python data_shard_worker.py STORE.zarr
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

import pybrain_mpi as pbm
import pybrain_mpi.data as pbd


def main(store: str) -> None:
    pbm.init()
    rank, world = pbm.rank(), pbm.size()
    vol = pbd.Volume(store)

    uniform = pbd.UniformSampler(vol, (16, 16, 16), 37, seed=5)
    assert (uniform.rank, uniform.world_size) == (rank, world), "sampler did not pick up pbm's rank"
    mine = [spec.index for spec in uniform]
    everyone = MPI.COMM_WORLD.allgather(mine)
    flat = [i for shard in everyone for i in shard]
    assert len(set(flat)) == len(flat), f"rank {rank}: shards overlap: {everyone}"
    assert sorted(flat) == list(range(37 // world * world)), f"shards do not cover the epoch: {everyone}"

    grid = pbd.GridSampler(vol, (64, 64, 64), overlap=8)
    agg = pbd.GridAggregator(vol.shape, (64, 64, 64), "gaussian")
    loader = pbd.PatchLoader(vol, grid, batch_size=3, threads=2)
    for batch in loader:
        agg.add(batch["start"], batch["image"][:, 0] * 2.0)  # a "prediction": twice the input
    agg.allreduce_()
    ref = vol.read().astype(np.float64) * 2.0
    np.testing.assert_allclose(agg.result(), ref, rtol=1e-12, atol=1e-9)
    pbm.barrier()
    print(f"rank {rank}/{world}: ok, {len(grid)} grid patches", flush=True)
    pbm.shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        MPI.COMM_WORLD.Abort(1)
