"""Activation checkpointing: peak memory and step time, with and without.

    python benchmarks/checkpointing.py [--model cnn|resnet50_3d] [--size 64] [--batch 2] [--steps 6]

Models: ``cnn`` is a small 8-layer 3D CNN (its first full-resolution block sets the peak);
``resnet50_3d`` is pybrain_mpi.models.ResNet50_3D (46M parameters), whose ``features``
(stem + 16 bottleneck blocks) are checkpointed; issue 7's target is the "sqrt" policy on it
at 64^3, batch 2: >= 2x less peak memory for <= 1.35x step time. For ResNet50_3D gradients are
zeroed in place (not freed), so its peak counts activations and backward temporaries, not
the 185 MB of gradients that exist either way; only plain and sqrt apply to it.

Each configuration runs in its own subprocess with glibc told to return freed memory
(MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072; PyTorch has no CPU allocator
statistics), one torch thread. Peak = the process's high-water RSS during training steps
(VmHWM, reset through /proc/self/clear_refs after set-up) minus the RSS before them.
Configurations:
  plain          no checkpointing (the baseline, same run)
  sqrt           pbm.checkpointing "sqrt" policy (about sqrt(n) segments)
  sqrt_inplace   sqrt + in-place ReLU (one activation tensor per conv block instead of two)
  sqrt_stem      sqrt + in-place ReLU + a strided first convolution (downsampling in the stem,
                 so no full-resolution activation is kept: the layer that sets the peak; a
                 different model, shown for scale)
  tiled          the same model as plain: its full-resolution block (conv, ReLU, conv, ReLU,
                 pool) runs as pbm.models.recompute.TiledSegment (--tile, 64^3 tiles, recomputed in
                 backward, exact); sqrt checkpointing with in-place ReLU for the rest
Step time = median over --steps steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ["plain", "sqrt", "sqrt_inplace", "sqrt_stem", "tiled"]
RESNET_CONFIGS = ["plain", "sqrt"]


def build_model(config: str):
    import torch

    inplace = config in ("sqrt_inplace", "sqrt_stem", "tiled")
    layers = []
    channels, stride = 1, 2 if config == "sqrt_stem" else 1
    for index, width in enumerate((8, 8, 16, 16, 32, 32, 64, 64)):
        layers += [torch.nn.Conv3d(channels, width, 3, padding=1, stride=stride if index == 0 else 1),
                   torch.nn.ReLU(inplace=inplace)]
        if index % 2 == 1:
            layers.append(torch.nn.MaxPool3d(2))
        channels = width
    layers += [torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 2)]
    if config == "tiled":
        from pybrain_mpi.models.recompute import TiledSegment

        # an in-place ReLU inside a tile would be fine too; plain ones keep the block generic
        block = torch.nn.Sequential(*[torch.nn.ReLU() if isinstance(m, torch.nn.ReLU) else m for m in layers[:5]])
        layers = [TiledSegment(block, tile=int(os.environ.get("PBM_BENCH_TILE", "64")))] + layers[5:]
    return torch.nn.Sequential(*layers)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(config: str, size: int, batch: int, steps: int, model_name: str = "cnn") -> dict:
    import torch

    from pybrain_mpi.models.recompute import checkpoint_sequential, segments_for_policy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    segments = "none" if config == "plain" else "sqrt"
    if model_name == "resnet50_3d":
        from pybrain_mpi.models import ResNet50_3D

        net = ResNet50_3D(out_features=2)
        sequential = net.features

        def forward(x):
            features = checkpoint_sequential(sequential, segments, x)
            return net.fc(net.pool(features).flatten(1))
        model, free_grads = net, False
    else:
        model = sequential = build_model(config)
        if config == "tiled":  # the tiled block keeps only its input and output already
            head, sequential = model[0], model[1:]

            def forward(x):
                return checkpoint_sequential(sequential, segments, head(x))
        else:
            def forward(x):
                return checkpoint_sequential(sequential, segments, x)
        free_grads = True
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, size)
    y = torch.randn(batch, 2)

    def step():
        opt.zero_grad(set_to_none=free_grads)
        out = forward(x)
        torch.nn.functional.mse_loss(out, y).backward()
        opt.step()

    step()  # warm-up: allocates gradients
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"config": config, "model": model_name,
            "segments": segments_for_policy(len(sequential), segments),
            "layers": len(sequential), "peak_mib": (rss_kib("VmHWM") - before) / 1024,
            "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", choices=["cnn", "resnet50_3d"], default="cnn")
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"default: {CONFIGS} for cnn, {RESNET_CONFIGS} for resnet50_3d")
    parser.add_argument("--json", default=None, help="default: results/checkpointing_<model>.json")
    parser.add_argument("--tile", type=int, default=64, help="TiledSegment tile edge for config tiled")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.batch, args.steps, args.model)))
        return
    configs = args.configs or (RESNET_CONFIGS if args.model == "resnet50_3d" else CONFIGS)
    if args.model == "resnet50_3d" and set(configs) - set(RESNET_CONFIGS):
        parser.error(f"resnet50_3d takes --configs among {RESNET_CONFIGS}")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               OMP_NUM_THREADS="1", PBM_BENCH_TILE=str(args.tile))
    rows = []
    for config in configs:
        out = subprocess.run([sys.executable, __file__, "--child", config, "--size", str(args.size),
                              "--batch", str(args.batch), "--steps", str(args.steps),
                              "--model", args.model],
                             env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0] if rows[0]["config"] == "plain" else None
    title = "ResNet50_3D" if args.model == "resnet50_3d" else "3D CNN"
    print(f"\n{title}, {args.size}^3, batch {args.batch}, 1 thread")
    print("| config | segments | peak MiB | step s | memory vs plain | time vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        mem = f"{base['peak_mib'] / row['peak_mib']:.2f}x less" if base else "-"
        tim = f"{row['step_s'] / base['step_s']:.2f}x" if base else "-"
        row.update(memory_reduction=base["peak_mib"] / row["peak_mib"] if base else None,
                   time_ratio=row["step_s"] / base["step_s"] if base else None)
        print(f"| {row['config']} | {row['segments']} | {row['peak_mib']:.0f} | {row['step_s']:.3f} | "
              f"{mem} | {tim} |")
    path = Path(args.json or f"results/checkpointing_{args.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "checkpointing", "model": args.model, "size": args.size, "batch": args.batch,
                                "loadavg": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
