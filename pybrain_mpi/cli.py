"""The ``pybrain-mpi`` command line."""

from __future__ import annotations

import argparse
import sys


def _info(_args: argparse.Namespace) -> int:
    import platform

    import numpy
    import torch

    from . import __version__
    from ._native import _core

    print(f"pybrain-mpi {__version__}")
    print(f"python {platform.python_version()}, numpy {numpy.__version__}, torch {torch.__version__}")
    print(f"native core compiled against: {_core.compiled_mpi_vendor()}")
    print(f"MPI library loaded: {_core.mpi_library_version().strip().splitlines()[0]}")
    try:
        import mpi4py

        print(f"mpi4py {mpi4py.__version__}")
    except ImportError:
        print("mpi4py: not installed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pybrain-mpi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, MPI library and build of the native core")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
