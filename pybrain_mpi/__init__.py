"""pybrain-mpi: MPI-native deep-learning training engine for brain imaging.

    import pybrain_mpi as pbm
    pbm.init()                       # on MPI.COMM_WORLD (mpiexec / srun)
    grad = pbm.allreduce(grad, op="avg")

Importing the package does not initialize MPI; :func:`init` does.
"""

from .communication import (ALGORITHMS, OPS, Handle, allreduce, allreduce_, allreduce_async_,
                            barrier, broadcast_, broadcast_async_, bytes_sent, comm, cross_rank,
                            cross_size, init, is_initialized, local_rank, local_size, rank,
                            shared_empty, shared_reset, shm_bytes, shutdown, size)
from . import amp, checkpointing, compression, optim
from .engine import DistributedDataParallel
from .errors import CollectiveMismatch, CollectiveTimeout, MPILibraryMismatch, PbmError

__version__ = "0.1.0"


def __getattr__(name: str):
    # pbm.data pulls in zarr/nibabel/numcodecs: import it on first use only.
    if name == "data":
        import importlib

        return importlib.import_module(".data", __name__)
    raise AttributeError(f"module 'pybrain_mpi' has no attribute {name!r}")

__all__ = [
    "ALGORITHMS", "OPS", "Handle", "allreduce", "allreduce_", "allreduce_async_", "barrier",
    "broadcast_", "broadcast_async_", "bytes_sent", "comm", "cross_rank", "cross_size", "init",
    "is_initialized", "local_rank", "local_size", "rank", "shutdown", "size",
    "shared_empty", "shared_reset", "shm_bytes", "DistributedDataParallel", "amp", "checkpointing", "compression", "optim", "CollectiveMismatch", "CollectiveTimeout", "MPILibraryMismatch", "PbmError", "__version__",
]
