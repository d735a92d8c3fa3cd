"""Small Python objects exchanged between ranks with bounded waits.

Data preparation (converting a cohort on every rank, agreeing on what failed, gathering each
rank's peak memory) needs an allgather of small Python values. mpi4py's object collectives
wait forever for a rank that never arrives; the helpers of
:mod:`pybrain_mpi.communication.objects` (re-exported here) go through pybrain-mpi's own
collectives, which have a deadline and name the ranks that did not join
(:class:`CollectiveTimeout`).
"""

from __future__ import annotations

from ..communication.objects import allgather_objects, world

__all__ = ["allgather_objects", "world"]
