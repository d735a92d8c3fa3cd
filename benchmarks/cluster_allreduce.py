"""Allreduce on an emulated multi-node cluster: bytes per link and time at 1 and 10 Gbit/s.

Run as root (it creates network namespaces), NOT under mpiexec: it brings up
slurm/emulated_cluster.sh with --nodes namespaces whose links are shaped to each --rates
value, runs benchmarks/allreduce.py inside it with --ppn ranks per node for each
--placements value, and tears the cluster down again (also on errors and Ctrl-C):

    sudo .venv/bin/python benchmarks/cluster_allreduce.py                 # 2x2, 1+10 Gbit/s
    sudo .venv/bin/python benchmarks/cluster_allreduce.py --rates 1gbit --sizes 64M \\
        --placements cyclic --impls pbm_ring,mpi

Placement matters for the flat ring. block (ranks 0,1 on node 0; 2,3 on node 1): of the
ring's n hops only one per node leaves the node, so each link carries 2(n-1)/n * S per
call, as much as one rank sends. cyclic (ranks 0,2 on node 0): every hop crosses, so each
link carries ppn times that. A hierarchical allreduce sends 2(N-1)/N * S per link
(N nodes) whatever the placement: with 2x2 that is 1.5x fewer bytes than the block ring and
3x fewer than the cyclic ring. MPICH's MPI_Allreduce is node-aware already (it reduces inside
the node first), which the measured link bytes show.

Every record of allreduce.py gains rate, placement, nodes, ppn, link_tx_bytes_per_call (per
node) and the theoretical per-link bytes of the ring and hierarchical schemes; the table shows
time, busbw, MB per link per call and ratios vs the flat ring of the same run. The links
have no added latency (this kernel has no netem); the measured round trip is stored.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from allreduce import IMPLS, write_plot  # noqa: E402
from common import human_bytes, plot_panels, print_table, write_json_lines  # noqa: E402

SCRIPT = HERE.parent / "slurm" / "emulated_cluster.sh"
# Implementations measured by default; the hierarchical ones join automatically once
# allreduce.py registers them (they are called pbm.allreduce_(x, algorithm="hierarchical")
# and the same with compression=ThreeLC(s), state=...).
BASE_IMPLS = ("pbm_ring", "mpi", "pbm_3lc")
HIERARCHICAL_IMPLS = ("pbm_hier", "pbm_hier_3lc", "pbm_hier_zc", "pbm_hier_3lc_zc")
DEFAULT_IMPLS = ",".join(BASE_IMPLS + tuple(i for i in HIERARCHICAL_IMPLS if i in IMPLS))


def cluster(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    """Runs slurm/emulated_cluster.sh with args (its probe uses this Python)."""
    if not SCRIPT.exists():
        sys.exit(f"cluster_allreduce.py drives {SCRIPT.relative_to(HERE.parent)}, which only the "
                 "source checkout has: run it there (pybrain-mpi bench --dir "
                 "CHECKOUT/benchmarks cluster_allreduce)")
    return subprocess.run(["bash", str(SCRIPT), *args], check=check, text=True,
                          capture_output=capture, env=dict(os.environ, PYTHON=sys.executable))


def refuse_unless_root_outside_mpiexec(parser: argparse.ArgumentParser) -> None:
    """The emulated-cluster benchmarks create network namespaces and start mpiexec themselves."""
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces (run with sudo)")
    if "PMI_RANK" in os.environ or "PMI_FD" in os.environ:
        parser.error("run this directly, not under mpiexec: it starts mpiexec itself")


def theory_link_bytes(size: int, nodes: int, ppn: int, placement: str) -> dict:
    """Bytes one node's link carries out per call for the flat ring and the hierarchical scheme."""
    n = nodes * ppn
    per_rank = 2 * (n - 1) / n * size
    crossing = 1 if placement == "block" else ppn  # ring hops that leave a node
    return {"ring": per_rank * crossing if nodes > 1 else 0.0,
            "hierarchical": 2 * (nodes - 1) / nodes * size}


def probe() -> dict:
    """Round trip and TCP throughput node0 -> node1 as reported by the script."""
    out = cluster("probe", "1", capture=True).stdout
    rtt = re.search(r"median of \d+\): (\d+) us", out)
    gbit = re.search(r"throughput node0->node1: ([\d.]+) Gbit/s", out)
    return {"rtt_us": float(rtt.group(1)) if rtt else None,
            "tcp_gbps": float(gbit.group(1)) if gbit else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ppn", type=int, default=2, help="ranks per node")
    parser.add_argument("--rates", default="1gbit,10gbit", help="comma-separated tc rates of every link")
    parser.add_argument("--placements", default="block,cyclic", help="block and/or cyclic")
    parser.add_argument("--sizes", default="4M,16M,64M")
    parser.add_argument("--impls", default=DEFAULT_IMPLS, help=f"subset of {','.join(IMPLS)}")
    parser.add_argument("--iterations", type=int, default=4, help="timed calls per size (plus 2 warm-up)")
    parser.add_argument("--netmod", default="ucx", choices=("ucx", "ofi"))
    parser.add_argument("--json", default="results/cluster_allreduce.jsonl")
    parser.add_argument("--plot", default=None, help="PNG (default: --json with .png)")
    args = parser.parse_args()
    refuse_unless_root_outside_mpiexec(parser)

    python = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1")
    records = []
    try:
        for rate in args.rates.split(","):
            cluster("up", str(args.nodes), rate)
            link = probe() if args.nodes > 1 else {}
            print(f"{rate}: {link}", flush=True)
            for placement in args.placements.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "run.jsonl"
                    subprocess.run(
                        ["bash", str(SCRIPT), "run", "--ppn", str(args.ppn), "--placement", placement,
                         "--netmod", args.netmod, "--", "-n", str(args.nodes * args.ppn), python,
                         str(HERE / "allreduce.py"), "--sizes", args.sizes, "--impls", args.impls,
                         "--iterations", str(args.iterations), "--json", str(out), "--plot", "none"],
                        check=True, env=env)
                    for line in out.read_text().splitlines():
                        record = json.loads(line)
                        record.update(link, ppn=args.ppn, netmod=args.netmod,
                                      theory_link_bytes=theory_link_bytes(record["size_bytes"], args.nodes,
                                                                          args.ppn, placement))
                        records.append(record)
    finally:
        cluster("down", check=False)

    rows = []
    for record in records:
        ring = next(r for r in records if r["impl"] == "pbm_ring" and r["rate"] == record["rate"]
                    and r["placement"] == record["placement"] and r["size_bytes"] == record["size_bytes"])
        link_bytes = max(record["link_tx_bytes_per_call"])
        record["speedup_vs_ring"] = ring["median_s"] / record["median_s"]
        record["link_bytes_vs_ring"] = max(ring["link_tx_bytes_per_call"]) / link_bytes
        rows.append({"rate": record["rate"], "placement": record["placement"],
                     "size": human_bytes(record["size_bytes"]), "impl": record["impl"],
                     "ms": record["median_s"] * 1e3, "busbw": record["busbw_gbps"],
                     "link_mb": link_bytes / 1e6, "ring_theory_mb": record["theory_link_bytes"]["ring"] / 1e6,
                     "hier_theory_mb": record["theory_link_bytes"]["hierarchical"] / 1e6,
                     "x_ring": record["speedup_vs_ring"], "bytes_x_ring": record["link_bytes_vs_ring"]})
    print(f"\nfloat32 sum allreduce, emulated {args.nodes} nodes x {args.ppn} ranks, links shaped both ways, "
          f"no added latency; median of slowest-rank times over {args.iterations} calls")
    print_table(rows, [("rate", "rate"), ("placement", "placement"), ("size", "size"), ("impl", "impl"),
                       ("ms", "ms"), ("busbw", "busbw GB/s"), ("link_mb", "MB/link/call"),
                       ("ring_theory_mb", "ring theory MB"), ("hier_theory_mb", "hier theory MB"),
                       ("x_ring", "speedup vs ring"), ("bytes_x_ring", "ring bytes / these")])
    write_json_lines(args.json, records)
    print(f"wrote {args.json}")
    plot = args.plot or str(Path(args.json).with_suffix(".png"))
    write_cluster_plot(plot, records, args)
    print(f"wrote {plot}")


def write_cluster_plot(path: str, records: list[dict], args) -> None:
    """One panel per (rate, placement): busbw vs size per implementation."""
    panels = list(dict.fromkeys((r["rate"], r["placement"]) for r in records))
    if len(panels) == 1:
        write_plot(path, records, f"{args.nodes}x{args.ppn} emulated, {panels[0][0]}, {panels[0][1]}")
        return
    plot_panels(path, [(f"{args.nodes} nodes x {args.ppn} ranks, {rate}, {placement}",
                        {impl: sorted((r["size_bytes"], r["busbw_gbps"]) for r in records
                                      if r["rate"] == rate and r["placement"] == placement
                                      and r["impl"] == impl)
                         for impl in dict.fromkeys(r["impl"] for r in records
                                                   if r["rate"] == rate and r["placement"] == placement)})
                       for rate, placement in panels],
                xlabel="message size (bytes, float32)", ylabel="busbw (GB/s)", xlog=True, ylog=True)


if __name__ == "__main__":
    main()
