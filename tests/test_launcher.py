"""The launcher check of pbm.init (pybrain_mpi/communication/launcher.py) and `info --pmi`.

Mis-launches (torchrun, srun without the MPI's PMI plugin, another MPI's mpiexec) must end in
one line and a non-zero exit; launches that only look alike (mpiexec inside an allocation of
more tasks, a batch script's own process, a singleton) must not. The subprocess tests run the
real CLI with the launchers' variables set, since torchrun and srun leave nothing else behind
in a process; tests/test_two_node_slurm.py does the same under a real srun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mpiexec_path
from pybrain_mpi.communication import launcher
from pybrain_mpi.communication.launcher import LaunchMismatch, detect, mismatch_message

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = str(Path(sys.executable).parent / "pybrain-mpi")
EXAMPLE = ROOT / "examples" / "dca_fmri.toml"

TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
# What srun --mpi=none (or MpiDefault=none) gives task 0 of a 2-task step.
SRUN_NO_PMI = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_JOB_NUM_NODES": "1"}
# A batch script (or salloc shell) of a 4-task job: SLURM_NTASKS is the allocation, no step.
BATCH = {"SLURM_JOB_ID": "8", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_PROCID": "0",
         "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_TASKS_PER_NODE": "2(x2)"}


def clean_env(**extra: str) -> dict:
    """os.environ without launcher variables (the suite may itself run under one), plus extra."""
    prefixes = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_", "MPI_LOCAL")
    names = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PBM_SRUN_MPI", "PBM_LAUNCH_CHECK"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PBM_TIMEOUT_S": "60"}, **extra)
    return env


def run(command: list[str], env: dict, timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{command} hung for {timeout_s} s\nstdout:\n{expired.stdout}\nstderr:\n{expired.stderr}")


# ------------------------------------------------------------------ detection (environment only)
@pytest.mark.parametrize("env, launcher_name, size, variable", [
    (TORCHRUN, "torchrun", 2, "WORLD_SIZE=2"),
    ({"WORLD_SIZE": "3", "RANK": "1"}, "a torch launcher", 3, "WORLD_SIZE=3"),
    (SRUN_NO_PMI, "srun", 2, "SLURM_STEP_NUM_TASKS=2"),
    # srun --mpi=pmi2: Slurm's PMI-2 server gives PMI_SIZE beside the step variables.
    ({**SRUN_NO_PMI, "SLURM_MPI_TYPE": "pmi2", "PMI_SIZE": "2", "PMI_RANK": "0", "PMI_FD": "11"},
     "srun", 2, "PMI_SIZE=2"),
    # srun --mpi=pmix (Open MPI): no size in the PMIx variables; the step's count it is.
    ({**SRUN_NO_PMI, "SLURM_MPI_TYPE": "pmix", "PMIX_NAMESPACE": "slurm.pmix.7.0", "PMIX_RANK": "0"},
     "srun", 2, "SLURM_STEP_NUM_TASKS=2"),
    # hydra's mpiexec -n 3 inside a job: its proxies are a 2-task srun step (one per node).
    ({**BATCH, "SLURM_STEP_ID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "PMI_SIZE": "3",
      "PMI_RANK": "0", "PMI_FD": "5", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0"},
     "mpiexec (hydra)", 3, "PMI_SIZE=3"),
    # Open MPI's mpirun -n 2 inside a job: its orted daemons are the srun step.
    ({**BATCH, "SLURM_STEP_ID": "1", "SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_RANK": "0", "PMIX_NAMESPACE": "prterun-x", "PMIX_RANK": "0"},
     "mpirun (Open MPI)", 2, "OMPI_COMM_WORLD_SIZE=2"),
    (BATCH, "none", None, ""),   # a batch script's own process: SLURM_NTASKS is the allocation
    ({}, "none", None, ""),
])
def test_detect_names_the_innermost_launcher_and_its_size(env, launcher_name, size, variable):
    launch = detect(env)
    assert (launch.launcher, launch.size, launch.variable) == (launcher_name, size, variable), launch


def test_mismatch_messages_are_one_line_naming_both_sizes_and_the_fix():
    torchrun = mismatch_message(detect(TORCHRUN), 1, vendor="MPICH 5.0.2", environ={})
    assert "\n" not in torchrun
    assert "torchrun started 2 processes (WORLD_SIZE=2)" in torchrun and "has 1 rank" in torchrun
    assert "mpiexec -n 2" in torchrun and "srun --mpi=pmi2" in torchrun
    srun = mismatch_message(detect(SRUN_NO_PMI), 1, vendor="Open MPI 4.1", environ={})
    assert "srun started 2 tasks (SLURM_STEP_NUM_TASKS=2)" in srun and "srun --mpi=pmix" in srun
    assert "without a PMI plugin" in srun and "\n" not in srun
    assert mismatch_message(detect(SRUN_NO_PMI), 2, vendor="MPICH 5.0.2", environ={}) is None
    assert mismatch_message(detect(BATCH), 1, vendor="MPICH 5.0.2", environ={}) is None
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}
    other_mpi = mismatch_message(detect(ompi), 1, vendor="MPICH 5.0.2", environ={})
    assert "mpirun (Open MPI) started 4 ranks (OMPI_COMM_WORLD_SIZE=4)" in other_mpi
    assert "another MPI than the MPICH 5.0.2" in other_mpi


@pytest.mark.parametrize("vendor, plugin", [("MPICH 5.0.2", "pmi2"), ("Open MPI 4.1", "pmix"),
                                            ("Open MPI 5.0.3", "pmix"), ("Intel(R) MPI 2021.11", "pmi2"),
                                            ("MVAPICH2 2.3.7", "pmi2"), ("SomethingElse 1.0", "pmi2")])
def test_srun_plugin_follows_the_mpi_family_and_the_override(vendor, plugin):
    assert launcher.srun_mpi_plugin(vendor, environ={}) == plugin
    assert launcher.srun_mpi_plugin(vendor, environ={"PBM_SRUN_MPI": "cray_shasta"}) == "cray_shasta"


def test_open_mpi_without_pmix_under_srun_is_refused_before_mpi_init(monkeypatch):
    assert launcher._open_mpi_speaks_pmi("Open MPI 5.0.3") is False   # 5.x speaks PMIx only
    monkeypatch.setattr(launcher, "_compiled_vendor", lambda: "Open MPI 4.1")
    monkeypatch.setattr(launcher, "_open_mpi_speaks_pmi", lambda vendor: False)
    with pytest.raises(LaunchMismatch, match=r"srun started 2 tasks \(SLURM_STEP_NUM_TASKS=2\) with "
                                             r"--mpi=none, .*only through PMIx.*srun --mpi=pmix"):
        launcher.check_before_mpi_init(SRUN_NO_PMI)
    pmi2 = {**SRUN_NO_PMI, "SLURM_MPI_TYPE": "pmi2", "PMI_SIZE": "2", "PMI_FD": "9"}
    with pytest.raises(LaunchMismatch, match=r"with --mpi=pmi2"):
        launcher.check_before_mpi_init(pmi2)
    # Launches Open MPI can join: PMIx from srun, its own mpirun, no srun at all, checks off.
    launcher.check_before_mpi_init({**SRUN_NO_PMI, "SLURM_MPI_TYPE": "pmix", "PMIX_NAMESPACE": "slurm.pmix.7.0"})
    launcher.check_before_mpi_init({**SRUN_NO_PMI, "OMPI_COMM_WORLD_SIZE": "2"})
    launcher.check_before_mpi_init(BATCH)
    launcher.check_before_mpi_init({**SRUN_NO_PMI, "PBM_LAUNCH_CHECK": "0"})
    # An Open MPI built --with-pmi (s1/s2 components) or MPICH: MPI_Init copes, check_world decides.
    monkeypatch.setattr(launcher, "_open_mpi_speaks_pmi", lambda vendor: True)
    launcher.check_before_mpi_init(pmi2)
    monkeypatch.setattr(launcher, "_compiled_vendor", lambda: "MPICH 5.0.2")
    launcher.check_before_mpi_init(SRUN_NO_PMI)


# ------------------------------------------------------------------ real processes
def test_info_pmi_prints_the_plugin_without_initializing_mpi():
    code = ("import sys; from pybrain_mpi.cli import main; main(['info', '--pmi']); "
            "assert 'mpi4py.MPI' not in sys.modules, 'info --pmi initialized MPI'")
    result = run([sys.executable, "-c", code], clean_env(), cwd=ROOT / "tests")
    assert result.returncode == 0 and result.stdout.strip() == "pmi2", result.stdout + result.stderr
    result = run([PROGRAM, "info", "--pmi"], clean_env(PBM_SRUN_MPI="pmix_v4"))
    assert result.returncode == 0 and result.stdout.strip() == "pmix_v4", result.stdout + result.stderr


@pytest.mark.parametrize("case, env", [("torchrun", TORCHRUN), ("srun --mpi=none", SRUN_NO_PMI)])
@pytest.mark.parametrize("command", ["info", "train"])
def test_mislaunch_exits_nonzero_with_one_line_and_no_traceback(case, env, command, tmp_path):
    args = ["info"] if command == "info" else ["train", str(EXAMPLE), "--set", f"output.dir={tmp_path / 'out'}"]
    result = run([PROGRAM, *args], clean_env(**env), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pybrain-mpi: error: "), result.stderr
    assert "2 " in lines[0] and "has 1 rank" in lines[0] and "srun --mpi=pmi2" in lines[0], lines[0]
    assert "topology" not in result.stdout and not (tmp_path / "out").exists()


def test_only_the_launchers_rank_0_prints_the_reason():
    result = run([PROGRAM, "info"], clean_env(**{**TORCHRUN, "RANK": "1", "LOCAL_RANK": "1"}))
    assert result.returncode == 2 and result.stderr == "", result.stderr


def test_pbm_init_raises_launch_mismatch_in_a_script():
    code = ("import pybrain_mpi as pbm\nfrom pybrain_mpi.communication.launcher import LaunchMismatch\n"
            "try:\n    pbm.init()\nexcept LaunchMismatch as e:\n    print('REFUSED', e)\nelse:\n    print('ACCEPTED')\n")
    result = run([sys.executable, "-c", code], clean_env(**TORCHRUN), cwd=ROOT / "tests")
    assert "REFUSED torchrun started 2 processes" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("case, env", [
    ("singleton", {}),
    ("batch script of a 4-task job", BATCH),
    ("srun -n 1 in a 4-task job", {**BATCH, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}),
    ("torchrun --nproc_per_node=1", {**TORCHRUN, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}),
    ("check turned off", {**TORCHRUN, "PBM_LAUNCH_CHECK": "0"}),
])
def test_launches_that_only_look_alike_are_not_refused(case, env):
    result = run([PROGRAM, "info"], clean_env(**env))
    assert result.returncode == 0, f"{case}: {result.stderr}"
    assert "topology: 1 rank(s)" in result.stdout, result.stdout


@pytest.mark.parametrize("case, env", [
    ("mpiexec -n 2 in an salloc of 4 tasks", BATCH),
    # hydra inside a job starts its proxies with srun: ranks inherit the proxies' 1-task step.
    ("mpiexec -n 2 whose proxy is a 1-task srun step", {**BATCH, "SLURM_STEP_ID": "0",
                                                         "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}),
])
def test_mpiexec_inside_a_slurm_allocation_is_not_refused(case, env):
    result = run([mpiexec_path(), "-launcher", "fork", "-n", "2", PROGRAM, "info"], clean_env(**env))
    assert result.returncode == 0, f"{case}: {result.stdout}\n{result.stderr}"
    assert "topology: 2 rank(s)" in result.stdout and "launcher: mpiexec (hydra), 2 process(es)" in result.stdout, \
        result.stdout


def test_real_torchrun_of_two_processes_is_refused_by_its_rank_0_in_one_line(tmp_path):
    """torchrun itself (rendezvous on loopback): both processes refuse, rank 0 says why once;
    torchrun then reports the failed children in its own words and exits non-zero."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torch's torchrun is not installed beside this python")
    result = run([str(torchrun), "--standalone", "--nproc_per_node=2", "--no-python", PROGRAM, "info"],
                 clean_env(), cwd=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("pybrain-mpi: error:")]
    assert len(ours) == 1 and "torchrun started 2 processes (WORLD_SIZE=2)" in ours[0], result.stderr
    assert "topology" not in result.stdout, result.stdout
