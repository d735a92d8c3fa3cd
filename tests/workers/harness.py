"""Shared entry point of the multi-rank test workers.

A worker defines ``mode_<name>(comm, *args)`` functions and ends with
``run_worker(globals())``; ``worker.py MODE ARGS...`` initializes pybrain-mpi, runs that
mode and prints ``OK <mode> rank <r>`` so the test can check every rank got there. An
assertion error ends the rank non-zero (and pbm.init's hook aborts the others).
"""

from __future__ import annotations

import sys

from mpi4py import MPI

import pybrain_mpi as pbm


def run_worker(namespace: dict) -> None:
    mode, *args = sys.argv[1:]
    comm = MPI.COMM_WORLD
    pbm.init()
    namespace[f"mode_{mode}"](comm, *args)
    print(f"OK {mode} rank {comm.Get_rank()}")
