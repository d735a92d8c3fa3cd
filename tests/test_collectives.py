"""Collective timeouts on real MPI processes (ranks that stay away on purpose). Everything
else about the collectives on 1-4 ranks runs as the suite tests/mpi/mpi_collectives.py."""

from __future__ import annotations

import pytest

from conftest import run_mpi


def _ok_on_every_rank(result, mode: str, ranks: int) -> None:
    for rank in range(ranks):
        assert f"OK {mode} rank {rank}" in result.stdout, result.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_timeout_names_the_ranks_that_did_not_join(ranks):
    result = run_mpi(ranks, "collectives_worker.py", "timeout", timeout_s=60)
    _ok_on_every_rank(result, "timeout", ranks)
    missing = ", ".join(str(r) for r in range(1, ranks))
    assert f"waiting for rank{'s' if ranks > 2 else ''} {missing}" in result.stdout, result.stdout


@pytest.mark.parametrize("ranks", [3, 4])
def test_timeout_names_only_the_rank_that_stayed_away(ranks):
    _ok_on_every_rank(run_mpi(ranks, "collectives_worker.py", "partial_join", timeout_s=90),
                      "partial_join", ranks)


def test_async_wait_timeout_names_missing_ranks():
    result = run_mpi(3, "collectives_worker.py", "async_timeout", timeout_s=60)
    _ok_on_every_rank(result, "async_timeout", 3)
    assert "ranks that have not joined: 1, 2" in result.stdout, result.stdout


ENGINE_TUNING_SCRIPT = """
import json
import pybrain_mpi as pbm
from pybrain_mpi.communication import context

pbm.init()
engine = context.current().engine
from mpi4py import MPI
rows = MPI.COMM_WORLD.gather({"rank": pbm.rank(), "local_size": pbm.local_size(),
                              "cross_size": pbm.cross_size(),
                              "ring": engine.ring_chunk_bytes, "shm_min": engine.shm_min_bytes,
                              "small_max": engine.small_max_bytes,
                              "shm_chunk": engine.shm_chunk_bytes})
if pbm.rank() == 0:
    print("ROWS " + json.dumps(rows))
pbm.shutdown()
"""


def _rows(stdout: str) -> list[dict]:
    import json

    return next(json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("ROWS "))


def test_engine_tunables_and_forced_nodes_come_from_the_environment(tmp_path):
    """PBM_* tunables reach the engine on every rank; PBM_RANKS_PER_NODE=1 makes 3 nodes of 3 ranks."""
    from conftest import run_mpi_command

    # cwd: a directory without the source tree, so `python -c` imports the installed package.
    env = {"PBM_RING_CHUNK_BYTES": "131072", "PBM_SHM_MIN_BYTES": "12345",
           "PBM_SMALL_MAX_BYTES": "8192", "PBM_SHM_CHUNK_BYTES": "1048576",
           "PBM_RANKS_PER_NODE": "1"}
    result = run_mpi_command(3, ["-c", ENGINE_TUNING_SCRIPT], env=env, timeout_s=120, cwd=tmp_path)
    rows = _rows(result.stdout)
    assert [row["rank"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert (row["ring"], row["shm_min"], row["small_max"], row["shm_chunk"]) == \
            (131072, 12345, 8192, 1048576), row
        assert (row["local_size"], row["cross_size"]) == (1, 3), row
    # Without the variables the engine keeps its own defaults (not the values above).
    plain = run_mpi_command(2, ["-c", ENGINE_TUNING_SCRIPT], timeout_s=120, cwd=tmp_path)
    rows = _rows(plain.stdout)
    assert len(rows) == 2
    for row in rows:
        assert row["ring"] != 131072 and row["small_max"] != 8192 and row["shm_min"] != 12345, row
        assert (row["local_size"], row["cross_size"]) == (2, 1), row
