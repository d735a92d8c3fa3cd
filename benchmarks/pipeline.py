"""Pipeline parallelism on NaiveCNN3D: step time, peak memory per rank, measured bubble vs GPipe's
bound, against the whole model on a single rank, all in the same run.

    python benchmarks/pipeline.py                            # 64^3 input, 1 rank vs 2 and 4 stages
    python benchmarks/pipeline.py --input 96 --stages 2 --micro-batches 4 8 --steps 5
    python benchmarks/pipeline.py --full                     # 176^3, the published 527M parameters
    python benchmarks/pipeline.py --stages --stage-ranks 1,3 --balance 1,11 --input 64

For each configuration one launch runs ``--steps`` timed training steps (forward, backward, plain
SGD) after one warm-up:
  single    the unsplit model (``NaiveCNN3D(seed=0)``), one process, over the whole batch
  pipeline  pbm.parallel.Pipeline over S ranks (balance "auto"; every rank builds the whole
            model before keeping its stage), micro-batches M, gpipe and 1f1b
  split     pbm.parallel.Pipeline over ``--stage-ranks`` (e.g. ``1,3``: stage 0 on one rank,
            stage 1 on three) with ``--balance`` layers per stage; each rank builds only its
            stage's layers (``naive_cnn3d_layers(seed=0)``: the single rank's weights), and a
            stage of several ranks holds fc1 (106,480 x 4,840 at 176^3, 98% of the parameters)
            column-split over them
and reports the median step time (slowest rank), the peak resident memory of every rank
(ru_maxrss, which includes the ~300 MB of the interpreter and torch: one launch per
configuration) and the parameters it holds, and the measured bubble: 1 - (compute time summed
over stages, each stage's first rank) / (S x step time), next to GPipe's (S-1)/(M+S-1). The
measured value also counts the stages' imbalance and the messages: next to it, the bound at the
measured stage costs (GPipe over unequal stages: a step takes at least sum(t) + (M-1) max(t), t a
stage's compute per micro-batch), which leaves the schedule's and the messages' share. ``--full`` is the split layout 1,3 with balance 1,11 (conv block 1 alone on
stage 0: the other blocks and the head take about as long at 176^3), batch 4 in 4 micro-batches.
Every process runs one thread (``--threads``), so the ranks of a launch use that many cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import print_table, write_json_lines  # noqa: E402


def _model(args):
    from pybrain_mpi.models import NaiveCNN3D

    side = args.input
    return NaiveCNN3D(input_shape=(side, side, side), dropout=0.0, batch_norm=False, seed=0)


def _layers(args):
    from pybrain_mpi.models import naive_cnn3d_layers

    side = args.input
    return naive_cnn3d_layers((side, side, side), dropout=0.0, batch_norm=False, seed=0)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _batch(args):
    import torch

    g = torch.Generator().manual_seed(1)
    side = args.input
    return torch.randn(args.batch, 1, side, side, side, generator=g), torch.randn(args.batch, 1, generator=g)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cost_bound(computes: list[float], m: int) -> float:
    """GPipe's bubble for stages of unequal cost (each stage's measured compute over M equal
    micro-batches): the step takes at least ``sum(t) + (M - 1) max(t)`` with ``t`` a stage's
    time per micro-batch; equal stages give (S-1)/(M+S-1)."""
    t = [c / m for c in computes]
    return 1.0 - m * sum(t) / (len(t) * (sum(t) + (m - 1) * max(t)))


def _pipeline_record(args, comm, schedule: str, m: int, x, y) -> dict:
    """Warm-up plus ``--steps`` timed SGD steps of one pipeline configuration (collective)."""
    import torch
    from mpi4py import MPI

    import pybrain_mpi as pbm

    if args.mode == "split":
        pipe = pbm.parallel.Pipeline(_layers(args), balance=_ints(args.balance), micro_batches=m,
                                     schedule=schedule, stage_ranks=_ints(args.stage_ranks[0]))
    else:
        model = _model(args)
        pipe = pbm.parallel.Pipeline(model, balance="auto", micro_batches=m, schedule=schedule,
                                     sample=x[:1] if comm.Get_rank() == 0 else None)
        del model
    optimizer = torch.optim.SGD(pipe.parameters(), lr=args.lr)
    times, bubbles, losses, stage_compute = [], [], [], []
    for step in range(args.steps + 1):
        comm.Barrier()
        optimizer.zero_grad()
        losses.append(float(pipe.step(x, y)))
        optimizer.step()
        wall = comm.allreduce(pipe.stats.wall_s, op=MPI.MAX)
        # One rank per stage (its lead): the ranks of a split stage compute in step.
        computes = comm.allgather(pipe.stats.compute_s if pipe.is_lead else None)
        computes = [c for c in computes if c is not None]
        if step:
            times.append(wall)
            bubbles.append(1.0 - sum(computes) / (pipe.stages * wall))
            stage_compute.append(computes)
    s = pipe.stages
    record = {
        "mode": args.mode, "ranks": comm.Get_size(), "stages": s, "micro_batches": m, "schedule": schedule,
        "step_s": statistics.median(times), "peak_mb": comm.gather(_peak_mb()),
        "params": comm.gather(sum(p.numel() for p in pipe.parameters())),
        "bubble": statistics.median(bubbles), "bound": (s - 1) / (m + s - 1),
        "cost_bound": statistics.median(_cost_bound(c, m) for c in stage_compute),
        "balance": "/".join(map(str, pipe.balance)), "stage_ranks": [len(r) for r in pipe.members],
        "compute_s": stage_compute, "step_times": times, "losses": losses, "layout": comm.gather(pipe.describe())}
    if pipe.tensor_group is not None:
        pipe.tensor_group.close()
    return record


def worker(args) -> None:
    """One configuration on this launch's ranks; rank 0 prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import pybrain_mpi as pbm

    pbm.init()
    from mpi4py import MPI

    from pybrain_mpi.models import naive_cnn3d_parameter_count

    comm = MPI.COMM_WORLD
    x, y = _batch(args)
    params_total = naive_cnn3d_parameter_count((args.input,) * 3, batch_norm=False)
    records = []
    if args.mode == "single":
        model = _model(args)
        loss_fn = torch.nn.MSELoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        times, losses = [], []
        for step in range(args.steps + 1):
            started = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            if step:
                times.append(time.perf_counter() - started)
        records.append({"mode": "single", "ranks": 1, "micro_batches": 1, "schedule": "-",
                        "step_s": statistics.median(times), "peak_mb": [_peak_mb()],
                        "params": [params_total], "bubble": 0.0, "bound": 0.0, "balance": "-",
                        "losses": losses})
    else:
        for schedule in args.schedules:
            for m in args.micro_batches:
                records.append(_pipeline_record(args, comm, schedule, m, x, y))
    if comm.Get_rank() == 0:
        for record in records:
            record.update({"input": args.input, "batch": args.batch, "total_params": params_total})
            print("RESULT " + json.dumps(record), flush=True)
    pbm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=int, default=64, help="input side in voxels (176: full resolution)")
    parser.add_argument("--full", action="store_true", help="--input 176 (527,199,651 parameters)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stages", type=int, nargs="*", default=None,
                        help="plain pipelines of this many stages (default 2 4; none with --full)")
    parser.add_argument("--stage-ranks", nargs="*", default=None,
                        help="split layouts: ranks per stage, e.g. 1,3 (default none; 1,3 with --full)")
    parser.add_argument("--balance", default="1,11", help="layers per stage of the split layouts")
    parser.add_argument("--lr", type=float, default=1e-4, help="plain SGD's learning rate")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3; 2 with --full)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the results as JSON lines here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _defaults(args)
    if args.worker:
        worker(args)
        return
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    common = [sys.executable, str(Path(__file__).resolve()), "--worker", "--input", str(args.input),
              "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads),
              "--lr", str(args.lr), "--balance", args.balance]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PBM_TIMEOUT_S=os.environ.get("PBM_TIMEOUT_S", "600"))
    # One launch per configuration: ru_maxrss is the peak of the whole process.
    per_config = [(schedule, m) for schedule in args.schedules for m in args.micro_batches]
    launches = [(1, "single", [])]
    launches += [(s, "pipeline", ["--micro-batches", str(m), "--schedules", schedule])
                 for s in args.stages for schedule, m in per_config]
    launches += [(sum(_ints(layout)), "split", ["--micro-batches", str(m), "--schedules", schedule,
                                                "--stage-ranks", layout])
                 for layout in args.stage_ranks for schedule, m in per_config]
    records = []
    for ranks, mode, extra in launches:
        out = subprocess.run([mpiexec, "-n", str(ranks), *common, "--mode", mode, *extra], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{mode} on {ranks} ranks failed:\n{out.stdout}\n{out.stderr}")
        records += [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        print(f"# {mode} on {ranks} rank(s) {' '.join(extra)}: {json.dumps(records[-1])}", flush=True)
    single = next(r for r in records if r["mode"] == "single")
    rows = []
    for r in records:
        rows.append({
            "mode": r["mode"], "ranks": "/".join(map(str, r.get("stage_ranks", [r["ranks"]]))), "schedule": r["schedule"], "M": str(r["micro_batches"]),
            "balance": r["balance"], "step_s": r["step_s"], "vs_single": r["step_s"] / single["step_s"],
            "peak_mb_max": max(r["peak_mb"]), "peak_vs_single": max(r["peak_mb"]) / single["peak_mb"][0],
            "peaks": " ".join(f"{v:.0f}" for v in r["peak_mb"]),
            "params_max": f"{max(r['params']):,}", "bubble": r["bubble"], "bound": r["bound"],
            "bubble_vs_bound": r["bubble"] / r["bound"] if r["bound"] else 0.0,
            "cost_bound": r.get("cost_bound", 0.0),
            "vs_cost_bound": r["bubble"] / r["cost_bound"] if r.get("cost_bound") else 0.0,
            "stage_s": " ".join(f"{v:.1f}" for v in r["compute_s"][-1]) if r.get("compute_s") else "-"})
    print(f"NaiveCNN3D {args.input}^3, {single['total_params']:,} parameters, batch {args.batch}, "
          f"{args.steps} timed steps, {args.threads} thread(s) per rank")
    print_table(rows, [("mode", "mode"), ("ranks", "ranks per stage"), ("schedule", "schedule"), ("M", "M"),
                       ("balance", "balance"), ("step_s", "step s"), ("vs_single", "x single"),
                       ("peak_mb_max", "peak MB (max rank)"), ("peak_vs_single", "x single"),
                       ("peaks", "peak MB per rank"),
                       ("params_max", "params (max rank)"), ("bubble", "bubble"), ("bound", "GPipe bound"),
                       ("bubble_vs_bound", "x bound"), ("stage_s", "compute s per stage"),
                       ("cost_bound", "bound at those costs"), ("vs_cost_bound", "x that")])
    if args.json:
        write_json_lines(args.json, records)


def _defaults(args) -> None:
    """--full's input and layouts; the defaults of the options it changes."""
    if args.full:
        args.input = 176
    full = args.full and not args.worker
    if args.stages is None:
        args.stages = [] if full else [2, 4]
    if args.stage_ranks is None:
        args.stage_ranks = ["1,3"] if full else []
    if args.steps is None:
        args.steps = 2 if args.full else 3
    if full and args.batch == 8 and args.micro_batches == [4, 8]:
        args.batch, args.micro_batches = 4, [4]


if __name__ == "__main__":
    main()
