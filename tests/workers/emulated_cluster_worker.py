"""Runs inside slurm/emulated_cluster.sh: node grouping and a ring allreduce across namespaces.

Mode ``check PLACEMENT PPN COUNT``: every rank finds its node from its network namespace
(/proc/self/ns/net), checks that pybrain-mpi's local_rank/local_size (MPI_COMM_TYPE_SHARED)
group exactly the ranks of that namespace and that the namespaces follow PLACEMENT, then
checks a float32 ring allreduce of COUNT elements against the float64 sum.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from harness import run_worker

import pybrain_mpi as pbm


def expected_node(rank: int, size: int, placement: str, ppn: int) -> int:
    nodes = size // ppn
    return rank // ppn if placement == "block" else rank % nodes


def mode_check(comm, placement: str, ppn: str, count: str) -> None:
    ppn_, count_ = int(ppn), int(count)
    rank, size = comm.Get_rank(), comm.Get_size()
    netns = os.stat("/proc/self/ns/net").st_ino
    assert str(netns) != os.environ["PBM_TEST_ROOT_NETNS"], \
        f"rank {rank} runs in the root network namespace, not in an emulated node"
    assert "PBM_RANKS_PER_NODE" not in os.environ, "the grouping must come from MPI, not be forced"
    seen = comm.allgather((netns, pbm.local_rank(), pbm.local_size()))
    by_ns: dict[int, list[int]] = {}
    for r, (ns, _, _) in enumerate(seen):
        by_ns.setdefault(ns, []).append(r)
    groups = sorted(by_ns.values())
    wanted = sorted([r for r in range(size) if expected_node(r, size, placement, ppn_) == node]
                    for node in range(size // ppn_))
    assert groups == wanted, f"rank {rank}: ranks per namespace {groups}, expected {placement} placement {wanted}"
    for members in groups:
        for local, r in enumerate(members):
            assert seen[r][1:] == (local, len(members)), (
                f"rank {r}: pbm local_rank/local_size {seen[r][1:]}, but its namespace holds ranks "
                f"{members} (expected {(local, len(members))})")

    inputs = [np.random.default_rng(1000 + r).standard_normal(count_).astype(np.float32) for r in range(size)]
    reference = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    tensor = torch.from_numpy(inputs[rank].copy())
    pbm.allreduce_(tensor, algorithm="ring")
    # float32 sums of `size` terms: each addition rounds by at most eps * |partial sum|
    bound = size * np.finfo(np.float32).eps * np.sum([np.abs(x.astype(np.float64)) for x in inputs], axis=0)
    error = np.abs(tensor.numpy().astype(np.float64) - reference)
    worst = int(np.argmax(error - bound))
    assert np.all(error <= bound), (
        f"rank {rank}: allreduce element {worst} is {tensor[worst].item()}, float64 reference "
        f"{reference[worst]}, error {error[worst]:.3g} > bound {bound[worst]:.3g}")


run_worker(globals())
