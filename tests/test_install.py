"""Installing: the one rule that picks the MPI a build uses (checked by configuring the real
CMakeLists.txt with PBM_MPI_ONLY), the message when there is none, what ``pybrain-mpi info``
reports about it, ``pybrain-mpi bench`` from an installed package, and CLI errors that are
one line plus the fix (``-v`` adds the traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CMAKE = shutil.which("cmake")
SYSTEM_BIN = ("/usr/bin", "/bin")
# Programs of an MPI installation (wrappers, launchers; Open MPI's opal/orte/shmem tools).
MPI_PROGRAMS = ("mpi", "ompi", "orte", "opal", "oshmem", "shmem")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="needs cmake")


def _bare_path(tmp_path: Path) -> str:
    """A PATH with the system's programs (compiler, make...) but no MPI: symlinks to everything
    in /usr/bin and /bin except MPI programs, so a system MPI there (CI installs Open MPI) does
    not hide the case "no mpicc on PATH"."""
    bare = tmp_path / "bare-bin"
    if not bare.exists():
        bare.mkdir()
        for directory in SYSTEM_BIN:
            for entry in sorted(Path(directory).iterdir()):
                target = bare / entry.name
                if not entry.name.startswith(MPI_PROGRAMS) and not os.path.lexists(target):
                    target.symlink_to(entry)
    assert shutil.which("mpicc", path=str(bare)) is None
    return str(bare)


def _configure(tmp_path: Path, env: dict, python: str | None = None, name: str = "b"):
    """Configure CMakeLists.txt with PBM_MPI_ONLY (stops once the MPI is chosen)."""
    command = [CMAKE, "-S", str(ROOT), "-B", str(tmp_path / name), "-DPBM_MPI_ONLY=ON"]
    if python:
        command.append(f"-DPython_EXECUTABLE={python}")
    full = {"PATH": _bare_path(tmp_path), "HOME": os.environ.get("HOME", "/root"), **env}
    result = subprocess.run(command, capture_output=True, text=True, env=full, timeout=300)
    chosen = [line for line in result.stdout.splitlines() if "pybrain-mpi: MPI at" in line]
    return result, (chosen[0] if chosen else "")


def _python_without_mpi(tmp_path: Path) -> str:
    """A Python whose environment holds no MPI (a fresh venv, as an isolated build makes)."""
    target = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    return str(target / "bin" / "python")


@needs_cmake
def test_no_mpi_anywhere_stops_the_build_saying_what_to_install_or_set(tmp_path):
    result, chosen = _configure(tmp_path, {}, python=_python_without_mpi(tmp_path))
    assert result.returncode != 0 and not chosen
    text = " ".join(result.stderr.split())
    for hint in ("no MPI to build the native core against", "pip install mpich", "MPI_HOME=",
                 "MPICC=", "Which MPI the build uses"):
        assert hint in text, result.stderr
    assert "Could NOT find MPI" not in text


@needs_cmake
def test_the_mpi_is_chosen_by_one_rule_in_order(tmp_path):
    venv = str(VENV_BIN.parent)
    assert (VENV_BIN / "mpicc").exists(), "the test environment has PyPI's mpich"
    bare = _python_without_mpi(tmp_path)
    # The Python running the build, only when nothing else names an MPI.
    _, chosen = _configure(tmp_path, {}, python=sys.executable, name="python")
    assert f"MPI at {venv}, chosen by the environment of the Python running the build" in chosen
    # An active virtual environment, whatever Python runs the build (an isolated one).
    _, chosen = _configure(tmp_path, {"VIRTUAL_ENV": venv}, python=bare, name="venv")
    assert f"MPI at {venv}, chosen by the active virtual environment" in chosen, chosen
    # mpicc on PATH beats the Python's environment.
    _, chosen = _configure(tmp_path, {"PATH": f"{VENV_BIN}:{_bare_path(tmp_path)}"}, python=bare, name="path")
    assert f"chosen by mpicc on PATH ({VENV_BIN / 'mpicc'})" in chosen, chosen
    # MPICC beats the active virtual environment; MPI_HOME beats MPICC.
    fake = tmp_path / "fake-mpi"
    (fake / "bin").mkdir(parents=True)
    _, chosen = _configure(tmp_path, {"VIRTUAL_ENV": str(fake), "MPICC": str(VENV_BIN / "mpicc")},
                           python=bare, name="mpicc")
    assert f"MPI at {venv}, chosen by MPICC=" in chosen, chosen
    result, chosen = _configure(tmp_path, {"MPI_HOME": str(fake), "MPICC": str(VENV_BIN / "mpicc")},
                                python=bare, name="home")
    assert f"MPI at {fake}, chosen by MPI_HOME" in chosen and result.returncode != 0
    assert "no MPI C++ compiler wrapper or mpi.h was found there" in " ".join(result.stderr.split())
    # The rule is applied afresh when a build directory is configured again: what FindMPI
    # cached for the earlier choice does not make it stick.
    result, chosen = _configure(tmp_path, {}, python=bare, name="venv")
    assert result.returncode != 0 and not chosen, chosen


def _pbm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "pybrain-mpi"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                     **(env or {})})


def test_info_reports_the_mpi_the_build_chose_and_why(tmp_path):
    import pybrain_mpi

    recorded = json.loads((Path(pybrain_mpi.__file__).parent / "build_info.json").read_text())
    result = _pbm("info", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "MPI chosen at build time" in line)
    assert recorded["mpi_home"] in line and recorded["mpi_rule"] in line, line


def test_bench_lists_and_runs_the_installed_benchmarks_outside_the_checkout(tmp_path):
    import pybrain_mpi

    installed = Path(pybrain_mpi.__file__).resolve().parent / "benchmarks"
    listed = _pbm("bench", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"benchmarks in {installed}" in listed.stdout and "allreduce" in listed.stdout
    assert installed != ROOT / "benchmarks" and "site-packages" in installed.parts, installed
    run = _pbm("bench", "--ranks", "1", "allreduce", "--help", cwd=tmp_path)
    assert run.returncode == 0 and str(installed / "allreduce.py") in run.stdout, run.stderr


_MISMATCH = """
import sys
import pybrain_mpi.core.library as library
library._core.compiled_mpi_vendor = lambda: "Open MPI 4.1"
from pybrain_mpi.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_mpi_mismatch_is_one_line_plus_the_fix_and_v_adds_the_traceback(tmp_path, verbose):
    args = ["info", *(["-v"] if verbose else [])]
    result = subprocess.run([sys.executable, "-c", _MISMATCH, *args], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    ours = [i for i, line in enumerate(lines) if line.startswith("pybrain-mpi: error:")]
    assert len(ours) == 1 and "different MPI libraries" in lines[ours[0]], result.stderr
    assert "core compiled against Open MPI 4.1" in lines[ours[0]]
    assert lines[ours[0] + 1].startswith("fix: ") and ours[0] + 2 == len(lines), result.stderr
    assert ("Traceback (most recent call last)" in result.stderr) == verbose, result.stderr


def test_convert_error_with_v_shows_the_traceback_before_its_one_line(tmp_path):
    quiet = _pbm("convert", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o.zarr"), cwd=tmp_path)
    loud = _pbm("convert", "-v", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o.zarr"),
                cwd=tmp_path)
    for result in (quiet, loud):
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith("pybrain-mpi convert: error:")
    assert len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    assert "Traceback (most recent call last)" in loud.stderr
