"""Worker: runs ``pybrain-mpi`` (the real CLI entry point) with the given arguments on each rank."""

import sys

from pybrain_mpi.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
