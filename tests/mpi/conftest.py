"""The plugin behind the multi-rank pytest suites in this folder (``mpi_*.py``).

``tests/test_mpi_suites.py`` runs each suite as ``mpiexec -n N python -m pytest SUITE`` for
every N the suite declares in its module-level ``RANKS``. Every rank runs every test, in the
same order, so a test body is plain SPMD code: it may call any collective. After each test's
setup and body the ranks agree on the outcome (a pybrain-mpi allreduce, bounded by
``PBM_TIMEOUT_S``), so a test that fails on one rank fails on all of them, names the ranks
where it failed, and the others never wait in a collective the failing rank skipped. Each rank
writes its outcomes to ``$PBM_MPI_REPORT_DIR/rank<r>.json`` for the runner.

Outside such a run (the ordinary single-process suite collects this folder too) the plugin
does nothing: the suites' file names do not match ``test_*.py``, so their tests are never
collected there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ACTIVE = os.environ.get("PBM_MPI_SUITE") == "1"

if ACTIVE:
    import numpy as np
    from mpi4py import MPI

    import pybrain_mpi as pbm

    _outcomes: list[dict] = []
    _out_of_step = {"reason": None}

    def pytest_sessionstart(session):
        pbm.init()

    @pytest.fixture(scope="session")
    def comm():
        """The world communicator (mpi4py)."""
        return MPI.COMM_WORLD

    @pytest.fixture
    def rank() -> int:
        """This process's rank."""
        return pbm.rank()

    @pytest.fixture
    def world() -> int:
        """The number of ranks."""
        return pbm.size()

    def _failed_ranks(failed_here: bool, what: str) -> list[int]:
        flags = np.zeros(pbm.size(), dtype=np.int32)
        flags[pbm.rank()] = int(failed_here)
        pbm.allreduce_(flags, op="sum", name=what[-60:])
        return [int(r) for r in np.flatnonzero(flags)]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        if call.when not in ("setup", "call"):
            return
        if _out_of_step["reason"] is None:
            try:
                failed = _failed_ranks(report.failed, f"{call.when} {item.name}")
            except Exception as error:  # noqa: BLE001 - the engine cannot agree any more
                _out_of_step["reason"] = f"ranks could not agree on the outcome of {item.nodeid}: {error}"
                item.session.shouldstop = _out_of_step["reason"]
                failed = [pbm.rank()]
                report.outcome = "failed"
                report.longrepr = _out_of_step["reason"]
            others = [r for r in failed if r != pbm.rank()]
            if others and not report.failed:
                report.outcome = "failed"
                report.longrepr = (f"{call.when} failed on rank{'s' if len(others) > 1 else ''} "
                                   f"{', '.join(map(str, others))} (passed here)")
        if report.failed or call.when == "call" or report.skipped:
            _outcomes.append({"test": item.nodeid.split("::", 1)[-1], "when": call.when,
                              "outcome": report.outcome,
                              "detail": "" if report.passed else str(report.longrepr)[-4000:]})

    def pytest_sessionfinish(session, exitstatus):
        directory = os.environ.get("PBM_MPI_REPORT_DIR")
        if directory:
            path = Path(directory) / f"rank{pbm.rank()}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rank": pbm.rank(), "size": pbm.size(),
                                       "exitstatus": int(exitstatus), "outcomes": _outcomes}))
            tmp.replace(path)
        pbm.shutdown()
