"""Single-copy (CMA) transfer speed between two ranks: the ceiling of any point-to-point ring.

    mpiexec -n 2 python benchmarks/cma_copy.py [--mib 64] [--repeats 5]

MPICH moves large point-to-point messages between processes of one node with one copy by the
kernel (cross-memory attach, process_vm_readv). A 2-rank ring allreduce of N bytes has to move
N/2 into each rank twice (reduce-scatter, then allgather), so this copy speed bounds the
ring's busbw, whatever the ring does: busbw <= N / (2 * (N/2) / speed) = speed, before any
reduce. Both ranks copy at once, as in the ring. Measured per rank, in pieces of 256 KiB to
the whole buffer:
  pull        process_vm_readv from the peer's buffer into ours (what MPICH's CMA does)
  pull_l2     the same into one reused piece-sized buffer (stays in L2: the best case for a
              receive that is reduced at once)
  push_l2     process_vm_writev from a reused piece-sized buffer into the peer's buffer
and, for scale, a memcpy (numpy copyto) of the same size within each rank, in the same run.
Prints a table and writes JSON lines (results/cma_copy.jsonl). Linux only; needs permission to
read a peer's memory (same user; ptrace scope that allows it), like MPICH's own CMA.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json_lines  # noqa: E402


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def main() -> None:
    from mpi4py import MPI

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="buffer size per rank")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="results/cma_copy.jsonl")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("cma_copy.py runs on exactly 2 ranks: mpiexec -n 2 python benchmarks/cma_copy.py")
    libc = ctypes.CDLL(None, use_errno=True)
    rank, total = comm.rank, args.mib * 2**20
    ours = np.full(total // 4, rank + 1, np.float32)
    copy_target = np.empty_like(ours)
    copy_target.fill(0)
    peer_pid, peer_address = comm.allgather((os.getpid(), ours.ctypes.data))[1 - rank]

    def transfer(mode: str, piece: int, scratch: np.ndarray) -> None:
        for offset in range(0, total, piece):
            length = min(piece, total - offset)
            if mode == "pull":
                local = _IoVec(copy_target.ctypes.data + offset, length)
            else:
                local = _IoVec(scratch.ctypes.data, length)
            remote = _IoVec(peer_address + offset, length)
            call = libc.process_vm_writev if mode == "push_l2" else libc.process_vm_readv
            if call(peer_pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != length:
                error = ctypes.get_errno()
                raise OSError(error, f"rank {rank}: {call.__name__} from pid {peer_pid} failed: "
                                     f"{os.strerror(error)} (cross-memory attach not permitted?)")

    records = []
    pieces = [256 * 1024, 1 << 20, 4 << 20, total]
    for piece in pieces:
        scratch = np.zeros(piece // 4, np.float32)
        for mode in ("pull", "pull_l2", "push_l2"):
            times = []
            for _ in range(args.repeats):
                comm.Barrier()
                start = time.perf_counter()
                transfer(mode, piece, scratch)
                times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
            records.append({"impl": mode, "piece_bytes": piece, "size_bytes": total,
                            "median_s": statistics.median(times), "gbps_per_rank": total / statistics.median(times) / 1e9})
    times = []
    for _ in range(args.repeats):
        comm.Barrier()
        start = time.perf_counter()
        np.copyto(copy_target, ours)
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    memcpy = total / statistics.median(times) / 1e9
    records.append({"impl": "memcpy", "piece_bytes": total, "size_bytes": total,
                    "median_s": statistics.median(times), "gbps_per_rank": memcpy})
    if rank == 0:
        rows = []
        for piece in pieces:
            row = {"piece": f"{piece // 1024} KiB" if piece < 2**20 else f"{piece // 2**20} MiB"}
            for r in records:
                if r["piece_bytes"] == piece and r["impl"] != "memcpy":
                    row[r["impl"]] = r["gbps_per_rank"]
            rows.append(row)
        print(f"2 ranks copying at once, {args.mib} MiB per rank, GB/s per rank (bytes moved / time); "
              f"memcpy within a rank: {memcpy:.2f} GB/s")
        print_table(rows, [("piece", "piece"), ("pull", "pull (CMA read)"), ("pull_l2", "pull into L2 piece"),
                           ("push_l2", "push from L2 piece")])
        write_json_lines(args.json, records)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
