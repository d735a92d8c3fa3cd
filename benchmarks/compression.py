"""3LC codec benchmark: single-core throughput and compression ratio on real fMRI gradients.

    python benchmarks/compression.py [--json results/compression.json] [--quick]

Part 1, throughput: encode, decode (overwrite) and decode-add of float32 buffers from
64 KiB to 256 MiB, in GB/s of float32 input, on the calling thread (one core), with a warm
residual. Two inputs: "fmri", the real gradients of part 2 tiled to size (sparse after
quantization), and "dense", Student-t noise whose many nonzero trits are the slow case.
Baselines in the same run: numpy `r += g` (one read-modify-write pass, what the error
feedback step alone costs) and a float32 -> bfloat16 cast (Cast('bf16')).
Times are medians; GB/s are given on thread CPU time (robust to other processes on a busy
machine) and on wall time. The codec calls are timed by the bench mode of the native test
binary (tests/native/, built here with CMake or g++ from the core's sources): the same
body-level functions the allreduce calls, with no Python call in between.

Part 2, ratio: a 1D convolutional autoencoder trains on the voxel time series of nitime's
real fMRI run (nitime/data/fmri1.nii.gz, 10x10x18 voxels x 40 volumes). Every step's
gradient goes through 3LC, one state per tensor as in the paper, with error feedback at
s = 1.0, 1.5, 1.9; ratio = float32 bytes / sum over tensors of (body + 4-byte scale M).
The same model is trained with the decoded gradients (SGD, lr 0.1, momentum 0.9) from the same
initialisation, and the final loss is compared to uncompressed training (loss gap).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pybrain_mpi  # noqa: F401
from pybrain_mpi.compression import ThreeLC

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "native"))
try:
    from build_native_tests import build  # noqa: E402
except ImportError:
    sys.exit("compression.py builds the native C++ benchmark of tests/native, which only the "
             "source checkout has: run it there (pybrain-mpi bench --dir CHECKOUT/benchmarks "
             "compression)")

SIZES = [64 << 10, 1 << 20, 16 << 20, 256 << 20]
SPARSITIES = [1.0, 1.5, 1.9]
LR = float(os.environ.get('PBM_BENCH_LR', '0.1'))  # SGD momentum 0.9, as in the 3LC paper


# --- real gradients ------------------------------------------------------------------------

def load_voxel_series() -> np.ndarray:
    """z-scored time series (voxels x 40) of nitime's fmri1.nii.gz, constant voxels dropped."""
    import nibabel as nib
    import nitime

    path = Path(nitime.__file__).parent / "data" / "fmri1.nii.gz"
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    series = data.reshape(-1, data.shape[-1])
    std = series.std(axis=1)
    series = series[std > 0]
    return (series - series.mean(axis=1, keepdims=True)) / series.std(axis=1, keepdims=True)


def make_model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(  # 40 time points -> 10 x 64 code -> 40
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 64, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv1d(64, 64, 5, stride=2, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(640, 256), nn.ReLU(), nn.Linear(256, 640), nn.ReLU(),
        nn.Unflatten(1, (64, 10)),
        nn.ConvTranspose1d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose1d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(32, 1, 5, padding=2),
    )


def train(series: np.ndarray, steps: int, codec: ThreeLC | None, seed: int = 0,
          capture: list | None = None):
    """Trains the autoencoder; with a codec every gradient goes through encode/decode.

    Returns (final loss averaged over the last 10 steps, list of per-step ratios).
    """
    import torch

    torch.set_num_threads(1)
    model = make_model(seed)
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    data = torch.from_numpy(series).unsqueeze(1)
    generator = torch.Generator().manual_seed(seed + 1)
    count = sum(p.numel() for p in params)
    # One 3LC state per tensor, as in the paper: each tensor gets its own scale M.
    states = [codec.new_state(p, name) for name, p in model.named_parameters()] if codec else None
    losses, ratios = [], []
    for _ in range(steps):
        batch = data[torch.randint(0, data.shape[0], (128,), generator=generator)]
        loss = torch.nn.functional.mse_loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        if capture is not None:
            capture.append(torch.cat([p.grad.reshape(-1) for p in params]).numpy())
        if codec is not None:
            sent = 0
            for p, state in zip(params, states):
                payload = codec.encode(p.grad, state)
                sent += payload.body_nbytes + 4  # the message is M plus the bytes
                codec.decode(payload, p.grad)
            ratios.append(count * 4 / sent)
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses[-10:])), ratios, count


# --- throughput ----------------------------------------------------------------------------

def timed(fn, repeats: int):
    """Median (thread CPU seconds, wall seconds) of fn() over repeats."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def throughput(gradients: list[np.ndarray], sizes: list[int], budget_s: float) -> list[dict]:
    rows = []
    source = np.concatenate(gradients[len(gradients) // 2:])  # mid-training gradients
    rng = np.random.default_rng(0)
    binary = build()
    with tempfile.TemporaryDirectory() as scratch:
        for size, kind in [(size, kind) for size in sizes for kind in ("fmri", "dense")]:
            n = size // 4
            if kind == "fmri":  # the real gradients, tiled: sparse once quantized (one M)
                grad = np.resize(source, n).astype(np.float32)
            else:  # heavy-tailed noise: many nonzero trits, the codec's slow case
                grad = (rng.standard_t(3, n) * 1e-3).astype(np.float32)
            repeats = int(min(200, max(5, budget_s / max(size / 1e9, 1e-4))))
            result = {"bytes": size, "input": kind, "repeats": repeats}
            # 3LC encode (warm residual, s = 1), decode, decode-add and Cast('bf16'), one core
            path = Path(scratch) / "grad.f32"
            grad.tofile(path)
            timing = json.loads(subprocess.run([str(binary), "bench", str(path), str(n), str(repeats)],
                                               capture_output=True, text=True, check=True).stdout)
            for name in ("encode", "decode", "decode_add", "cast_bf16"):
                cpu, wall = timing[name]
                result[f"{name}_gbps"] = size / cpu / 1e9
                result[f"{name}_wall_gbps"] = size / wall / 1e9
            result["ratio"] = size / (timing["body_bytes"] + 4)
            residual = np.zeros(n, np.float32)
            cpu, wall = timed(lambda: np.add(residual, grad, out=residual), repeats)
            result.update(numpy_add_gbps=size / cpu / 1e9, numpy_add_wall_gbps=size / wall / 1e9)
            del grad, residual
            rows.append(result)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="results/compression.json")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (smoke test)")
    args = parser.parse_args(argv)
    steps = 30 if args.quick else args.steps
    sizes = SIZES[:2] if args.quick else SIZES

    series = load_voxel_series()
    print(f"nitime fmri1: {series.shape[0]} voxel time series x {series.shape[1]} volumes")
    captured: list[np.ndarray] = []
    t0 = time.perf_counter()
    base_loss, _, count = train(series, steps, None, capture=captured)
    print(f"autoencoder: {count} parameters, {steps} steps, uncompressed loss {base_loss:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")
    ratio_rows = []
    for sparsity in SPARSITIES:
        loss, ratios, _ = train(series, steps, ThreeLC(sparsity))
        ratio_rows.append({"sparsity": sparsity, "ratio_mean": float(np.mean(ratios)),
                           "ratio_median": float(np.median(ratios)), "ratio_min": float(np.min(ratios)),
                           "loss": loss, "loss_uncompressed": base_loss,
                           "loss_gap_pct": 100 * (loss - base_loss) / base_loss})

    print("\n3LC on real gradients (per tensor, all parameters, per step)")
    print(f"{'s':>4} {'ratio mean':>11} {'median':>8} {'min':>7} {'loss':>8} {'uncompr.':>9} {'gap %':>7}")
    for r in ratio_rows:
        print(f"{r['sparsity']:>4.1f} {r['ratio_mean']:>11.1f} {r['ratio_median']:>8.1f} {r['ratio_min']:>7.1f} "
              f"{r['loss']:>8.4f} {r['loss_uncompressed']:>9.4f} {r['loss_gap_pct']:>+7.2f}")

    rows = throughput(captured, sizes, budget_s=2.0 if not args.quick else 0.2)
    print("\nThroughput, GB/s of float32 input, one core (thread CPU time; wall time in brackets)")
    print(f"{'size':>9} {'input':>6} {'encode':>14} {'decode':>14} {'decode_add':>14} {'numpy r+=g':>14} {'cast bf16':>14} {'ratio':>7}")
    for r in rows:
        def cell(key):
            return f"{r[key + '_gbps']:6.2f} ({r[key + '_wall_gbps']:5.2f})"
        size = f"{r['bytes'] >> 20} MiB" if r["bytes"] >= 1 << 20 else f"{r['bytes'] >> 10} KiB"
        print(f"{size:>9} {r['input']:>6} {cell('encode'):>14} {cell('decode'):>14} {cell('decode_add'):>14} "
              f"{cell('numpy_add'):>14} {cell('cast_bf16'):>14} {r['ratio']:>7.1f}")

    report = {"machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]},
              "model_parameters": count, "steps": steps, "ratio": ratio_rows, "throughput": rows}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
