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
from .errors import CollectiveMismatch, CollectiveTimeout, MPILibraryMismatch, PbmError, PeerFailure

__version__ = "0.1.0"


# Submodules that import torch (or zarr, for data) load on first use, so `import pybrain_mpi.data`
# in a data-only process (conversion, patch reading) never pays torch's ~180 MB.
_LAZY_MODULES = ("compression", "optim", "data", "models", "engine", "trainer", "horovod", "parallel")
# Short names kept for scripts written against earlier releases: activation recomputation now
# lives beside the models, loss scaling beside the optimizers.
_ALIASES = {"checkpointing": ".models.recompute", "amp": ".optim.loss_scaling"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module("." + name, __name__)
    if name in _ALIASES:
        return importlib.import_module(_ALIASES[name], __name__)
    if name == "DistributedDataParallel":
        return importlib.import_module(".engine", __name__).DistributedDataParallel
    raise AttributeError(f"module 'pybrain_mpi' has no attribute {name!r}")


__all__ = [
    "ALGORITHMS", "OPS", "Handle", "allreduce", "allreduce_", "allreduce_async_", "barrier",
    "broadcast_", "broadcast_async_", "bytes_sent", "comm", "cross_rank", "cross_size", "init",
    "is_initialized", "local_rank", "local_size", "rank", "shutdown", "size",
    "shared_empty", "shared_reset", "shm_bytes", "DistributedDataParallel", "compression",
    "optim", "data", "models", "parallel", "CollectiveMismatch", "CollectiveTimeout", "PeerFailure",
    "MPILibraryMismatch", "PbmError", "__version__",
]
