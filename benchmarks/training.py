"""Data-parallel training throughput: pybrain-mpi DDP vs torch DDP (gloo), 1 and 2 ranks.

    python benchmarks/training.py                 # launches itself on 1 and 2 ranks
    python benchmarks/training.py --models mlp --steps 8

For each model, one process per rank (one thread each) runs interleaved steps of
  pbm        pbm.DistributedDataParallel (ring allreduce, overlapped with backward)
  pbm_nosync the same wrapper inside no_sync(): the step without any communication
  gloo       torch.nn.parallel.DistributedDataParallel over gloo
  pbm_3lc    (--threelc) pbm.DistributedDataParallel(compression=ThreeLC(1.0)) over the ring:
             3LC's two-stage compressed allreduce with error feedback, and the bytes it sends
and reports median step times, samples/s per rank, weak-scaling efficiency 1 -> 2 ranks
(samples/s per rank at 2 ranks / at 1 rank), pbm / pbm_nosync (how much communication was
left exposed) and pbm / gloo. Models:
  dca    DCA 1D conv autoencoder on 284-point series (docs/background.md, ~6.0M params)
  cnn3d  NaiveCNN3D on 64^3 patches (1.3M params)
  mlp    EncodingMLP with 20,000 outputs (22M params: communication-heavy)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import print_table, write_json_lines  # noqa: E402

MODELS = {
    # name: (batch per rank, description)
    "dca": (64, "DCA autoencoder, 284-point series"),
    "cnn3d": (2, "NaiveCNN3D, 64^3 patches"),
    "mlp": (32, "EncodingMLP, 20k outputs"),
}


def build(name: str):
    import torch

    from pybrain_mpi.models import DCA, EncodingMLP, NaiveCNN3D
    from pybrain_mpi.models.dca import dca_loss

    batch = MODELS[name][0]
    g = torch.Generator().manual_seed(0)
    if name == "dca":
        model = DCA(input_length=284, hidden_size=600)
        x = torch.randn(batch, 1, 284, generator=g)

        def loss_fn(m):
            x_hat, (z, z_prime) = m(x)
            return dca_loss(x, x_hat, z, z_prime)
    elif name == "cnn3d":
        model = NaiveCNN3D(input_shape=(64, 64, 64))
        x = torch.randn(batch, 1, 64, 64, 64, generator=g)
        y = torch.randn(batch, 1, generator=g)

        def loss_fn(m):
            return torch.nn.functional.mse_loss(m(x), y)
    else:
        model = EncodingMLP(in_features=768, hidden=(1024, 1024), out_features=20000)
        x = torch.randn(batch, 768, generator=g)
        y = torch.randn(batch, 20000, generator=g)

        def loss_fn(m):
            return torch.nn.functional.mse_loss(m(x), y)
    return model, loss_fn, batch


def worker(args) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    import pybrain_mpi as pbm

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    pbm.init(comm)
    port = None
    if comm.rank == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank,
                            world_size=comm.size)
    records = []
    for name in args.models.split(","):
        model, loss_fn, batch = build(name)
        pbm_model = pbm.DistributedDataParallel(copy.deepcopy(model), algorithm=args.algorithm)
        gloo_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        pbm_opt = torch.optim.SGD(pbm_model.parameters(), lr=1e-4)
        gloo_opt = torch.optim.SGD(gloo_model.parameters(), lr=1e-4)

        def step_pbm():
            pbm_opt.zero_grad()
            loss_fn(pbm_model).backward()
            pbm_opt.step()

        def step_nosync():
            pbm_opt.zero_grad()
            with pbm_model.no_sync():
                loss_fn(pbm_model).backward()
            pbm_opt.step()

        def step_gloo():
            gloo_opt.zero_grad()
            loss_fn(gloo_model).backward()
            gloo_opt.step()

        variants = {"pbm": step_pbm, "pbm_nosync": step_nosync, "gloo": step_gloo}
        if args.threelc:
            tlc_model = pbm.DistributedDataParallel(copy.deepcopy(model), algorithm="ring",
                                                    compression=pbm.compression.ThreeLC(1.0))
            tlc_opt = torch.optim.SGD(tlc_model.parameters(), lr=1e-4)

            def step_3lc():
                tlc_opt.zero_grad()
                loss_fn(tlc_model).backward()
                tlc_opt.step()
            variants["pbm_3lc"] = step_3lc
        times = {k: [] for k in variants}
        sent = {k: 0 for k in variants}  # bytes pbm sent over MPI (not shared memory) per rank
        for i in range(args.steps + 2):  # two warm-up rounds
            for key, fn in variants.items():
                comm.Barrier()
                before = pbm.bytes_sent()
                start = time.perf_counter()
                fn()
                elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
                if i >= 2:
                    times[key].append(elapsed)
                    sent[key] += pbm.bytes_sent() - before
        params = sum(p.numel() for p in model.parameters())
        for key, values in times.items():
            median = statistics.median(values)
            records.append({"model": name, "impl": key, "algorithm": args.algorithm, "ranks": comm.size, "batch_per_rank": batch,
                            "params": params, "median_step_s": median,
                            "samples_per_s_per_rank": batch / median, "steps": len(values),
                            "pbm_bytes_sent_per_step": sent[key] / len(values)})
        pbm_model = gloo_model = tlc_model = None  # freed before the next model is built
    dist.destroy_process_group()
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dca,cnn3d,mlp")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--algorithm", default="ring",
                        help="pbm DDP's allreduce algorithm: ring, mpi, shm (gradient buckets in "
                             "shared memory, reduced in place), hierarchical or auto")
    parser.add_argument("--threelc", action="store_true",
                        help="also time pbm DDP with 3LC compression (ring) and report its bytes")
    parser.add_argument("--json", default="results/training.jsonl")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    records = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        out = Path(args.json).with_suffix(f".{ranks}.tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(ranks), sys.executable,
                        __file__, "--worker", "--models", args.models, "--steps", str(args.steps),
                        "--algorithm", args.algorithm, "--out", str(out)] + (["--threelc"] if args.threelc else []),
                       check=True, env=env)
        records += json.loads(out.read_text())
        out.unlink()
    rows = []
    for name in args.models.split(","):
        for ranks in sorted({r["ranks"] for r in records}):
            by = {r["impl"]: r for r in records if r["model"] == name and r["ranks"] == ranks}
            one = {r["impl"]: r for r in records if r["model"] == name and r["ranks"] == 1}
            row = {"model": name, "ranks": str(ranks), "params": f"{by['pbm']['params'] / 1e6:.2f}M",
                   "pbm_s": by["pbm"]["median_step_s"], "nosync_s": by["pbm_nosync"]["median_step_s"],
                   "gloo_s": by["gloo"]["median_step_s"],
                   "pbm_vs_nosync": by["pbm"]["median_step_s"] / by["pbm_nosync"]["median_step_s"],
                   "pbm_vs_gloo": by["pbm"]["median_step_s"] / by["gloo"]["median_step_s"]}
            if "pbm_3lc" in by:
                row["tlc_s"] = by["pbm_3lc"]["median_step_s"]
                row["tlc_vs_gloo"] = by["pbm_3lc"]["median_step_s"] / by["gloo"]["median_step_s"]
                ring_bytes = 2 * (ranks - 1) / ranks * by["pbm"]["params"] * 4  # an uncompressed ring
                row["tlc_ratio"] = (ring_bytes / by["pbm_3lc"]["pbm_bytes_sent_per_step"]
                                    if by["pbm_3lc"]["pbm_bytes_sent_per_step"] else float("nan"))
            if one:
                row["eff_pbm"] = by["pbm"]["samples_per_s_per_rank"] / one["pbm"]["samples_per_s_per_rank"]
                row["eff_gloo"] = by["gloo"]["samples_per_s_per_rank"] / one["gloo"]["samples_per_s_per_rank"]
            rows.append(row)
    columns = [("model", "model"), ("ranks", "ranks"), ("params", "params"), ("pbm_s", "pbm step s"),
               ("nosync_s", "no_sync step s"), ("gloo_s", "gloo DDP step s"),
               ("pbm_vs_nosync", "pbm/no_sync"), ("pbm_vs_gloo", "pbm/gloo")]
    if all("tlc_s" in r for r in rows):
        columns += [("tlc_s", "3LC step s"), ("tlc_vs_gloo", "3LC/gloo"),
                    ("tlc_ratio", "ring bytes / 3LC bytes")]
    if all("eff_pbm" in r for r in rows):
        columns += [("eff_pbm", "pbm weak-scaling eff"), ("eff_gloo", "gloo weak-scaling eff")]
    print(f"median step times (slowest rank), one thread per rank; pbm DDP algorithm={args.algorithm}")
    print_table(rows, columns)
    write_json_lines(args.json, records)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
