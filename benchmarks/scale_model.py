"""Scale model: per-step cost of data-parallel training, fitted here, projected to 1024 nodes.

    python benchmarks/scale_model.py                       # fit + validate + project from results/scale/
                                                           # (or, without it, docs/data/scale_model/)
    python benchmarks/scale_model.py --measure             # measure fresh first (cluster part needs root)
    python benchmarks/scale_model.py --measure --skip-cluster
    python benchmarks/scale_model.py --fit-rates 10gbit    # leave-one-out: network fitted on 10 Gbit/s only

What it does
------------
1. Measures (``--measure``; otherwise it loads the JSON the benchmarks wrote earlier into
   ``--data``, so a re-fit costs nothing): ``benchmarks/allreduce.py`` on 2 and 4 ranks of this
   machine (ring, shm node stage, flat 3LC, MPI_Allreduce), the 3LC codec's single-core
   throughput and real-gradient ratio (functions of ``benchmarks/compression.py``), training
   step compute (``benchmarks/training.py``, DCA and NaiveCNN3D, 1 and 2 ranks) and, as root,
   the emulated 2-node x 2-rank cluster with tc-shaped links (``benchmarks/cluster_allreduce.py``
   driving ``slurm/emulated_cluster.sh``, its own namespace prefix and subnet).
2. Fits the parameters below by non-negative least squares on *relative* error (every
   measurement weighs the same whatever its size).
3. Validates: predicts configurations that were left out of each fit (4 ranks from 2-rank
   fits; cyclic placement, hierarchical and hierarchical+3LC from the block ring; 1 Gbit/s from
   10 Gbit/s with ``--fit-rates 10gbit``; 3LC allreduce time from the codec's single-core
   throughput; a 2-rank DDP step from compute + the allreduce model) and prints
   predicted / measured.
4. Projects the weak-scaling efficiency E(N) = T_step(1 node) / T_step(N nodes) for 1..1024
   nodes at 10/25/100 Gbit/s for the example models with the flat ring, hierarchical and
   hierarchical+3LC allreduce; writes a table (markdown + JSON) and a PNG.

The model (per rank, one allreduce of S bytes; N nodes, p ranks per node, n = N p)
-------------------------------------------------------------------------------------
  over            = max(1, ranks on the host / host cores): time-sharing factor (2 cores here;
                    a projected node has one core per rank, over = 1)
  local ring      = over * [2(n-1) a_loc + 2(n-1)/n S b_loc]               (one node)
  node stage      = over * [a_shm + 2(p-1)/p S b_shm]                      (0 when p = 1)
  wire            = 8 / (eta R)              s per byte on a link; R in bit/s, eta: TCP payload
                                              share of the rate (the emulator's probe)
  flat ring       = 2(n-1) a_net + 2(n-1)/n S max(c wire, over b_loc + h)            (N > 1)
                    c = ring hops per node that leave it: 1 for block placement, p for cyclic;
                    a step lasts as long as the slower of the link (c ranks' S/n) and the
                    rank's own work on its S/n: receive-and-reduce plus h, the network stack's
                    CPU per byte sent (fitted; it overlaps the wire, hence max, not sum)
  hierarchical    = node stage + 2(N-1) a_net + 2(N-1)/N S max(wire, (over b_loc + h) / p)
                    (p slice rings of N nodes share each link: per link 2(N-1)/N S in total)
  hier + 3LC      = node stage + over * (S/p) [e + (N-1)/N d_add + d]      (codec, one slice)
                    + 2 a_net + 2(N-1) a_loc                               (direct exchange: two
                      rounds of N-1 messages posted at once, a_loc software cost per message)
                    + 2(N-1)/N (S / r) max(wire, h / p)                    (r: 3LC ratio)
  flat 3LC, 1 node= over * S [e + (n-1)/n d_add + d] + 2(n-1) a_loc + 2(n-1)/n (S/r) b_loc
  step            = t_sample * batch_per_rank + sum over DDP buckets of allreduce(bucket)
                    buckets as pbm's DDP: first 1 MiB, then 25 MiB each

Fitted parameters and where from: a_loc, b_loc (pbm_ring, 2 ranks); a_shm, b_shm (pbm_shm,
2 ranks); e, d, d_add (encode / decode / decode-add per float32 byte at the largest measured
size, real fMRI gradients: thread CPU time for projections, wall time on this shared machine
for validation); r (3LC ratio at s = 1.0 on nitime fMRI gradients for projections; for
validation on the emulated cluster the ratio its links showed in the same run); a_net, h (flat
ring, block placement, emulated cluster, the ``--fit-rates`` rates); eta (TCP throughput the
emulator's probe measured at the lowest rate / that rate); t_sample (pbm_nosync step time /
batch, 2 ranks on this 2-core machine, i.e. a full node). ``--compare DIR`` predicts another
measurement set with the same fit (run-to-run and size leave-one-out checks).

Assumptions (say them with every figure)
----------------------------------------
- No overlap of communication with backward (pbm's DDP can overlap; the model is an upper
  bound on exposed communication), no stragglers, no I/O, identical nodes.
- A projected node is like this machine: 2 cores, one rank per core (--ppn, default 2),
  compute per rank as measured here with both cores busy. Faster or bigger nodes compute
  more per step, so communication weighs relatively *more* on them: --compute-speedup X
  divides compute by X (the default run adds a row with X = 16).
- Links: full-duplex, non-blocking switch (no oversubscription of the fabric, no congestion),
  payload efficiency eta as measured on the emulated links. Fixed costs in projections
  (--latency probe, default): a_loc = a_shm = a_net = the 1-byte TCP round trip between
  emulated nodes (about 10-20 us, the low end of real 10/25 GbE; the emulator has no netem).
  The fitted ones are scheduler time slices of a shared 2-core machine (0.2-0.9 ms);
  --latency fitted keeps them. Projections use h = 0 by default (the emulated cluster runs both
  nodes' TCP stacks on the same 2 cores, which a real cluster does not; RDMA-style NICs cost
  almost no host CPU); --host-cost measured keeps the fitted h.
- Local per-byte costs (b_loc, b_shm) are as measured, i.e. under the machine's load at the
  time: several times the quiet-machine figures, so fast-link projections are pessimistic.
- 3LC's ratio is that of real fMRI gradients at s = 1.0 (it depends on the data), constant
  across nodes; codec time per byte is the single-core one measured here.
- NaiveCNN3D at full resolution (176^3, 527M parameters): compute is the 64^3 measurement
  scaled by the voxel count, an extrapolation.
- Weak scaling: batch per rank fixed, so T_step(1 node) is compute + node stage of one node.

Published figures shown beside the projection (docs/scale_model.md, ../shared/REFERENCE.md):
Horovod on CPU clusters, about 47% weak-scaling efficiency at 16 machines; the distributed
fMRI autoencoder (Downpour SGD, parameter server on Spark) stopped scaling past 13 workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MiB = 1 << 20
COMMITTED_DATA = HERE.parent / "docs" / "data" / "scale_model"   # the figures docs/scale_model.md cites
FIRST_BUCKET_BYTES = 1 * MiB   # pbm.DistributedDataParallel defaults
BUCKET_BYTES = 25 * MiB
RATES_GBIT = (10, 25, 100)
NODE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ALGORITHMS = ("ring", "hierarchical", "hierarchical_3lc")
# Published weak-scaling figures shown beside the projection (see the module docstring).
PUBLISHED = [
    {"system": "Horovod on CPU", "nodes": 16, "efficiency": 0.47},
    {"system": "distributed fMRI autoencoder (Downpour SGD, parameter server)", "nodes": 13,
     "efficiency": None, "note": "stopped scaling past 13 workers"},
]


# --- the model ------------------------------------------------------------------------------

@dataclass
class Params:
    """Fitted per-step cost parameters (seconds, bytes); see the module docstring."""

    a_loc: float = 5e-6          # s per on-node ring hop / per posted message
    b_loc: float = 2.5e-10       # s per byte per on-node ring step
    a_shm: float = 1e-5          # s, node stage fixed cost
    b_shm: float = 2e-10         # s per byte of 2(p-1)/p S in the node stage
    a_net: float = 2e-5          # s per inter-node hop
    eta: float = 0.93            # payload share of the nominal link rate
    h: float = 0.0               # s per byte, host CPU cost of crossing the network stack
    e: float = 1e-9              # 3LC encode, s per float32 input byte
    d: float = 5e-10             # 3LC decode
    d_add: float = 6e-10         # 3LC decode-add
    ratio: float = 100.0         # 3LC compression ratio (float32 bytes / message bytes)
    codec_wall: dict = field(default_factory=dict)  # e, d, d_add on wall time (same shared machine)
    cores: int = 2               # host cores the fitted configurations ran on
    rtt_s: float = 2e-5          # 1-byte TCP round trip between emulated nodes (probe)
    t_sample: dict = field(default_factory=dict)   # model -> compute s per sample per rank


@dataclass
class Layout:
    """Where the ranks are: N nodes x p ranks, a link rate, placement, and the host's cores."""

    nodes: int
    ppn: int
    rate_bps: float = 10e9
    placement: str = "block"
    host_ranks: int | None = None   # ranks sharing the host's cores (None: one node = ppn)
    host_cores: int | None = None   # None: one core per rank (a projected node)

    @property
    def ranks(self) -> int:
        return self.nodes * self.ppn

    def oversubscription(self) -> float:
        ranks = self.host_ranks if self.host_ranks is not None else self.ppn
        cores = self.host_cores if self.host_cores is not None else ranks
        return max(1.0, ranks / cores)


def wire_s_per_byte(p: Params, layout: Layout) -> float:
    """Seconds per payload byte on one node's link at its nominal rate."""
    return 8.0 / (p.eta * layout.rate_bps)


def local_ring_s(p: Params, size: float, layout: Layout) -> float:
    """Flat ring on one node (through MPI's shared-memory channel)."""
    n = layout.ranks
    if n == 1:
        return 0.0
    return layout.oversubscription() * (2 * (n - 1) * p.a_loc + 2 * (n - 1) / n * size * p.b_loc)


def node_stage_s(p: Params, size: float, layout: Layout) -> float:
    """Shared-memory node stage (reduce-scatter + allgather among the ppn ranks of a node)."""
    k = layout.ppn
    if k == 1:
        return 0.0
    return layout.oversubscription() * (p.a_shm + 2 * (k - 1) / k * size * p.b_shm)


def ring_s(p: Params, size: float, layout: Layout) -> float:
    """Flat ring over all N p ranks; on several nodes every step waits for the link hop."""
    if layout.nodes == 1:
        return local_ring_s(p, size, layout)
    n = layout.ranks
    crossing = 1 if layout.placement == "block" else layout.ppn
    # every step each rank also receives and reduces S/n on its own core: the step lasts as long
    # as the slower of the link hop and that local work
    # The network stack's CPU work (h per byte a rank sends) overlaps the wire, so a step
    # lasts as long as the slower of the link (carrying `crossing` ranks' S/n) and the rank's own
    # work on its S/n (receive-and-reduce b_loc plus h): a max, not a sum. On the emulated links
    # 16 MiB took the same time at 1 and 10 Gbit/s and for block and cyclic placement at
    # 10 Gbit/s (host-bound), which a sum or a per-link host cost cannot reproduce.
    per_byte = max(crossing * wire_s_per_byte(p, layout), layout.oversubscription() * p.b_loc + p.h)
    return 2 * (n - 1) * p.a_net + 2 * (n - 1) / n * size * per_byte


def hierarchical_s(p: Params, size: float, layout: Layout) -> float:
    """Node stage, then ppn slice rings of N nodes sharing each link."""
    t = node_stage_s(p, size, layout)
    big_n = layout.nodes
    if big_n > 1:
        # per step the link carries S/N (all ppn slices), each rank reduces S/(ppn N) itself
        per_byte = max(wire_s_per_byte(p, layout), (layout.oversubscription() * p.b_loc + p.h) / layout.ppn)
        t += 2 * (big_n - 1) * p.a_net + 2 * (big_n - 1) / big_n * size * per_byte
    return t


def codec_s(p: Params, size: float, members: int) -> float:
    """3LC two-stage exchange codec work of one rank for a slice of `size` bytes, `members`-way."""
    return size * (p.e + (members - 1) / members * p.d_add + p.d)


def hierarchical_3lc_s(p: Params, size: float, layout: Layout) -> float:
    """Node stage, then each node slice through 3LC's compressed two-stage exchange."""
    t = node_stage_s(p, size, layout)
    big_n = layout.nodes
    if big_n > 1:
        t += layout.oversubscription() * codec_s(p, size / layout.ppn, big_n)
        t += 2 * p.a_net + 2 * (big_n - 1) * p.a_loc
        t += 2 * (big_n - 1) / big_n * size / p.ratio * max(wire_s_per_byte(p, layout), p.h / layout.ppn)
    return t


def flat_3lc_local_s(p: Params, size: float, layout: Layout) -> float:
    """Flat 3LC allreduce on one node (pbm_3lc of benchmarks/allreduce.py)."""
    n = layout.ranks
    return (layout.oversubscription() * codec_s(p, size, n) + 2 * (n - 1) * p.a_loc
            + 2 * (n - 1) / n * size / p.ratio * p.b_loc)


ALLREDUCE = {"ring": ring_s, "hierarchical": hierarchical_s, "hierarchical_3lc": hierarchical_3lc_s}


def buckets(parameter_bytes: int) -> list[int]:
    """DDP bucket sizes for a gradient of parameter_bytes (first 1 MiB, then 25 MiB each)."""
    if parameter_bytes <= FIRST_BUCKET_BYTES:
        return [parameter_bytes]
    rest = parameter_bytes - FIRST_BUCKET_BYTES
    full, tail = divmod(rest, BUCKET_BYTES)
    return [FIRST_BUCKET_BYTES] + [BUCKET_BYTES] * full + ([tail] if tail else [])


def step_s(p: Params, model: dict, algorithm: str, layout: Layout) -> float:
    """Per-step time of one rank: compute plus every bucket's allreduce (no overlap)."""
    compute = p.t_sample[model["name"]] * model["batch_per_rank"]
    comm = sum(ALLREDUCE[algorithm](p, b, layout) for b in buckets(4 * model["params"]))
    return compute + comm


def weak_scaling_efficiency(p: Params, model: dict, algorithm: str, layout: Layout) -> float:
    """T_step(1 node, node stage only) / T_step(N nodes); batch per rank fixed."""
    one = replace(layout, nodes=1)
    return step_s(p, model, "hierarchical", one) / step_s(p, model, algorithm, layout)


# --- fitting --------------------------------------------------------------------------------

def nnls_relative(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Non-negative w minimising sum(((features @ w) - t) / t)^2 (every point weighs the same)."""
    from scipy.optimize import nnls

    a = features / times[:, None]
    w, _ = nnls(a, np.ones(len(times)))
    return w


def fit_local(records: list[dict], cores: int) -> tuple[float, float]:
    """a_loc, b_loc from pbm_ring on one node."""
    rows, times = [], []
    for r in records:
        n, s = r["ranks"], r["size_bytes"]
        over = max(1.0, n / cores)
        rows.append([over * 2 * (n - 1), over * 2 * (n - 1) / n * s])
        times.append(r["median_s"])
    a, b = nnls_relative(np.array(rows, float), np.array(times, float))
    return float(a), float(b)


def fit_shm(records: list[dict], cores: int) -> tuple[float, float]:
    """a_shm, b_shm from the shared-memory allreduce on one node."""
    rows, times = [], []
    for r in records:
        n, s = r["ranks"], r["size_bytes"]
        over = max(1.0, n / cores)
        rows.append([over, over * 2 * (n - 1) / n * s])
        times.append(r["median_s"])
    a, b = nnls_relative(np.array(rows, float), np.array(times, float))
    return float(a), float(b)


def cluster_layout(r: dict, cores: int) -> Layout:
    """Layout of one emulated-cluster record (every rank shares the host's cores)."""
    return Layout(nodes=r["nodes"], ppn=r["ppn"], rate_bps=parse_rate(r["rate"]),
                  placement=r["placement"], host_ranks=r["nodes"] * r["ppn"], host_cores=cores)


def fit_network(records: list[dict], p: Params) -> tuple[float, float]:
    """a_net, h from flat-ring records on the emulated cluster; eta (probe) and b_loc are given.

    t = 2(n-1) a_net + 2(n-1)/n S max(c wire, over b_loc + h): linear in a_net for a given h,
    so h is searched (log grid, then bounded Brent on log h) with a_net solved in closed form for
    each h, all on relative error. An h that leaves every record wire-bound is unidentifiable:
    then 0 is kept when it fits as well.
    """
    from scipy.optimize import minimize_scalar

    hops, rank_bytes, wire, cpu, times = [], [], [], [], []
    for r in records:
        layout = cluster_layout(r, p.cores)
        n = layout.ranks
        crossing = 1 if layout.placement == "block" else layout.ppn
        hops.append(2 * (n - 1))
        rank_bytes.append(2 * (n - 1) / n * r["size_bytes"])
        wire.append(crossing * wire_s_per_byte(p, layout))
        cpu.append(layout.oversubscription() * p.b_loc)
        times.append(r["median_s"])
    hops, rank_bytes, wire, cpu, times = (np.array(x, float) for x in (hops, rank_bytes, wire, cpu, times))

    def solve(h: float) -> tuple[float, float]:
        rest = times - rank_bytes * np.maximum(wire, cpu + h)
        x, y = hops / times, rest / times
        a = max(0.0, float(x @ y / (x @ x)))
        return a, float(np.sum((a * x - y) ** 2))

    grid = np.concatenate([[0.0], np.logspace(-12, -6, 601)])
    errors = [solve(h)[1] for h in grid]
    best = int(np.argmin(errors))
    h = float(grid[best])
    if 0 < best < len(grid) - 1:
        lo = math.log(grid[best - 1]) if best > 1 else math.log(grid[1]) - 1
        refined = minimize_scalar(lambda lh: solve(math.exp(lh))[1], bounds=(lo, math.log(grid[best + 1])),
                                  method="bounded", options={"xatol": 1e-12})
        if refined.fun <= errors[best]:
            h = math.exp(refined.x)
    if np.all(cpu + h <= wire) and solve(0.0)[1] <= solve(h)[1] * (1 + 1e-9):
        h = 0.0
    return solve(h)[0], h


def parse_rate(text) -> float:
    """'10gbit' / '1gbit' / '100mbit' -> bit/s."""
    text = str(text).lower().strip()
    for suffix, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def fit(data: dict, fit_rates: list[str] | None = None, host_cores: int = 2) -> Params:
    """All parameters from the measurement files loaded by load_data()."""
    p = Params(cores=host_cores)
    two = [r for r in data["allreduce"] if r["ranks"] == 2]
    p.a_loc, p.b_loc = fit_local([r for r in two if r["impl"] == "pbm_ring"], host_cores)
    p.a_shm, p.b_shm = fit_shm([r for r in two if r["impl"] in ("pbm_shm", "pbm_shm_zc")], host_cores)
    comp = data.get("compression")
    if comp:
        rows = [r for r in comp["throughput"] if r["input"] == "fmri"]
        big = max(rows, key=lambda r: r["bytes"])
        p.e, p.d, p.d_add = (1 / (big[k] * 1e9) for k in ("encode_gbps", "decode_gbps", "decode_add_gbps"))
        if "encode_wall_gbps" in big:
            p.codec_wall = {name: 1 / (big[f"{key}_wall_gbps"] * 1e9)
                            for name, key in (("e", "encode"), ("d", "decode"), ("d_add", "decode_add"))}
        p.ratio = next(r["ratio_median"] for r in comp["ratio"] if r["sparsity"] == 1.0)
    cluster = data.get("cluster") or []
    if cluster:
        probes = [r["tcp_gbps"] / (parse_rate(r["rate"]) / 1e9) for r in cluster if r.get("tcp_gbps")]
        # the probe's TCP payload share at the lowest rate: there the link, not the CPU, limits
        low = min(parse_rate(r["rate"]) for r in cluster)
        low_probes = [r["tcp_gbps"] / (low / 1e9) for r in cluster
                      if r.get("tcp_gbps") and parse_rate(r["rate"]) == low]
        p.eta = float(np.median(low_probes or probes)) if probes else p.eta
        rtts = [r["rtt_us"] * 1e-6 for r in cluster if r.get("rtt_us")]
        p.rtt_s = float(np.median(rtts)) if rtts else p.rtt_s
        ring = [r for r in cluster if r["impl"] == "pbm_ring" and r["placement"] == "block"
                and (not fit_rates or r["rate"] in fit_rates)]
        if ring:
            p.a_net, p.h = fit_network(ring, p)
    for r in data.get("training") or []:
        if r["impl"] == "pbm_nosync" and r["ranks"] == 2:
            p.t_sample[r["model"]] = r["median_step_s"] / r["batch_per_rank"]
    for r in data.get("training") or []:  # 1-rank figures only where 2-rank ones are missing
        if r["impl"] == "pbm_nosync" and r["ranks"] == 1:
            p.t_sample.setdefault(r["model"], r["median_step_s"] / r["batch_per_rank"])
    return p


# --- validation -----------------------------------------------------------------------------

def validation_rows(data: dict, p: Params, fit_rates: list[str] | None) -> list[dict]:
    """Predicted vs measured for every measured configuration; 'fitted' says if it was in a fit."""
    rows = []
    # Validation compares wall times on this shared machine, so the codec enters with its wall
    # time measured here too (thread CPU time, the dedicated-core figure, is for projections).
    p = replace(p, **p.codec_wall) if p.codec_wall else p
    for r in data["allreduce"]:
        layout = Layout(nodes=1, ppn=r["ranks"], host_ranks=r["ranks"], host_cores=p.cores)
        predictor = {"pbm_ring": local_ring_s, "pbm_shm": node_stage_s, "pbm_shm_zc": node_stage_s,
                     "pbm_3lc": flat_3lc_local_s}.get(r["impl"])
        if predictor is None:
            continue
        fitted = r["ranks"] == 2 and r["impl"] in ("pbm_ring", "pbm_shm", "pbm_shm_zc")
        rows.append({"where": f"1 node x {r['ranks']}", "impl": r["impl"], "size_bytes": r["size_bytes"],
                     "measured_s": r["median_s"], "predicted_s": predictor(p, r["size_bytes"], layout),
                     "fitted": fitted, "loadavg": r.get("loadavg")})
    cluster = data.get("cluster") or []
    for r in cluster:
        layout = cluster_layout(r, p.cores)
        q = p
        if r["impl"].endswith("3lc"):
            hier = next((x for x in cluster if x["impl"] == "pbm_hier" and x["rate"] == r["rate"]
                         and x["placement"] == r["placement"] and x["size_bytes"] == r["size_bytes"]), None)
            if hier is not None:  # the ratio this input had on the links in the same run
                q = replace(p, ratio=max(hier["link_tx_bytes_per_call"]) / max(r["link_tx_bytes_per_call"]))
        predictor = {"pbm_ring": ring_s, "pbm_hier": hierarchical_s, "pbm_hier_zc": hierarchical_s,
                     "pbm_hier_3lc": hierarchical_3lc_s, "pbm_hier_3lc_zc": hierarchical_3lc_s}.get(r["impl"])
        if predictor is None:
            continue
        fitted = (r["impl"] == "pbm_ring" and r["placement"] == "block"
                  and (not fit_rates or r["rate"] in fit_rates))
        rows.append({"where": f"emulated {r['nodes']}x{r['ppn']} {r['rate']} {r['placement']}",
                     "impl": r["impl"], "size_bytes": r["size_bytes"], "measured_s": r["median_s"],
                     "predicted_s": predictor(q, r["size_bytes"], layout), "fitted": fitted,
                     "loadavg": r.get("loadavg")})
    for r in data.get("training") or []:
        if r["impl"] != "pbm" or r["ranks"] != 2 or r["model"] not in p.t_sample:
            continue
        layout = Layout(nodes=1, ppn=2, host_ranks=2, host_cores=p.cores)
        model = {"name": r["model"], "params": r["params"], "batch_per_rank": r["batch_per_rank"]}
        predicted = p.t_sample[r["model"]] * r["batch_per_rank"] + sum(
            local_ring_s(p, b, layout) for b in buckets(4 * model["params"]))
        rows.append({"where": "1 node x 2, DDP step", "impl": f"pbm {r['model']}", "size_bytes": 4 * r["params"],
                     "measured_s": r["median_step_s"], "predicted_s": predicted, "fitted": False,
                     "loadavg": r.get("loadavg")})
    for row in rows:
        row["ratio"] = row["predicted_s"] / row["measured_s"]
    return rows


# --- projection -----------------------------------------------------------------------------

def example_models() -> list[dict]:
    """The example models with parameter counts from pybrain_mpi.models (closed forms)."""
    from pybrain_mpi.models.cnn3d import naive_cnn3d_parameter_count
    from pybrain_mpi.models.dca import dca_parameter_count

    return [
        {"name": "dca", "label": "DCA (fMRI, 284 points)", "params": dca_parameter_count(284, 600),
         "batch_per_rank": 64, "compute_from": "dca"},
        {"name": "cnn3d", "label": "NaiveCNN3D 64^3", "params": naive_cnn3d_parameter_count((64, 64, 64)),
         "batch_per_rank": 2, "compute_from": "cnn3d"},
        # full resolution (published widths): compute extrapolated from 64^3 by voxel count
        {"name": "cnn3d_full", "label": "NaiveCNN3D 176^3 (527M, compute extrapolated)",
         "params": naive_cnn3d_parameter_count((176, 176, 176)), "batch_per_rank": 2,
         "compute_from": "cnn3d", "compute_scale": (176 / 64) ** 3},
    ]


def projection_params(p: Params, host_cost: str = "none", latency: str = "probe") -> Params:
    """The fitted parameters as projections use them (see the docstring's assumptions).

    latency "probe": every fixed cost (a_loc, a_shm, a_net) is the measured 1-byte round trip
    between emulated nodes; the fitted ones come from a 2-core machine shared with other jobs
    (load average 6-17 in our runs), where a wait costs a scheduler time slice, not a wire
    round trip. "fitted" keeps them (a pessimistic sensitivity case).
    """
    q = p if host_cost == "measured" else replace(p, h=0.0)
    if latency == "probe":
        q = replace(q, a_loc=p.rtt_s, a_shm=p.rtt_s, a_net=p.rtt_s)
    return replace(q, t_sample=dict(q.t_sample))


def project(p: Params, models: list[dict], ppn: int, host_cost: str = "none",
            latency: str = "probe", compute_speedup: float = 1.0) -> list[dict]:
    """Weak-scaling efficiency for every model, rate, algorithm and node count.

    compute_speedup divides the measured compute per sample: a rank on a node that many times
    faster than one core of this machine (communication costs unchanged).
    """
    q = projection_params(p, host_cost, latency)
    out = []
    for model in models:
        if model["compute_from"] not in p.t_sample:
            continue
        q.t_sample[model["name"]] = (p.t_sample[model["compute_from"]] * model.get("compute_scale", 1.0)
                                     / compute_speedup)
        for rate in RATES_GBIT:
            for algorithm in ALGORITHMS:
                for nodes in NODE_COUNTS:
                    layout = Layout(nodes=nodes, ppn=ppn, rate_bps=rate * 1e9)
                    step = step_s(q, model, algorithm, layout)
                    out.append({"model": model["name"], "label": model["label"], "params": model["params"],
                                "rate_gbit": rate, "algorithm": algorithm, "nodes": nodes, "ppn": ppn,
                                "compute_speedup": compute_speedup,
                                "step_s": step, "efficiency": weak_scaling_efficiency(q, model, algorithm, layout)})
    return out


def write_plot(path: Path, projections: list[list[dict]]) -> None:
    """Efficiency vs nodes: a row per compute speedup, a panel per model, colour = algorithm,
    line style = rate; the published figures marked on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in projections[0]))
    fig, axes = plt.subplots(len(projections), len(models), figsize=(5.2 * len(models), 4.0 * len(projections)),
                             squeeze=False)
    colours = {"ring": "tab:red", "hierarchical": "tab:blue", "hierarchical_3lc": "tab:green"}
    styles = {10: ":", 25: "--", 100: "-"}
    for row, projection in zip(axes, projections):
        for ax, name in zip(row, models):
            subset = [r for r in projection if r["model"] == name]
            for algorithm in ALGORITHMS:
                for rate in RATES_GBIT:
                    pts = sorted((r["nodes"], r["efficiency"]) for r in subset
                                 if r["algorithm"] == algorithm and r["rate_gbit"] == rate)
                    ax.plot([x for x, _ in pts], [y for _, y in pts], styles[rate], color=colours[algorithm],
                            label=f"{algorithm} {rate}G")
            ax.plot([16], [0.47], "k*", markersize=11, label="Horovod CPU, 16 machines (published)")
            ax.axvline(13, color="grey", alpha=0.5, lw=1)
            ax.text(13, 0.03, " fMRI AE param. server\n stalls past 13", fontsize=7, color="grey")
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("nodes")
            ax.set_ylabel("weak-scaling efficiency")
            ax.set_title(f"{subset[0]['label']}, compute x{subset[0]['compute_speedup']:g}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=6, ncol=2, loc="lower left")
    fig.suptitle("pybrain-mpi scale model: fitted on a shared 2-core machine + emulated 2x2 cluster; "
                 "2 ranks/node, no overlap; row 2: ranks 16x faster at compute", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- measuring ------------------------------------------------------------------------------

def _python() -> str:
    return sys.executable


def _mpiexec() -> str:
    candidate = Path(sys.executable).parent / "mpiexec"
    return str(candidate) if candidate.exists() else "mpiexec"


def measure(data_dir: Path, skip_cluster: bool, quick: bool) -> None:
    """Runs the benchmarks with short settings; every file records the load average around it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sizes = "4K,64K,1M,4M,16M" if quick else "4K,64K,1M,4M,16M,64M"
    for ranks in (2, 4):
        out = data_dir / f"allreduce_n{ranks}.jsonl"
        load = os.getloadavg()[0]
        subprocess.run([_mpiexec(), "-n", str(ranks), _python(), str(HERE / "allreduce.py"), "--sizes", sizes,
                        "--impls", "pbm_ring,pbm_shm,pbm_3lc,mpi", "--json", str(out), "--plot", "none"],
                       check=True, env=env)
        _stamp_loadavg(out, (load + os.getloadavg()[0]) / 2)
    measure_compression(data_dir / "compression.json", quick)
    out = data_dir / "training.jsonl"
    load = os.getloadavg()[0]
    subprocess.run([_python(), str(HERE / "training.py"), "--models", "dca,cnn3d", "--ranks", "1,2",
                    "--steps", "3" if quick else "5", "--json", str(out)], check=True, env=env)
    _stamp_loadavg(out, (load + os.getloadavg()[0]) / 2)
    if skip_cluster:
        return
    if os.geteuid() != 0:
        sys.exit("the emulated cluster needs root (network namespaces): rerun with sudo or --skip-cluster")
    out = data_dir / "cluster_allreduce.jsonl"
    # own namespace names and subnet, so that another cluster on this machine is left alone
    cenv = dict(env, PBM_EMU_PREFIX=os.environ.get("PBM_EMU_PREFIX", "pbscm"),
                PBM_EMU_SUBNET=os.environ.get("PBM_EMU_SUBNET", "10.231.17"))
    load = os.getloadavg()[0]
    subprocess.run([_python(), str(HERE / "cluster_allreduce.py"), "--rates", "1gbit,10gbit",
                    "--placements", "block,cyclic", "--sizes", "64K,1M,4M,16M",
                    "--impls", "pbm_ring,pbm_hier,pbm_hier_3lc", "--iterations", "3",
                    "--json", str(out), "--plot", str(data_dir / "cluster_allreduce.png")],
                   check=True, env=cenv)
    _stamp_loadavg(out, (load + os.getloadavg()[0]) / 2)


def _stamp_loadavg(path: Path, load: float) -> None:
    """Adds the 1-minute load average around the run to every JSON line of path."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(dict(r, loadavg=round(load, 2))) + "\n" for r in lines))


def measure_compression(path: Path, quick: bool) -> None:
    """Codec throughput and real-gradient ratio at s = 1.0, with compression.py's functions."""
    import compression as bench

    from pybrain_mpi.compression import ThreeLC

    series = bench.load_voxel_series()
    captured: list = []
    steps = 30 if quick else 60
    bench.train(series, steps, None, capture=captured)
    _, ratios, count = bench.train(series, steps, ThreeLC(1.0))
    load = os.getloadavg()[0]
    rows = bench.throughput(captured, [1 * MiB, 16 * MiB], budget_s=0.3 if quick else 1.0)
    report = {"machine": {"cpus": os.cpu_count(), "loadavg": (load + os.getloadavg()[0]) / 2},
              "model_parameters": count, "steps": steps,
              "ratio": [{"sparsity": 1.0, "ratio_median": float(np.median(ratios)),
                         "ratio_mean": float(np.mean(ratios))}],
              "throughput": rows}
    path.write_text(json.dumps(report, indent=2))


def load_data(data_dir: Path) -> dict:
    """The JSON files measure() (or the benchmarks themselves) wrote into data_dir."""
    def lines(name):
        path = data_dir / name
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    data = {"allreduce": lines("allreduce_n2.jsonl") + lines("allreduce_n4.jsonl"),
            "training": lines("training.jsonl"), "cluster": lines("cluster_allreduce.jsonl")}
    comp = data_dir / "compression.json"
    data["compression"] = json.loads(comp.read_text()) if comp.exists() else None
    if not data["allreduce"] and not data["cluster"]:
        sys.exit(f"no allreduce measurements in {data_dir}: run with --measure first")
    return data


# --- output ---------------------------------------------------------------------------------

def markdown_validation(rows: list[dict]) -> str:
    out = ["| where | impl | size | measured ms | predicted ms | pred/meas | in fit | load |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        size = r["size_bytes"]
        size_text = f"{size / MiB:g} MiB" if size >= MiB else f"{size / 1024:g} KiB"
        out.append(f"| {r['where']} | {r['impl']} | {size_text} | {r['measured_s'] * 1e3:.3f} | "
                   f"{r['predicted_s'] * 1e3:.3f} | {r['ratio']:.2f} | {'yes' if r['fitted'] else 'no'} | "
                   f"{r['loadavg'] if r.get('loadavg') is not None else '?'} |")
    return "\n".join(out)


def markdown_projection(rows: list[dict], node_counts=(16, 64, 256, 1024)) -> str:
    out = ["| model | params | Gbit/s | " + " | ".join(f"{a} @{n}" for a in ALGORITHMS for n in node_counts) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in ALGORITHMS for _ in node_counts) + " |"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for rate in RATES_GBIT:
            cells = []
            for a in ALGORITHMS:
                for n in node_counts:
                    r = next(x for x in rows if x["model"] == model and x["rate_gbit"] == rate
                             and x["algorithm"] == a and x["nodes"] == n)
                    cells.append(f"{100 * r['efficiency']:.0f}%")
            params = next(x["params"] for x in rows if x["model"] == model)
            out.append(f"| {model} | {params / 1e6:.2f}M | {rate} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="measurement JSON files, read (and written by --measure); default "
                             f"results/scale, else the committed set {COMMITTED_DATA.relative_to(HERE.parent)}")
    parser.add_argument("--out", default="results/scale_model", help="fit, tables and PNG go here")
    parser.add_argument("--measure", action="store_true", help="run the benchmarks first (short settings)")
    parser.add_argument("--skip-cluster", action="store_true", help="with --measure: no emulated cluster (no root)")
    parser.add_argument("--quick", action="store_true", help="with --measure: fewer sizes and steps")
    parser.add_argument("--fit-rates", default="", help="rates whose block ring fits the network (default: all)")
    parser.add_argument("--ppn", type=int, default=2, help="ranks (= cores) per projected node")
    parser.add_argument("--host-cost", choices=("none", "measured"), default="none",
                        help="network host CPU cost per byte in projections (default none: see docstring)")
    parser.add_argument("--latency", choices=("probe", "fitted"), default="probe",
                        help="fixed costs in projections: the probe's round trip, or as fitted here")
    parser.add_argument("--compute-speedup", type=float, default=1.0,
                        help="projected ranks compute this many times faster than one core here")
    parser.add_argument("--compare", default=None,
                        help="another measurement directory: predict its records with this fit "
                             "(run-to-run check; nothing of it enters the fit)")
    parser.add_argument("--tolerance", type=float, default=0.15, help="validation band (relative)")
    args = parser.parse_args(argv)
    data_dir, out_dir = Path(args.data or "results/scale"), Path(args.out)
    if args.data is None and not args.measure and not (data_dir / "allreduce_n2.jsonl").exists():
        data_dir = COMMITTED_DATA
        print(f"no {Path('results/scale')}: fitting the committed measurements in {data_dir}")
    if args.measure:
        start = time.perf_counter()
        measure(data_dir, args.skip_cluster, args.quick)
        print(f"measured in {time.perf_counter() - start:.0f} s into {data_dir}")
    data = load_data(data_dir)
    fit_rates = [r for r in args.fit_rates.split(",") if r] or None
    params = fit(data, fit_rates)
    rows = validation_rows(data, params, fit_rates)
    held_out = [r for r in rows if not r["fitted"]]
    inside = [r for r in held_out if abs(r["ratio"] - 1) <= args.tolerance]
    print("fitted parameters:", json.dumps(asdict(params), indent=1))
    print("\nvalidation (predicted / measured; 'in fit' rows were used by the fit):")
    print(markdown_validation(rows))
    print(f"\nheld-out configurations within {100 * args.tolerance:.0f}%: {len(inside)} of {len(held_out)}")
    for regime, test in (("bandwidth regime, >= 4 MiB", lambda r: r["size_bytes"] >= 4 * MiB),
                         ("latency regime, < 4 MiB", lambda r: r["size_bytes"] < 4 * MiB)):
        for kind in ("1 node x 2", "1 node x 4", "emulated", "DDP"):
            group = [r for r in held_out if test(r) and kind in r["where"]
                     and (kind == "DDP" or "DDP" not in r["where"])]
            if group:
                good = sum(abs(r["ratio"] - 1) <= args.tolerance for r in group)
                print(f"  {regime}, {kind}: {good} of {len(group)} within {100 * args.tolerance:.0f}% "
                      f"(pred/meas median {np.median([r['ratio'] for r in group]):.2f})")
    if args.compare:
        other = validation_rows(load_data(Path(args.compare)), params, fit_rates)
        for row in other:
            row.update(where=f"{args.compare}: {row['where']}", fitted=False)
        good = sum(abs(r["ratio"] - 1) <= args.tolerance for r in other)
        print(f"\n{args.compare}, predicted with the fit above (pred/meas):")
        print(markdown_validation(other))
        print(f"within {100 * args.tolerance:.0f}%: {good} of {len(other)}")
        rows += other
    speedups = sorted({args.compute_speedup, 16.0}) if args.compute_speedup == 1.0 else [args.compute_speedup]
    projections = [project(params, example_models(), args.ppn, args.host_cost, args.latency, x) for x in speedups]
    tables = []
    for x, projection in zip(speedups, projections):
        title = (f"weak-scaling efficiency, {args.ppn} ranks per node, host cost {args.host_cost}, "
                 f"latency {args.latency}, compute speedup {x:g}, no overlap:")
        tables.append(title + "\n\n" + markdown_projection(projection))
        print("\n" + tables[-1])
    print("published: Horovod on CPU about 47% at 16 machines; distributed fMRI autoencoder "
          "(parameter server) stopped scaling past 13 workers")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fit.json").write_text(json.dumps({
        "params": asdict(params), "fit_rates": fit_rates,
        "projection_params": asdict(projection_params(params, args.host_cost, args.latency)),
        "ppn": args.ppn, "host_cost": args.host_cost, "latency": args.latency,
        "compute_speedups": speedups}, indent=1))
    (out_dir / "validation.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "projection.json").write_text(json.dumps(
        {"rows": [r for p in projections for r in p], "published": PUBLISHED}, indent=1))
    (out_dir / "tables.md").write_text(markdown_validation(rows) + "\n\n" + "\n\n".join(tables) + "\n")
    write_plot(out_dir / "scale_model.png", projections)
    print(f"wrote {out_dir}/fit.json, validation.json, projection.json, tables.md, scale_model.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
