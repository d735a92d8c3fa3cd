"""Shared test helpers. Multi-rank tests launch real MPI processes with ``run_mpi``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "workers"


def mpiexec_path() -> str:
    """mpiexec of the environment running the tests (PyPI's mpich puts it beside python)."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("mpiexec not found: pip install mpich (or load your MPI module)")
    return found


def run_mpi(ranks: int, worker: str, *args: str, timeout_s: float = 180, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``tests/workers/<worker>`` on ``ranks`` MPI processes and returns the result.

    With ``check`` a non-zero exit fails the test, showing every rank's output. The whole
    launch is bounded by ``timeout_s`` so a hang fails instead of stalling the suite.
    """
    full_env = dict(os.environ)
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PBM_TIMEOUT_S": "60"})
    if env:
        full_env.update(env)
    command = [mpiexec_path(), "-n", str(ranks), sys.executable, str(WORKERS / worker), *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=full_env)
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        err = (expired.stderr or b"").decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        pytest.fail(f"{worker} on {ranks} ranks hung for {timeout_s} s\nstdout:\n{out}\nstderr:\n{err}")
    if check and result.returncode != 0:
        pytest.fail(
            f"{worker} on {ranks} ranks exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


@pytest.fixture
def mpirun():
    """Fixture form of :func:`run_mpi`."""
    return run_mpi
