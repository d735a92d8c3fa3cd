"""Patch throughput, read amplification and peak memory: pybrain-mpi vs TorchIO vs nibabel.

Every configuration runs in its own process (so its peak RSS, /proc VmHWM, is its own) on the
same volume: nilearn's MNI152 T1 (1 mm, 197x233x189) as float32, optionally upsampled to make
it larger, stored once as NIfTI (.nii.gz, what TorchIO and nibabel read) and once as Zarr with
32^3 chunks (what pybrain-mpi reads).

  pbm        pbm.data.PatchLoader(output="numpy") + UniformSampler, 1/2/4 prefetch threads,
             1 and 2 MPI ranks: the patch pipeline alone, in a process that never imports
             torch (numpy, zarr, numcodecs). Chunk cache: the Volume's automatic sizing
             (room for 8 patches' chunks) unless --cache-mb; read-ahead: the loader's
             default (threads + 1 batches, at most 4 MiB) unless --prefetch-extra. Epoch 0
             starts from an empty cache (cold); the median of the later epochs is reported
             as warm.
  pbm +torch the same loader in a training process: torch imported, batches as tensors.
  pbm +augment  the pipeline alone with every numba augmentation on (numba + LLVM resident).
  torchio    tio.Queue(UniformSampler, samples_per_volume=16) + DataLoader (baseline), with
             --torchio-workers N: subjects loaded by N forked DataLoader workers (the setting
             users pick for speed). Every TorchIO row and the pbm +torch row sample their whole
             process tree every 20 ms: summed RSS and PSS (/proc/PID/smaps_rollup, shared pages
             split between processes); with workers, peak MB is the tree's RSS sum and data MB
             that minus each process's imports.
  nibabel    naive: load the whole NIfTI for every patch, then crop.

Also: the peak RSS of each kind of process's imports alone ("imports"; "data MB" is the
rest; "xTIO pk" and "xTIO dat" are a row's peak and data MB over TorchIO's at that patch
size: data MB compares what each pipeline holds beyond the libraries it imports); read amplification of random 64^3 and 128^3 patches (automatic cache and 25/50/100%
of the volume; cold = cache cleared before each patch, warm = a second epoch); a codec table
(blosc-zstd, blosc-lz4, zstd, none: bytes on disk, conversion time, patches/s); with
--large-gb, a synthetic volume of that size converted and sampled with bounded memory.

    python benchmarks/patches.py                     # table + results/patches.json
    python benchmarks/patches.py --patch 64 --threads 1 2 --ranks 1 --samples 200
    python benchmarks/patches.py --large-gb 4 --only-large --json results/patches_large.json
    python benchmarks/patches.py --upsample 2 --threads 2 --ranks 1 --no-codecs   # 277 MiB volume
"""

from __future__ import annotations

import argparse
import importlib
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
    """Peak resident memory of this process: /proc/self/status VmHWM (KiB).

    Not ru_maxrss: Linux carries a process's ru_maxrss across fork + exec (the parent's
    resident set at fork time becomes the child's floor), so every child of this driver
    would report at least the driver's own size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
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
def _cache_arg(args):
    """--cache-mb: a size in MiB, or a negative value for the Volume's automatic sizing."""
    return None if args.cache_mb is None or args.cache_mb < 0 else int(args.cache_mb * 2**20)


def _held_modules() -> list[str]:
    return [m for m in ("numpy", "zarr", "numcodecs", "nibabel", "numba", "torch", "torchio", "SimpleITK",
                        "mpi4py") if m in sys.modules]


def worker_pbm(args) -> dict:
    if args.torch:
        importlib.import_module("torch")  # a training loop's process: batches come out as tensors

    import pybrain_mpi as pbm
    from pybrain_mpi.data import PatchLoader, UniformSampler, Volume

    rank, world = 0, 1
    if args.mpi:
        pbm.init()
        rank, world = pbm.rank(), pbm.size()
    vol = Volume(args.zarr, cache_bytes=_cache_arg(args), threads=2)
    size = (args.patch,) * 3
    vol.size_cache_for(size)  # the automatic cache is sized before the cold epoch
    sampler = UniformSampler(vol, size, args.samples, seed=0, rank=rank, world_size=world,
                             local_window=args.local_window)
    augment = None
    if args.augment:  # numba kernels: numba's import and LLVM are the cost measured here
        from pybrain_mpi.data import Augment

        augment = Augment(flip_axes=(0, 1, 2), scale=(0.8, 1.2), shift=(-5, 5), gamma=(0.7, 1.4),
                          noise_std=(0.5, 2.0), zscore=True)
    extra = None if args.prefetch_extra is None or args.prefetch_extra < 0 else args.prefetch_extra
    loader = PatchLoader(vol, sampler, batch_size=args.batch, threads=args.threads, augment=augment,
                         prefetch_batches=None if extra is None else args.threads + extra,
                         prefetch_bytes=None if args.prefetch_mb < 0 else int(args.prefetch_mb * 2**20),
                         output="torch" if args.torch else "numpy")
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
            if args.step_ms:
                time.sleep(args.step_ms / 1000)  # a training step: the read-ahead fills up
        if args.mpi:
            pbm.barrier()  # the epoch ends when the slowest rank is done
        dt = time.perf_counter() - t0
        epochs.append({"seconds": dt, "patches": n * world, "amplification": vol.read_amplification})
    out = {"epochs": epochs, "peak_rss_mb": peak_rss_mb(), "rank": rank, "world": world,
           "cache_capacity_mb": vol.cache_capacity_bytes / 2**20,
           # batches alive at most: those queued, the one handed out, the one the loop still holds
           "prefetch_depth": loader.prefetch_depth,
           "batches_resident_mb": (loader.prefetch_depth + 2) * loader.batch_bytes / 2**20,
           "modules": _held_modules()}
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
                      sampler=tio.data.UniformSampler(size),
                      num_workers=args.threads - 1 if args.tio_workers < 0 else args.tio_workers,
                      shuffle_subjects=False, shuffle_patches=True, verbose=False)
    loader = torch.utils.data.DataLoader(queue, batch_size=args.batch, num_workers=0)
    epochs = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += batch["image"][tio.DATA].shape[0]
            if args.step_ms:
                time.sleep(args.step_ms / 1000)
            if n >= args.samples:
                break
        epochs.append({"seconds": time.perf_counter() - t0, "patches": n, "amplification": None})
    return {"epochs": epochs, "peak_rss_mb": peak_rss_mb(), "modules": _held_modules()}


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
    """Read amplification of random ``--patch`` patches for the automatic cache and fixed caches
    of 25/50/100% of the volume: cold (cache cleared before each patch) and warm (one epoch
    fills the cache, the next epoch's fresh positions are measured)."""
    from pybrain_mpi.data import UniformSampler, Volume

    volume_bytes = args.volume_mb * 2**20
    size = (args.patch,) * 3
    rows = []
    runs = [(None, 0), (0.25, 0), (0.5, 0), (1.0, 0)] + ([(None, args.local_window)] if args.local_window > 1 else [])
    for fraction, window in runs:
        cache = None if fraction is None else int(fraction * volume_bytes) + 2**20
        vol = Volume(args.zarr, cache_bytes=cache, threads=2)
        vol.size_cache_for(size)
        sampler = UniformSampler(vol, size, args.samples, seed=1, rank=0, world_size=1, local_window=window)
        for spec in list(sampler)[:30]:
            vol.clear_cache()
            vol.read_patch(spec.start, spec.size)
        cold = vol.read_amplification
        vol.clear_cache()
        for spec in sampler:
            vol.read_patch(spec.start, spec.size)
        sampler.set_epoch(1)
        vol.reset_counters()
        t0 = time.perf_counter()
        for spec in sampler:
            vol.read_patch(spec.start, spec.size)
        rows.append({"patch": args.patch, "cache": "auto" if fraction is None else fraction, "local_window": window,
                     "cache_mb": vol.cache_capacity_bytes / 2**20, "cold": cold, "warm": vol.read_amplification,
                     "warm_patches_per_s": args.samples / (time.perf_counter() - t0)})
        vol.close()
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}


def worker_codec(args) -> dict:
    """Converts the benchmark NIfTI with ``--codec`` (32^3 chunks) and reads random 64^3 patches:
    decode-bound (cache cleared before each patch) and through PatchLoader (automatic cache)."""
    import shutil

    from pybrain_mpi.data import PatchLoader, UniformSampler, Volume, convert

    dst = str(Path(args.zarr).with_name(f"codec_{args.codec}.zarr"))
    t0 = time.perf_counter()
    convert(args.nii, dst, chunks=(32, 32, 32), codec=args.codec, overwrite=True, progress=False)
    convert_s = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    size = (64,) * 3
    vol = Volume(dst, threads=2)
    sampler = UniformSampler(vol, size, args.samples, seed=2, rank=0, world_size=1)
    specs = list(sampler)
    t0 = time.perf_counter()
    for spec in specs:
        vol.clear_cache()
        vol.read_patch(spec.start, spec.size)
    cold = len(specs) / (time.perf_counter() - t0)
    rates = []
    for epoch in range(3):
        sampler.set_epoch(epoch + 1)
        t0 = time.perf_counter()
        n = sum(b["image"].shape[0] for b in PatchLoader(vol, sampler, 4, threads=2, output="numpy"))
        rates.append(n / (time.perf_counter() - t0))
    vol.close()
    shutil.rmtree(dst, ignore_errors=True)
    return {"codec": args.codec, "convert_s": convert_s, "disk_mb": disk / 2**20,
            "cold_patches_per_s": cold, "loader_patches_per_s": statistics.median(rates[1:]),
            "peak_rss_mb": peak_rss_mb()}


def _large_side(gb: float) -> int:
    return int(round((gb * 2**30 / 4) ** (1 / 3) / 32)) * 32


def _large_slab(side: int, lo: int) -> np.ndarray:
    """Planes ``[lo, lo + 32)`` of the synthetic volume: a smooth pattern plus seeded noise
    rounded to whole numbers (float32 holding integer-valued intensities, like scanner data:
    compressible, but not trivially)."""
    j, k = np.meshgrid(np.arange(side), np.arange(side), indexing="ij", sparse=True)
    planes = np.arange(lo, lo + 32)[:, None, None]
    noise = np.random.default_rng(lo).normal(0, 8, size=(32, side, side))
    return np.round(np.sin((planes + j + k) / 50.0) * 100 + 500 + noise).astype(np.float32)


def worker_large_make(args) -> dict:
    """Writes a synthetic ``--large-gb`` float32 .npy slab by slab (its own process, so the
    conversion's peak RSS is measured apart)."""
    side = _large_side(args.large_gb)
    npy = Path(args.zarr).with_suffix(".npy")
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (side,) * 3})
        for lo in range(0, side, 32):
            _large_slab(side, lo).tofile(f)
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
    """Samples ``--samples`` random 64^3 patches through PatchLoader from the large store
    (automatic cache unless --cache-mb; tensors when --torch 1)."""
    if args.torch:
        importlib.import_module("torch")

    from pybrain_mpi.data import PatchLoader, UniformSampler, Volume

    vol = Volume(args.zarr, cache_bytes=_cache_arg(args))
    sampler = UniformSampler(vol, (64,) * 3, args.samples, seed=0, rank=0, world_size=1)
    t0 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in PatchLoader(vol, sampler, 4, threads=2,
                                                     output="torch" if args.torch else "numpy"))
    rate = n / (time.perf_counter() - t0)
    peak = peak_rss_mb()  # before the check below, whose reference slabs are large
    # Two patches against the generator itself (the .npy is gone): the store holds the data.
    side = vol.shape[0]
    for s0 in (0, side - 64 - 3):
        start = (s0, 100, side - 64)
        ref = _large_slab(side, s0 // 32 * 32)
        if s0 % 32 + 64 > 32:
            ref = np.concatenate([ref] + [_large_slab(side, lo) for lo in range(s0 // 32 * 32 + 32, s0 + 64, 32)])
        off = s0 % 32
        np.testing.assert_array_equal(vol.read_patch(start, (64, 64, 64)),
                                      ref[off:off + 64, 100:164, side - 64:side])
    return {"patches_per_s": rate, "amplification": vol.read_amplification,
            "cache_mb": vol.cache_capacity_bytes / 2**20, "peak_rss_mb": peak,
            "verified_patches": 2, "modules": _held_modules()}


def worker_baseline(args) -> dict:
    """Peak RSS of importing ``--modules`` (comma-separated) and nothing else: what each
    process holds before it reads any data."""
    for name in filter(None, args.modules.split(",")):
        importlib.import_module(name)
    return {"peak_rss_mb": peak_rss_mb(), "pss_mb": _proc_kib("/proc/self/smaps_rollup", "Pss:") / 1024,
            "modules": _held_modules()}


WORKERS = {"large_make": worker_large_make, "large_convert": worker_large_convert, "large_sample": worker_large_sample,
           "baseline": worker_baseline, "pbm": worker_pbm, "torchio": worker_torchio, "nibabel": worker_nibabel,
           "amplification": worker_amplification, "codec": worker_codec}


# ---------------------------------------------------------------------------- driver
def _tree_pids(root: int) -> list[int]:
    """``root`` and every process descending from it (DataLoader workers, mpiexec's ranks)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass  # exited between the listing and the read
    return pids


def _proc_kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Samples, every ``interval_s``, the summed RSS (/proc/PID/status VmRSS) and PSS
    (/proc/PID/smaps_rollup: shared pages split between the processes mapping them) of a
    process and all its descendants; keeps the peaks and the most processes seen. RSS sums
    count pages shared by forked workers once per worker; PSS counts them once in all."""

    def __init__(self, pid: int, interval_s: float = 0.02):
        import threading

        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree_pids(self.pid)
            rss = sum(_proc_kib(f"/proc/{p}/status", "VmRSS:") for p in pids) / 1024
            pss = sum(_proc_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
            self.peak_pss_mb = max(self.peak_pss_mb, pss)
            self.max_procs = max(self.max_procs, len(pids))
            self._stop.wait(self.interval_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"tree_peak_rss_mb": self.peak_rss_mb, "tree_peak_pss_mb": self.peak_pss_mb,
                "tree_processes": self.max_procs}


def run_child(kind: str, data: dict, ranks: int = 1, tree: bool = False, **opts) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--nii", data["nii"], "--zarr", data["zarr"],
           "--volume-mb", str(data["volume_mb"])]
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if ranks > 1:
        mpiexec = str(Path(sys.executable).parent / "mpiexec")
        cmd = [mpiexec, "-n", str(ranks)] + cmd + ["--mpi"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watch = TreeMemory(proc.pid) if tree else None
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
        sampled = watch.stop() if watch else {}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout}\n{stderr}")
    return dict(json.loads(lines[0][len("RESULT "):]), **sampled)


def summarize(name: str, patch: int, result: dict, threads, ranks, imports_mb: float, torch_: bool,
              imports_pss_mb: float | None = None) -> dict:
    epochs = result["epochs"]
    cold = epochs[0]
    warm = epochs[1:] or epochs
    rate = statistics.median(e["patches"] / e["seconds"] for e in warm)
    amp_warm = [e["amplification"] for e in warm if e["amplification"] is not None]
    peak = sum(result.get("peak_rss_mb_per_rank") or [result["peak_rss_mb"]])
    procs = ranks
    data = peak - ranks * imports_mb
    pss = result.get("tree_peak_pss_mb")
    if result.get("tree_processes", 0) > ranks:
        # Worker processes (TorchIO's DataLoader): peak is the tree's sampled RSS sum, which
        # counts the libraries forked workers share with the parent once per process; data MB
        # is the tree's PSS (shared pages split, so counted once in all) minus the PSS of the
        # imports alone.
        procs = result["tree_processes"]
        peak = max(peak, result["tree_peak_rss_mb"])
        data = pss - imports_pss_mb
        imports_mb, procs_imports = imports_pss_mb, 1
    else:
        procs_imports = ranks
    data_pss = None if pss is None or imports_pss_mb is None else pss - imports_pss_mb
    return {"method": name, "patch": patch, "threads": threads, "ranks": ranks, "torch": torch_,
            "processes": procs, "pss_mb": pss, "data_pss_mb": data_pss,
            "patches_per_s": rate, "cold_patches_per_s": cold["patches"] / cold["seconds"],
            "mb_per_s": rate * patch**3 * 4 / 2**20,
            "amplification_cold": cold["amplification"],
            "amplification_warm": statistics.median(amp_warm) if amp_warm else None,
            "peak_rss_mb": peak, "imports_mb": procs_imports * imports_mb, "data_mb": data,
            "cache_capacity_mb": result.get("cache_capacity_mb"), "modules": result.get("modules")}


# What each kind of process imports before touching data (measured in a child of its own).
IMPORTS = {
    "pbm": "pybrain_mpi.data,numcodecs.blosc,numcodecs.zstd",
    "pbm+torch": "pybrain_mpi.data,numcodecs.blosc,numcodecs.zstd,torch",
    "torchio": "torch,torchio",
    "nibabel": "nibabel,torch",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=160, help="patches per epoch (64^3; half at 128^3)")
    p.add_argument("--epochs", type=int, default=4, help="epoch 0 is cold; later ones warm (median)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prefetch-extra", type=int, default=-1,
                   help="pbm prefetch_batches = threads + this; negative (default): the loader's own "
                        "bound (threads + 1 batches, at most 4 MiB read ahead)")
    p.add_argument("--local-window", type=int, default=0,
                   help="UniformSampler local_window for the pbm rows (0: random order) and one more "
                        "read-amplification row with the automatic cache in that order")
    p.add_argument("--step-ms", type=float, default=0,
                   help="sleep this long per batch in the pbm and TorchIO loops (a training step, "
                        "so read-ahead queues fill up as in training; patches/s then include it)")
    p.add_argument("--prefetch-mb", type=float, default=-1,
                   help="pbm prefetch_bytes in MiB (read-ahead bound); negative (default): the loader's 4 MiB")
    p.add_argument("--cache-mb", type=float, default=-1,
                   help="pbm chunk cache in MiB; negative (default): the Volume's automatic sizing")
    p.add_argument("--upsample", type=int, default=1, help="repeat voxels to make a larger volume")
    p.add_argument("--no-torchio", action="store_true")
    p.add_argument("--torchio-workers", type=int, nargs="+", default=[0],
                   help="TorchIO Queue num_workers to run (0: subjects loaded in the training process, "
                        "the xTIO reference; N > 0: N forked DataLoader workers, peak memory of the "
                        "whole process tree)")
    p.add_argument("--no-codecs", action="store_true", help="skip the codec table")
    p.add_argument("--large-gb", type=float, default=0,
                   help="also convert and sample a synthetic volume of this many GiB (bounded memory)")
    p.add_argument("--only-large", action="store_true", help="run only the --large-gb part")
    p.add_argument("--only-amplification", action="store_true",
                   help="run only the read-amplification sweep (e.g. with --upsample 2 for a volume "
                        "larger than the automatic cache at 128^3)")
    p.add_argument("--nibabel-samples", type=int, default=12)
    p.add_argument("--workdir", default=None, help="where the NIfTI/Zarr copies live (default: temp)")
    p.add_argument("--json", default="results/patches.json")
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--nii", help=argparse.SUPPRESS)
    p.add_argument("--zarr", help=argparse.SUPPRESS)
    p.add_argument("--volume-mb", type=float, help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--augment", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--codec", default="blosc-zstd", help=argparse.SUPPRESS)
    p.add_argument("--modules", default="", help=argparse.SUPPRESS)
    p.add_argument("--tio-workers", type=int, default=-1, help=argparse.SUPPRESS)
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
    from pybrain_mpi.data.volume import AUTO_CACHE_PATCHES

    cache_text = (f"automatic ({AUTO_CACHE_PATCHES} patches' chunks)" if args.cache_mb < 0
                  else f"{args.cache_mb:.1f} MiB")
    print(f"volume {data['shape']} float32 = {data['volume_mb']:.1f} MiB; pbm chunk cache {cache_text}; "
          f"chunks 32^3; batch {args.batch}; load average {os.getloadavg()[0]:.1f} (other jobs share the cores)")
    out = {"volume": data, "cache_mb": args.cache_mb, "host": os.uname().nodename,
           "args": {k: v for k, v in vars(args).items() if not k.startswith(("worker", "nii", "zarr"))}}
    if args.large_gb > 0:
        large_zarr = str(workdir / "large.zarr")
        made = run_child("large_make", dict(data, zarr=large_zarr), large_gb=args.large_gb)
        conv = dict(run_child("large_convert", dict(data, zarr=large_zarr)), **{
            k: made[k] for k in ("side", "gib")})
        conv["disk_gib"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(large_zarr)
                               for f in fs) / 2**30
        samp = [run_child("large_sample", dict(data, zarr=large_zarr), samples=200, torch=t, cache_mb=args.cache_mb)
                for t in (0, 1)]
        out["large"] = {"convert": conv, "sample": samp[0], "sample_torch": samp[1]}
        print(f"large volume {conv['side']}^3 float32 = {conv['gib']:.2f} GiB ({conv['disk_gib']:.2f} GiB stored): "
              f"convert {conv['convert_s']:.0f} s, peak RSS {conv['peak_rss_mb']:.0f} MB")
        for label, r in (("numpy batches", samp[0]), ("torch tensors", samp[1])):
            print(f"  200 random 64^3 patches, {label}: {r['patches_per_s']:.0f} patches/s, cache "
                  f"{r['cache_mb']:.0f} MiB, peak RSS {r['peak_rss_mb']:.0f} MB")
        import shutil

        shutil.rmtree(large_zarr, ignore_errors=True)
        if args.only_large:
            return _write(args.json, out)
    if args.only_amplification:
        out["amplification"] = _amplification(args, data)
        _print_amplification(out["amplification"])
        return _write(args.json, out)
    base = {k: run_child("baseline", data, modules=v) for k, v in IMPORTS.items()}
    imports = {k: v["peak_rss_mb"] for k, v in base.items()}
    imports_pss = {k: v["pss_mb"] for k, v in base.items()}
    out["imports_pss_mb"] = imports_pss
    imports["python+numpy"] = run_child("baseline", data, modules="numpy")["peak_rss_mb"]
    out["imports_rss_mb"] = imports
    print("peak RSS of the imports alone: " + ", ".join(f"{k} {v:.0f} MB" for k, v in imports.items()))
    print("PSS of the imports alone (shared library pages split between processes): "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in imports_pss.items()))
    rows = []
    for patch in args.patch:
        samples = args.samples if patch <= 64 else max(8, args.samples // 2)
        common = dict(patch=patch, batch=args.batch, epochs=args.epochs, step_ms=args.step_ms,
                      local_window=args.local_window)
        if not args.no_torchio:
            for workers in args.torchio_workers:
                # The whole process tree is sampled (RSS and PSS every 20 ms): with workers > 0
                # TorchIO loads subjects in forked DataLoader processes.
                r = run_child("torchio", data, samples=samples, threads=1, tio_workers=workers, tree=True,
                              **common)
                name = "torchio Queue" if workers == 0 else f"torchio Queue {workers}w"
                rows.append(summarize(name, patch, r, workers, 1, imports["torchio"], True, imports_pss["torchio"]))
                print(_fmt(rows[-1]), flush=True)
        r = run_child("nibabel", data, samples=args.nibabel_samples, threads=1, **dict(common, epochs=2))
        rows.append(summarize("nibabel full load", patch, r, 1, 1, imports["nibabel"], True))
        print(_fmt(rows[-1]), flush=True)
        for ranks in args.ranks:
            for threads in args.threads:
                r = run_child("pbm", data, ranks=ranks, samples=samples, threads=threads,
                              cache_mb=args.cache_mb, prefetch_extra=args.prefetch_extra,
                              prefetch_mb=args.prefetch_mb, **common)
                rows.append(summarize("pbm PatchLoader", patch, r, threads, ranks, imports["pbm"], False))
                print(_fmt(rows[-1]), flush=True)
        # The same loader in a training process: torch imported, batches as tensors.
        r = run_child("pbm", data, samples=samples, threads=2, cache_mb=args.cache_mb, torch=1, tree=True,
                      prefetch_extra=args.prefetch_extra, prefetch_mb=args.prefetch_mb, **common)
        rows.append(summarize("pbm +torch", patch, r, 2, 1, imports["pbm+torch"], True, imports_pss["pbm+torch"]))
        print(_fmt(rows[-1]), flush=True)
        # With every numba augmentation on (no torch): what numba and its LLVM add.
        r = run_child("pbm", data, samples=samples, threads=2, cache_mb=args.cache_mb, augment=1,
                      prefetch_extra=args.prefetch_extra, prefetch_mb=args.prefetch_mb, **common)
        rows.append(summarize("pbm +augment", patch, r, 2, 1, imports["pbm"], False))
        print(_fmt(rows[-1]), flush=True)
    amp = _amplification(args, data)
    codecs = [] if args.no_codecs else [run_child("codec", data, codec=c, samples=args.samples)
                                        for c in ("blosc-zstd", "blosc-lz4", "zstd", "none")]

    add_torchio_ratios(rows)
    print()
    print(f"{'method':18} {'patch':>5} {'thr':>3} {'ranks':>5} {'patches/s':>10} {'cold p/s':>9} "
          f"{'MB/s':>8} {'amp cold':>9} {'amp warm':>9} {'procs':>5} {'peak MB':>8} {'PSS MB':>7} {'imports':>8} {'data MB':>8} "
          f"{'xTIO p/s':>8} {'xTIO pk':>8} {'xTIO dat':>8}")
    for row in rows:
        print(_fmt(row))
    _print_amplification(amp)
    if codecs:
        print("\ncodecs: MNI152 T1 float32, 32^3 chunks; random 64^3 patches")
        print(f"{'codec':>10} {'on disk MiB':>11} {'convert s':>9} {'decode-bound p/s':>16} {'loader p/s':>10} {'peak MB':>8}")
        for c in codecs:
            print(f"{c['codec']:>10} {c['disk_mb']:>11.2f} {c['convert_s']:>9.2f} {c['cold_patches_per_s']:>16.1f} "
                  f"{c['loader_patches_per_s']:>10.1f} {c['peak_rss_mb']:>8.0f}")
    for patch in args.patch:
        base = [r for r in rows if r["method"] == "torchio Queue" and r["patch"] == patch]
        alone = [r for r in rows if r["method"] == "pbm PatchLoader" and r["patch"] == patch and r["ranks"] == 1]
        with_torch = [r for r in rows if r["method"] == "pbm +torch" and r["patch"] == patch]
        if base and alone:
            b, best = base[0], max(alone, key=lambda r: r["patches_per_s"])
            print(f"{patch}^3: pbm patch pipeline alone ({best['threads']} threads, no torch) "
                  f"{best['patches_per_s'] / b['patches_per_s']:.2f}x TorchIO patches/s at "
                  f"{best['peak_rss_mb'] / b['peak_rss_mb']:.2f}x its peak RSS "
                  f"({best['peak_rss_mb']:.0f} vs {b['peak_rss_mb']:.0f} MB)")
            if with_torch:
                t = with_torch[0]
                print(f"{patch}^3: pbm with torch imported (2 threads, tensors) "
                      f"{t['patches_per_s'] / b['patches_per_s']:.2f}x TorchIO patches/s at "
                      f"{t['peak_rss_mb'] / b['peak_rss_mb']:.2f}x its peak RSS ({t['peak_rss_mb']:.0f} MB); "
                      f"data beyond imports {t['data_mb']:.0f} vs {b['data_mb']:.0f} MB "
                      f"({t['data_vs_torchio']:.2f}x)")
    for patch in args.patch:
        with_torch = [r for r in rows if r["method"] == "pbm +torch" and r["patch"] == patch]
        for b in [r for r in rows if r["method"].startswith("torchio Queue") and r["patch"] == patch]:
            if not with_torch or b["method"] == "torchio Queue" and len(args.torchio_workers) == 1:
                continue
            t = with_torch[0]
            print(f"{patch}^3: pbm +torch vs {b['method']} ({b['processes']} processes): "
                  f"{t['patches_per_s'] / b['patches_per_s']:.2f}x patches/s, peak "
                  f"{t['peak_rss_mb'] / b['peak_rss_mb']:.2f}x ({t['peak_rss_mb']:.0f} vs {b['peak_rss_mb']:.0f} MB), "
                  f"PSS {t['pss_mb'] / b['pss_mb']:.2f}x ({t['pss_mb']:.0f} vs {b['pss_mb']:.0f} MB), data (PSS "
                  f"above imports) {t['data_pss_mb'] / b['data_pss_mb']:.2f}x ({t['data_pss_mb']:.0f} vs "
                  f"{b['data_pss_mb']:.0f} MB)")
    out.update(rows=rows, amplification=amp, codecs=codecs, load_average=os.getloadavg())
    return _write(args.json, out)


def add_torchio_ratios(rows: list[dict]) -> None:
    """Sets each row's patches/s, peak RSS and data MB (peak minus its imports) over those of
    the TorchIO row with the same patch size (None without one)."""
    base = {r["patch"]: r for r in rows if r["method"] == "torchio Queue"}
    for r in rows:
        b = base.get(r["patch"])
        r["speed_vs_torchio"] = r["patches_per_s"] / b["patches_per_s"] if b else None
        r["peak_vs_torchio"] = r["peak_rss_mb"] / b["peak_rss_mb"] if b else None
        r["data_vs_torchio"] = r["data_mb"] / b["data_mb"] if b and b["data_mb"] > 0 else None


def _amplification(args, data: dict) -> list[dict]:
    rows = []
    for patch in args.patch:
        samples = args.samples if patch <= 64 else max(8, args.samples // 2)
        rows += run_child("amplification", data, samples=samples, patch=patch,
                          local_window=args.local_window)["rows"]
    return rows


def _print_amplification(amp: list[dict]) -> None:
    print("\nread amplification, random patches, 32^3 chunks (decoded bytes / returned bytes)")
    print(f"{'patch':>5} {'cache':>6} {'order':>9} {'cache MiB':>9} {'cold':>6} {'warm':>6} {'warm patches/s':>15}")
    for a in amp:
        cache = a["cache"] if a["cache"] == "auto" else f"{a['cache']:.2f}v"
        order = f"local {a['local_window']}" if a.get("local_window", 0) > 1 else "random"
        print(f"{a['patch']:>5} {cache:>6} {order:>9} {a['cache_mb']:>9.1f} {a['cold']:>6.2f} {a['warm']:>6.2f} "
              f"{a['warm_patches_per_s']:>15.1f}")


def _write(path: str, out: dict) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


def _fmt(r: dict) -> str:
    def num(v, spec):
        return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0].lstrip(">")))
    return (f"{r['method']:18} {r['patch']:>5} {r['threads']:>3} {r['ranks']:>5} {r['patches_per_s']:>10.1f} "
            f"{r['cold_patches_per_s']:>9.1f} {r['mb_per_s']:>8.1f} {num(r['amplification_cold'], '>9.2f')} "
            f"{num(r['amplification_warm'], '>9.2f')} {r.get('processes', r['ranks']):>5} {r['peak_rss_mb']:>8.0f} "
            f"{num(r.get('pss_mb'), '>7.0f')} {r['imports_mb']:>8.0f} "
            f"{r['data_mb']:>8.0f} {num(r.get('speed_vs_torchio'), '>8.2f')} "
            f"{num(r.get('peak_vs_torchio'), '>8.2f')} {num(r.get('data_vs_torchio'), '>8.2f')}")


if __name__ == "__main__":
    sys.exit(main())
