"""Patch throughput, read amplification and peak memory: pybrain-mpi vs TorchIO vs nibabel.

Every configuration runs in its own process (so its peak RSS is its own) on the same volume:
nilearn's MNI152 T1 (1 mm, 197x233x189) as float32, optionally upsampled to make it larger,
stored once as NIfTI (.nii.gz, what TorchIO and nibabel read) and once as Zarr with 32^3
chunks (what pybrain-mpi reads).

  pbm      pbm.data.PatchLoader + UniformSampler, 1/2/4 prefetch threads, 1 and 2 MPI ranks,
           chunk cache smaller than the volume (--cache-mb). Epoch 0 starts from an empty
           cache (cold); the median of the later epochs is reported as warm.
  torchio  tio.Queue(UniformSampler, samples_per_volume=16) + DataLoader (baseline).
  nibabel  naive: load the whole NIfTI for every patch, then crop.

Plus a read-amplification sweep: random 64^3 patches, 32^3 chunks, cache from 25% to 100%
of the volume, cold (cache cleared before each patch) and warm.

    python benchmarks/patches.py                     # table + results/patches.json
    python benchmarks/patches.py --patch 64 --threads 1 2 --ranks 1 --samples 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- data
def prepare(workdir: Path, upsample: int) -> dict:
    """Writes the benchmark volume as float32 NIfTI and as Zarr (32^3 chunks) once."""
    import nibabel as nib
    import nilearn

    nii = workdir / f"t1_x{upsample}.nii.gz"
    zarr_path = workdir / f"t1_x{upsample}.zarr"
    if not nii.exists():
        src = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                           "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
        img = nib.load(src)
        data = np.asarray(img.dataobj).astype(np.float32)
        affine = img.affine.copy()
        if upsample > 1:
            for ax in range(3):
                data = np.repeat(data, upsample, axis=ax)
            affine[:3, :3] /= upsample
        nib.save(nib.Nifti1Image(data, affine), str(nii))
    if not zarr_path.exists():
        from pybrain_mpi.data import convert

        convert(str(nii), str(zarr_path), chunks=(32, 32, 32), progress=False)
    import nibabel as nib

    shape = tuple(int(n) for n in nib.load(str(nii)).shape)
    return {"nii": str(nii), "zarr": str(zarr_path), "shape": shape,
            "volume_mb": int(np.prod(shape)) * 4 / 2**20}


# ---------------------------------------------------------------------------- workers
def worker_pbm(args) -> dict:
    import torch  # noqa: F401  (same import cost as the baselines)

    import pybrain_mpi as pbm
    from pybrain_mpi.data import PatchLoader, UniformSampler, Volume

    rank, world = 0, 1
    if args.mpi:
        pbm.init()
        rank, world = pbm.rank(), pbm.size()
    vol = Volume(args.zarr, cache_bytes=int(args.cache_mb * 2**20), threads=2)
    size = (args.patch,) * 3
    sampler = UniformSampler(vol, size, args.samples, seed=0, rank=rank, world_size=world)
    loader = PatchLoader(vol, sampler, batch_size=args.batch, threads=args.threads,
                         prefetch_batches=args.threads + 1)
    epochs = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        vol.reset_counters()
        if args.mpi:
            pbm.barrier()
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += batch["image"].shape[0]
        if args.mpi:
            pbm.barrier()  # the epoch ends when the slowest rank is done
        dt = time.perf_counter() - t0
        epochs.append({"seconds": dt, "patches": n * world, "amplification": vol.read_amplification})
    out = {"epochs": epochs, "peak_rss_mb": peak_rss_mb(), "rank": rank, "world": world}
    if args.mpi:
        from mpi4py import MPI

        everyone = MPI.COMM_WORLD.gather(out["peak_rss_mb"], root=0)
        out["peak_rss_mb_per_rank"] = everyone
        pbm.shutdown()
        if rank != 0:
            return {}
    return out


def worker_torchio(args) -> dict:
    import torch
    import torchio as tio

    size = (args.patch,) * 3
    per_volume = 16
    n_subjects = -(-args.samples // per_volume)
    subjects = [tio.Subject(image=tio.ScalarImage(args.nii)) for _ in range(n_subjects)]
    dataset = tio.SubjectsDataset(subjects)
    queue = tio.Queue(dataset, max_length=2 * per_volume, samples_per_volume=per_volume,
                      sampler=tio.data.UniformSampler(size), num_workers=args.threads - 1,
                      shuffle_subjects=False, shuffle_patches=True, verbose=False)
    loader = torch.utils.data.DataLoader(queue, batch_size=args.batch, num_workers=0)
    epochs = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += batch["image"][tio.DATA].shape[0]
            if n >= args.samples:
                break
        epochs.append({"seconds": time.perf_counter() - t0, "patches": n, "amplification": None})
    return {"epochs": epochs, "peak_rss_mb": peak_rss_mb()}


def worker_nibabel(args) -> dict:
    import nibabel as nib
    import torch

    size = args.patch
    rng = np.random.default_rng(0)
    epochs = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.samples):
            data = nib.load(args.nii).get_fdata(dtype=np.float32)
            s = [int(rng.integers(0, d - size + 1)) for d in data.shape]
            patch = torch.from_numpy(np.ascontiguousarray(
                data[s[0]:s[0] + size, s[1]:s[1] + size, s[2]:s[2] + size]))
            n += 1
            del data, patch
        dt = time.perf_counter() - t0
        volume_bytes = float(np.prod(nib.load(args.nii).shape)) * 4
        epochs.append({"seconds": dt, "patches": n, "amplification": volume_bytes / size**3 / 4})
    return {"epochs": epochs, "peak_rss_mb": peak_rss_mb()}


def worker_amplification(args) -> dict:
    """Read amplification of random 64^3 patches for several cache sizes, cold and warm."""
    from pybrain_mpi.data import UniformSampler, Volume

    volume_bytes = args.volume_mb * 2**20
    rows = []
    for fraction in (0.25, 0.5, 1.0):
        vol = Volume(args.zarr, cache_bytes=int(fraction * volume_bytes) + 2**20, threads=2)
        sampler = UniformSampler(vol, (64,) * 3, args.samples, seed=1, rank=0, world_size=1)
        # Cold: every patch from an empty cache.
        for spec in list(sampler)[:50]:
            vol.clear_cache()
            vol.read_patch(spec.start, spec.size)
        cold = vol.read_amplification
        # Warm: one pass to fill the cache, then measure a fresh epoch of patches.
        vol.clear_cache()
        for spec in sampler:
            vol.read_patch(spec.start, spec.size)
        sampler.set_epoch(1)
        vol.reset_counters()
        t0 = time.perf_counter()
        for spec in sampler:
            vol.read_patch(spec.start, spec.size)
        rows.append({"cache_fraction": fraction, "cold": cold, "warm": vol.read_amplification,
                     "warm_patches_per_s": args.samples / (time.perf_counter() - t0)})
        vol.close()
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}


def worker_large_make(args) -> dict:
    """Writes a synthetic ``--large-gb`` float32 .npy slab by slab (its own process, so the
    conversion's peak RSS is measured apart)."""
    side = int(round((args.large_gb * 2**30 / 4) ** (1 / 3) / 32)) * 32
    npy = Path(args.zarr).with_suffix(".npy")
    j, k = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (side,) * 3})
        for lo in range(0, side, 32):  # a smooth pattern plus a ramp: compressible, not constant
            planes = np.arange(lo, lo + 32)[:, None, None]
            ((np.sin((planes + j + k) / 50.0) * 100 + planes % 7).astype(np.float32)).tofile(f)
    return {"side": side, "gib": side**3 * 4 / 2**30, "peak_rss_mb": peak_rss_mb()}


def worker_large_convert(args) -> dict:
    """Converts the synthetic .npy to Zarr (32^3 chunks, default 256 MiB slabs); time, peak RSS."""
    from pybrain_mpi.data import convert

    npy = Path(args.zarr).with_suffix(".npy")
    t0 = time.perf_counter()
    convert(str(npy), args.zarr, chunks=(32, 32, 32), overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    os.remove(npy)
    return {"convert_s": seconds, "peak_rss_mb": peak_rss_mb()}


def worker_large_sample(args) -> dict:
    """Samples ``--samples`` random 64^3 patches through PatchLoader from the large store."""
    import torch  # noqa: F401

    from pybrain_mpi.data import PatchLoader, UniformSampler, Volume

    vol = Volume(args.zarr, cache_bytes=int(args.cache_mb * 2**20))
    sampler = UniformSampler(vol, (64,) * 3, args.samples, seed=0, rank=0, world_size=1)
    t0 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in PatchLoader(vol, sampler, 4, threads=2))
    return {"patches_per_s": n / (time.perf_counter() - t0), "amplification": vol.read_amplification,
            "peak_rss_mb": peak_rss_mb()}


def worker_baseline(args) -> dict:
    """Peak RSS of the imports every method pays (torch, nibabel): subtracted to get the memory
    the data pipeline itself uses (pbm's own imports, zarr and numba, count as pipeline)."""
    import nibabel  # noqa: F401
    import torch  # noqa: F401

    return {"peak_rss_mb": peak_rss_mb()}


WORKERS = {"large_make": worker_large_make, "large_convert": worker_large_convert, "large_sample": worker_large_sample,
           "baseline": worker_baseline, "pbm": worker_pbm, "torchio": worker_torchio, "nibabel": worker_nibabel,
           "amplification": worker_amplification}


# ---------------------------------------------------------------------------- driver
def run_child(kind: str, data: dict, ranks: int = 1, **opts) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--nii", data["nii"], "--zarr", data["zarr"],
           "--volume-mb", str(data["volume_mb"])]
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if ranks > 1:
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        cmd = [mpiexec, "-n", str(ranks)] + cmd + ["--mpi"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[0][len("RESULT "):])


def summarize(name: str, patch: int, result: dict, threads, ranks, baseline_mb: float) -> dict:
    epochs = result["epochs"]
    cold = epochs[0]
    warm = epochs[1:] or epochs
    rate = statistics.median(e["patches"] / e["seconds"] for e in warm)
    amp_warm = [e["amplification"] for e in warm if e["amplification"] is not None]
    peak = sum(result.get("peak_rss_mb_per_rank") or [result["peak_rss_mb"]])
    return {"method": name, "patch": patch, "threads": threads, "ranks": ranks,
            "patches_per_s": rate, "cold_patches_per_s": cold["patches"] / cold["seconds"],
            "mb_per_s": rate * patch**3 * 4 / 2**20,
            "amplification_cold": cold["amplification"],
            "amplification_warm": statistics.median(amp_warm) if amp_warm else None,
            "peak_rss_mb": peak, "pipeline_mb": peak - ranks * baseline_mb}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=160, help="patches per epoch (64^3; half at 128^3)")
    p.add_argument("--epochs", type=int, default=4, help="epoch 0 is cold; later ones warm (median)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cache-mb", type=float, default=None, help="default: half the volume")
    p.add_argument("--upsample", type=int, default=1, help="repeat voxels to make a larger volume")
    p.add_argument("--no-torchio", action="store_true")
    p.add_argument("--large-gb", type=float, default=0,
                   help="also convert and sample a synthetic volume of this many GiB (bounded memory)")
    p.add_argument("--only-large", action="store_true", help="run only the --large-gb part")
    p.add_argument("--nibabel-samples", type=int, default=12)
    p.add_argument("--workdir", default=None, help="where the NIfTI/Zarr copies live (default: temp)")
    p.add_argument("--json", default="results/patches.json")
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--nii", help=argparse.SUPPRESS)
    p.add_argument("--zarr", help=argparse.SUPPRESS)
    p.add_argument("--volume-mb", type=float, help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.patch, args.threads = args.patch[0], args.threads[0]
        result = WORKERS[args.worker](args)
        if result:
            print("RESULT " + json.dumps(result), flush=True)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pbm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = prepare(workdir, args.upsample)
    cache_mb = args.cache_mb if args.cache_mb is not None else data["volume_mb"] / 2
    print(f"volume {data['shape']} float32 = {data['volume_mb']:.1f} MiB; pbm chunk cache {cache_mb:.1f} MiB; "
          f"chunks 32^3; batch {args.batch}")
    large = None
    if args.large_gb > 0:
        large_zarr = str(workdir / "large.zarr")
        made = run_child("large_make", dict(data, zarr=large_zarr), large_gb=args.large_gb)
        conv = dict(run_child("large_convert", dict(data, zarr=large_zarr)), **{
            k: made[k] for k in ("side", "gib")})
        samp = run_child("large_sample", dict(data, zarr=large_zarr), samples=200, cache_mb=256)
        large = {"convert": conv, "sample": samp}
        print(f"large volume {conv['side']}^3 float32 = {conv['gib']:.2f} GiB: convert {conv['convert_s']:.0f} s "
              f"peak RSS {conv['peak_rss_mb']:.0f} MB; 200 random 64^3 patches (256 MB cache) "
              f"{samp['patches_per_s']:.0f} patches/s, peak RSS {samp['peak_rss_mb']:.0f} MB")
        import shutil

        shutil.rmtree(large_zarr, ignore_errors=True)
        if args.only_large:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"large": large}, indent=2))
            print(f"wrote {args.json}")
            return 0
    baseline_mb = run_child("baseline", data)["peak_rss_mb"]
    print(f"imports alone (torch, nibabel): peak RSS {baseline_mb:.0f} MB per process; "
          "'pipe MB' = peak RSS minus that")
    rows = []
    for patch in args.patch:
        samples = args.samples if patch <= 64 else max(8, args.samples // 2)
        common = dict(patch=patch, batch=args.batch, epochs=args.epochs)
        if not args.no_torchio:
            r = run_child("torchio", data, samples=samples, threads=1, **common)
            rows.append(summarize("torchio Queue", patch, r, 1, 1, baseline_mb))
            print(_fmt(rows[-1]), flush=True)
        r = run_child("nibabel", data, samples=args.nibabel_samples, threads=1,
                      **dict(common, epochs=2))
        rows.append(summarize("nibabel full load", patch, r, 1, 1, baseline_mb))
        print(_fmt(rows[-1]), flush=True)
        for ranks in args.ranks:
            for threads in args.threads:
                r = run_child("pbm", data, ranks=ranks, samples=samples, threads=threads,
                              cache_mb=cache_mb, **common)
                rows.append(summarize("pbm PatchLoader", patch, r, threads, ranks, baseline_mb))
                print(_fmt(rows[-1]), flush=True)
    amp = run_child("amplification", data, samples=args.samples)

    print()
    print(f"{'method':18} {'patch':>5} {'thr':>3} {'ranks':>5} {'patches/s':>10} {'cold p/s':>9} "
          f"{'MB/s':>8} {'amp cold':>9} {'amp warm':>9} {'peak MB':>8} {'pipe MB':>8}")
    for row in rows:
        print(_fmt(row))
    print("\nread amplification, random 64^3 patches, 32^3 chunks (decoded bytes / returned bytes)")
    print(f"{'cache/volume':>12} {'cold':>6} {'warm':>6} {'warm patches/s':>15}")
    for a in amp["rows"]:
        print(f"{a['cache_fraction']:>12.2f} {a['cold']:>6.2f} {a['warm']:>6.2f} {a['warm_patches_per_s']:>15.1f}")
    for patch in args.patch:
        base = [r for r in rows if r["method"] == "torchio Queue" and r["patch"] == patch]
        best = max((r for r in rows if r["method"] == "pbm PatchLoader" and r["patch"] == patch
                    and r["ranks"] == 1), key=lambda r: r["patches_per_s"])
        if base:
            b = base[0]
            print(f"{patch}^3: pbm best 1-rank ({best['threads']} threads) {best['patches_per_s'] / b['patches_per_s']:.2f}x "
                  f"TorchIO patches/s at {best['peak_rss_mb'] / b['peak_rss_mb']:.2f}x its peak RSS, "
                  f"{best['pipeline_mb'] / max(1.0, b['pipeline_mb']):.2f}x its pipeline memory")
    out = {"volume": data, "cache_mb": cache_mb, "baseline_rss_mb": baseline_mb, "args": {k: v for k, v in vars(args).items()
                                                            if not k.startswith(("worker", "nii", "zarr"))},
           "rows": rows, "amplification": amp["rows"], "large": large, "host": os.uname().nodename,
           "load_average": os.getloadavg()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


def _fmt(r: dict) -> str:
    def num(v, spec):
        return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0].lstrip(">")))
    return (f"{r['method']:18} {r['patch']:>5} {r['threads']:>3} {r['ranks']:>5} {r['patches_per_s']:>10.1f} "
            f"{r['cold_patches_per_s']:>9.1f} {r['mb_per_s']:>8.1f} {num(r['amplification_cold'], '>9.2f')} "
            f"{num(r['amplification_warm'], '>9.2f')} {r['peak_rss_mb']:>8.0f} {r['pipeline_mb']:>8.0f}")


if __name__ == "__main__":
    sys.exit(main())
