"""Helpers of the multi-rank suites in this folder (not a suite itself: the runner takes
``mpi_*.py`` only).

A suite declares every rank count it needs in ``RANKS``; a test that applies to some of them
is collected only in the launches with those rank counts (``on``, ``grouping``), so every test
that is collected runs (the runner counts a skip as a failure). Node groupings are emulated by re-initializing
pybrain-mpi with consecutive blocks of ranks as nodes for the length of a test, as
``PBM_RANKS_PER_NODE`` does for a whole launch.
"""

from __future__ import annotations

import pytest
from mpi4py import MPI

import pybrain_mpi as pbm

WORLD = MPI.COMM_WORLD.Get_size()


def on(*ranks: int):
    """Collects the decorated test only in launches of one of these rank counts."""
    return lambda test: test if WORLD in ranks else None


def regroup(per_node: int | None) -> None:
    """Re-initializes pybrain-mpi with blocks of ``per_node`` consecutive ranks as nodes
    (None: the machine's own grouping). Collective over the world."""
    pbm.shutdown()
    pbm.init(ranks_per_node=per_node)


@pytest.fixture
def nodes(request):
    """Indirect parameter (ranks, per_node) of ``grouping``: the ranks grouped `per_node` to a
    node for the test; the machine's grouping is restored afterwards."""
    ranks, per_node = request.param
    assert ranks == pbm.size(), (ranks, pbm.size())
    regroup(per_node)
    yield per_node
    regroup(None)


def grouping(*cases: tuple[int, int]):
    """Parametrizes the `nodes` fixture over the (ranks, per_node) cases of this launch's rank
    count; a test with none is not collected."""
    mine = [case for case in cases if case[0] == WORLD]

    def decorate(test):
        if not mine:
            return None
        return pytest.mark.parametrize("nodes", mine, indirect=True,
                                       ids=[f"{per_node}pernode" for _, per_node in mine])(test)
    return decorate
