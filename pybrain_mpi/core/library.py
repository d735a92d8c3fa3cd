"""Loads the compiled core (``pybrain_mpi._core``) and checks it runs against the MPI it was
built for. Only :mod:`pybrain_mpi.core` modules and the package's thin wrappers import it."""

from __future__ import annotations

from ..errors import MPILibraryMismatch

try:
    from .. import _core  # noqa: F401  (re-exported)
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    from pathlib import Path

    _package = Path(__file__).resolve().parent.parent
    if not any(_package.glob("_core*.so")) and "cannot import name" in str(error):
        # The source checkout shadows the installed package (python -m ... or cwd on
        # sys.path): the compiled core only exists in the installed copy.
        raise ImportError(
            f"pybrain_mpi was imported from {_package}, which has no compiled native core. "
            "This is usually the source checkout shadowing the installed package (the "
            "current directory is on sys.path, e.g. with `python -m`). Run the console "
            "script (`pybrain-mpi ...`), run from another directory, or install in place "
            "with `pip install -e .`."
        ) from error
    raise MPILibraryMismatch(
        "pybrain_mpi's native core (pybrain_mpi._core) failed to load: "
        f"{error} (usually the MPI library it was compiled against is not the one available "
        "now: another `module load`, a removed `mpich` wheel, or a build made for another "
        "environment)\nfix: rebuild in this environment: `pip install --force-reinstall "
        "--no-deps --no-build-isolation .` (see README, 'On a cluster')."
    ) from error


def _family(version_text: str) -> str:
    text = version_text.lower()
    for family in ("open mpi", "intel", "mvapich", "mpich"):
        if family in text:
            return family
    return text.split()[0] if text.split() else "unknown"


def check_mpi_library(mpi4py_library_version: str) -> None:
    """Raises MPILibraryMismatch unless mpi4py and the core use the same MPI library.

    Two different MPI libraries in one process crash in obscure ways (or deadlock), so
    this is checked at ``pybrain_mpi.init()``, before any communicator is handed over.
    """
    compiled = _core.compiled_mpi_vendor()
    linked = _core.mpi_library_version()
    if linked.strip() != mpi4py_library_version.strip() or _family(compiled) != _family(linked):
        raise MPILibraryMismatch(
            "pybrain_mpi's native core and mpi4py use different MPI libraries (core compiled "
            f"against {compiled.strip()}, linked to {linked.strip().splitlines()[0]}; mpi4py uses "
            f"{mpi4py_library_version.strip().splitlines()[0]})\n"
            "fix: build both against the same MPI: with PyPI's mpich use `pip install mpich mpi4py` "
            "then reinstall pybrain-mpi; on a cluster build mpi4py and pybrain-mpi with the "
            "system MPI loaded (README, 'On a cluster')."
        )
