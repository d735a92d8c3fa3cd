"""Horovod's own acceptance tests, run against ``pybrain_mpi.horovod``.

Horovod's ``test/parallel/test_torch.py`` (its CPU tests) is taken unmodified from a Horovod
checkout and run under ``mpiexec -n 2`` with ``horovod.torch`` mapped to
:mod:`pybrain_mpi.horovod` by the shim directory ``tests/horovod_shim`` (put on ``PYTHONPATH``
for these runs only). Nothing of Horovod is copied into this repository. Its PyTorch example
scripts run in ``tests/test_horovod_examples.py``, with these helpers.

Where the checkout is: ``PBM_HOROVOD_SRC``, either a work tree or a bare git directory
(default: the workspace's mirror ``/work/.mirror/horovod+horovod/repo``). Without it the tests
are skipped, saying so.

A test of Horovod's file passes here only if it passes on every rank. The only tests allowed to
be skipped are those in :data:`ALLOWED_SKIPS`, each for the reason given there (they need CUDA,
Gloo, Adasum, Intel oneCCL or a world of more ranks); the reason a test skipped must match.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import mpiexec_path

SHIM = Path(__file__).resolve().parent / "horovod_shim"
DEFAULT_SRC = "/work/.mirror/horovod+horovod/repo"
RANKS = 2

# Horovod tests that may skip, with the words their skip message must contain and why.
ALLOWED_SKIPS = {
    "test_gpu_required": ("No GPUs available", "needs CUDA"),
    "test_horovod_allreduce_multi_gpu": ("No GPUs available", "needs CUDA (several GPUs per rank)"),
    "test_horovod_allreduce_cpu_gpu_error": ("No GPUs available", "needs CUDA (CPU/GPU tensor mix)"),
    "test_horovod_grouped_allreduce_cpu_gpu_error": ("No GPUs available", "needs CUDA (CPU/GPU tensor mix)"),
    "test_horovod_alltoall_splits_on_gpu": ("No GPUs available", "needs CUDA"),
    "test_horovod_sync_batch_norm": ("No GPUs available", "Horovod tests SyncBatchNorm on CUDA only "
                                     "(tests/mpi/mpi_horovod.py tests ours on CPU)"),
    "test_model_parallelism": ("No GPUs available", "needs CUDA (two GPUs per rank)"),
    "test_delta_optimizer": ("No GPUs available", "needs CUDA and Adasum"),
    "test_broadcast_state_gpu": ("", "needs CUDA (Horovod marks it unittest.skip: hangs on K80s)"),
    "test_horovod_reinit": ("Gloo is not available", "re-init after shutdown is tested under Gloo only"),
    "test_horovod_is_initialized": ("Gloo is not available", "shutdown/re-init is tested under Gloo only"),
}


def horovod_source() -> Path | None:
    """The Horovod checkout (work tree or bare git dir) named by PBM_HOROVOD_SRC, if present."""
    src = Path(os.environ.get("PBM_HOROVOD_SRC", DEFAULT_SRC))
    return src if src.exists() else None


def horovod_file(relative: str, dest: Path) -> Path:
    """Copies ``relative`` out of the Horovod checkout to ``dest``/``relative``; skips if absent."""
    src = horovod_source()
    if src is None:
        pytest.skip(f"no Horovod checkout at {os.environ.get('PBM_HOROVOD_SRC', DEFAULT_SRC)} "
                    "(set PBM_HOROVOD_SRC to a Horovod work tree or git dir)")
    target = dest / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if (src / relative).is_file():
        target.write_bytes((src / relative).read_bytes())
        return target
    shown = subprocess.run(["git", "--git-dir", str(src), "show", f"HEAD:{relative}"], capture_output=True)
    if shown.returncode != 0:
        pytest.skip(f"{relative} is not in the Horovod checkout {src}: {shown.stderr.decode().strip()}")
    target.write_bytes(shown.stdout)
    return target


def shim_env(extra: dict | None = None) -> dict:
    """The environment of a Horovod run: the shim first on PYTHONPATH, bounded waits."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PBM_TIMEOUT_S": "30"})
    env.update(extra or {})
    return env


def run_ranks(args: list[str], cwd: Path, timeout_s: float, env: dict | None = None,
              python: str = sys.executable, shim: bool = True) -> subprocess.CompletedProcess:
    """``mpiexec -n RANKS PYTHON ARGS`` (with the shim on PYTHONPATH unless ``shim`` is false);
    the mpiexec beside ``python`` if there is one; a hang fails the test after ``timeout_s``."""
    beside = Path(python).parent / "mpiexec"
    command = [str(beside) if beside.exists() else mpiexec_path(), "-n", str(RANKS), python, *args]
    full_env = shim_env(env)
    if not shim:
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in full_env["PYTHONPATH"].split(os.pathsep)
                                                 if p != str(SHIM))
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=cwd,
                              env=full_env)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        pytest.fail(f"{' '.join(args[:3])} on {RANKS} ranks hung for {timeout_s} s\n{out[-20000:]}")


def tally(reports: list[Path]) -> dict[str, tuple[str, str]]:
    """Per test: (outcome, message) over all ranks; failed on any rank wins, then skipped."""
    result: dict[str, tuple[str, str]] = {}
    rank_order = {"passed": 0, "skipped": 1, "failed": 2}
    for report in reports:
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name")
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", (child.get("message") or "")[:300]
                elif child.tag == "skipped" and outcome != "failed":
                    outcome, message = "skipped", child.get("message") or ""
            if name not in result or rank_order[outcome] > rank_order[result[name][0]]:
                result[name] = (outcome, message)
    return result


def test_horovod_test_torch_passes_on_two_ranks(tmp_path: Path):
    """Every CPU test of Horovod's test_torch.py passes; only CUDA/Gloo/Adasum tests skip."""
    test_file = horovod_file("test/parallel/test_torch.py", tmp_path)
    out = tmp_path / "reports"
    out.mkdir()
    selection = os.environ.get("PBM_HOROVOD_K")  # e.g. "allreduce" to run a subset by hand
    args = [str(SHIM / "run_rank.py"), str(out), "-q", "-x" if os.environ.get("PBM_HOROVOD_X") else "-q",
            f"--timeout={os.environ.get('PBM_HOROVOD_TEST_TIMEOUT_S', '240')}", str(test_file)] + (["-k", selection] if selection else [])
    result = run_ranks(args, tmp_path, timeout_s=float(os.environ.get("PBM_HOROVOD_TIMEOUT_S", 1500)))
    reports = sorted(out.glob("rank*.xml"))
    assert len(reports) == RANKS, f"expected {RANKS} JUnit reports, got {reports}\n{result.stdout[-20000:]}"
    outcomes = tally(reports)
    counts = {k: sum(1 for o, _ in outcomes.values() if o == k) for k in ("passed", "skipped", "failed")}
    print(f"Horovod test_torch.py on {RANKS} ranks: {counts} of {len(outcomes)}")
    for name, (outcome, message) in sorted(outcomes.items()):
        print(f"  {outcome:8s} {name}" + (f": {message[:160]}" if outcome != "passed" else ""))
    failed = {n: m for n, (o, m) in outcomes.items() if o == "failed"}
    bad_skips = {n: m for n, (o, m) in outcomes.items()
                 if o == "skipped" and (n not in ALLOWED_SKIPS or ALLOWED_SKIPS[n][0] not in m)}
    assert not failed and not bad_skips, (
        f"tally {counts}\nfailed:\n" + "\n".join(f"  {n}: {m}" for n, m in sorted(failed.items()))
        + "\nskipped without an allowed reason:\n" + "\n".join(f"  {n}: {m}" for n, m in sorted(bad_skips.items()))
        + f"\n--- output ---\n{result.stdout[-15000:]}\n{result.stderr[-5000:]}")
    assert counts["passed"] > 0 and result.returncode == 0, result.stdout[-5000:]
