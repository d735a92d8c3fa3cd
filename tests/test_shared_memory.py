"""The node stage's shared memory (csrc/collectives/shared_pool.h) under the MPI netmods a
cluster may use, and what it leaves behind.

MPICH's OFI netmod refuses to close its fabric while an MPI shared window is alive, so with
MPI windows every run ended in "Fatal error in internal_Finalize ... fabricclose failed"
(exit 15) after a correct result: the node stage's windows could never be freed collectively.
They are now POSIX shared-memory segments mapped by every node rank. These tests run real MPI
processes on 2 and 3 ranks (an odd count, a size that does not divide evenly).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_mpi_command

WORKER = r'''
import sys
import numpy as np
import pybrain_mpi as pbm

pbm.init()
size, rank = pbm.size(), pbm.rank()
count = 100_003  # not a multiple of any rank count
for algorithm in ("shm", "small", "auto", "ring"):
    n = 1000 if algorithm == "small" else count
    data = np.arange(n, dtype=np.float64) * (rank + 1)
    pbm.allreduce_(data, algorithm=algorithm)
    expected = np.arange(n, dtype=np.float64) * (size * (size + 1) / 2)
    np.testing.assert_allclose(data, expected, rtol=0, atol=0)
shared = pbm.shared_empty((count,), np.float32)
shared[:] = rank + 1
pbm.allreduce_(shared, algorithm="shm")
assert float(shared.min()) == float(shared.max()) == size * (size + 1) / 2, (shared.min(), shared.max())
print(f"SHARED_OK rank={rank}", flush=True)
'''


def _mpich_with_ofi() -> bool:
    from pybrain_mpi.core.library import _core  # noqa: F401 - the package under test is built
    from mpi4py import MPI

    version = MPI.Get_library_version()
    return "MPICH" in version and "ofi" in version.lower()


@pytest.mark.parametrize("ranks", [2, 3])
def test_node_stage_runs_and_finalizes_under_mpichs_ofi_netmod(ranks, tmp_path: Path):
    if not _mpich_with_ofi():
        pytest.skip("the MPI under test is not an MPICH built with the OFI netmod")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = run_mpi_command(ranks, [str(script)], check=False, timeout_s=180,
                             env={"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SHARED_OK") == ranks, output
    assert "fabricclose" not in output and "Fatal error" not in output, output


def test_no_segment_is_left_in_dev_shm(tmp_path: Path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = run_mpi_command(3, [str(script)], check=True, timeout_s=180)
    assert result.stdout.count("SHARED_OK") == 3, result.stdout + result.stderr
    # Names carry the creating process's pid; none of the run's processes may leave one.
    leftovers = [p.name for p in shm.iterdir() if p.name.startswith("pbm-")
                 and not Path(f"/proc/{p.name.split('-')[1]}").exists()]
    assert leftovers == [], leftovers
