"""``pybrain-mpi convert IN OUT.zarr``: the command-line face of :func:`pybrain_mpi.data.convert`."""

from __future__ import annotations

import argparse

from .convert import CODECS


def _parse_chunks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"chunks must look like 32,32,32 (or 32x32x32), not {text!r}")


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    affine = None
    if args.affine:
        import numpy as np

        affine = np.loadtxt(args.affine).reshape(4, 4)
    convert(args.input, args.output, chunks=args.chunks, levels=args.levels,
            downsample=args.downsample, dtype=args.dtype, affine=affine, codec=args.codec, clevel=args.clevel,
            max_slab_bytes=int(args.max_slab_mb * 2**20), overwrite=args.overwrite,
            progress=not args.quiet)
    return 0


def add_convert_subcommand(subparsers) -> argparse.ArgumentParser:
    """Adds ``convert`` to an argparse sub-parser set (``pybrain-mpi convert IN OUT.zarr``)."""
    p = subparsers.add_parser(
        "convert", help="convert NIfTI / HDF5 (file.h5:/dataset) / .npy into OME-Zarr (Zarr v3)",
        description="Convert a NIfTI (.nii/.nii.gz, 3D or 4D), an HDF5 dataset (file.h5:/path) or "
                    "a .npy file into a chunked, compressed OME-Zarr image, slab by slab.")
    p.add_argument("input", help="source: x.nii[.gz], x.npy or x.h5:/path/to/dataset")
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
    p.add_argument("--max-slab-mb", type=float, default=256, help="largest slab read at once")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)
    return p
