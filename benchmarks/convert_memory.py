"""Peak memory of `convert` against input size: pybrain-mpi's streaming conversion vs loading
the whole volume with nibabel, in the same run.

Inputs are nilearn's real MNI152 T1 (1 mm, 197x233x189) as float32, upsampled by whole factors
(nearest neighbour, plus seeded integer-valued noise so the data compresses like a scan
rather than like repeated voxels) and written plane by plane, so building them needs no
more memory than one plane. They are synthetic enlargements of a real template; the
factor-2 file is the size of a 0.5 mm T1 (394x466x378, 277 MB of float32).

Rows, each conversion in its own process (peak RSS = /proc VmHWM of that process):

  pbm          pybrain_mpi.data.convert with its defaults (32 MiB slabs: one chunk row for
               large volumes), 32^3 chunks, blosc-zstd
  pbm 256 MiB  the same with --max-slab-mb 256 (the default before conversion streamed)
  nibabel      nib.load(...).get_fdata(float32) of the whole volume, then one zarr write: what
               a script without a streaming converter does (the baseline)

Every process runs under an address-space limit (``--cap-gb``, RLIMIT_AS, default 2 GiB),
smaller than the largest default input (2.2 GB of voxels): memory that does not allow loading
that volume twice, nor even once. The whole-volume baseline cannot load it; the streaming
conversion completes within a small part of the limit. ``--large-gb G`` adds an input of about G GB (an
uncompressed .nii), e.g. larger than half of this machine's memory.

    python benchmarks/convert_memory.py                          # factors 1, 2, 4; table + JSON
    python benchmarks/convert_memory.py --factors 1 2 --cap-gb 0  # no cap
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (/proc/self/status VmHWM; not ru_maxrss, which a
    child inherits from its parent across fork + exec)."""
    return _status_mb("VmHWM")


def mni_t1() -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    import nilearn

    path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def make_input(path: Path, factor: int, compressed: bool) -> dict:
    """The MNI152 T1 upsampled ``factor`` times per axis, written plane by plane (F order)."""
    import nibabel as nib

    t1, affine = mni_t1()
    shape = tuple(n * factor for n in t1.shape)
    out_affine = affine.copy()
    out_affine[:3, :3] /= factor
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(out_affine, code=1)
    header.set_qform(out_affine, code=1)
    header["vox_offset"] = 352
    # gzip level 1: level 9 compresses noisy float32 at well under 1 MB/s.
    with (gzip.open(path, "wb", compresslevel=1) if compressed else open(path, "wb")) as f:
        f.write(header.binaryblock)
        f.write(b"\0" * (352 - len(header.binaryblock)))
        for k in range(shape[2]):
            plane = np.repeat(np.repeat(t1[:, :, k // factor], factor, axis=0), factor, axis=1)
            noise = np.random.default_rng([factor, k]).normal(0.0, 3.0, size=plane.shape)
            plane = np.round(plane + noise).astype(np.float32)
            f.write(plane.tobytes(order="F"))
    return {"shape": list(shape), "raw_mb": int(np.prod(shape)) * 4 / 1e6,
            "file_mb": path.stat().st_size / 1e6}


# ---------------------------------------------------------------------------- workers
def worker(args) -> dict:
    started = time.perf_counter()
    if args.kind == "nibabel":
        import nibabel as nib
        import zarr

        data = nib.load(args.input).get_fdata(dtype=np.float32)
        group = zarr.open_group(args.output, mode="w", zarr_format=3)
        group.create_array("0", data=data, chunks=(32, 32, 32))
    else:
        from pybrain_mpi.data import convert

        slab = 256 * 2**20 if args.kind == "pbm256" else None
        kwargs = {} if slab is None else {"max_slab_bytes": slab}
        convert(args.input, args.output, chunks=(32, 32, 32), progress=False, **kwargs)
    seconds = time.perf_counter() - started
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.output) for f in fs)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "peak_virtual_mb": _status_mb("VmPeak"),
            "store_mb": disk / 1e6}


def run_worker(kind: str, source: Path, workdir: Path, cap_gb: float) -> dict:
    output = workdir / f"out_{kind}.zarr"
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, __file__, "--worker", kind, "--input", str(source), "--output", str(output)]
    limit = int(cap_gb * 2**30) if cap_gb > 0 else None

    def cap():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=cap)
    shutil.rmtree(output, ignore_errors=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": last[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4],
                   help="upsampling factors of the MNI152 T1 (1: 35 MB, 2: 277 MB, 4: 2.2 GB float32)")
    p.add_argument("--compressed-up-to", type=int, default=2,
                   help="factors up to this are written .nii.gz, larger ones .nii (default 2)")
    p.add_argument("--cap-gb", type=float, default=2.0,
                   help="RLIMIT_AS of every conversion process in GiB (0: none; default 2, less "
                        "than the factor-4 volume itself)")
    p.add_argument("--large-gb", type=float, default=0.0,
                   help="also an uncompressed input of about this many GB (float32)")
    p.add_argument("--kinds", nargs="+", default=["pbm", "pbm256", "nibabel"],
                   choices=["pbm", "pbm256", "nibabel"])
    p.add_argument("--workdir", default=None, help="where inputs are written (default: a temp dir)")
    p.add_argument("--json", default="results/convert_memory.json")
    p.add_argument("--worker", choices=["pbm", "pbm256", "nibabel"], help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.kind = args.worker
        print(json.dumps(worker(args)))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pbm-convert-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    factors = list(args.factors)
    if args.large_gb > 0:
        factors.append(max(1, round((args.large_gb * 1e9 / (197 * 233 * 189 * 4)) ** (1 / 3))))
    rows, records = [], []
    try:
        for factor in factors:
            compressed = factor <= args.compressed_up_to
            source = workdir / f"t1_x{factor}.nii{'.gz' if compressed else ''}"
            t0 = time.perf_counter()
            info = make_input(source, factor, compressed)
            print(f"input x{factor}: {info['shape']} float32, {info['raw_mb']:.0f} MB of voxels, "
                  f"{info['file_mb']:.0f} MB file ({time.perf_counter() - t0:.0f} s to write)",
                  flush=True)
            for kind in args.kinds:
                result = run_worker(kind, source, workdir, args.cap_gb)
                record = {"factor": factor, "file": source.name, **info, "kind": kind,
                          "cap_gib": args.cap_gb or None, **result}
                records.append(record)
                rows.append({"input": f"x{factor} {source.suffix}", "voxels MB": info["raw_mb"],
                             "file MB": info["file_mb"], "kind": kind,
                             "peak RSS MB": result.get("peak_rss_mb", float("nan")),
                             "peak/voxels": result.get("peak_rss_mb", float("nan")) / info["raw_mb"],
                             "seconds": result.get("seconds", float("nan")),
                             "result": "ok" if "failed" not in result else result["failed"][:60]})
                print(f"  {kind}: {result}", flush=True)
            source.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"convert peak memory vs input size (address-space cap: "
          f"{str(args.cap_gb) + ' GiB' if args.cap_gb > 0 else 'none'}; 32^3 chunks, blosc-zstd)")
    print_table(rows, [(k, k) for k in ("input", "voxels MB", "file MB", "kind", "peak RSS MB",
                                         "peak/voxels", "seconds", "result")])
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "convert_memory", "cpu_count": os.cpu_count(),
                               "records": records}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
