"""Errors raised by :mod:`pybrain_mpi.data` and the trainer's data adapters.

:class:`DataError` is the family: everything wrong with training data (missing, malformed,
not fitting the model). The subclasses say which kind; each message says what was wrong,
where (store, chunk key, sample, file) and what to do.
"""

from __future__ import annotations

from ..errors import PbmError

__all__ = ["DataError", "ChunkError", "PatchOutOfBounds", "DataMismatch", "SampleError"]


class DataError(PbmError, ValueError):
    """The data is missing, malformed or does not fit the model (base of every data error)."""


class ChunkError(DataError, OSError):
    """A chunk could not be read: missing from a store that should hold it, or corrupt.

    ``store`` is the store's URL and ``key`` the chunk key inside it (``0/c/1/2/0``).
    """

    def __init__(self, message: str, store: str, key: str):
        super().__init__(message)
        self.store = store
        self.key = key


class PatchOutOfBounds(DataError, IndexError):
    """A patch reaches outside the volume and the volume was opened with ``padding="error"``."""


class DataMismatch(DataError):
    """Inputs that must agree do not: grids of an image and its mask, the dimensionality a
    sampler expects, a patch larger than the volume, or a saved sampler state."""


class SampleError(DataError):
    """A prefetch thread failed while producing a sample.

    Raised in the training loop; ``sample_index`` and ``start`` locate the sample, ``chunk_key``
    and ``store`` the chunk when a chunk read was the cause (else None). The original exception
    is chained as ``__cause__``.
    """

    def __init__(self, message: str, sample_index: int, start: tuple, chunk_key: str | None = None,
                 store: str | None = None):
        super().__init__(message)
        self.sample_index = sample_index
        self.start = start
        self.chunk_key = chunk_key
        self.store = store
