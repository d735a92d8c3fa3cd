"""Runs pytest on one MPI rank with a per-rank JUnit report: ``run_rank.py OUTDIR PYTEST_ARGS...``."""

import os
import sys

import pytest

if __name__ == "__main__":
    rank = next((os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK") if v in os.environ), "0")
    out = sys.argv[1]
    sys.exit(pytest.main(["-p", "no:cacheprovider", f"--junitxml={os.path.join(out, f'rank{rank}.xml')}",
                          *sys.argv[2:]]))
