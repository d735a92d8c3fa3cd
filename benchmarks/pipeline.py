"""Pipeline parallelism on NaiveCNN3D: step time, peak memory per rank, measured bubble vs GPipe's
bound, against the whole model on a single rank, all in the same run.

    python benchmarks/pipeline.py                            # 64^3 input, 1 rank vs 2 and 4 stages
    python benchmarks/pipeline.py --input 96 --stages 2 --micro-batches 4 8 --steps 5
    python benchmarks/pipeline.py --full                     # 176^3, the published 527M parameters

For each configuration one launch (``mpiexec -n S``) runs ``--steps`` timed steps after one warm-up:
  single    the unsplit model, one process, forward+backward over the whole batch
  pipeline  pbm.parallel.Pipeline over S ranks (balance "auto"), micro-batches M, gpipe and 1f1b
and reports the median step time (slowest rank), the peak resident memory of every rank (ru_maxrss,
which includes the ~300 MB of the interpreter and torch, and the whole model each rank builds
before keeping its stage: one launch per configuration) and the parameters it holds, and the
measured bubble: 1 - (compute time summed over stages) / (S x step time), next to GPipe's
(S-1)/(M+S-1). The measured value also counts the stages' imbalance and the messages.
Every process runs one thread (``--threads``), so S ranks use S cores.
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
    import torch

    from pybrain_mpi.models import NaiveCNN3D

    torch.manual_seed(0)
    side = args.input
    return NaiveCNN3D(input_shape=(side, side, side), dropout=0.0, batch_norm=False)


def _batch(args):
    import torch

    g = torch.Generator().manual_seed(1)
    side = args.input
    return torch.randn(args.batch, 1, side, side, side, generator=g), torch.randn(args.batch, 1, generator=g)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One configuration on this launch's ranks; rank 0 prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import pybrain_mpi as pbm

    pbm.init()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    x, y = _batch(args)
    params_total = sum(p.numel() for p in _model(args).parameters())
    records = []
    if args.mode == "single":
        model = _model(args)
        loss_fn = torch.nn.MSELoss()
        times = []
        for step in range(args.steps + 1):
            started = time.perf_counter()
            model.zero_grad()
            loss_fn(model(x), y).backward()
            if step:
                times.append(time.perf_counter() - started)
        records.append({"mode": "single", "ranks": 1, "micro_batches": 1, "schedule": "-",
                        "step_s": statistics.median(times), "peak_mb": [_peak_mb()],
                        "params": [params_total], "bubble": 0.0, "bound": 0.0, "balance": "-"})
    else:
        for schedule in args.schedules:
            for m in args.micro_batches:
                model = _model(args)
                pipe = pbm.parallel.Pipeline(model, balance="auto", micro_batches=m, schedule=schedule,
                                             sample=x[:1] if comm.Get_rank() == 0 else None)
                del model
                times, bubbles = [], []
                for step in range(args.steps + 1):
                    comm.Barrier()
                    pipe.zero_grad()
                    pipe.step(x, y)
                    wall = comm.allreduce(pipe.stats.wall_s, op=MPI.MAX)
                    compute = comm.allreduce(pipe.stats.compute_s, op=MPI.SUM)
                    if step:
                        times.append(wall)
                        bubbles.append(1.0 - compute / (comm.Get_size() * wall))
                s = comm.Get_size()
                records.append({
                    "mode": "pipeline", "ranks": s, "micro_batches": m, "schedule": schedule,
                    "step_s": statistics.median(times), "peak_mb": comm.gather(_peak_mb()),
                    "params": comm.gather(sum(p.numel() for p in pipe.parameters())),
                    "bubble": statistics.median(bubbles), "bound": (s - 1) / (m + s - 1),
                    "balance": "/".join(map(str, pipe.balance))})
                del pipe
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
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the results as JSON lines here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full:
        args.input = 176
    if args.worker:
        worker(args)
        return
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    common = [sys.executable, str(Path(__file__).resolve()), "--worker", "--input", str(args.input),
              "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PBM_TIMEOUT_S=os.environ.get("PBM_TIMEOUT_S", "600"))
    # One launch per configuration: ru_maxrss is the peak of the whole process.
    launches = [(1, "single", [])] + [(s, "pipeline", ["--micro-batches", str(m), "--schedules", schedule])
                                      for s in args.stages for schedule in args.schedules
                                      for m in args.micro_batches]
    records = []
    for ranks, mode, extra in launches:
        out = subprocess.run([mpiexec, "-n", str(ranks), *common, "--mode", mode, *extra], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{mode} on {ranks} ranks failed:\n{out.stdout}\n{out.stderr}")
        records += [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    single = next(r for r in records if r["mode"] == "single")
    rows = []
    for r in records:
        rows.append({
            "mode": r["mode"], "ranks": str(r["ranks"]), "schedule": r["schedule"], "M": str(r["micro_batches"]),
            "balance": r["balance"], "step_s": r["step_s"], "vs_single": r["step_s"] / single["step_s"],
            "peak_mb_max": max(r["peak_mb"]), "peak_vs_single": max(r["peak_mb"]) / single["peak_mb"][0],
            "params_max": f"{max(r['params']):,}", "bubble": r["bubble"], "bound": r["bound"],
            "bubble_vs_bound": r["bubble"] / r["bound"] if r["bound"] else 0.0})
    print(f"NaiveCNN3D {args.input}^3, {single['total_params']:,} parameters, batch {args.batch}, "
          f"{args.steps} timed steps, {args.threads} thread(s) per rank")
    print_table(rows, [("mode", "mode"), ("ranks", "ranks"), ("schedule", "schedule"), ("M", "M"),
                       ("balance", "balance"), ("step_s", "step s"), ("vs_single", "x single"),
                       ("peak_mb_max", "peak MB (max rank)"), ("peak_vs_single", "x single"),
                       ("params_max", "params (max rank)"), ("bubble", "bubble"), ("bound", "GPipe bound"),
                       ("bubble_vs_bound", "x bound")])
    if args.json:
        write_json_lines(args.json, records)


if __name__ == "__main__":
    main()
