#!/usr/bin/env bash
# Creates ./.venv with everything pybrain-mpi needs and builds its native core.
# Used by README's first command and by .ci/run (one way to install).
#
#   PBM_SYSTEM_MPI=1 ./setup.sh   build against the MPI on PATH (cluster: module load ...)
#                                 instead of PyPI's mpich wheel; see README "On a cluster".
#   PBM_VENV=DIR ./setup.sh       the venv to create or update instead of ./.venv (a path
#                                 relative to this directory, or absolute), with its own CMake
#                                 build directory, e.g. PBM_VENV=.venv-ompi PBM_SYSTEM_MPI=1
#                                 beside the default .venv (CI's Open MPI tests).
#   PBM_MPI4PY_WHEEL=1            with PBM_SYSTEM_MPI=1: mpi4py's binary wheel (it loads the
#                                 system libmpi at run time) instead of compiling mpi4py.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
venv=${PBM_VENV:-.venv}
if [ "$venv" != .venv ]; then
  # The default's build directory (pyproject.toml: build/{wheel_tag}) holds the other venv's
  # MPI; scikit-build-core reads its settings from SKBUILD_* too.
  export SKBUILD_BUILD_DIR="build/{wheel_tag}-$(basename "$venv")"
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# The CPU wheel of torch first: with no torch present, a dependency asking for plain
# "torch" would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
# The build picks its MPI by one rule (README "Which MPI the build uses"); naming it with
# MPICC makes mpi4py and the core use the same one.
if [ "${PBM_SYSTEM_MPI:-0}" = 1 ]; then
  MPICC=${MPICC:-$(command -v mpicc || true)}
  if [ -z "$MPICC" ]; then
    echo "setup.sh: PBM_SYSTEM_MPI=1 but no mpicc on PATH: load your MPI (module load openmpi)" \
         "or set MPICC=/path/to/mpicc" >&2
    exit 1
  fi
  export MPICC
  if [ "${PBM_MPI4PY_WHEEL:-0}" = 1 ]; then
    # mpi4py's binary wheel, which loads the libmpi it finds at run time (MPICH ABI or Open
    # MPI's libmpi.so.40): seconds instead of many minutes of compiling; pybrain_mpi.init()
    # refuses a libmpi other than the core's (MPILibraryMismatch).
    "${pip[@]}" mpi4py
  else
    # mpi4py compiled against the same MPI the core will link to.
    "${pip[@]}" --no-binary=mpi4py mpi4py
  fi
else
  "${pip[@]}" mpich mpi4py
  export MPICC="$(cd "$venv" && pwd)/bin/mpicc"
fi
"${pip[@]}" ".[data,examples,test,tensorboard]"
echo "pybrain-mpi installed in $(cd "$venv" && pwd)"
