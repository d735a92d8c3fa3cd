"""Held-out quality of DCA trained with and without 3LC, 2 ranks, in the same run.

    python benchmarks/compression_quality.py                       # launches itself on 2 ranks
    python benchmarks/compression_quality.py --sources nitime --optimizers adam --steps 200
    python benchmarks/compression_quality.py --variants none,3lc,emu_bucket,emu_tensor

Real fMRI only (both load offline from installed packages):
  nitime  nitime's two runs (nitime/data/fmri{1,2}.nii.gz): every non-constant voxel's
          40-point series, z-scored (pybrain_mpi.data.examples.load_nitime_fmri_series)
  nipy    nipy's functional run (nipy/testing/functional.nii.gz, 17x21x3 voxels x 20
          volumes, TR 2 s; ``pip install --no-deps nipy``), the same preprocessing

20% of the voxels are held out (seeded); DCA(input_length, hidden 64) trains for
``--steps`` steps of ``--batch`` series per rank, the same data order for every variant.
Held-out R^2 (pybrain_mpi.metrics.r2_score over time points) is measured every
``--eval-every`` steps. Variants (comma-separated):
  none         pbm.DistributedDataParallel, uncompressed (the baseline)
  3lc          pbm.DistributedDataParallel(compression=ThreeLC(--sparsity)): the library path
               with the library's default block size
  3lc_tensor   ThreeLC(--sparsity, block=0): one scale per parameter tensor (per allreduce
               partition)
  3lc_blockN   ThreeLC(--sparsity, block=N): one scale per N elements (e.g. 3lc_block64)
  3lc_bucket   the same with ThreeLC(per_tensor=False): one scale per DDP bucket (the
               library's behaviour before per_tensor existed)
  emu_*        a float64 numpy emulation of the library's two-stage 3LC allreduce
               (stage 1: each rank quantizes its peer's partition with error feedback, its own
               stays exact; stage 2: the owner re-quantizes the average with a second
               residual) with one knob changed, for ablations:
    emu_bucket     as the library (one scale per DDP bucket): checks the emulation
    emu_tensor     one scale per parameter tensor
    emu_noef1 / emu_noef2   no error feedback at stage 1 / stage 2
    emu_1stage     stage 2 sends the exact average (only stage 1 quantizes)
    emu_gather     one quantization per contribution: each rank quantizes its whole
                   gradient (error feedback), all ranks sum everyone's decoded values
    emu_warmN      the first N steps uncompressed (e.g. emu_warm50)
    emu_sN         sparsity multiplier N/100 on the bucket scale (e.g. emu_s150)
    emu_blockN     one scale per N elements (blocks never span two tensors)
    knobs combine with '+': emu_tensor+1stage
For each run: final held-out R^2, the ratio to the uncompressed run of the same source and
optimizer, the steps the run took to reach 98% of the uncompressed final R^2 (and the
ratio to the steps the uncompressed run took to reach the same), and the bytes this rank
sent (pybrain_mpi.communication.context.bytes_sent) over the uncompressed run's: the
compression ratio of the whole allreduce traffic. A run whose loss turns NaN/Inf (or whose
3LC allreduce refuses a NaN gradient) stops there and is recorded as "diverged at step N"
with the last finite held-out R^2. JSON lines go to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import print_table  # noqa: E402


def load_source(name: str):
    """(series float32 (n_voxels, length), description) of a real fMRI source."""
    import numpy as np

    from pybrain_mpi.data.examples import load_nitime_fmri_series, package_data_path

    if name == "nitime":
        return load_nitime_fmri_series(), "nitime fmri1+fmri2 (40 TRs)"
    if name == "nipy":
        import nibabel as nib

        path = package_data_path("nipy", "testing", "functional.nii.gz")
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        series = data.reshape(-1, data.shape[-1])
        std = series.std(axis=1)
        keep = std > 0
        z = (series[keep] - series[keep].mean(axis=1, keepdims=True)) / std[keep, None]
        return z.astype(np.float32), "nipy testing/functional.nii.gz (20 TRs)"
    raise SystemExit(f"unknown source {name!r}: use nitime or nipy")


# --- float64 emulation of the two-stage 3LC allreduce (ablations) ---------------------


class Emulated3LC:
    """The library's two-stage 3LC average of a flat gradient over `comm`, in float64 numpy,
    with knobs: scale segments, error feedback per stage, stage 2 on/off, sparsity."""

    def __init__(self, comm, count: int, segments: list[tuple[int, int]], sparsity: float = 1.0,
                 ef1: bool = True, ef2: bool = True, stage2: bool = True, gather: bool = False):
        import numpy as np

        self.comm, self.n, self.me = comm, comm.size, comm.rank
        self.count, self.sparsity = count, sparsity
        self.ef1, self.ef2, self.stage2, self.gather = ef1, ef2, stage2, gather
        base, extra = divmod(count, self.n)
        self.bounds = [(p * base + min(p, extra), (p + 1) * base + min(p + 1, extra)) for p in range(self.n)]
        self.segments = segments  # [(begin, end)] sharing one scale, covering [0, count)
        self.res1 = np.zeros(count)
        b, e = self.bounds[self.me]
        self.res2 = np.zeros(e - b)

    def _quantize(self, acc, begin: int):
        """q * M per scale segment of acc (which starts at flat index `begin`)."""
        import numpy as np

        out = np.zeros_like(acc)
        end = begin + acc.size
        for sb, se in self.segments:
            lo, hi = max(sb, begin), min(se, end)
            if lo >= hi:
                continue
            part = acc[lo - begin:hi - begin]
            m = np.abs(part).max() * self.sparsity
            if m > 0:
                out[lo - begin:hi - begin] = np.where(part >= m / 2, m, np.where(part <= -m / 2, -m, 0.0))
        return out

    def average(self, grad):
        import numpy as np

        g = np.asarray(grad, dtype=np.float64)
        if self.gather:
            # One quantization per contribution: every rank quantizes its whole gradient
            # (error feedback) and all ranks sum every rank's decoded values.
            acc = self.res1 + g
            sent = self._quantize(acc, 0)
            self.res1 = acc - sent if self.ef1 else np.zeros_like(acc)
            return np.sum(self.comm.allgather(sent), axis=0) / self.n
        shares = []
        for p, (b, e) in enumerate(self.bounds):
            acc = self.res1[b:e] + g[b:e]
            if p == self.me:
                self.res1[b:e] = 0.0
                shares.append(acc)
                continue
            sent = self._quantize(acc, b)
            self.res1[b:e] = acc - sent if self.ef1 else 0.0
            shares.append(sent)
        received = self.comm.alltoall(shares)
        avg = np.sum(received, axis=0) / self.n
        b, _ = self.bounds[self.me]
        if self.stage2:
            acc2 = self.res2 + avg
            sent2 = self._quantize(acc2, b)
            self.res2 = acc2 - sent2 if self.ef2 else np.zeros_like(acc2)
        else:
            sent2 = avg
        return np.concatenate(self.comm.allgather(sent2))


# --- one training run -------------------------------------------------------------------


def train(args, series, variant: str, optimizer_name: str, comm):
    import numpy as np
    import torch

    import pybrain_mpi as pbm
    from pybrain_mpi.data.examples import split_by_voxel
    from pybrain_mpi.metrics import r2_score
    from pybrain_mpi.models import DCA
    from pybrain_mpi.models.dca import dca_loss

    torch.manual_seed(0)
    train_x, held_x = split_by_voxel(series, 0.2, seed=0)
    length = series.shape[1]
    model = DCA(input_length=length, hidden_size=64)
    named = [(n, p) for n, p in model.named_parameters()]

    emulated = None
    warm = 0
    library_block = variant.startswith("3lc_block") and variant[9:].isdigit()
    if variant in ("none", "3lc", "3lc_bucket", "3lc_tensor") or library_block:
        codec = None
        if variant == "3lc":
            codec = pbm.compression.ThreeLC(args.sparsity)
        elif variant == "3lc_bucket":
            codec = pbm.compression.ThreeLC(args.sparsity, per_tensor=False, block=0)
        elif variant == "3lc_tensor":
            codec = pbm.compression.ThreeLC(args.sparsity, block=0)
        elif library_block:
            codec = pbm.compression.ThreeLC(args.sparsity, block=int(variant[9:]))
        net = pbm.DistributedDataParallel(model, compression=codec)
        buckets = None
    else:
        net = model
        # The DDP bucket layout (reverse parameter order, first bucket 1 MiB), so the
        # emulation's per-bucket scale matches the library's.
        index = {id(p): i for i, (_, p) in enumerate(named)}
        buckets = [[index[id(p)] for p in b.params]
                   for b in pbm.DistributedDataParallel._build_buckets(named, 25 << 20, 1 << 20)]
        order = [i for b in buckets for i in b]  # flat order: bucket by bucket, as DDP
        bucket_of = [0] * len(named)
        for k, b in enumerate(buckets):
            for i in b:
                bucket_of[i] = k
        offsets, total = [], 0
        for i in order:
            offsets.append(total)
            total += named[i][1].numel()
        tensor_segments = [(o, o + named[i][1].numel()) for o, i in zip(offsets, order)]
        bucket_segments = []
        for k in range(len(buckets)):
            seg = [s for s, i in zip(tensor_segments, order) if bucket_of[i] == k]
            bucket_segments.append((seg[0][0], seg[-1][1]))
        kwargs = {}
        segments = bucket_segments
        for knob in variant.removeprefix("emu_").split("+"):
            if knob == "tensor":
                segments = tensor_segments
            elif knob.startswith("block") and knob[5:].isdigit():
                size = int(knob[5:])
                segments = [(b, min(b + size, e)) for tb, e in tensor_segments for b in range(tb, e, size)]
            elif knob == "noef1":
                kwargs["ef1"] = False
            elif knob == "noef2":
                kwargs["ef2"] = False
            elif knob == "1stage":
                kwargs["stage2"] = False
            elif knob == "gather":
                kwargs["gather"] = True
            elif knob.startswith("warm") and knob[4:].isdigit():
                warm = int(knob[4:])
            elif knob.startswith("s") and knob[1:].isdigit():
                kwargs["sparsity"] = int(knob[1:]) / 100
            elif knob != "bucket":
                raise SystemExit(f"unknown variant {variant!r}")
        # A DDP bucket's allreduce is its own exchange: emulate each bucket separately.
        emulated = []
        for (bb, be) in bucket_segments:
            segs = [(max(sb, bb) - bb, min(se, be) - bb) for sb, se in segments if sb < be and se > bb]
            emulated.append((bb, be, Emulated3LC(comm, be - bb, segs, **kwargs)))
        flat_order = order

    if optimizer_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr_adam)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr_sgd, momentum=0.9)

    rng = np.random.default_rng(1)
    held = torch.from_numpy(held_x)
    curve = []

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            pred = model(held.unsqueeze(1))[0].squeeze(1).numpy()
        model.train()
        curve.append((step, float(r2_score(pred, held_x))))

    from pybrain_mpi.communication import context

    diverged = None
    bytes_before = int(context.bytes_sent())
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        picks = rng.choice(len(train_x), size=args.batch * comm.size, replace=False)
        x = torch.from_numpy(train_x[picks[comm.rank::comm.size]]).unsqueeze(1)
        opt.zero_grad(set_to_none=False)
        x_hat, (z, z_prime) = net(x)
        loss = dca_loss(x, x_hat, z, z_prime)
        # Every rank stops at the same step: one rank's NaN loss is every rank's divergence.
        if comm.allreduce(0 if bool(torch.isfinite(loss)) else 1):
            diverged = step
            break
        try:
            loss.backward()
            step_ok = True
        except pbm.PbmError:
            # 3LC refuses a NaN/Inf gradient on every rank alike (an agreed failure).
            step_ok = False
        if not step_ok:
            diverged = step
            break
        if emulated is not None:
            flat = torch.cat([named[i][1].grad.reshape(-1) for i in flat_order]).double().numpy()
            if step <= warm:
                averaged = np.asarray(comm.allreduce(flat)) / comm.size
            else:
                averaged = np.concatenate([e.average(flat[bb:be]) for bb, be, e in emulated])
            at = 0
            for i in flat_order:
                p = named[i][1]
                p.grad.copy_(torch.from_numpy(averaged[at:at + p.numel()]).view_as(p).float())
                at += p.numel()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    if not curve:
        curve.append((0, float("nan")))
    return curve, time.perf_counter() - start, diverged, int(context.bytes_sent()) - bytes_before


def steps_to(curve, target: float):
    for step, r2 in curve:
        if r2 >= target:
            return step
    return None


def worker(args) -> None:
    from mpi4py import MPI

    import pybrain_mpi as pbm

    pbm.init()
    comm = MPI.COMM_WORLD
    rows, records = [], []
    for source in args.sources.split(","):
        series, description = load_source(source)
        for optimizer_name in args.optimizers.split(","):
            base_curve = None
            base_bytes = None
            for variant in args.variants.split(","):
                curve, seconds, diverged, sent = train(args, series, variant, optimizer_name, comm)
                if variant == "none" and diverged is None:
                    base_curve, base_bytes = curve, sent
                final = curve[-1][1]
                record = {"source": source, "data": description, "series": int(series.shape[0]),
                          "length": int(series.shape[1]), "optimizer": optimizer_name, "variant": variant,
                          "steps": args.steps, "final_r2": final, "seconds": seconds, "curve": curve,
                          "diverged_at": diverged, "bytes_sent": sent}
                row = {"source": source, "optimizer": optimizer_name, "variant": variant, "r2": f"{final:.4f}",
                       "ratio": "-", "reached": "-", "base_reached": "-", "steps_ratio": "-", "bytes": "-",
                       "status": "ok" if diverged is None else f"diverged at step {diverged}"}
                # The emulations exchange through mpi4py: the engine's byte count says nothing.
                if base_bytes and variant != "none" and not variant.startswith("emu_") and diverged is None:
                    record.update(compression=base_bytes / max(sent, 1))
                    row.update(bytes=f"{base_bytes / max(sent, 1):.1f}x")
                if base_curve is not None and diverged is None:
                    base_final = base_curve[-1][1]
                    target = 0.98 * base_final
                    reached, base_reached = steps_to(curve, target), steps_to(base_curve, target)
                    record.update(ratio=final / base_final, steps_to_98=reached, base_steps_to_98=base_reached)
                    row.update(ratio=f"{final / base_final:.3f}", reached=str(reached), base_reached=str(base_reached),
                               steps_ratio=f"{reached / base_reached:.2f}" if reached and base_reached else "-")
                rows.append(row)
                records.append(record)
                if comm.rank == 0:
                    print(" ".join(row.values()), flush=True)
    if comm.rank == 0:
        print_table(rows, [("source", "source"), ("optimizer", "optimizer"), ("variant", "variant"),
                           ("r2", "held-out R^2"), ("ratio", "/ none"), ("reached", "steps to 98% of none"),
                           ("base_reached", "none's steps"), ("steps_ratio", "steps ratio"),
                           ("bytes", "bytes: none / this"), ("status", "status")])
        if args.json:
            with open(args.json, "w") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", default="nitime,nipy")
    parser.add_argument("--optimizers", default="adam,sgd")
    parser.add_argument("--variants", default="none,3lc")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="series per rank per step")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lr-adam", type=float, default=1e-3)
    parser.add_argument("--lr-sgd", type=float, default=0.01)
    parser.add_argument("--sparsity", type=float, default=1.0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sys.exit(subprocess.run([str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(args.ranks), sys.executable,
                             __file__, "--worker", *sys.argv[1:]], env=env).returncode)


if __name__ == "__main__":
    main()
