"""The one door to the native core (``pybrain_mpi._core``, built from ``csrc/``).

- :mod:`pybrain_mpi.core.library` loads the compiled extension and checks that it runs
  against the MPI library it was built for (``import`` of it loads ``libmpi``, nothing more).
- :mod:`pybrain_mpi.core.buffers` turns torch tensors and numpy arrays into the
  (address, element count, dtype) buffers the core takes.

Every other module reaches the core through these two. Importing this package itself loads
nothing, so ``import pybrain_mpi`` stays cheap and works where MPI is not installed.
"""
