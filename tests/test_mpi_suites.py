"""Runs the multi-rank pytest suites of ``tests/mpi/`` under ``mpiexec``.

Each ``tests/mpi/mpi_*.py`` is an ordinary pytest file whose tests run on every rank at once
(see ``tests/mpi/conftest.py``); it declares the rank counts it runs with in ``RANKS`` (and
optionally a wall-clock bound ``TIMEOUT_S``). One test here per suite and rank count: it
passes when every rank ran the same tests and each passed (or was skipped on every rank).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import TESTS, run_mpi_command

SUITES = sorted((TESTS / "mpi").glob("mpi_*.py"))


def _declared(path: Path, name: str, default):
    """A module-level constant of a suite, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    return default


CASES = [pytest.param(suite, ranks, id=f"{suite.stem}-{ranks}ranks")
         for suite in SUITES for ranks in _declared(suite, "RANKS", (2,))]


def _summary(reports: dict[int, dict]) -> str:
    lines = []
    for rank, report in sorted(reports.items()):
        for entry in report["outcomes"]:
            if entry["outcome"] != "passed":
                lines.append(f"rank {rank}: {entry['test']} ({entry['when']}) {entry['outcome']}\n"
                             f"{entry['detail']}")
    return "\n".join(lines)


@pytest.mark.parametrize("suite,ranks", CASES)
def test_suite_passes_on_every_rank(suite: Path, ranks: int, tmp_path: Path):
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    # Run from an empty directory: the source checkout on sys.path would shadow the installed
    # package (which alone has the compiled core).
    result = run_mpi_command(
        ranks, ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
        cwd=tmp_path, timeout_s=_declared(suite, "TIMEOUT_S", 300),
        env={"PBM_MPI_SUITE": "1", "PBM_MPI_REPORT_DIR": str(reports_dir)}, check=False)
    output = f"stdout:\n{result.stdout[-20000:]}\nstderr:\n{result.stderr[-8000:]}"
    reports = {int(p.stem[4:]): json.loads(p.read_text()) for p in reports_dir.glob("rank*.json")}
    assert sorted(reports) == list(range(ranks)), f"ranks {sorted(reports)} reported\n{output}"
    failures = _summary(reports)
    assert not failures and result.returncode == 0, f"{failures}\n{output}"
    ran = [[(e["test"], e["outcome"]) for e in r["outcomes"] if e["when"] == "call"]
           for _, r in sorted(reports.items())]
    assert all(r == ran[0] for r in ran), f"ranks ran different tests: {ran}"
    assert any(outcome == "passed" for _, outcome in ran[0]), f"no test ran\n{output}"
