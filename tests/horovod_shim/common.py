"""The three helpers Horovod's ``test/parallel/test_torch.py`` imports from its
``test/utils/common.py`` (which needs Horovod's runner), written for pybrain-mpi's runner."""

import contextlib
import os
import tempfile


def mpi_env_rank_and_size():
    """(rank, size) from the launcher's environment (MPICH/Hydra, Open MPI, Slurm), else (0, 1)."""
    for rank_var, size_var in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                               ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, 1


def skip_or_fail_gpu_test(test, message):
    """Skips a test that needs a GPU (Horovod fails it instead when HOROVOD_TEST_GPU=1)."""
    if os.environ.get("HOROVOD_TEST_GPU") == "1":
        test.fail(message)
    test.skipTest(message)


@contextlib.contextmanager
def temppath():
    """A path to a not-yet-existing file in a fresh temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory() as directory:
        yield os.path.join(directory, "temp")
