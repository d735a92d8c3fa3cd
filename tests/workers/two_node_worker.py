"""Worker for tests/test_two_node_slurm.py: what one rank sees under srun on two Slurm nodes.

Started by ``srun -N 2 --ntasks-per-node=2`` on slurm/two_node_cluster.sh. Every rank reports
(one ``TWO_NODE {json}`` line) where Slurm put it (hostname, SLURMD_NODENAME, SLURM_PROCID,
SLURM_LOCALID, its network namespace), what pybrain-mpi derived from MPI (rank, size,
local_rank/local_size, cross_rank/cross_size, the engine's node layout), and the worst error of
hierarchical (and ring) allreduces against a float64 reference relative to the bound of
summing ``size`` terms in the input's precision. The test compares these across ranks.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import torch

import pybrain_mpi as pbm
from pybrain_mpi.communication import context

COUNT = (1 << 20) + 3  # float32 elements: 4 MiB and an odd remainder for uneven slices


def rank_input(rank: int, count: int, dtype) -> np.ndarray:
    return np.random.default_rng(7000 + rank).standard_normal(count).astype(dtype)


def worst_error(algorithm: str, dtype, count: int) -> float:
    """max(|result - float64 sum| / bound) over elements: <= 1 means within the bound."""
    rank, size = pbm.rank(), pbm.size()
    inputs = [rank_input(r, count, dtype) for r in range(size)]
    reference = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    bound = size * np.finfo(dtype).eps * np.sum([np.abs(x.astype(np.float64)) for x in inputs], axis=0)
    tensor = torch.from_numpy(inputs[rank].copy())
    pbm.allreduce_(tensor, op="sum", algorithm=algorithm)
    error = np.abs(tensor.numpy().astype(np.float64) - reference)
    return float(np.max(error / np.maximum(bound, np.finfo(np.float64).tiny)))


def main() -> int:
    pbm.init()
    report = {
        "rank": pbm.rank(), "size": pbm.size(),
        "hostname": socket.gethostname(),
        "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "slurm_localid": os.environ.get("SLURM_LOCALID"),
        "netns": os.stat("/proc/self/ns/net").st_ino,
        "local_rank": pbm.local_rank(), "local_size": pbm.local_size(),
        "cross_rank": pbm.cross_rank(), "cross_size": pbm.cross_size(),
        "node_layout": dict(context.current().engine.node_layout()),
        "errors": {
            "hierarchical_float32": worst_error("hierarchical", np.float32, COUNT),
            "hierarchical_float64": worst_error("hierarchical", np.float64, 1001),
            "ring_float32": worst_error("ring", np.float32, 65537),
        },
    }
    pbm.barrier()
    print("TWO_NODE " + json.dumps(report), flush=True)
    pbm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
