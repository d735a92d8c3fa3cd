"""Patches/s from a many-subject manifest: pybrain-mpi's cohort reader vs TorchIO's
SubjectsDataset + Queue on the same NIfTI files, in the same run.

The cohort: nilearn's real MNI152 (1 mm T1 and brain mask) and ``--subjects - 1`` subjects
made from it by seeded affine warps and intensity changes (synthetic;
``pybrain_mpi.data.examples.build_mni152_cohort``), written as .nii.gz files and a
``subjects.tsv``. Each row reads a T1 patch *and* its label patch (a segmentation batch).

  pbm      the trainer's data adapter (``kind = "segmentation"``, ``[data] manifest``):
           patches read on demand from the cohort converted once into the cache, batches of
           ``--batch`` drawn in the trainer's order (a fresh global shuffle over subjects and
           patches each epoch), ``num_workers`` reader threads, uniform or foreground
           sampling, the default chunk cache (``cache_mb`` 512 over ``open_subjects`` 32; more
           cache re-decodes fewer chunks: ``--cache-mb``). The one-time conversion of the
           cohort (1 rank) is timed on its own. Held-out subjects are never read for training,
           so pbm's rows draw from 23 of the 24 subjects.
  torchio  ``tio.SubjectsDataset`` of ``tio.Subject(image=ScalarImage, label=LabelMap)``,
           ``tio.Queue(UniformSampler, samples_per_volume=16, max_length=64)`` + DataLoader,
           ``--torchio-workers`` subject-loading workers (0: in the main process).

Every row runs in its own process; patches/s is the second epoch's (the first warms caches
and, for TorchIO, the workers); peak RSS is the process tree's (VmHWM summed over workers).

    python benchmarks/cohort_patches.py                    # 24 subjects, 64^3, table + JSON
    python benchmarks/cohort_patches.py --subjects 8 --patch 32 --patches 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402


def _status_mb(pid: int | str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreePeak:
    """Peak of the summed RSS of this process and its children, sampled every 20 ms."""

    def __init__(self):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[str]:
        pids, todo = [], [str(os.getpid())]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += f.read().split()
            except OSError:
                pass
        return pids

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_status_mb(p, "VmRSS") for p in self._tree()))
            self._stop.wait(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("self", "VmHWM"))


def config_text(manifest: Path, cache: Path, args, sampling: str, workers: int) -> str:
    return textwrap.dedent(f"""
        [model]
        name = "unet3d"
        [data]
        kind = "segmentation"
        manifest = "{manifest}"
        images = ["t1"]
        label = "brain_mask"
        patch_size = [{args.patch}, {args.patch}, {args.patch}]
        patches_per_volume = 16
        sampling = "{sampling}"
        num_workers = {workers}
        cache_mb = {args.cache_mb}
        open_subjects = {args.open_subjects}
        held_out_fraction = 0.05
        cache_dir = "{cache}"
        [train]
        epochs = 1
        batch_size = {args.batch}
        lr = 1e-3
        val_fraction = 0.0
        """)


# ---------------------------------------------------------------------------- workers
def worker_convert(args) -> dict:
    from pybrain_mpi.data.cohort import read_manifest
    from pybrain_mpi.data.subjects import prepare_cohort

    t0 = time.perf_counter()
    cohort = read_manifest(args.manifest, ["t1"], label="brain_mask")
    prepare_cohort(cohort, kind="volume", cache_dir=args.cache, chunks=(32, 32, 32),
                   echo=lambda text: None)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _status_mb("self", "VmHWM")}


def worker_pbm(args) -> dict:
    from pybrain_mpi.config import parse_config
    from pybrain_mpi.data.samplers import ShuffledSampler
    from pybrain_mpi.trainer.data import build_data

    tree = TreePeak()
    config = parse_config(config_text(Path(args.manifest), Path(args.cache), args, args.sampling,
                                      args.threads))
    data = build_data(config.data, 0.0, 0, lambda value, timeout: value)
    sampler = ShuffledSampler(data.size("train"), args.batch, seed=0, rank=0, world_size=1)
    epochs = []
    for epoch in range(2):
        t0 = time.perf_counter()
        n = 0
        for step in range(sampler.steps_per_epoch):
            x, y = data.batch("train", epoch, sampler.batch_indices(epoch, step))
            n += len(x)
            if n >= args.patches:
                break
        epochs.append({"seconds": time.perf_counter() - t0, "patches": n})
    data.close()
    return {"epochs": epochs, "peak_rss_mb": tree.stop(), "subjects_train": len(data.split.train)}


def worker_torchio(args) -> dict:
    import torch
    import torchio as tio

    from pybrain_mpi.data.cohort import read_manifest

    tree = TreePeak()
    cohort = read_manifest(args.manifest, ["t1"], label="brain_mask")
    subjects = [tio.Subject(image=tio.ScalarImage(s.images["t1"]), label=tio.LabelMap(s.label))
                for s in cohort.subjects]
    dataset = tio.SubjectsDataset(subjects)
    size = (args.patch,) * 3
    epochs = []
    for _ in range(2):
        queue = tio.Queue(dataset, max_length=64, samples_per_volume=16,
                          sampler=tio.data.UniformSampler(size), num_workers=args.threads,
                          shuffle_subjects=True, shuffle_patches=True, verbose=False)
        loader = torch.utils.data.DataLoader(queue, batch_size=args.batch, num_workers=0)
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += batch["image"][tio.DATA].shape[0]
            if n >= args.patches:
                break
        epochs.append({"seconds": time.perf_counter() - t0, "patches": n})
        del loader, queue
    return {"epochs": epochs, "peak_rss_mb": tree.stop()}


WORKERS = {"convert": worker_convert, "pbm": worker_pbm, "torchio": worker_torchio}


def run(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--manifest", str(args.manifest_path),
           "--cache", str(args.cache_path), "--patch", str(args.patch), "--batch", str(args.batch),
           "--patches", str(args.patches), "--cache-mb", str(args.cache_mb),
           "--open-subjects", str(args.open_subjects)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {extra} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=24, help="cohort size (default 24)")
    p.add_argument("--voxel-mm", type=float, default=1.0, help="cohort voxel size (default 1 mm)")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patches", type=int, default=384, help="patches timed per epoch")
    p.add_argument("--threads", type=int, nargs="+", default=[0, 2],
                   help="pbm reader threads (num_workers) to run")
    p.add_argument("--torchio-workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cache-mb", type=int, default=512, help="pbm: [data] cache_mb (default 512)")
    p.add_argument("--open-subjects", type=int, default=32,
                   help="pbm: [data] open_subjects (default 32)")
    p.add_argument("--workdir", default=None, help="cohort and cache directory (kept; default temp)")
    p.add_argument("--json", default="results/cohort_patches.json")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--sampling", default="uniform", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.worker == "pbm" or args.worker == "torchio":
            args.threads = int(args.threads[0]) if isinstance(args.threads, list) else int(args.threads)
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    from pybrain_mpi.data.examples import build_mni152_cohort

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pbm-cohort-bench-"))
    cohort_dir = workdir / f"cohort_{args.subjects}_{args.voxel_mm:g}mm"
    args.manifest_path = cohort_dir / "subjects.tsv"
    args.cache_path = workdir / "cache"
    if not args.manifest_path.exists():
        t0 = time.perf_counter()
        build_mni152_cohort(cohort_dir, subjects=args.subjects, seed=0, voxel_mm=args.voxel_mm)
        print(f"built {args.subjects} subjects in {time.perf_counter() - t0:.0f} s", flush=True)
    files_mb = sum(f.stat().st_size for f in cohort_dir.rglob("*.nii.gz")) / 1e6
    conversion = run("convert", args)
    print(f"pbm: cohort converted into the cache in {conversion['seconds']:.1f} s (1 rank, "
          f"one time), peak {conversion['peak_rss_mb']:.0f} MB", flush=True)
    rows, records = [], []
    configs = [("pbm", {"threads": t, "sampling": s}) for t in args.threads
               for s in ("uniform", "foreground")]
    configs += [("torchio", {"threads": w}) for w in args.torchio_workers]
    for kind, extra in configs:
        result = run(kind, args, **extra)
        warm = result["epochs"][-1]
        first = result["epochs"][0]
        label = (f"pbm {extra['sampling']}, {extra['threads']} threads" if kind == "pbm"
                 else f"torchio Queue, {extra['threads']} workers")
        rate = warm["patches"] / warm["seconds"]
        row = {"pipeline": label, "patches/s": rate,
               "first epoch p/s": first["patches"] / first["seconds"],
               "peak MB": result["peak_rss_mb"]}
        rows.append(row)
        records.append({"kind": kind, **extra, **result, "patches_per_s": rate})
        print(f"  {label}: {rate:.1f} patches/s", flush=True)
    best_tio = max(r["patches/s"] for r in rows if r["pipeline"].startswith("torchio"))
    for row in rows:
        row["x TorchIO"] = row["patches/s"] / best_tio
    print()
    print(f"patches/s, {args.patch}^3 T1 + label patches, batch {args.batch}, {args.subjects} "
          f"subjects ({args.voxel_mm:g} mm, {files_mb:.0f} MB of .nii.gz), {os.cpu_count()} cores; "
          f"x TorchIO against its best row")
    print_table(rows, [(k, k) for k in ("pipeline", "patches/s", "first epoch p/s", "peak MB",
                                         "x TorchIO")])
    print(f"pbm's one-time conversion of the cohort: {conversion['seconds']:.1f} s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "cohort_patches", "subjects": args.subjects,
                               "voxel_mm": args.voxel_mm, "patch": args.patch,
                               "batch": args.batch, "files_mb": files_mb,
                               "conversion": conversion, "records": records}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
