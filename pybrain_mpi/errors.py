"""Error types raised by pybrain-mpi.

One class per failure family. Messages name the rank, the operation (and tensor name when
one was given) and, for multi-rank failures, the ranks at fault.
"""

from __future__ import annotations

__all__ = ["PbmError", "CollectiveTimeout", "CollectiveMismatch", "MPILibraryMismatch"]


class PbmError(RuntimeError):
    """Base class of every pybrain-mpi error."""


class CollectiveTimeout(PbmError, TimeoutError):
    """A collective did not complete within its timeout.

    ``missing_ranks`` lists the ranks that had not joined it (or, once the data phase had
    started, the peer that was being waited for). After a timeout the ranks are out of
    step: end the job (``mpiexec``/``srun`` then stops the other ranks).
    """

    missing_ranks: list[int]

    def __init__(self, message: str, missing_ranks: list[int] | None = None):
        super().__init__(message)
        self.missing_ranks = list(missing_ranks or [])


class CollectiveMismatch(PbmError, ValueError):
    """Ranks issued different collectives (order, dtype, element count, op or root).

    Raised on every rank, with a line per rank describing what each one called.
    """


class MPILibraryMismatch(PbmError, ImportError):
    """The native core was built against a different MPI than the one loaded at run time."""
