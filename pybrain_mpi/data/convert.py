"""Conversion of NIfTI, HDF5 and .npy volumes into chunked, compressed OME-Zarr (Zarr v3).

Layout written by :func:`convert` (an OME-Zarr NGFF 0.5 image group)::

    out.zarr/            group; attributes "ome" (multiscales) and "pybrain_mpi" (affine, ...)
    out.zarr/0           full resolution array
    out.zarr/1, 2, ...   optional levels downsampled by 2 along the spatial axes

Axes: spatial axes are always last and keep the source's voxel order (NIfTI i, j, k, named
x, y, z), so the stored affine maps ``(i, j, k)`` of level 0 to scanner millimetres. 4D
NIfTI (fMRI) is stored time-first, ``(t, x, y, z)``, because NGFF requires time before space;
its default chunk spans the whole time axis so one voxel's series is one chunk read.

Memory stays bounded: the source is read slab by slab along an axis the chunks split
(NIfTI through nibabel's array proxy, HDF5 through h5py, .npy with plain reads of contiguous
slabs), and each slab covers whole chunks so no chunk is written twice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DataMismatch

__all__ = ["convert", "default_chunks", "ATTRS_KEY", "CODECS"]

#: Compressors :func:`convert` writes (all standard Zarr v3 codecs, all read by Volume's fast path):
#: name -> (what it is, when to pick it).
CODECS = {
    "blosc-zstd": "Blosc, byte shuffle + zstd (default): smallest stores",
    "blosc-lz4": "Blosc, byte shuffle + LZ4: larger stores, fastest compression and decoding",
    "zstd": "plain zstd, no shuffle: what other Zarr v3 tools read most widely",
    "none": "uncompressed: fastest when storage bandwidth is plentiful (RAM disk, NVMe)",
}


def _compressors(codec: str, clevel: int):
    """The zarr v3 ``compressors`` argument for a :data:`CODECS` name."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    if codec == "none":
        return None
    if codec == "zstd":
        return ZstdCodec(level=clevel)
    return BloscCodec(cname=codec.split("-", 1)[1], clevel=clevel, shuffle="shuffle")

#: Name of the attribute block pybrain-mpi writes beside NGFF's "ome" block.
ATTRS_KEY = "pybrain_mpi"


@dataclass
class _Source:
    """A source opened lazily: shape/dtype in *stored* axis order and a slab reader."""

    kind: str                     # "nifti", "hdf5", "npy"
    shape: tuple[int, ...]        # stored order (time first for 4D NIfTI)
    dtype: np.dtype
    affine: np.ndarray            # 4x4, voxel (i, j, k) -> mm
    time_step_s: float | None
    read: Callable[[int, int, int], np.ndarray]  # (axis, lo, hi) -> stored-order slab
    slab_axis: int                # axis along which reading slabs is cheap
    close: Callable[[], None]


def _open_nifti(path: str) -> _Source:
    import nibabel as nib

    img = nib.load(path)
    proxy = img.dataobj
    shape = tuple(int(n) for n in img.shape)
    if len(shape) not in (3, 4):
        raise DataMismatch(f"{path}: NIfTI of shape {shape}; pybrain-mpi converts 3D volumes and "
                           "4D time series only")
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    scaled = not (slope in (None, 1.0) and inter in (None, 0.0)) and not (
        np.isnan(slope) if slope is not None else False)
    dtype = np.dtype(np.float32) if scaled else np.dtype(img.get_data_dtype()).newbyteorder("=")
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = img.header.get_zooms()
    time_step = float(zooms[3]) if len(shape) == 4 and len(zooms) > 3 else None

    if len(shape) == 3:
        # NIfTI is Fortran-ordered: the last axis (k) is the slowest, so k-slabs are contiguous.
        def read(axis, lo, hi):
            sl = [slice(None)] * 3
            sl[axis] = slice(lo, hi)
            return np.asarray(proxy[tuple(sl)], dtype=dtype)
        stored, slab_axis = shape, 2
    else:
        # Stored time-first. A k-slab of every volume keeps memory at X*Y*dk*T.
        def read(axis, lo, hi):
            sl = [slice(None)] * 4
            src_axis = {0: 3, 1: 0, 2: 1, 3: 2}[axis]
            sl[src_axis] = slice(lo, hi)
            block = np.asarray(proxy[tuple(sl)], dtype=dtype)
            return np.ascontiguousarray(np.moveaxis(block, 3, 0))
        stored, slab_axis = (shape[3], shape[0], shape[1], shape[2]), 3
    return _Source("nifti", stored, dtype, affine, time_step, read, slab_axis, lambda: None)


def _open_hdf5(path: str, dataset: str, affine: np.ndarray | None) -> _Source:
    import h5py

    handle = h5py.File(path, "r")
    if dataset is None or dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
        names: list[str] = []
        handle.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        handle.close()
        what = "no dataset named" if dataset is None else f"no dataset {dataset!r} in"
        raise DataMismatch(f"{what} {path}; datasets in the file: {names[:20]}. "
                           f"Name one as {path}:/path/to/dataset")
    dset = handle[dataset]
    if affine is None and "affine" in dset.attrs:
        affine = np.asarray(dset.attrs["affine"], dtype=np.float64)

    def read(axis, lo, hi):
        sl = [slice(None)] * dset.ndim
        sl[axis] = slice(lo, hi)
        return np.asarray(dset[tuple(sl)])
    # HDF5 is C-ordered: axis 0 is the slowest, so axis-0 slabs are contiguous.
    return _Source("hdf5", tuple(dset.shape), np.dtype(dset.dtype), _affine_or_identity(affine),
                   None, read, 0, handle.close)


def _open_npy(path: str, affine: np.ndarray | None) -> _Source:
    # Slabs along the file's slowest axis are read with plain file reads, not through a
    # memory map: mapped pages would count towards (and stay in) the process's resident set.
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    shape = tuple(int(n) for n in shape)
    slow_axis = len(shape) - 1 if fortran else 0
    row_items = int(np.prod(shape)) // max(1, shape[slow_axis])
    mapped = None

    def read(axis, lo, hi):
        nonlocal mapped
        if axis == slow_axis:
            with open(path, "rb") as f:
                f.seek(offset + lo * row_items * dtype.itemsize)
                flat = np.fromfile(f, dtype=dtype, count=(hi - lo) * row_items)
            slab_shape = list(shape)
            slab_shape[axis] = hi - lo
            return flat.reshape(slab_shape, order="F" if fortran else "C")
        if mapped is None:
            mapped = np.load(path, mmap_mode="r")
        sl = [slice(None)] * len(shape)
        sl[axis] = slice(lo, hi)
        return np.array(mapped[tuple(sl)])
    return _Source("npy", shape, dtype, _affine_or_identity(affine), None, read, slow_axis,
                   lambda: None)


def _affine_or_identity(affine) -> np.ndarray:
    return np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64).reshape(4, 4)


def _open_source(src: str, affine) -> _Source:
    text = str(src)
    lower = text.lower()
    if lower.endswith((".nii", ".nii.gz")):
        if not os.path.exists(text):
            raise FileNotFoundError(f"NIfTI file {text} does not exist")
        return _open_nifti(text)
    if lower.endswith(".npy"):
        if not os.path.exists(text):
            raise FileNotFoundError(f".npy file {text} does not exist")
        return _open_npy(text, affine)
    for ext in (".h5:", ".hdf5:", ".hdf:"):
        at = lower.find(ext)
        if at >= 0:
            path, dataset = text[: at + len(ext) - 1], text[at + len(ext):]
            if not os.path.exists(path):
                raise FileNotFoundError(f"HDF5 file {path} does not exist")
            return _open_hdf5(path, dataset or None, affine)
    if lower.endswith((".h5", ".hdf5", ".hdf")):
        if not os.path.exists(text):
            raise FileNotFoundError(f"HDF5 file {text} does not exist")
        return _open_hdf5(text, None, affine)
    raise DataMismatch(f"{text}: unknown input format; pybrain-mpi converts .nii/.nii.gz, "
                       ".npy and HDF5 datasets (file.h5:/path)")


def default_chunks(shape: tuple[int, ...], itemsize: int, time_first: bool) -> tuple[int, ...]:
    """Default chunk shape: 64^3 for volumes; for time series the whole time axis times a cube
    of voxels sized so one chunk is about 2 MiB (so a voxel's series is a single read)."""
    if time_first:
        t = shape[0]
        side = int(max(1, min(64, math.floor((2 * 2**20 / (t * itemsize)) ** (1 / 3)))))
        return (t,) + tuple(min(side, n) for n in shape[1:])
    return tuple(min(64, n) for n in shape)


def _slab_batches(shape, chunks, slab_axis, itemsize, max_slab_bytes):
    """Yields (lo, hi) slabs along ``slab_axis`` covering whole chunks, each at most about
    ``max_slab_bytes`` (never less than one chunk row)."""
    n, c = shape[slab_axis], chunks[slab_axis]
    row_bytes = itemsize * int(np.prod(shape)) // max(1, n) * c
    rows = max(1, int(max_slab_bytes // max(1, row_bytes)))
    step = rows * c
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _downsample(block: np.ndarray, spatial_axes: tuple[int, ...], method: str) -> np.ndarray:
    """Downsamples by 2 along ``spatial_axes``: block mean (odd edges averaged over what
    exists) or nearest (every other voxel, for label maps)."""
    if method == "nearest":
        sl = [slice(None)] * block.ndim
        for ax in spatial_axes:
            sl[ax] = slice(0, None, 2)
        return block[tuple(sl)]
    out = block.astype(np.float64)
    for ax in spatial_axes:
        n = out.shape[ax]
        even = out.take(range(0, n - n % 2), axis=ax)
        new_shape = list(even.shape)
        new_shape[ax] = n // 2
        new_shape.insert(ax + 1, 2)
        pairs = even.reshape(new_shape).mean(axis=ax + 1)
        if n % 2:
            pairs = np.concatenate([pairs, out.take([n - 1], axis=ax)], axis=ax)
        out = pairs
    if np.issubdtype(block.dtype, np.integer):
        out = np.rint(out)
    return out.astype(block.dtype)


def _ngff_multiscales(name, axes, level_shapes, spatial_axes, voxel_size, affine, time_step):
    """NGFF 0.5 ``multiscales`` entry. Scale/translation carry voxel size and origin; an oblique
    affine cannot be expressed in NGFF, so the full affine lives under ``pybrain_mpi``."""
    diagonal = np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))
    datasets = []
    for level, shape in enumerate(level_shapes):
        factor = 2 ** level
        scale, translation = [], []
        spatial_index = 0
        for ax in range(len(shape)):
            if ax in spatial_axes:
                vs = float(voxel_size[spatial_index]) * factor
                scale.append(vs)
                origin = float(affine[spatial_index, 3]) if diagonal else 0.0
                # A block mean's centre sits (factor-1)/2 source voxels in.
                translation.append(origin + (factor - 1) / 2 * float(voxel_size[spatial_index]))
                spatial_index += 1
            else:
                scale.append(float(time_step) if time_step else 1.0)
                translation.append(0.0)
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if diagonal:
            transforms.append({"type": "translation", "translation": translation})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {"name": name, "axes": axes, "datasets": datasets}


def convert(src: str | os.PathLike, dst: str | os.PathLike, chunks: tuple[int, ...] | None = None, *,
            levels: int = 1, downsample: str = "mean", dtype: str | np.dtype | None = None,
            affine: np.ndarray | None = None, codec: str = "blosc-zstd", clevel: int = 3,
            max_slab_bytes: int = 256 * 2**20,
            overwrite: bool = False, progress: bool = True) -> str:
    """Converts a NIfTI (.nii/.nii.gz, 3D or 4D), HDF5 dataset (``file.h5:/path``) or .npy file
    into an OME-Zarr (NGFF 0.5, Zarr v3) image and returns ``dst``.

    Args:
        chunks: chunk shape in stored axis order (time first for 4D NIfTI). Default: see
            :func:`default_chunks`.
        levels: number of resolution levels (1 = full resolution only); each further level
            halves the spatial axes.
        downsample: ``"mean"`` (intensities) or ``"nearest"`` (label maps).
        dtype: stored dtype (default: the source's; scaled NIfTI becomes float32).
        affine: 4x4 voxel-to-mm affine for HDF5/.npy sources (NIfTI uses its own; HDF5 also
            reads a dataset attribute ``affine``). Default identity.
        codec: compressor, one of :data:`CODECS`: ``"blosc-zstd"`` (default), ``"blosc-lz4"``,
            ``"zstd"`` or ``"none"``. Sizes and speeds: the codec table of ``benchmarks/patches.py``.
        clevel: compression level (zstd 1-22, Blosc 0-9; LZ4 ignores most of it).
        max_slab_bytes: bound on the slab read from the source at once; memory use is about
            twice this whatever the volume size.
        overwrite: replace an existing ``dst``.
        progress: show a tqdm progress bar.
    """
    import zarr
    from tqdm.auto import tqdm

    dst = str(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (or --overwrite) to replace it")
    if downsample not in ("mean", "nearest"):
        raise ValueError(f"downsample must be 'mean' or 'nearest', not {downsample!r}")
    compressors = _compressors(codec, clevel)  # an unknown name fails before any file is opened
    source = _open_source(str(src), affine)
    try:
        time_first = source.kind == "nifti" and len(source.shape) == 4
        out_dtype = np.dtype(dtype) if dtype is not None else source.dtype
        shape = source.shape
        if chunks is None:
            chunks = default_chunks(shape, out_dtype.itemsize, time_first)
        chunks = tuple(int(c) for c in chunks)
        if len(chunks) != len(shape) or any(c <= 0 for c in chunks):
            raise DataMismatch(f"chunks {chunks} do not fit the {len(shape)}-D source of shape {shape}"
                               + (" (stored time-first: t, x, y, z)" if time_first else ""))
        chunks = tuple(min(c, n) for c, n in zip(chunks, shape))
        ndim = len(shape)
        spatial_axes = tuple(range(ndim - 3, ndim)) if ndim >= 3 else tuple(range(ndim))
        if time_first:
            axes = [{"name": "t", "type": "time", "unit": "second"}]
        else:
            axes = [{"name": f"dim{i}"} for i in range(ndim - len(spatial_axes))]
        axes += [{"name": n, "type": "space", "unit": "millimeter"}
                 for n in ("x", "y", "z")[-len(spatial_axes):]]
        voxel_size = np.sqrt((source.affine[:3, :3] ** 2).sum(axis=0))[-len(spatial_axes):]

        # The slab axis must split into several chunks; fall back to any axis that does.
        slab_axis = source.slab_axis
        if chunks[slab_axis] >= shape[slab_axis]:
            split = [ax for ax in range(ndim) if chunks[ax] < shape[ax]]
            slab_axis = split[0] if split else slab_axis

        level_shapes = [shape]
        for _ in range(1, levels):
            prev = level_shapes[-1]
            level_shapes.append(tuple((n + 1) // 2 if ax in spatial_axes else n
                                      for ax, n in enumerate(prev)))

        group = zarr.open_group(dst, mode="w", zarr_format=3)
        arrays = []
        for level, lshape in enumerate(level_shapes):
            lchunks = tuple(min(c, n) for c, n in zip(chunks, lshape))
            arrays.append(group.create_array(
                str(level), shape=lshape, chunks=lchunks, dtype=out_dtype,
                compressors=compressors,
                fill_value=0, dimension_names=[a["name"] for a in axes],
                # Every chunk is written, even all-zero ones, so a missing chunk is an error
                # a reader can report rather than silently read as zeros.
                config={"write_empty_chunks": True}))

        total = sum(int(np.prod(s)) * out_dtype.itemsize for s in level_shapes)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {Path(str(src)).name}",
                   disable=not progress)
        itemsize = out_dtype.itemsize
        for lo, hi in _slab_batches(shape, chunks, slab_axis, itemsize, max_slab_bytes):
            slab = source.read(slab_axis, lo, hi).astype(out_dtype, copy=False)
            sl = [slice(None)] * ndim
            sl[slab_axis] = slice(lo, hi)
            arrays[0][tuple(sl)] = slab
            bar.update(slab.nbytes)
            del slab
        # Each level from the previous one, slab by slab; a slab covers an even number of
        # source rows so the factor-2 blocks never straddle two slabs.
        for level in range(1, len(level_shapes)):
            prev, cur = arrays[level - 1], arrays[level]
            axis = slab_axis
            out_chunk = cur.chunks[axis]
            for lo, hi in _slab_batches(cur.shape, cur.chunks, axis, itemsize, max_slab_bytes):
                if axis in spatial_axes:
                    src_lo, src_hi = 2 * lo, min(prev.shape[axis], 2 * hi)
                else:
                    src_lo, src_hi = lo, hi
                sl = [slice(None)] * ndim
                sl[axis] = slice(src_lo, src_hi)
                block = _downsample(np.asarray(prev[tuple(sl)]), spatial_axes, downsample)
                osl = [slice(None)] * ndim
                osl[axis] = slice(lo, lo + block.shape[axis])
                cur[tuple(osl)] = block
                bar.update(block.nbytes)
            del out_chunk
        bar.close()

        name = Path(str(src)).name
        group.attrs["ome"] = {"version": "0.5", "multiscales": [_ngff_multiscales(
            name, axes, level_shapes, spatial_axes, voxel_size, source.affine, source.time_step_s)]}
        group.attrs[ATTRS_KEY] = {
            "affine": source.affine.tolist(),
            "voxel_size": [float(v) for v in voxel_size],
            "axes": [a["name"] for a in axes],
            "spatial_axes": list(spatial_axes),
            "time_step_s": source.time_step_s,
            "source": os.path.abspath(str(src).split(":")[0]) if source.kind != "hdf5" else str(src),
            "source_kind": source.kind,
            "downsample": downsample,
            "codec": codec,
            "all_chunks_written": True,
        }
        return dst
    finally:
        source.close()
