"""``pybrain-mpi convert IN OUT.zarr``: the command-line face of :func:`pybrain_mpi.data.convert`.

A conversion that cannot be done (missing or truncated file, unknown format, bad chunks)
prints one line, ``pybrain-mpi convert: error: <what and where>``, and exits 1; nothing is
left at the destination.
"""

from __future__ import annotations

import argparse
import sys

from .convert import CODECS, DEFAULT_SLAB_BYTES


def _parse_chunks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks must look like 32,32,32 (or 32x32x32), not {text!r}")


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .errors import DataError

    try:
        affine = None
        if args.affine:
            import numpy as np

            try:
                affine = np.loadtxt(args.affine).reshape(4, 4)
            except ValueError as exc:
                raise DataError(f"--affine {args.affine}: expected 16 numbers (a 4x4 matrix): "
                                f"{exc}") from None
        convert(args.input, args.output, chunks=args.chunks, levels=args.levels,
                downsample=args.downsample, dtype=args.dtype, affine=affine, codec=args.codec,
                clevel=args.clevel, shards=args.shard,
                max_slab_bytes=int(args.max_slab_mb * 2**20), overwrite=args.overwrite,
                progress=not getattr(args, "quiet", 0))
    except (DataError, OSError, ValueError, TypeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if getattr(args, "verbose", 0) >= 1:
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"pybrain-mpi convert: error: {message}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"pybrain-mpi convert: interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    return 0


def add_convert_subcommand(subparsers, parents=()) -> argparse.ArgumentParser:
    """Adds ``convert`` to an argparse sub-parser set (``pybrain-mpi convert IN OUT.zarr``);
    ``parents`` add shared options (the CLI's -v/-q: -q also hides the progress bar)."""
    p = subparsers.add_parser(
        "convert", parents=list(parents), help="convert NIfTI / MGH / GIFTI / HDF5 / .npy / Zarr into OME-Zarr (Zarr v3)",
        description="Convert a NIfTI (.nii/.nii.gz, 3D or 4D), FreeSurfer .mgz/.mgh, GIFTI (.gii "
                    "surface series), an HDF5 dataset (file.h5:/path), a .npy file or a Zarr store "
                    "into a chunked, compressed OME-Zarr image, slab by slab with bounded memory. "
                    "The store is written aside and renamed into place when complete.")
    p.add_argument("input", help="source: x.nii[.gz], x.mgz, x.func.gii, x.npy, x.h5:/path/to/dataset "
                                 "or x.zarr")
    p.add_argument("output", help="destination directory, e.g. out.zarr")
    p.add_argument("--chunks", type=_parse_chunks, default=None,
                   help="chunk shape, e.g. 32,32,32 (4D fMRI is stored t,x,y,z); default 64^3, "
                        "or the whole time axis x a voxel block for fMRI")
    p.add_argument("--levels", type=int, default=1, help="resolution levels incl. full (default 1)")
    p.add_argument("--downsample", choices=("mean", "nearest"), default="mean",
                   help="how levels are reduced: mean (images) or nearest (label maps)")
    p.add_argument("--dtype", default=None, help="stored dtype (default: the source's)")
    p.add_argument("--affine", default=None, help="text file with a 4x4 affine (HDF5/.npy sources)")
    p.add_argument("--codec", choices=sorted(CODECS), default="blosc-zstd",
                   help="compressor: " + "; ".join(f"{k}: {v}" for k, v in CODECS.items()))
    p.add_argument("--clevel", type=int, default=3, help="compression level (default 3)")
    p.add_argument("--shard", type=_parse_chunks, default=None, metavar="SHAPE",
                   help="Zarr v3 sharding: shard shape (multiples of --chunks), e.g. 256,256,256; "
                        "one file per shard instead of per chunk (stores with millions of chunks)")
    p.add_argument("--max-slab-mb", type=float, default=DEFAULT_SLAB_BYTES / 2**20,
                   help="largest slab read at once in MiB (default %(default)g; at least one "
                        "chunk or shard row); peak memory is about three slabs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    if not parents:  # used on its own: its own -q (no progress bar); the CLI's parents add -v/-q
        p.add_argument("-q", "--quiet", action="count", default=0, help="no progress bar")
    p.set_defaults(func=_convert)
    return p
