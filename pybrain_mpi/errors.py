"""Error types raised by pybrain-mpi.

One class per failure family. Messages name the rank, the operation (and tensor name when
one was given) and, for multi-rank failures, the ranks at fault.
"""

from __future__ import annotations

__all__ = ["PbmError", "CollectiveTimeout", "CollectiveMismatch", "PeerFailure", "MPILibraryMismatch"]

# Failures that left this rank's world unable to finish together (a timeout, a lost peer):
# the ranks at fault of each (kept in step with the error's attribute, which the native core
# sets after construction), not the errors themselves, whose tracebacks would keep frames
# alive. Read at interpreter exit by communication/context.py, which then bounds
# MPI_Finalize (it would wait for the stopped or lost rank).
WORLD_FAILURES: list[list[int]] = []


def _record_world_failure() -> list[int]:
    """A new record of a failure (its ranks, filled in by the error)."""
    record: list[int] = []
    if len(WORLD_FAILURES) < 64:  # the first ones are enough to name the ranks at exit
        WORLD_FAILURES.append(record)
    return record


class _RanksAttribute:
    """A list attribute of an error whose value is mirrored into its WORLD_FAILURES record."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return instance.__dict__.get(self.slot, [])

    def __set__(self, instance, value):
        ranks = list(value or [])
        instance.__dict__[self.slot] = ranks
        record = instance.__dict__.get("_world_record")
        if record is not None:
            record[:] = ranks


class PbmError(RuntimeError):
    """Base class of every pybrain-mpi error."""


class CollectiveTimeout(PbmError, TimeoutError):
    """A collective did not complete within its timeout.

    ``missing_ranks`` lists the ranks that had not joined it (or, once the data phase had
    started, the peer that was being waited for). After a timeout the ranks are out of
    step: end the job (``mpiexec``/``srun`` then stops the other ranks). Exiting is bounded
    as well: ``MPI_Finalize`` would wait for the missing rank, so a rank still exiting
    ``PBM_EXIT_TIMEOUT_S`` later (default: ``PBM_TIMEOUT_S``, at least 30 s) ends with status 1
    without finalizing (communication/context.py).
    """

    missing_ranks = _RanksAttribute()

    def __init__(self, message: str, missing_ranks: list[int] | None = None):
        super().__init__(message)
        self._world_record = _record_world_failure()
        self.missing_ranks = missing_ranks


class PeerFailure(PbmError):
    """The MPI library failed a transfer with other ranks, most likely because a peer
    process died (e.g. SIGKILL under ``mpiexec -disable-auto-cleanup``).

    ``failed_ranks`` lists the peers the wait was still waiting for (on the 2-rank ring: the
    other rank); the message names them and carries MPI's own error text. Like a timeout,
    it leaves the ranks out of step: end the job.
    """

    failed_ranks = _RanksAttribute()

    def __init__(self, message: str, failed_ranks: list[int] | None = None):
        super().__init__(message)
        self._world_record = _record_world_failure()
        self.failed_ranks = failed_ranks


class CollectiveMismatch(PbmError, ValueError):
    """Ranks issued different collectives (order, dtype, element count, op or root).

    Raised on every rank, with a line per rank describing what each one called.
    """


class MPILibraryMismatch(PbmError, ImportError):
    """The native core was built against a different MPI than the one loaded at run time."""
