"""Conversion of brain images into chunked, compressed OME-Zarr (Zarr v3), streaming.

Sources: NIfTI (.nii/.nii.gz, 3D or 4D), FreeSurfer MGH (.mgz/.mgh), GIFTI surface data
(.gii, e.g. ``.func.gii`` series), an HDF5 dataset (``file.h5:/path``), .npy, and Zarr /
OME-Zarr stores (re-chunked, re-compressed or sharded).

Layout written by :func:`convert` (an OME-Zarr NGFF 0.5 image group)::

    out.zarr/            group; attributes "ome" (multiscales) and "pybrain_mpi" (affine, ...)
    out.zarr/0           full resolution array
    out.zarr/1, 2, ...   optional levels downsampled by 2 along the spatial axes

Axes: spatial axes are always last and keep the source's voxel order (NIfTI i, j, k, named
x, y, z), so the stored affine maps ``(i, j, k)`` of level 0 to scanner millimetres. 4D
NIfTI (fMRI) is stored time-first, ``(t, x, y, z)``, because NGFF requires time before space;
its default chunk spans the whole time axis so one voxel's series is one chunk read. GIFTI
series are stored ``(t, vertex)``.

**Memory is bounded by the slab, not the volume.** The source is read slab by slab along an
axis the chunks split; a slab covers whole chunks (whole shards with ``shards``), so no chunk
is written twice, and is at most ``max_slab_bytes`` (default 32 MiB) but never less than one
chunk row. NIfTI and MGH voxel data are read straight from the file (through gzip for
``.gz``/``.mgz``) in file order: a 3D volume's slabs along its slowest axis are consecutive
byte ranges, read in one forward pass. Where the slabs are not consecutive in the file
(4D series, whose slab of every volume is scattered over the file), a compressed file is
first decompressed once into a temporary file beside the output, so reading stays one pass
of the compressed data and memory stays one slab. Peak memory is then about three slabs
(the bytes read, the converted slab, zarr's encoded chunks) plus the interpreter: measured
by ``benchmarks/convert_memory.py``. GIFTI is XML: nibabel parses a file whole.

**A failed conversion leaves nothing behind.** The store is written beside its destination
under a temporary name and renamed into place at the very end; on any error (a truncated
file, a full disk, an interrupt) the temporary store is removed. A truncated NIfTI is an
error naming the file and how many bytes are missing, never a store of zeros.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import DataError, DataMismatch

__all__ = ["convert", "write_array", "default_chunks", "ATTRS_KEY", "CODECS", "DEFAULT_SLAB_BYTES",
           "source_kind", "is_zarr_store"]

#: Compressors :func:`convert` writes (all standard Zarr v3 codecs, all read by Volume's fast path):
#: name -> (what it is, when to pick it).
CODECS = {
    "blosc-zstd": "Blosc, byte shuffle + zstd (default): smallest stores",
    "blosc-lz4": "Blosc, byte shuffle + LZ4: larger stores, fastest compression and decoding",
    "zstd": "plain zstd, no shuffle: what other Zarr v3 tools read most widely",
    "none": "uncompressed: fastest when storage bandwidth is plentiful (RAM disk, NVMe)",
}

#: Default bound on one slab read from the source (never less than one chunk row).
DEFAULT_SLAB_BYTES = 32 * 2**20
#: Bytes copied per read when a compressed file is decompressed into a temporary file.
_SPOOL_BYTES = 8 * 2**20
#: Largest single read from a voxel stream (the precision of a truncation's byte count).
_READ_PIECE_BYTES = 2**16


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

    kind: str                     # "nifti", "mgh", "gifti", "hdf5", "npy", "zarr"
    shape: tuple[int, ...]        # stored order (time first for series)
    dtype: np.dtype
    affine: np.ndarray            # 4x4, voxel (i, j, k) -> mm
    time_step_s: float | None
    read: Callable[[int, int, int], np.ndarray]  # (axis, lo, hi) -> stored-order slab
    slab_axis: int                # axis along which reading slabs is cheap
    close: Callable[[], None]
    time_first: bool = False
    axis_names: tuple[str, ...] | None = None  # stored axes' names (default x, y, z / dimN)
    # Called once the slabs are known: (slab axis, number of slabs, scratch directory).
    prepare: Callable[[int, int, Path], None] | None = None


# ------------------------------------------------------------------------- NIfTI and MGH
class _VoxelFile:
    """The voxel bytes of a NIfTI/MGH file, read by byte range.

    Uncompressed files are read with seeks. A compressed file (``.gz``, ``.mgz``) is a gzip
    stream: reading it in increasing order is one pass (forward seeks decompress and
    discard); :meth:`spool` first decompresses the whole voxel stream into a temporary file
    when the reads would jump back and forth, so it is still decompressed once.
    """

    def __init__(self, path: str, offset: int, nbytes: int):
        from nibabel.openers import ImageOpener

        self.path, self.offset, self.nbytes = path, int(offset), int(nbytes)
        self.compressed = path.lower().endswith((".gz", ".mgz", ".bz2", ".zst"))
        self._opener = ImageOpener(path, "rb")
        self._file = self._opener.fobj
        self._spool: str | None = None
        if not self.compressed:
            available = os.path.getsize(path) - self.offset
            if available < self.nbytes:
                raise DataError(_truncated(path, max(0, available), self.nbytes))

    def spool(self, directory: Path) -> None:
        """Decompress the voxel stream once into a temporary file in ``directory``."""
        if not self.compressed or self._spool is not None:
            return
        fd, name = tempfile.mkstemp(dir=directory, prefix=".pbm-voxels.", suffix=".raw")
        self._spool = name
        with os.fdopen(fd, "wb") as out:
            self._seek(self.offset)
            left = self.nbytes
            while left:
                block = self._read_exact(min(_SPOOL_BYTES, left), self.nbytes - left)
                out.write(block)
                left -= len(block)
        self._opener.close()
        self._file = open(name, "rb")
        self._opener = None
        self.offset = 0

    def _seek(self, position: int) -> None:
        try:
            self._file.seek(position)
        except (EOFError, OSError) as exc:
            raise DataError(f"{self.path}: cannot read the voxel data ({exc}); the file is "
                            "truncated or damaged") from None

    def _read_exact(self, count: int, done: int) -> bytes:
        # In pieces, into one buffer: a gzip stream that ends early raises EOFError and drops
        # what that read had decompressed, so the count of bytes found is exact to a piece.
        buffer = bytearray(count)
        view, got = memoryview(buffer), 0
        try:
            while got < count:
                n = self._file.readinto(view[got:got + min(_READ_PIECE_BYTES, count - got)])
                if not n:
                    break
                got += n
        except EOFError:  # gzip: the stream ends before its end-of-stream marker
            pass
        except OSError as exc:  # gzip.BadGzipFile, zlib.error (a subclass of Exception)
            raise DataError(f"{self.path}: the compressed voxel data is damaged ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - zlib.error is not an OSError
            raise DataError(f"{self.path}: the compressed voxel data is damaged "
                            f"({type(exc).__name__}: {exc})") from None
        finally:
            view.release()
        if got != count:
            raise DataError(_truncated(self.path, done + got, self.nbytes,
                                       within=_READ_PIECE_BYTES if self.compressed else 0))
        return buffer

    def read(self, start: int, count: int) -> bytes:
        """``count`` bytes of voxel data from byte ``start`` of the voxel stream."""
        self._seek(self.offset + start)
        return self._read_exact(count, start)

    def close(self) -> None:
        """Closes the file and removes the temporary copy (idempotent)."""
        if self._opener is not None:
            self._opener.close()
        elif self._file is not None:
            self._file.close()
        self._opener = self._file = None
        if self._spool is not None:
            try:
                os.unlink(self._spool)
            except OSError:
                pass
            self._spool = None


def _truncated(path: str, got: int, expected: int, within: int = 0) -> str:
    """The one-line message of a file with fewer voxel bytes than its header announces
    (``within``: ``got`` may be short of what the file holds by up to this many bytes)."""
    holds = f"{got:,}" if not within else f"{got:,} to {min(expected, got + within):,}"
    missing = f"{expected - got:,} missing" + (" at most" if within else "")
    return (f"{path} is truncated: its header announces {expected:,} bytes of voxel data but "
            f"the file holds {holds} ({missing}); copy or download it again")


def _time_step_s(img, shape) -> float | None:
    if len(shape) != 4:
        return None
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not zooms[3]:
        return None
    step = float(zooms[3])
    try:
        unit = img.header.get_xyzt_units()[1]
    except (AttributeError, IndexError, TypeError):
        unit = "sec"
    return step / 1000.0 if unit == "msec" else step / 1e6 if unit == "usec" else step


def _open_proxy_image(path: str, kind: str) -> _Source:
    """NIfTI or MGH through its header; voxel bytes streamed from the file (F order)."""
    import nibabel as nib
    from nibabel.volumeutils import apply_read_scaling

    try:
        img = nib.load(path)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad header
        raise DataError(f"{path}: not a readable {kind.upper()} file ({type(exc).__name__}: "
                        f"{exc})") from None
    proxy = img.dataobj
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1): a 3D volume
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise DataMismatch(f"{path}: image of shape {shape}; pybrain-mpi converts 3D volumes and "
                           "4D time series only")
    if getattr(proxy, "order", "F") != "F" or not hasattr(proxy, "offset"):
        raise DataMismatch(f"{path}: unsupported voxel layout for streaming "
                           f"({type(proxy).__name__})")
    disk = np.dtype(proxy.dtype)
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    scaled = not (slope in (None, 1.0) and inter in (None, 0.0)) and not (
        np.isnan(slope) if slope is not None else False)
    dtype = np.dtype(np.float32) if scaled else disk.newbyteorder("=")
    affine = np.asarray(img.affine, dtype=np.float64)
    nbytes = int(np.prod(shape)) * disk.itemsize
    voxels = _VoxelFile(path, proxy.offset, nbytes)

    def decode(raw: bytes, fshape: tuple[int, ...]) -> np.ndarray:
        block = np.frombuffer(raw, dtype=disk).reshape(fshape, order="F")
        if scaled:
            return np.asarray(apply_read_scaling(block, slope, inter), dtype=np.float32)
        return block.astype(dtype, copy=False)

    plane = int(np.prod(shape[:3][:2])) * disk.itemsize  # bytes of one k-plane of one volume
    volume_bytes = plane * shape[2]
    if len(shape) == 3:
        # F order: k (axis 2) is the slowest axis, so a k-slab is one byte range.
        def read(axis, lo, hi):
            if axis == 2:
                return decode(voxels.read(lo * plane, (hi - lo) * plane), shape[:2] + (hi - lo,))
            # Any other axis: plane by plane, keeping the slab's rows of each plane.
            out = np.empty(tuple(hi - lo if a == axis else n for a, n in enumerate(shape)),
                           dtype=dtype)
            for k in range(shape[2]):
                piece = decode(voxels.read(k * plane, plane), shape[:2] + (1,))
                out[..., k:k + 1] = piece[(slice(lo, hi),) if axis == 0 else (slice(None), slice(lo, hi))]
            return out
        stored, slab_axis = shape, 2
        consecutive = lambda slabs, axis: axis == 2  # noqa: E731
    else:
        x, y, z, t = shape

        # Stored time-first (t, x, y, z); a z-slab (stored axis 3) of every volume is T ranges.
        def read(axis, lo, hi):
            sl = [slice(None)] * 4
            sl[axis] = slice(lo, hi)
            zlo, zhi = (lo, hi) if axis == 3 else (0, z)
            tlo, thi = (lo, hi) if axis == 0 else (0, t)
            out = np.empty(tuple(hi - lo if a == axis else n for a, n in enumerate((t, x, y, z))),
                           dtype=dtype)
            for ti in range(tlo, thi):
                block = decode(voxels.read(ti * volume_bytes + zlo * plane, (zhi - zlo) * plane),
                               (x, y, zhi - zlo))
                if axis in (1, 2):
                    block = block[(slice(lo, hi),) if axis == 1 else (slice(None), slice(lo, hi))]
                out[ti - tlo] = block
            return out
        stored, slab_axis = (t, x, y, z), 3
        consecutive = lambda slabs, axis: slabs == 1 or axis == 0  # noqa: E731

    def prepare(axis: int, slabs: int, scratch: Path) -> None:
        # Reads that would jump back and forth in a compressed stream: decompress it once.
        if not consecutive(slabs, axis):
            voxels.spool(scratch)
    return _Source(kind, stored, dtype, affine, _time_step_s(img, shape), read, slab_axis,
                   voxels.close, time_first=len(shape) == 4, prepare=prepare)


# ------------------------------------------------------------------------- GIFTI
def _open_gifti(path: str) -> _Source:
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as exc:  # noqa: BLE001 - XML and base64 errors of many kinds
        raise DataError(f"{path}: not a readable GIFTI file ({type(exc).__name__}: {exc})") from None
    arrays = [np.asarray(d.data) for d in img.darrays]
    if not arrays:
        raise DataMismatch(f"{path}: GIFTI file without data arrays")
    if len(arrays) == 1 and arrays[0].ndim == 2:
        data = arrays[0].T if arrays[0].shape[0] > arrays[0].shape[1] else arrays[0]
    else:
        lengths = sorted({a.size for a in arrays})
        if len(lengths) != 1:
            raise DataMismatch(f"{path}: GIFTI data arrays of different lengths {lengths}; a "
                               "series needs one array of vertices per time point")
        data = np.stack([a.reshape(-1) for a in arrays])
    data = np.ascontiguousarray(data)  # (t, vertex): GIFTI is XML, parsed whole by nibabel

    def read(axis, lo, hi):
        sl = [slice(None)] * 2
        sl[axis] = slice(lo, hi)
        return data[tuple(sl)]
    return _Source("gifti", tuple(data.shape), data.dtype.newbyteorder("="), np.eye(4), None,
                   read, 1, lambda: None, time_first=True, axis_names=("t", "vertex"))


# ------------------------------------------------------------------------- HDF5, .npy, Zarr
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
    available = os.path.getsize(path) - offset
    if available < int(np.prod(shape)) * dtype.itemsize:
        raise DataError(_truncated(path, available, int(np.prod(shape)) * dtype.itemsize))
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


def _open_zarr(path: str, affine: np.ndarray | None) -> _Source:
    from .volume import Volume

    volume = Volume(path, threads=1, cache_bytes=0)

    def read(axis, lo, hi):
        start = [0] * volume.ndim
        size = list(volume.shape)
        start[axis], size[axis] = lo, hi - lo
        return volume.read_patch(start, size)
    time_first = volume.time_axis == 0
    return _Source("zarr", tuple(volume.shape), volume.dtype,
                   volume.affine if affine is None else _affine_or_identity(affine),
                   volume.time_step_s, read, 0, volume.close, time_first=time_first,
                   axis_names=tuple(volume.axes))


def _affine_or_identity(affine) -> np.ndarray:
    return np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64).reshape(4, 4)


def is_zarr_store(path: str | os.PathLike) -> bool:
    """True for a directory (or URL) that is a Zarr store: ``*.zarr``, or one holding
    ``zarr.json`` / ``.zgroup`` / ``.zarray``."""
    text = os.fspath(path).rstrip("/")
    if "://" in text:
        return text.lower().endswith(".zarr")
    return os.path.isdir(text) and (text.lower().endswith(".zarr") or any(
        os.path.exists(os.path.join(text, name)) for name in ("zarr.json", ".zgroup", ".zarray")))


#: File endings and the source kind they are read as (checked in this order).
_KINDS = ((".nii.gz", "nifti"), (".nii", "nifti"), (".mgz", "mgh"), (".mgh", "mgh"),
          (".gii", "gifti"), (".npy", "npy"), (".h5", "hdf5"), (".hdf5", "hdf5"),
          (".hdf", "hdf5"))


def source_kind(src: str | os.PathLike) -> str | None:
    """The kind of image ``src`` names (``"nifti"``, ``"mgh"``, ``"gifti"``, ``"npy"``,
    ``"hdf5"`` incl. ``file.h5:/dataset``, ``"zarr"``), or None for an unknown ending."""
    text = os.fspath(src)
    lower = text.lower()
    if is_zarr_store(text) or lower.rstrip("/").endswith(".zarr"):
        return "zarr"
    for ext in (".h5:", ".hdf5:", ".hdf:"):
        if ext in lower:
            return "hdf5"
    for ending, kind in _KINDS:
        if lower.endswith(ending):
            return kind
    return None


def _open_source(src: str, affine) -> _Source:
    text = str(src)
    lower = text.lower()
    kind = source_kind(text)
    if kind == "hdf5":
        for ext in (".h5:", ".hdf5:", ".hdf:"):
            at = lower.find(ext)
            if at >= 0:
                path, dataset = text[: at + len(ext) - 1], text[at + len(ext):]
                break
        else:
            path, dataset = text, None
        if not os.path.exists(path):
            raise FileNotFoundError(f"HDF5 file {path} does not exist")
        return _open_hdf5(path, dataset or None, affine)
    if kind is None:
        raise DataMismatch(f"{text}: unknown input format; pybrain-mpi converts .nii/.nii.gz, "
                           ".mgz/.mgh, .gii, .npy, HDF5 datasets (file.h5:/path) and Zarr stores")
    if "://" not in text and not os.path.exists(text):
        label = {"nifti": "NIfTI", "mgh": "MGH", "gifti": "GIFTI", "npy": ".npy",
                 "zarr": "Zarr store"}[kind]
        raise FileNotFoundError(f"{label} file {text} does not exist" if kind != "zarr"
                                else f"Zarr store {text} does not exist")
    if kind in ("nifti", "mgh"):
        return _open_proxy_image(text, kind)
    if kind == "gifti":
        return _open_gifti(text)
    if kind == "npy":
        return _open_npy(text, affine)
    return _open_zarr(text, affine)


# ------------------------------------------------------------------------- the conversion
def default_chunks(shape: tuple[int, ...], itemsize: int, time_first: bool) -> tuple[int, ...]:
    """Default chunk shape: 64^3 for volumes; for time series the whole time axis times a block
    of voxels (a cube, or a run of vertices) sized so one chunk is about 2 MiB (so a voxel's
    series is a single read)."""
    if time_first:
        t, rest = shape[0], shape[1:]
        side = (2 * 2**20 / (t * itemsize)) ** (1 / max(1, len(rest)))
        side = int(max(1, min(64 if len(rest) > 1 else 2**16, math.floor(side))))
        return (t,) + tuple(min(side, n) for n in rest)
    return tuple(min(64, n) for n in shape)


def _slab_batches(shape, chunks, slab_axis, itemsize, max_slab_bytes):
    """Yields (lo, hi) slabs along ``slab_axis`` covering whole chunks (``chunks`` may be the
    shard shape), each at most about ``max_slab_bytes`` (never less than one chunk row)."""
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


def _axes_of(source: _Source, ndim: int) -> tuple[list[dict], tuple[int, ...]]:
    """NGFF axes and the spatial axes of a source."""
    if source.kind == "gifti":
        return [{"name": "t", "type": "time", "unit": "second"}, {"name": "vertex"}], ()
    spatial = tuple(range(ndim - 3, ndim)) if ndim >= 3 else tuple(range(ndim))
    if source.time_first:
        axes = [{"name": "t", "type": "time", "unit": "second"}]
    else:
        axes = [{"name": f"dim{i}"} for i in range(ndim - len(spatial))]
    axes += [{"name": n, "type": "space", "unit": "millimeter"}
             for n in ("x", "y", "z")[-len(spatial):]]
    return axes, spatial


def _check_grid(what: str, values, shape, base=None) -> tuple[int, ...]:
    values = tuple(int(c) for c in values)
    if len(values) != len(shape) or any(c <= 0 for c in values):
        raise DataMismatch(f"{what} {values} do not fit the {len(shape)}-D source of shape "
                           f"{tuple(shape)}")
    if base is not None and any(v % b for v, b in zip(values, base)):
        raise DataMismatch(f"{what} {values} must be multiples of the chunks {tuple(base)}")
    return values


def _staging_dir(dst: str) -> str:
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dst)}.", suffix=".tmp")


def _move_into_place(staged: str, dst: str) -> None:
    """Renames the finished store ``staged`` to ``dst`` (an existing ``dst`` is moved aside
    first and deleted once the new one is in place)."""
    old = None
    if os.path.lexists(dst):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dst)),
                               prefix=f".{os.path.basename(dst)}.", suffix=".old")
        os.replace(dst, os.path.join(old, "stale"))
    os.replace(staged, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert(src: str | os.PathLike, dst: str | os.PathLike, chunks: tuple[int, ...] | None = None, *,
            levels: int = 1, downsample: str = "mean", dtype: str | np.dtype | None = None,
            affine: np.ndarray | None = None, codec: str = "blosc-zstd", clevel: int = 3,
            shards: tuple[int, ...] | None = None, max_slab_bytes: int = DEFAULT_SLAB_BYTES,
            overwrite: bool = False, progress: bool = True) -> str:
    """Converts a brain image (see the module docstring for the formats) into an OME-Zarr
    (NGFF 0.5, Zarr v3) image and returns ``dst``.

    Args:
        chunks: chunk shape in stored axis order (time first for series). Default: see
            :func:`default_chunks`.
        levels: number of resolution levels (1 = full resolution only); each further level
            halves the spatial axes.
        downsample: ``"mean"`` (intensities) or ``"nearest"`` (label maps).
        dtype: stored dtype (default: the source's; scaled NIfTI becomes float32).
        affine: 4x4 voxel-to-mm affine for HDF5/.npy sources (NIfTI and MGH use their own;
            HDF5 also reads a dataset attribute ``affine``). Default identity.
        codec: compressor, one of :data:`CODECS`: ``"blosc-zstd"`` (default), ``"blosc-lz4"``,
            ``"zstd"`` or ``"none"``. Sizes and speeds: the codec table of ``benchmarks/patches.py``.
        clevel: compression level (zstd 1-22, Blosc 0-9; LZ4 ignores most of it).
        shards: Zarr v3 sharding: the shard shape (multiples of ``chunks``). Each shard is
            one file holding its chunks and an index, so a store of millions of chunks is
            thousands of files; :class:`~pybrain_mpi.data.Volume` still reads only the inner
            chunks a patch touches (byte ranges of the shard). Slabs then cover whole shards:
            memory grows to one shard row.
        max_slab_bytes: bound on the slab read from the source at once (default 32 MiB;
            never less than one chunk row, or shard row); peak memory is about three slabs.
        overwrite: replace an existing ``dst`` (only once the new store is complete).
        progress: show a tqdm progress bar.

    Raises :class:`DataError` (and subclasses) for data that cannot be converted, naming the
    file; ``FileNotFoundError`` for a missing source. Nothing is left at ``dst`` on failure.
    """
    import zarr
    from tqdm.auto import tqdm

    dst = os.fspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (or --overwrite) to replace it")
    if downsample not in ("mean", "nearest"):
        raise ValueError(f"downsample must be 'mean' or 'nearest', not {downsample!r}")
    if os.path.abspath(os.fspath(src)) == os.path.abspath(dst):
        raise DataMismatch(f"{dst}: source and destination are the same store")
    compressors = _compressors(codec, clevel)  # an unknown name fails before any file is opened
    source = _open_source(os.fspath(src), affine)
    staged = None
    try:
        layout = _Layout.plan(source, chunks, shards, dtype, levels, max_slab_bytes)
        staged = _staging_dir(dst)
        if source.prepare is not None:
            source.prepare(layout.slab_axis, len(layout.slabs), Path(staged))
        store = os.path.join(staged, "image.zarr")
        group = zarr.open_group(store, mode="w", zarr_format=3)
        arrays = layout.create_arrays(group, compressors)
        total = sum(int(np.prod(s)) * layout.dtype.itemsize for s in layout.level_shapes)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {Path(str(src)).name}",
                  disable=not progress) as bar:
            layout.write_full_resolution(source, arrays[0], bar)
            layout.write_pyramid(arrays, downsample, max_slab_bytes, bar)
        group.attrs["ome"] = {"version": "0.5", "multiscales": [_ngff_multiscales(
            Path(str(src)).name, layout.axes, layout.level_shapes, layout.spatial_axes,
            layout.voxel_size, source.affine, source.time_step_s)]}
        group.attrs[ATTRS_KEY] = {
            "affine": source.affine.tolist(),
            "voxel_size": [float(v) for v in layout.voxel_size],
            "axes": [a["name"] for a in layout.axes],
            "spatial_axes": list(layout.spatial_axes),
            "time_step_s": source.time_step_s,
            "source": os.path.abspath(str(src).split(":")[0]) if source.kind != "hdf5" else str(src),
            "source_kind": source.kind,
            "downsample": downsample,
            "codec": codec,
            "shards": None if layout.shards is None else list(layout.shards),
            "all_chunks_written": True,
        }
        source.close()
        _move_into_place(store, dst)
        return dst
    finally:
        source.close()
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


@dataclass
class _Layout:
    """How one conversion stores its image: the stored dtype, chunk and shard grids, the
    resolution levels and the slabs (along ``slab_axis``) the source is read in."""

    dtype: np.dtype
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    axes: list[dict]
    spatial_axes: tuple[int, ...]
    voxel_size: np.ndarray
    slab_axis: int
    slabs: list[tuple[int, int]]
    level_shapes: list[tuple[int, ...]]

    @classmethod
    def plan(cls, source: _Source, chunks, shards, dtype, levels: int, max_slab_bytes: int) -> "_Layout":
        """The layout of ``source`` with the requested grids, checked against its shape."""
        out_dtype = np.dtype(dtype) if dtype is not None else source.dtype
        shape = source.shape
        ndim = len(shape)
        if chunks is None:
            chunks = default_chunks(shape, out_dtype.itemsize, source.time_first)
        chunks = _check_grid("chunks", chunks, shape)
        chunks = tuple(min(c, n) for c, n in zip(chunks, shape))
        if shards is not None:
            shards = _check_grid("shards", shards, shape, chunks)
        grid = shards or chunks
        axes, spatial_axes = _axes_of(source, ndim)
        voxel_size = np.sqrt((source.affine[:3, :3] ** 2).sum(axis=0))[-len(spatial_axes):] \
            if spatial_axes else np.zeros(0)
        # The slab axis must split into several chunks; fall back to any axis that does.
        slab_axis = source.slab_axis
        if grid[slab_axis] >= shape[slab_axis]:
            split = [ax for ax in range(ndim) if grid[ax] < shape[ax]]
            slab_axis = split[0] if split else slab_axis
        slabs = list(_slab_batches(shape, grid, slab_axis, out_dtype.itemsize, max_slab_bytes))
        level_shapes = [shape]
        for _ in range(1, levels):
            level_shapes.append(tuple((n + 1) // 2 if ax in spatial_axes else n
                                      for ax, n in enumerate(level_shapes[-1])))
        return cls(out_dtype, chunks, shards, axes, spatial_axes, voxel_size, slab_axis, slabs,
                   level_shapes)

    def create_arrays(self, group, compressors) -> list:
        """One Zarr array per resolution level in ``group``."""
        arrays = []
        for level, lshape in enumerate(self.level_shapes):
            lchunks = tuple(min(c, n) for c, n in zip(self.chunks, lshape))
            lshards = None if self.shards is None else tuple(
                max(c, min(s, -(-n // c) * c)) for s, c, n in zip(self.shards, lchunks, lshape))
            arrays.append(group.create_array(
                str(level), shape=lshape, chunks=lchunks, shards=lshards, dtype=self.dtype,
                compressors=compressors,
                fill_value=0, dimension_names=[a["name"] for a in self.axes],
                # Every chunk is written, even all-zero ones, so a missing chunk is an error
                # a reader can report rather than silently read as zeros.
                config={"write_empty_chunks": True}))
        return arrays

    def write_full_resolution(self, source: _Source, array, bar) -> None:
        """Level 0, slab by slab from the source."""
        for lo, hi in self.slabs:
            slab = source.read(self.slab_axis, lo, hi).astype(self.dtype, copy=False)
            sl = [slice(None)] * len(self.level_shapes[0])
            sl[self.slab_axis] = slice(lo, hi)
            array[tuple(sl)] = slab
            bar.update(slab.nbytes)
            del slab

    def write_pyramid(self, arrays: list, downsample: str, max_slab_bytes: int, bar) -> None:
        """Each further level from the previous one, slab by slab; a slab covers an even number
        of source rows so the factor-2 blocks never straddle two slabs."""
        axis, ndim = self.slab_axis, len(self.level_shapes[0])
        for level in range(1, len(self.level_shapes)):
            prev, cur = arrays[level - 1], arrays[level]
            cur_grid = cur.shards or cur.chunks
            for lo, hi in _slab_batches(cur.shape, cur_grid, axis, self.dtype.itemsize, max_slab_bytes):
                if axis in self.spatial_axes:
                    src_lo, src_hi = 2 * lo, min(prev.shape[axis], 2 * hi)
                else:
                    src_lo, src_hi = lo, hi
                sl = [slice(None)] * ndim
                sl[axis] = slice(src_lo, src_hi)
                block = _downsample(np.asarray(prev[tuple(sl)]), self.spatial_axes, downsample)
                osl = [slice(None)] * ndim
                osl[axis] = slice(lo, lo + block.shape[axis])
                cur[tuple(osl)] = block
                bar.update(block.nbytes)


def write_array(array: np.ndarray, dst: str | os.PathLike, *, affine: np.ndarray,
                chunks: tuple[int, ...] | None = None, channel_axis: bool = False,
                codec: str = "blosc-zstd", name: str = "prediction",
                overwrite: bool = True) -> str:
    """Writes an in-memory array (e.g. a prediction) as a single-level OME-Zarr image with the
    layout :func:`convert` writes, aside and renamed into place; returns ``dst``.

    The spatial axes are the last three; ``channel_axis`` marks a leading channel axis
    (class probabilities, ``(c, x, y, z)``).
    """
    import zarr

    dst = os.fspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists")
    array = np.asarray(array)
    ndim = array.ndim
    spatial = tuple(range(ndim - 3, ndim))
    axes = ([{"name": "c", "type": "channel"}] if channel_axis else []) + \
        [{"name": n, "type": "space", "unit": "millimeter"} for n in ("x", "y", "z")]
    affine = _affine_or_identity(affine)
    voxel_size = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    chunks = tuple(min(c, n) for c, n in zip(chunks or default_chunks(array.shape, array.itemsize,
                                                                      False), array.shape))
    staged = _staging_dir(dst)
    try:
        store = os.path.join(staged, "image.zarr")
        group = zarr.open_group(store, mode="w", zarr_format=3)
        group.create_array("0", data=array, chunks=chunks, compressors=_compressors(codec, 3),
                           fill_value=0, dimension_names=[a["name"] for a in axes],
                           config={"write_empty_chunks": True})
        group.attrs["ome"] = {"version": "0.5", "multiscales": [_ngff_multiscales(
            name, axes, [array.shape], spatial, voxel_size, affine, None)]}
        group.attrs[ATTRS_KEY] = {"affine": affine.tolist(), "voxel_size": voxel_size.tolist(),
                                  "axes": [a["name"] for a in axes], "spatial_axes": list(spatial),
                                  "time_step_s": None, "source": name, "source_kind": "array",
                                  "codec": codec, "all_chunks_written": True}
        _move_into_place(store, dst)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return dst
