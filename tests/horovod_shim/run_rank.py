"""Runs pytest on one MPI rank with a per-rank JUnit report: ``run_rank.py OUTDIR PYTEST_ARGS...``.

A small plugin (this module) keeps Horovod's tests independent of each other: at every test
boundary each rank restarts the call-order names of unnamed collectives (``<op>.noname.<n>``),
so a test that failed on one rank half-way through does not leave the ranks' names out of
step for every later test. It also prints each failure as it happens (with the rank).
"""

import os
import sys

import pytest

RANK = next((os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK") if v in os.environ), "0")


def _hide_optimizers_the_tests_cannot_build() -> None:
    """Horovod's tests build every ``torch.optim.Optimizer`` subclass "except LBFGS and SparseAdam"
    (those that cannot train their model). torch 2.9 added ``Muon``, which also cannot (it
    refuses 1-D parameters such as biases) and makes those tests fail before any Horovod call.
    With ``PBM_HOROVOD_HIDE_OPTIMIZERS`` (default ``Muon``; empty: hide nothing) such classes
    are left out of ``Optimizer.__subclasses__()``, as the tests leave out the two they know."""
    hidden = {n for n in os.environ.get("PBM_HOROVOD_HIDE_OPTIMIZERS", "Muon").split(",") if n}
    if not hidden:
        return
    import torch

    base = torch.optim.Optimizer
    every = type.__subclasses__

    def subclasses(cls=base):
        return [c for c in every(cls) if c.__name__ not in hidden]

    base.__subclasses__ = staticmethod(subclasses)
    print(f"[rank {RANK}] hidden from Optimizer.__subclasses__(): {sorted(hidden)}", flush=True)


# Tests Horovod marks ``pytest.mark.skip`` for its own CI's sake (test_timeline_api: flaky on
# Horovod's runners, horovod#2496) that this runner runs anyway; PBM_HOROVOD_UNSKIP overrides.
UNSKIP = {n for n in os.environ.get("PBM_HOROVOD_UNSKIP", "test_timeline_api").split(",") if n}


class _Isolation:
    def pytest_configure(self, config):
        _hide_optimizers_the_tests_cannot_build()

    def pytest_collection_modifyitems(self, items):
        for item in items:
            if item.name in UNSKIP:
                item.own_markers[:] = [m for m in item.own_markers if m.name != "skip"]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        hvd = sys.modules.get("pybrain_mpi.horovod")
        if hvd is not None:
            hvd._counters.clear()

    def pytest_runtest_logreport(self, report):
        if report.failed:
            text = str(report.longrepr).splitlines()
            errors = [line for line in text if line.startswith("E ")][:4]
            sys.__stderr__.write(f"[rank {RANK}] FAILED {report.nodeid} ({report.when}): " + " | ".join(errors)[:1500] + "\n")
            sys.__stderr__.flush()


if __name__ == "__main__":
    out = sys.argv[1]
    sys.exit(pytest.main(["-p", "no:cacheprovider", f"--junitxml={os.path.join(out, f'rank{RANK}.xml')}",
                          *sys.argv[2:]], plugins=[_Isolation()]))
