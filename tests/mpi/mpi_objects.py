"""pybrain_mpi.communication.objects across real MPI ranks: every helper returns exactly what
mpi4py's unbounded object collectives return (the reference), for payloads of different
sizes on every rank (empty, a few bytes, not a multiple of 8, ~100 KB), roots other than 0,
and the model check naming the rank whose model differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pybrain_mpi as pbm
from pybrain_mpi.communication import objects
from .helpers import on

RANKS = (1, 2, 3, 4)


def payload(rank: int) -> object:
    """Values whose pickles differ in length from rank to rank (and are not word-sized)."""
    return {"rank": rank, "text": "x" * (rank * 13 + 1), "array": np.arange(rank * 7, dtype=np.int16),
            "big": bytes(range(256)) * (400 * (rank % 2)), "none": None}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def test_allgather_objects_matches_mpi4py(comm):
    mine = payload(pbm.rank())
    ours = objects.allgather_objects(mine, name="payloads")
    reference = comm.allgather(mine)
    assert len(ours) == pbm.size() and all(same(a, b) for a, b in zip(ours, reference))


@pytest.mark.parametrize("root_from_end", [1, 2])
def test_gather_objects_matches_mpi4py_on_the_root_and_gives_none_elsewhere(comm, root_from_end):
    root = max(0, pbm.size() - root_from_end)
    mine = payload(pbm.rank())
    ours = objects.gather_objects(mine, root, name="payloads")
    reference = comm.gather(mine, root=root)
    if pbm.rank() == root:
        assert len(ours) == pbm.size() and all(same(a, b) for a, b in zip(ours, reference))
    else:
        assert ours is None and reference is None


@pytest.mark.parametrize("value", [None, "", "state", list(range(5000))])
def test_broadcast_object_matches_mpi4py(comm, value):
    root = pbm.size() - 1
    mine = value if pbm.rank() == root else ("not this", pbm.rank())
    assert objects.broadcast_object(mine, root, name="config") == comm.bcast(mine, root=root)


def test_root_outside_the_world_is_refused_before_any_communication():
    with pytest.raises(ValueError, match="root 99"):
        objects.gather_objects(1, 99, name="payloads")
    with pytest.raises(ValueError, match="root -1"):
        objects.broadcast_object(1, -1, name="config")


def test_barrier_returns_on_every_rank(comm):
    objects.barrier(name="suite barrier")
    assert comm.allreduce(1) == pbm.size()


@on(2, 3, 4)
def test_model_check_names_the_rank_whose_model_differs(comm):
    width = 3 if pbm.rank() != pbm.size() - 1 else 4
    model = torch.nn.Linear(width, 2)
    with pytest.raises(pbm.CollectiveMismatch, match=rf"differs on rank\(s\) {pbm.size() - 1}\b"):
        pbm.DistributedDataParallel(model)
