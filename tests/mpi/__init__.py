"""Multi-rank pytest suites (run under mpiexec by tests/test_mpi_suites.py)."""
