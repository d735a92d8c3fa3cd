"""Parameter-server ranks really killed (``os._exit``) mid-run, under ``mpiexec
-disable-auto-cleanup`` (tests/workers/ps_worker.py): a lost worker is reported by the server,
which finishes with the others; a lost server makes every worker raise a timeout naming it
within the deadline. The rest of ParameterServer runs in tests/mpi/mpi_parameter_server.py.

MPICH's hydra now and then SIGKILLs the survivors of a dead rank even under
-disable-auto-cleanup (see tests/test_failures.py): such a launch leaves no result files and
says nothing about pybrain-mpi, so each case tries up to three launches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WORKERS, mpiexec_path

TIMEOUT_S = 4          # PBM_TIMEOUT_S: a worker's deadline on a server
WORKER_TIMEOUT_S = 3   # a server's deadline on a worker


def _launch(ranks: int, mode: str, out: Path, limit_s: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PBM_TIMEOUT_S=str(TIMEOUT_S),
               PBM_EXIT_TIMEOUT_S=str(TIMEOUT_S), PS_WORKER_TIMEOUT_S=str(WORKER_TIMEOUT_S))
    command = [mpiexec_path(), "-disable-auto-cleanup", "-n", str(ranks), sys.executable,
               str(WORKERS / "ps_worker.py"), mode, str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{mode} still running after {limit_s} s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    finally:
        for pid_file in out.glob("rank*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _results(tmp_path: Path, ranks: int, mode: str, needed: list[int], limit_s: float) -> dict[int, dict]:
    """Results of the first launch in which every rank of ``needed`` wrote one."""
    outputs = []
    for attempt in range(3):
        out = tmp_path / f"{mode}{attempt}"
        out.mkdir()
        result = _launch(ranks, mode, out, limit_s)
        found = {int(p.stem[6:]): json.loads(p.read_text()) for p in out.glob("result*.json")}
        if all(r in found for r in needed):
            return found
        outputs.append(f"launch {attempt}: results of ranks {sorted(found)}\nstdout:\n{result.stdout[-4000:]}"
                       f"\nstderr:\n{result.stderr[-4000:]}")
    pytest.fail("no launch left results of ranks " + str(needed) + "\n" + "\n".join(outputs))


def test_a_killed_worker_is_reported_lost_and_the_server_finishes_with_the_others(tmp_path):
    results = _results(tmp_path, 3, "worker_killed", [0, 1, 2], limit_s=120)
    report = results[0]["report"]
    assert report["lost_workers"] == [2], report
    assert report["done_workers"] == [1], report
    stats = results[1]["stats"]
    assert stats["steps"] == 40, stats
    # Worker 1's 40 pushes, and the 5 or so worker 2 made before it died.
    assert 40 + 4 <= report["pushes_applied"] <= 40 + 6, report
    # Noticed within the server's deadline on a worker (plus its polling and the machine's load).
    assert results[0]["time"] - results[2]["time"] <= WORKER_TIMEOUT_S + 15, (results[0], results[2])


def test_a_killed_server_makes_every_worker_raise_a_timeout_naming_it_within_the_deadline(tmp_path):
    results = _results(tmp_path, 4, "server_killed", [1, 2, 3], limit_s=180)
    killed_at = results[1]["time"]
    for worker in (2, 3):
        seen = results[worker]
        assert seen["error"] in ("CollectiveTimeout", "PeerFailure"), seen
        assert seen["missing_ranks"] == [1], seen
        assert "rank 1" in seen["message"] and "ps " in seen["message"], seen
        # The deadline, the grace period the timeout spends asking who is at fault (at most
        # 10 s, here max(1, TIMEOUT_S/2)), and slack for a loaded 2-core machine.
        assert seen["time"] - killed_at <= TIMEOUT_S + max(1.0, TIMEOUT_S / 2) + 15, (seen, killed_at)
