"""CPU training-step speed of each example model per number format and memory layout.

    python benchmarks/compute_policy.py [--models cnn3d dca encoding] [--steps 8] [--threads 1]

One training step (forward, loss, backward, Adam step) of the example models at the shapes
their configs use, timed in one process with plain torch in the same run:

  fp32               plain torch: float32, contiguous (the baseline)
  channels_last      model and batch in channels_last_3d (3D convolutions only)
  bf16               torch.autocast("cpu", torch.bfloat16)
  channels_last+bf16 both
  auto               what pybrain_mpi.compute.resolve() picks on this machine

Prints the median step time of each (after warm-up), the speed-up over fp32, and writes
results/compute_policy.json. A row is timed in alternating rounds with the baseline so drift
on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from pybrain_mpi import compute  # noqa: E402
from pybrain_mpi.models import DCA, EncodingMLP, NaiveCNN3D, dca_loss  # noqa: E402


def _cnn3d(size: int, batch: int):
    model = NaiveCNN3D(input_shape=(size,) * 3, dropout=0.1)
    x = torch.randn(batch, 1, size, size, size)
    y = torch.randn(batch, 1)
    return model, x, y, lambda m, a, b: torch.nn.functional.mse_loss(m(a), b)


def _unet3d(size: int, batch: int):
    from pybrain_mpi.models.unet3d import UNet3D

    model = UNet3D(in_channels=1, out_channels=2, depth=3, width=8)
    x = torch.randn(batch, 1, size, size, size)
    y = torch.randint(0, 2, (batch, size, size, size))
    return model, x, y, lambda m, a, b: torch.nn.functional.cross_entropy(m(a).float(), b)


def _dca(length: int, batch: int):
    model = DCA(input_length=length, hidden_size=64)
    x = torch.randn(batch, 1, length)
    def loss(m, a, b):
        x_hat, (z, z_prime) = m(a)
        return dca_loss(a, x_hat.float(), z.float(), z_prime.float())
    return model, x, x, loss


def _encoding(batch: int, sizes=(31, (64, 64), 28)):
    model = EncodingMLP(in_features=sizes[0], hidden=sizes[1], out_features=sizes[2])
    x, y = torch.randn(batch, sizes[0]), torch.randn(batch, sizes[2])
    return model, x, y, lambda m, a, b: torch.nn.functional.mse_loss(m(a), b)


def _step_fn(policy: compute.ComputePolicy, build):
    model, x, y, loss_fn = build()
    torch.manual_seed(0)
    model = policy.prepare(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = policy.input(x), policy.input(y)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with policy.autocast():
            loss = loss_fn(model, x, y)
        loss.float().backward()
        opt.step()
    return step


def _time(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn3d", "cnn3d64", "unet3d", "dca", "encoding", "encoding_large"],
                        help="cnn3d: NaiveCNN3D 32^3 batch 8 (examples/cnn3d_mni.toml); cnn3d64: "
                             "64^3 batch 8; unet3d: UNet3D depth 3 width 8, 32^3 batch 4 "
                             "(examples/unet3d_mni_cohort.toml); dca: DCA 40-point series batch 32 "
                             "(examples/dca_fmri.toml); encoding: EncodingMLP 31-64-64-28 batch 16 "
                             "(examples/encoding_fmri.toml); encoding_large: the model's default "
                             "768-1024-1024-20000, batch 64")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="results/compute_policy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    builds = {"cnn3d": lambda: _cnn3d(32, 8), "cnn3d64": lambda: _cnn3d(64, 8),
              "unet3d": lambda: _unet3d(32, 4),
              "dca": lambda: _dca(40, 32), "encoding": lambda: _encoding(16),
              "encoding_large": lambda: _encoding(64, (768, (1024, 1024), 20000))}
    features = compute.cpu_features()
    print(f"CPU native bf16: {compute.cpu_has_native_bf16()} "
          f"(avx512_bf16={'avx512_bf16' in features}, amx_bf16={'amx_bf16' in features}); "
          f"{args.threads} thread(s); torch {torch.__version__}")
    rows = []
    for name in args.models:
        build = builds[name]
        probe = build()[0]
        auto = compute.resolve(probe, device="cpu")
        variants = {"fp32": compute.ComputePolicy("cpu", "fp32", "contiguous"),
                    "bf16": compute.ComputePolicy("cpu", "bf16", "contiguous")}
        if compute._has_conv3d(probe):
            variants["channels_last"] = compute.ComputePolicy("cpu", "fp32", "channels_last")
            variants["channels_last+bf16"] = compute.ComputePolicy("cpu", "bf16", "channels_last")
        variants["auto"] = auto
        steps = {label: _step_fn(policy, build) for label, policy in variants.items()}
        for step in steps.values():  # warm-up: oneDNN kernel selection, allocator
            _time(step, 2)
        times: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(args.rounds):
            for label, step in steps.items():
                times[label] += _time(step, args.steps)
        base = statistics.median(times["fp32"])
        for label in steps:
            med = statistics.median(times[label])
            rows.append({"model": name, "variant": label, "median_s": med, "speedup": base / med,
                         "policy": variants[label].describe() if label == "auto" else ""})
        print_table([r for r in rows if r["model"] == name],
                    [("model", "model"), ("variant", "variant"), ("median_s", "step s"),
                     ("speedup", "x fp32")])
        print(f"  auto = {auto.describe()}\n")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "compute_policy", "threads": args.threads,
                                "native_bf16": compute.cpu_has_native_bf16(), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
