"""Allreduce bandwidth and latency: pybrain-mpi's ring vs MPI_Allreduce vs torch gloo.

Run under MPI, one thread per rank:

    mpiexec -n 2 python benchmarks/allreduce.py              # 4 KiB .. 256 MiB
    mpiexec -n 2 python benchmarks/allreduce.py --sizes 4K,64M --impls pbm_ring,mpi

Every implementation runs in the same job on the same inputs (float32 sum, in place). As in a
training step, where backward has just written the gradient buckets, each call reduces a fresh
copy of this rank's gradient-like input (random, heavy-tailed), written before the barrier and
not timed: every row times the allreduce alone. ``--inputs reuse`` instead reduces the same
buffer again and again (the previous result is the next input: zeros stay zeros, and a
buffer that was just reduced may still sit in the cache the next call reads), which is how
this benchmark measured before and what made its zero-copy row exceed the copy floor. After
timing, each exact row's result is checked against a float64 sum of every rank's input
(tolerance from float32's epsilon and the rank count); a wrong result stops the benchmark.
pbm_3lc (3LC, s=1.0) and pbm_bf16 (Cast) are lossy and not checked; their "busbw" is the
effective one, uncompressed bytes / time. For every implementation the bytes this rank sent
per call are measured and turned into the time the same call would take on a 10 Gbit/s link
(bytes / 1.25 GB/s), the bandwidth-bound regime of multi-node runs.
pbm_shm runs the shared-memory node stage on ordinary tensors (copy-in, reduce, copy-out),
pbm_shm_zc on a buffer from pbm.shared_empty (zero-copy: peers' buffers are reduced in
place); both need all ranks on one node. pbm_hier (and pbm_hier_3lc, 3LC between nodes
only) is the hierarchical allreduce: run it with PBM_RANKS_PER_NODE to emulate nodes.
For each size the table shows the median over iterations of the slowest rank's time,
algorithm bandwidth (size / time) and bus bandwidth busbw = algbw * 2(n-1)/n, which
compares across rank counts (NCCL's convention). JSON lines go to --json with fields
impl, size_bytes, ranks, median_s, algbw_gbps, busbw_gbps; a PNG of busbw vs size per
implementation goes to --plot (default: the JSON path with .png).

Inside an emulated cluster (slurm/emulated_cluster.sh run, which sets PBM_EMU_LINK), each
node's first rank also reads its link's kernel byte counters around every implementation, and
the records gain link_tx_bytes_per_call / link_rx_bytes_per_call (one entry per node, nodes
ordered by their lowest rank). benchmarks/cluster_allreduce.py drives that mode.

Memory speed varies on shared machines (this one has measured 14-20 GB/s for a copy), so every
run first times a 64 MiB copy on all ranks at once and reports it: the "copy floor" of a
zero-copy node-stage allreduce is copy GB/s / 2 busbw at 2 ranks (each rank reads N and writes
N bytes), and the table's "zc / floor" column says how close pbm_shm_zc comes to it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (human_bytes, median, parse_size, print_table, time_collective,  # noqa: E402
                    write_json_lines)

DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"
IMPLS = ("pbm_ring", "pbm_mpi", "pbm_small", "pbm_auto", "mpi", "gloo", "pbm_3lc", "pbm_bf16", "pbm_shm", "pbm_shm_zc",
         "pbm_shm_zc_finite", "pbm_hier", "pbm_hier_3lc", "pbm_hier_zc", "pbm_hier_3lc_zc")
DEFAULT_IMPLS = "pbm_ring,pbm_mpi,mpi,gloo"
LINK_10G_BYTES_PER_S = 10e9 / 8
LOSSY = ("pbm_3lc", "pbm_bf16", "pbm_hier_3lc", "pbm_hier_3lc_zc")


def check_result(comm, impl: str, size_bytes: int, gradient, prepare, run, output, reference) -> None:
    """One more call on a fresh input, compared with the float64 sum of every rank's input.

    Each float32 addition of the n inputs rounds once, so the error is at most about
    n * eps32 * (sum of |inputs|) per element; 2x that bound is allowed.
    """
    import numpy as np

    prepare()
    comm.Barrier()
    run()
    result = output.numpy().astype(np.float64)
    magnitude = np.abs(gradient.double().numpy())
    from mpi4py import MPI

    comm.Allreduce(MPI.IN_PLACE, magnitude, op=MPI.SUM)
    n = comm.Get_size()
    bound = 2 * n * np.finfo(np.float32).eps * magnitude + np.finfo(np.float32).tiny
    bad = np.flatnonzero(np.abs(result - reference) > bound)
    worst = comm.allreduce(len(bad), op=MPI.MAX)
    if worst:
        where = int(bad[0]) if len(bad) else -1
        raise SystemExit(f"rank {comm.Get_rank()}: {impl} at {size_bytes} bytes gave a wrong result "
                         f"({len(bad)} elements off, first at {where}); not reporting its speed")


def iterations_for(size_bytes: int) -> int:
    # enough repetitions for a stable median at small sizes, bounded time at large ones
    return int(min(300, max(8, (256 << 20) // max(size_bytes, 1) // 2)))


def link_counters(comm, local_rank: int) -> list[tuple[int, int]] | None:
    """(tx, rx) bytes of each emulated node's link, on rank 0 (None elsewhere or off-cluster).

    Collective. Inside a node's network namespace /sys/class/net shows that namespace's
    devices, so PBM_EMU_LINK names the node's own veth end; one rank per node reads it.
    """
    link = os.environ.get("PBM_EMU_LINK")
    if not link:
        return None
    comm.Barrier()  # every rank has finished the timed calls before any counter is read
    mine = None
    if local_rank == 0:
        stats = Path("/sys/class/net") / link / "statistics"
        mine = (int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text()))
    gathered = comm.gather(mine, root=0)
    return None if gathered is None else [c for c in gathered if c is not None]


def write_plot(path: str, records: list[dict], title: str) -> None:
    """busbw vs size, one line per implementation (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in records):
        points = sorted((r["size_bytes"], r["busbw_gbps"]) for r in records if r["impl"] == impl)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes, float32)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def setup_gloo(comm):
    import torch.distributed as dist

    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size())
    return dist


def concurrent_copy_gbps(comm, megabytes: int = 64, repeats: int = 9) -> float:
    """Median GB/s (read + write) of a numpy copy timed on every rank at the same moment; the
    slowest rank's figure."""
    import numpy as np
    from mpi4py import MPI

    source = np.ones(megabytes << 18, dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return comm.allreduce(2 * source.nbytes / median(times) / 1e9, op=MPI.MIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated sizes in bytes (4K, 16M, ...)")
    parser.add_argument("--impls", default=DEFAULT_IMPLS, help=f"subset of {','.join(IMPLS)}")
    parser.add_argument("--iterations", type=int, default=0, help="fixed iteration count (0: by size)")
    parser.add_argument("--inputs", choices=("gradient", "reuse"), default="gradient",
                        help="gradient: a fresh copy of a gradient-like input before every call "
                             "(what a training step sees); reuse: the previous result (old behaviour)")
    parser.add_argument("--json", default="results/allreduce.jsonl", help="JSON lines output (rank 0)")
    parser.add_argument("--plot", default=None, help="PNG of busbw vs size (default: --json with .png; 'none': off)")
    args = parser.parse_args()

    import torch
    from mpi4py import MPI

    import pybrain_mpi as pbm

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    pbm.init(comm)
    n, rank = comm.Get_size(), comm.Get_rank()
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}")
    dist = setup_gloo(comm) if "gloo" in impls else None

    copy_gbps = concurrent_copy_gbps(comm)
    records = []
    for size_bytes in (parse_size(s) for s in args.sizes.split(",")):
        count = max(1, size_bytes // 4)
        buffer = torch.zeros(count, dtype=torch.float32)
        array = buffer.numpy()
        # This rank's gradient-like input: heavy-tailed like real gradients (3LC's ratio
        # depends on it), different on every rank.
        generator = torch.Generator().manual_seed(rank)
        gradient = torch.randn(count, generator=generator) * torch.rand(count, generator=generator) ** 4
        # pbm_shm_zc: the buffer lives in MPI shared memory (pbm.shared_empty), so the node
        # stage reads peers' buffers in place instead of copying them in.
        shared = None
        if any(impl.endswith("_zc") or impl == "pbm_shm_zc_finite" for impl in impls):
            pbm.shared_reset()
            shared = pbm.shared_empty(count, "float32")
            shared.copy_(gradient) if args.inputs == "gradient" else shared.zero_()
        work = torch.empty_like(gradient)
        if any(impl in impls for impl in ("pbm_3lc", "pbm_bf16", "pbm_hier_3lc", "pbm_hier_3lc_zc")):
            codec = pbm.compression.ThreeLC(1.0)
            state = codec.new_state(gradient)
            hier_state = codec.new_state(gradient)
            cast = pbm.compression.Cast("bf16")
        # Every row restores its input before each call, outside the timing: the compressed
        # rows must (a quantized output would be a far sparser next input), and the others
        # then see what a training step sees, a buffer backward has just written.
        reuse = args.inputs == "reuse"
        restore_buffer = (lambda: None) if reuse else (lambda: buffer.copy_(gradient))
        restore_shared = (lambda: None) if reuse else (lambda: shared.copy_(gradient))
        prepares = {impl: restore_buffer for impl in IMPLS}
        prepares.update({impl: restore_shared for impl in IMPLS if impl.endswith("_zc") or impl == "pbm_shm_zc_finite"})
        prepares.update({
            "pbm_3lc": lambda: work.copy_(gradient),
            "pbm_bf16": lambda: work.copy_(gradient),
            "pbm_hier_3lc": lambda: work.copy_(gradient),
            "pbm_hier_3lc_zc": lambda: shared.copy_(gradient),
        })
        outputs = {impl: buffer for impl in IMPLS}
        outputs.update({impl: shared for impl in prepares if prepares[impl] is restore_shared})
        reference = None
        runs = {
            "pbm_3lc": lambda: pbm.allreduce_(work, compression=codec, state=state),
            "pbm_bf16": lambda: pbm.allreduce_(work, compression=cast),
            "pbm_ring": lambda: pbm.allreduce_(buffer, algorithm="ring"),
            "pbm_mpi": lambda: pbm.allreduce_(buffer, algorithm="mpi"),
            "pbm_shm": lambda: pbm.allreduce_(buffer, algorithm="shm"),
            # the small-message path (one node, at most 64 KiB) and what "auto" picks
            "pbm_small": lambda: pbm.allreduce_(buffer, algorithm="small"),
            "pbm_auto": lambda: pbm.allreduce_(buffer, algorithm="auto"),
            "pbm_shm_zc": lambda: pbm.allreduce_(shared, algorithm="shm"),
            # the same, also reporting whether the result is finite (checked inside the reduce)
            "pbm_shm_zc_finite": lambda: pbm.allreduce_async_(shared, algorithm="shm",
                                                              check_finite=True).wait(),
            "pbm_hier": lambda: pbm.allreduce_(buffer, algorithm="hierarchical"),
            "pbm_hier_3lc": lambda: pbm.allreduce_(work, algorithm="hierarchical",
                                                   compression=codec, state=hier_state),
            # hierarchical on shared buffers (what DDP's buckets are): zero-copy node stages
            "pbm_hier_zc": lambda: pbm.allreduce_(shared, algorithm="hierarchical"),
            "pbm_hier_3lc_zc": lambda: pbm.allreduce_(shared, algorithm="hierarchical",
                                                      compression=codec, state=hier_state),
            "mpi": lambda: comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM),
            "gloo": lambda: dist.all_reduce(buffer),
        }
        iterations = args.iterations or iterations_for(size_bytes)
        for impl in impls:
            sent_before = pbm.bytes_sent()
            links_before = link_counters(comm, pbm.local_rank())
            seconds = median(time_collective(comm, runs[impl], iterations, prepare=prepares.get(impl)))
            if impl not in LOSSY and not reuse:
                if reference is None:
                    reference = gradient.double().numpy().copy()
                    comm.Allreduce(MPI.IN_PLACE, reference, op=MPI.SUM)
                check_result(comm, impl, size_bytes, gradient, prepares[impl], runs[impl],
                             outputs[impl], reference)
            calls = iterations + 2  # time_collective's warm-up calls included
            # gloo and MPI_Allreduce bypass pbm's counters: they move what a ring moves
            sent = ((pbm.bytes_sent() - sent_before) / calls if impl.startswith("pbm")
                    else count * 4 * 2 * (n - 1) / n)
            algbw = count * 4 / seconds / 1e9
            records.append({
                "impl": impl, "size_bytes": count * 4, "ranks": n, "median_s": seconds,
                "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (n - 1) / n, "iterations": iterations,
                "bytes_sent_per_rank": sent, "link_10g_s": sent / LINK_10G_BYTES_PER_S,
                "copy_gbps_concurrent": copy_gbps,
            })
            links_after = link_counters(comm, pbm.local_rank())
            if links_after is not None:
                records[-1].update({
                    "link_tx_bytes_per_call": [(a[0] - b[0]) / calls for a, b in zip(links_after, links_before)],
                    "link_rx_bytes_per_call": [(a[1] - b[1]) / calls for a, b in zip(links_after, links_before)],
                    "nodes": len(links_after), "local_size": pbm.local_size(),
                    "rate": os.environ.get("PBM_EMU_RATE"), "placement": os.environ.get("PBM_EMU_PLACEMENT"),
                })
        buffer = array = shared = None  # free before the next size allocates

    if rank == 0:
        rows = []
        for size in sorted({r["size_bytes"] for r in records}):
            by_impl = {r["impl"]: r for r in records if r["size_bytes"] == size}
            row = {"size": human_bytes(size)}
            for impl in impls:
                row[f"{impl}_us"] = by_impl[impl]["median_s"] * 1e6
                row[f"{impl}_bus"] = by_impl[impl]["busbw_gbps"]
            if "pbm_ring" in by_impl:
                for base in ("mpi", "gloo"):
                    if base in by_impl:
                        row[f"x_{base}"] = by_impl[base]["median_s"] / by_impl["pbm_ring"]["median_s"]
            rows.append(row)
        columns = [("size", "size")]
        for impl in impls:
            columns += [(f"{impl}_us", f"{impl} us"), (f"{impl}_bus", f"{impl} busbw GB/s")]
        columns += [(k, f"ring speedup vs {k[2:]}") for k in ("x_mpi", "x_gloo") if k in rows[0]]
        for impl in ("pbm_3lc", "pbm_bf16", "pbm_hier_3lc", "pbm_hier_3lc_zc"):
            if impl in impls and "pbm_ring" in impls:
                for row in rows:
                    size = next(r["size_bytes"] for r in records if human_bytes(r["size_bytes"]) == row["size"])
                    by_impl = {r["impl"]: r for r in records if r["size_bytes"] == size}
                    row[f"{impl}_vs_ring"] = by_impl[impl]["busbw_gbps"] / by_impl["pbm_ring"]["busbw_gbps"]
                    row[f"{impl}_10g"] = by_impl["pbm_ring"]["link_10g_s"] / by_impl[impl]["link_10g_s"]
                columns += [(f"{impl}_vs_ring", f"{impl} eff. busbw / ring"),
                            (f"{impl}_10g", f"{impl} speedup on 10 Gbit/s")]
        if "pbm_shm_zc" in impls and n == 2:
            for row in rows:
                row["zc_floor"] = row["pbm_shm_zc_bus"] / (copy_gbps / 2)
            columns.append(("zc_floor", "zc / copy floor"))
        print(f"float32 sum allreduce, {n} ranks, {os.environ.get('OMP_NUM_THREADS', '?')} thread(s)/rank; "
              "median of slowest-rank times")
        print(f"memory copy, all ranks at once: {copy_gbps:.1f} GB/s per rank (read + write counted)")
        print_table(rows, columns)
        write_json_lines(args.json, records)
        print(f"wrote {args.json}")
        plot = args.plot or str(Path(args.json).with_suffix(".png"))
        if plot != "none":
            write_plot(plot, records, f"float32 sum allreduce, {n} ranks")
            print(f"wrote {plot}")
    if dist is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
