"""Shared test helpers. Multi-rank tests launch real MPI processes: the pytest suites of
``tests/mpi/`` (run by ``test_mpi_suites.py``) and, for crash/stop/timeout cases, the
subprocess workers of ``tests/workers/`` (``run_mpi``)."""

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


def run_mpi_command(ranks: int, python_args: list[str], *, cwd: Path | None = None,
                    timeout_s: float = 180, env: dict | None = None,
                    check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``python PYTHON_ARGS...`` on ``ranks`` MPI processes and returns the result.

    One thread per rank and ``PBM_TIMEOUT_S=60`` unless ``env`` says otherwise. With ``check``
    a non-zero exit fails the test, showing every rank's output. The whole launch is bounded
    by ``timeout_s`` so a hang fails instead of stalling the suite.
    """
    full_env = dict(os.environ)
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PBM_TIMEOUT_S": "60"})
    if env:
        full_env.update(env)
    command = [mpiexec_path(), "-n", str(ranks), sys.executable, *python_args]
    what = " ".join(python_args[:4])
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        err = (expired.stderr or b"").decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        pytest.fail(f"{what} on {ranks} ranks hung for {timeout_s} s\nstdout:\n{out}\nstderr:\n{err}")
    if check and result.returncode != 0:
        pytest.fail(
            f"{what} on {ranks} ranks exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def run_mpi(ranks: int, worker: str, *args: str, timeout_s: float = 180, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``tests/workers/<worker>`` on ``ranks`` MPI processes (see :func:`run_mpi_command`).

    Subprocess workers are for what a pytest suite under mpiexec cannot host: ranks that crash,
    stop (SIGSTOP) or time out on purpose. Ordinary multi-rank behaviour lives in
    ``tests/mpi/mpi_*.py``.
    """
    return run_mpi_command(ranks, [str(WORKERS / worker), *args], timeout_s=timeout_s, env=env,
                           check=check)


@pytest.fixture
def mpirun():
    """Fixture form of :func:`run_mpi`."""
    return run_mpi
