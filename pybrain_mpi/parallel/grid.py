"""Rank groups: a data-parallel x pipeline grid, and sub-communicators with an engine of their own.

``Grid(pipeline_stages=S)`` arranges the world's ``W`` ranks (``W`` a multiple of ``S``) as
``W / S`` replicas of an ``S``-stage pipeline: world rank ``r`` is stage ``r % S`` of replica
``r // S``, so each pipeline runs over consecutive ranks. ``pipeline_comm`` joins the stages of
this rank's replica (for :class:`~pybrain_mpi.parallel.Pipeline`), ``data_group`` the ranks that
hold the same stage in every replica (their gradients are averaged with the existing DDP buckets,
:class:`~pybrain_mpi.DistributedDataParallel` ``group=``).
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any

from ..communication import context
from ..communication.setup_wait import bounded_allgather_ints, node_leader
from ..errors import PbmError

__all__ = ["Group", "Grid"]


class Group:
    """Collectives among the ranks of an mpi4py sub-communicator, through an engine of their own.

    Collective over ``comm``. Pass it as ``group=`` to :func:`pybrain_mpi.allreduce_`,
    :func:`pybrain_mpi.allreduce_async_`, :func:`pybrain_mpi.broadcast_` and
    :class:`pybrain_mpi.DistributedDataParallel`. ``rank``/``size`` are the group's; timeouts
    and mismatches reported by its engine number ranks within the group (``world_ranks`` maps
    them to world ranks).
    """

    def __init__(self, comm: Any, timeout_s: float | None = None):
        if not context.is_initialized():
            context.init()
        from mpi4py import MPI

        from ..core.library import _core

        ctx = context.current()
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout_s = ctx.timeout_s if timeout_s is None else float(timeout_s)
        # Bounded (names the ranks that never build the group) before the blocking
        # communicator calls of the engine and Split_type.
        self.world_ranks = [entry[0] for entry in bounded_allgather_ints(
            comm, [ctx.rank], timeout_s=self.timeout_s, what="pybrain_mpi.parallel.Group set-up")]
        self.engine = _core.Engine(comm.py2f(), self.timeout_s, ctx.thread_level == MPI.THREAD_MULTIPLE)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.engine.configure_nodes(node_leader(local, comm))
        local.Free()
        atexit.register(_close, weakref.ref(self))

    def close(self) -> None:
        """Stops the group's progress thread (pending collectives fail)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def __repr__(self) -> str:
        return f"<pybrain_mpi.parallel.Group rank {self.rank} of world ranks {self.world_ranks}>"


def _close(reference: "weakref.ref[Group]") -> None:
    group = reference()
    if group is not None:
        group.close()


class Grid:
    """``pipeline_stages`` stages per pipeline, the remaining factor data parallel (module docstring).

    Collective over ``comm`` (default: pybrain-mpi's world).
    """

    def __init__(self, pipeline_stages: int, comm: Any = None, timeout_s: float | None = None):
        if not context.is_initialized():
            context.init()
        comm = context.current().comm if comm is None else comm
        world, rank = comm.Get_size(), comm.Get_rank()
        stages = int(pipeline_stages)
        if stages < 1 or world % stages:
            raise PbmError(f"rank {rank}: pipeline_stages={pipeline_stages} does not divide the "
                           f"{world} ranks into whole pipelines")
        self.pipeline_stages = stages
        self.data_parallel = world // stages
        self.stage = rank % stages
        self.replica = rank // stages
        # Every rank here, with the same layout, before the blocking Splits (bounded: names
        # the ranks that never build the grid).
        wait_s = context.current().timeout_s if timeout_s is None else float(timeout_s)
        asked = bounded_allgather_ints(comm, [stages], timeout_s=wait_s, what="pybrain_mpi.parallel.Grid set-up")
        differing = [r for r, (s,) in enumerate(asked) if s != stages]
        if differing:
            raise PbmError(f"rank {rank}: Grid(pipeline_stages={stages}) but rank(s) {differing} asked for "
                           f"{sorted({asked[r][0] for r in differing})} stages; every rank must ask for the same")
        self.pipeline_comm = comm.Split(color=self.replica, key=self.stage)
        self.data_comm = comm.Split(color=self.stage, key=self.replica)
        self.data_group = Group(self.data_comm, timeout_s) if self.data_parallel > 1 else None

    def layout(self) -> list[list[int]]:
        """World ranks of each replica's stages: ``layout()[replica][stage]``."""
        s = self.pipeline_stages
        return [[d * s + k for k in range(s)] for d in range(self.data_parallel)]

    def describe(self) -> str:
        """The layout in one line, e.g. ``2 pipelines x 3 stages: [0, 1, 2] [3, 4, 5]``."""
        return (f"{self.data_parallel} pipeline{'s' if self.data_parallel > 1 else ''} x "
                f"{self.pipeline_stages} stages: " + " ".join(map(str, self.layout())))
