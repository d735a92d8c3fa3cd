"""A cohort's images converted once into the cache, by the ranks in parallel, and read back.

:func:`prepare_cohort` gives every subject of a :class:`~pybrain_mpi.data.cohort.Cohort` a
cache directory (:mod:`pybrain_mpi.data.cache`: built aside, stamped with its sources and
checksums, renamed into place) holding one OME-Zarr store per image column, the label map
and mask, and what training needs from one streaming pass over them:

- **volumes** (``kind="volume"``): a ``foreground.zarr`` map for drawing patches (the mask
  column > 0, else the label > 0, else the first image above its own mean: a T1's noisy
  background is not foreground), its voxel count and bounding box, each image's mean and
  standard deviation over the mask, else over the first image above its mean (the z-scoring
  of its patches: the same whether or not the subject has a label, so a new image is scaled
  as the training images were), and the label values present;
- **series** (``kind="series"``, 4D fMRI or GIFTI surface series): every voxel's (vertex's)
  mean and standard deviation over time, and the voxels whose series is not constant (inside
  the mask, if any), in ``series_*.npy`` files; constant series are dropped and counted.

Images of one subject must share one voxel grid: shapes and affines are compared after
conversion and a mismatch is refused naming both files, shapes and affines.

**Ranks in parallel.** Subjects are dealt to ranks in order of size (largest first, round
robin), each converted by exactly one rank. The ranks meet after every round (one subject
each) in a bounded allgather (:func:`pybrain_mpi.data.ranks.allgather_objects`), so a wait
is bounded by one subject's conversion (``timeout_s``), not the whole cohort's, and every
rank learns which subjects failed and why. A subject already in the cache (same sources,
same options) is not converted again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import CacheError, default_cache_dir, ensure_cache, open_cache
from .cohort import Cohort, Subject
from .convert import ATTRS_KEY, convert, is_zarr_store
from .errors import DataError, DataMismatch
from .ranks import allgather_objects

__all__ = ["CachedSubject", "prepare_cohort", "SubjectVolumes", "SeriesReader",
           "SUBJECT_FORMAT", "FOREGROUND_STORE"]

#: Version of a subject directory's layout (part of its cache key).
SUBJECT_FORMAT = 1
FOREGROUND_STORE = "foreground.zarr"
#: Slab bound of the statistics pass (decoded bytes of one image).
_STATS_SLAB_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class CachedSubject:
    """A subject's directory in the cache: stores per image column, label, mask, foreground,
    and the statistics of the conversion pass (see the module docstring)."""

    id: str
    group: str
    where: str
    root: Path
    images: dict
    label: str | None
    mask: str | None
    foreground: str | None
    stats: dict
    targets: dict


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "subject"


def _source_file(path: str) -> Path | None:
    """The file a source path reads (``file.h5`` of ``file.h5:/dataset``); None for a Zarr
    store, which is read in place."""
    if is_zarr_store(path) or "://" in path:
        return None
    match = re.search(r"\.(h5|hdf5|hdf):", path, flags=re.IGNORECASE)
    return Path(path[:match.end() - 1] if match else path)


def _cache_name(subject: Subject, options: dict) -> str:
    key = json.dumps({"format": SUBJECT_FORMAT, "images": subject.images, "label": subject.label,
                      "mask": subject.mask, **options}, sort_keys=True)
    return f"{_safe(subject.id)}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _oneline(array: np.ndarray) -> str:
    return np.array2string(np.asarray(array), precision=3, separator=",", suppress_small=True,
                           max_line_width=10**6).replace("\n", "")


def _check_same_grid(subject: Subject, opened: list) -> None:
    """Refuse images of one subject that are not on one voxel grid (shape and affine)."""
    (first_name, first_path, first), *rest = opened
    for name, path, volume in rest:
        same_shape = volume.spatial_shape == first.spatial_shape
        if same_shape and np.allclose(volume.affine, first.affine, atol=1e-3):
            continue
        raise DataMismatch(
            f"{subject.where}: subject {subject.id}: '{first_name}' ({first_path}) and "
            f"'{name}' ({path}) are not on one voxel grid: shapes {list(first.spatial_shape)} vs "
            f"{list(volume.spatial_shape)}, affines {_oneline(first.affine)} vs "
            f"{_oneline(volume.affine)}; resample one onto the other")


def _slabs(shape, chunks, axis: int, itemsize: int):
    row = int(np.prod(shape)) // shape[axis] * itemsize * chunks[axis]
    step = chunks[axis] * max(1, _STATS_SLAB_BYTES // max(1, row))
    for lo in range(0, shape[axis], step):
        yield lo, min(shape[axis], lo + step)


def _read_slab(volume, axis: int, lo: int, hi: int) -> np.ndarray:
    start = [0] * volume.ndim
    size = list(volume.shape)
    start[axis], size[axis] = lo, hi - lo
    return volume.read_patch(start, size)


def _write_foreground(template, path: Path) -> object:
    """An empty uint8 single-level OME-Zarr store on ``template``'s grid (same chunks, affine)."""
    import zarr
    from zarr.codecs import BloscCodec

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    axes = [{"name": n, "type": "space", "unit": "millimeter"} for n in template.axes]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": "foreground", "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in template.voxel_size]}]}]}]}
    group.attrs[ATTRS_KEY] = {"affine": template.affine.tolist(),
                              "voxel_size": [float(v) for v in template.voxel_size],
                              "axes": list(template.axes), "spatial_axes": list(template.spatial_axes),
                              "time_step_s": None, "source_kind": "foreground",
                              "downsample": "nearest", "all_chunks_written": True}
    return group.create_array("0", shape=template.shape, chunks=template.chunks, dtype="uint8",
                              compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                              fill_value=0, dimension_names=list(template.axes),
                              config={"write_empty_chunks": True})


def _volume_stats(subject: Subject, tmp: Path, images: dict, label: str | None,
                  mask: str | None) -> dict:
    """One streaming pass (two without mask or label): foreground, per-image statistics."""
    from .volume import Volume

    opened = {name: Volume(path, threads=1, cache_bytes=0) for name, path in images.items()}
    extra = {}
    if label is not None:
        extra["label"] = Volume(label, threads=1, cache_bytes=0)
    if mask is not None:
        extra["mask"] = Volume(mask, threads=1, cache_bytes=0)
    try:
        # Messages name the files of the manifest, not the stores converted from them.
        everything = [(n, subject.images[n], v) for n, v in opened.items()] + \
            [(n, subject.label if n == "label" else subject.mask, v) for n, v in extra.items()]
        for name, path, volume in everything:
            if volume.ndim != 3 or volume.time_axis is not None:
                raise DataMismatch(f"{subject.where}: subject {subject.id}: '{name}' ({path}) has "
                                   f"shape {list(volume.shape)}; segmentation and regression "
                                   "read 3D volumes (4D series train with kind = \"fmri_series\")")
        _check_same_grid(subject, everything)
        first_name = next(iter(opened))
        first = opened[first_name]
        shape, chunks = first.shape, first.chunks
        # Intensities are z-scored over the mask, else over the first image above its mean
        # (also when a label exists: a new image to predict has none, and must be scaled the
        # same way). Patches are drawn around the mask, else the label, else that region.
        threshold = None
        if mask is None:
            total = 0.0
            for lo, hi in _slabs(shape, chunks, 0, 8):
                total += float(_read_slab(first, 0, lo, hi).sum(dtype=np.float64))
            threshold = total / float(np.prod(shape))
        region = "mask > 0" if mask is not None else f"'{first_name}' > its mean ({threshold:.6g})"
        how = "mask > 0" if mask is not None else "label > 0" if label is not None else region
        foreground = _write_foreground(first, tmp / FOREGROUND_STORE)
        sums = {n: [0.0, 0.0, math.inf, -math.inf] for n in opened}
        count = region_count = 0
        lo_corner = np.array(shape)
        hi_corner = np.zeros(3, dtype=np.int64)
        label_counts: dict[int, int] = {}
        for lo, hi in _slabs(shape, chunks, 0, 8):
            values = _read_slab(extra["label"], 0, lo, hi) if label is not None else None
            if mask is not None:
                inside = _read_slab(extra["mask"], 0, lo, hi) > 0
            else:
                inside = _read_slab(first, 0, lo, hi) > threshold
            fg = values > 0 if values is not None and mask is None else inside
            if values is not None:
                if not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values, np.round(values)):
                    raise DataMismatch(f"{subject.where}: subject {subject.id}: the label map "
                                       f"{subject.label} holds non-integer values; a label map "
                                       "has one integer label per voxel")
                for v, c in zip(*np.unique(values, return_counts=True)):
                    label_counts[int(v)] = label_counts.get(int(v), 0) + int(c)
            foreground[lo:hi] = fg.astype(np.uint8)
            n = int(fg.sum())
            if n:
                where = np.argwhere(fg)
                lo_corner = np.minimum(lo_corner, where.min(axis=0) + (lo, 0, 0))
                hi_corner = np.maximum(hi_corner, where.max(axis=0) + (lo + 1, 1, 1))
            count += n
            region_count += int(inside.sum())
            for name, volume in opened.items():
                slab = _read_slab(volume, 0, lo, hi)
                if np.issubdtype(slab.dtype, np.floating) and not np.isfinite(slab).all():
                    raise DataError(f"{subject.where}: subject {subject.id}: '{name}' "
                                    f"({subject.images[name]}) contains NaN or infinite values "
                                    f"in slab x = {lo}..{hi}; clean the image")
                values_in = slab[inside].astype(np.float64)
                entry = sums[name]
                entry[0] += float(values_in.sum())
                entry[1] += float((values_in * values_in).sum())
                entry[2] = min(entry[2], float(slab.min()))
                entry[3] = max(entry[3], float(slab.max()))
        channels = {}
        for name, (s1, s2, low, high) in sums.items():
            mean = s1 / region_count if region_count else 0.0
            var = max(0.0, s2 / region_count - mean * mean) if region_count else 0.0
            channels[name] = {"mean": mean, "std": math.sqrt(var), "min": low, "max": high,
                              "over": region, "voxels": region_count}
        return {"kind": "volume", "shape": list(shape), "affine": first.affine.tolist(),
                "voxel_size": list(first.voxel_size), "levels": [list(s) for s in first.levels],
                "channels": channels,
                "foreground": {"count": count, "fraction": count / float(np.prod(shape)),
                               "lo": [int(v) for v in (lo_corner if count else (0, 0, 0))],
                               "hi": [int(v) for v in (hi_corner if count else shape)],
                               "how": how},
                "label_values": sorted(label_counts), "label_counts":
                    [label_counts[v] for v in sorted(label_counts)]}
    finally:
        for volume in list(opened.values()) + list(extra.values()):
            volume.close()


def _series_stats(subject: Subject, tmp: Path, images: dict, mask: str | None) -> dict:
    """Per-voxel mean and std over time, streaming over slabs of voxels; constant series
    (zero variance) dropped and counted."""
    from .volume import Volume

    if len(images) != 1:
        raise DataError(f"{subject.where}: fmri_series takes one image column per subject, "
                        f"got {list(images)}")
    name, path = next(iter(images.items()))
    volume = Volume(path, threads=1, cache_bytes=0)
    mask_volume = Volume(mask, threads=1, cache_bytes=0) if mask is not None else None
    try:
        if volume.time_axis != 0 or volume.ndim < 2:
            raise DataMismatch(f"{subject.where}: subject {subject.id}: '{name}' "
                               f"({subject.images[name]}) has shape {list(volume.shape)} (axes "
                               f"{list(volume.axes)}); fmri_series needs a 4D NIfTI (x, y, z, t) "
                               "or a GIFTI series")
        spatial = tuple(volume.shape[1:])
        if mask_volume is not None:
            _check_same_grid(subject, [(name, subject.images[name], volume),
                                       ("mask", subject.mask, mask_volume)])
        length = volume.shape[0]
        mean = np.zeros(spatial, dtype=np.float64)
        std = np.zeros(spatial, dtype=np.float64)
        axis = 1
        for lo, hi in _slabs(volume.shape, volume.chunks, axis, 8):
            block = _read_slab(volume, axis, lo, hi).astype(np.float64)
            if not np.isfinite(block).all():
                raise DataError(f"{subject.where}: subject {subject.id}: '{name}' contains NaN or "
                                f"infinite values (voxels x = {lo}..{hi}); clean the series")
            mean[lo:hi] = block.mean(axis=0)
            std[lo:hi] = block.std(axis=0)
        inside = np.ones(spatial, dtype=bool) if mask_volume is None else mask_volume.read() > 0
        varying = std > 0
        usable = np.flatnonzero(inside & varying)
        np.save(tmp / "series_mean.npy", mean)
        np.save(tmp / "series_std.npy", std)
        np.save(tmp / "series_voxels.npy", usable.astype(np.int64))
        return {"kind": "series", "length": int(length), "spatial_shape": list(spatial),
                "affine": volume.affine.tolist(), "time_step_s": volume.time_step_s,
                "series": int(np.prod(spatial)), "outside_mask": int((~inside).sum()),
                "constant": int((inside & ~varying).sum()), "usable": int(usable.size)}
    finally:
        volume.close()
        if mask_volume is not None:
            mask_volume.close()


def _build_subject(subject: Subject, kind: str, options: dict) -> Callable[[Path], dict]:
    def build(tmp: Path) -> dict:
        stores, columns = {}, {}
        jobs = [(f"image_{_safe(c)}", c, p, "mean") for c, p in subject.images.items()]
        if subject.label:
            jobs.append(("label", "label", subject.label, "nearest"))
        if subject.mask:
            jobs.append(("mask", "mask", subject.mask, "nearest"))
        for store_name, column, path, downsample in jobs:
            if is_zarr_store(path) and options["levels"] == 1:
                stores[column] = path  # already Zarr: read in place
                continue
            target = tmp / f"{store_name}.zarr"
            chunks = options["chunks"] if kind == "volume" else None
            try:
                convert(path, target, chunks=chunks, levels=options["levels"] if kind == "volume"
                        else 1, downsample=downsample, progress=False)
            except DataMismatch as exc:
                if "chunks" in str(exc):
                    raise DataMismatch(f"{subject.where}: subject {subject.id}: [data] chunks "
                                       f"{list(chunks)} do not fit {path}: {exc}") from None
                raise
            stores[column] = str(target)
            columns[column] = target.name
        images = {c: stores[c] for c in subject.images}
        label, mask = stores.get("label"), stores.get("mask")
        if kind == "volume":
            stats = _volume_stats(subject, tmp, images, label, mask)
        else:
            stats = _series_stats(subject, tmp, images, mask)
        # Stores inside the directory are recorded by name (the directory is renamed).
        return {"subject": subject.id, "kind": kind, "stats": stats,
                "columns": {c: columns.get(c) or stores[c] for c in stores}}
    return build


def _subject_sources(subject: Subject) -> list[Path]:
    return [f for f in (_source_file(p) for p in subject.files()) if f is not None]


def _open_subject(subject: Subject, name: str, root_dir: Path, wait_s: float) -> CachedSubject:
    root, stamp = open_cache(name, root_dir, wait_s, what="subject")
    columns = stamp["columns"]
    place = lambda c: (str(root / columns[c]) if not os.path.isabs(columns[c])  # noqa: E731
                       else columns[c]) if c in columns else None
    foreground = root / FOREGROUND_STORE
    return CachedSubject(subject.id, subject.group, subject.where, root,
                         {c: place(c) for c in subject.images}, place("label"), place("mask"),
                         str(foreground) if foreground.exists() else None, stamp["stats"],
                         dict(subject.targets))


def prepare_cohort(cohort: Cohort, *, kind: str, cache_dir=None, chunks=(32, 32, 32),
                   levels: int = 1, verify: bool = False, timeout_s: float = 600.0,
                   echo: Callable[[str], None] | None = None) -> list[CachedSubject]:
    """Every subject of ``cohort`` in the cache (converting what is missing, ranks in
    parallel: see the module docstring), in cohort order. Collective over the ranks of the
    initialized pybrain-mpi world (or one process); raises :class:`DataError` on every rank,
    naming each subject that failed and why.

    ``kind``: ``"volume"`` or ``"series"``; ``chunks``/``levels``: how volumes are stored
    (levels > 1 add 2x-downsampled levels, for whole-volume models); ``verify``: re-read
    every cached store against its checksum; ``timeout_s``: bound on one subject's
    conversion (each round's wait).
    """
    from .ranks import world

    if kind not in ("volume", "series"):
        raise ValueError(f"kind must be 'volume' or 'series', not {kind!r}")
    rank, size = world()
    root_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "subjects"
    options = {"kind": kind, "chunks": list(chunks) if kind == "volume" else None,
               "levels": int(levels)}
    names = [_cache_name(s, options) for s in cohort.subjects]

    def weight(i: int) -> int:
        total = 0
        for f in _subject_sources(cohort.subjects[i]):
            try:
                total += f.stat().st_size
            except OSError:
                pass
        return total
    order = sorted(range(len(cohort.subjects)), key=lambda i: (-weight(i), i))
    mine = order[rank::size]
    rounds = -(-len(order) // size)
    from .. import logs

    say = echo or logs.get_logger("data").info
    failures: list[tuple[str, str]] = []
    for step in range(rounds):
        failure = None
        if step < len(mine):
            subject = cohort.subjects[mine[step]]
            try:
                ensure_cache(names[mine[step]], _build_subject(subject, kind, options),
                             _subject_sources(subject), root_dir, verify=verify,
                             echo=lambda text, s=subject: say(f"rank {rank}: subject {s.id}: {text}"),
                             what="subject")
            except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
                message = str(exc) if isinstance(exc, (DataError, OSError, ValueError)) \
                    else f"{type(exc).__name__}: {exc}"
                failure = (subject.id, message)
        results = allgather_objects(failure, name=f"converting the cohort (round {step + 1} of "
                                    f"{rounds})", timeout_s=timeout_s)
        failures += [f for f in results if f is not None]
    if failures:
        shown = "\n".join(f"  {message}" if f"subject {sid}" in message else
                           f"  subject {sid}: {message}" for sid, message in failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise DataError(f"{len(failures)} of {len(cohort.subjects)} subject(s) of {cohort.source} "
                        f"could not be prepared:\n{shown}{more}")
    try:
        # A shared file system may show another rank's rename a little later.
        return [_open_subject(s, n, root_dir, 30.0) for s, n in zip(cohort.subjects, names)]
    except CacheError as exc:
        raise DataError(f"rank {rank}: {exc}") from None


# ----------------------------------------------------------------------------- reading
class SubjectVolumes:
    """One cached subject's volumes opened for patch reads (threads share the chunk caches).

    ``read_input(start, size)`` is ``(channels, *size)`` float32, each image z-scored with
    its foreground mean and standard deviation; ``read_label(start, size)`` maps the label
    values to class indices through ``classes`` (label value -> class index); the
    foreground map is :attr:`foreground`.
    """

    def __init__(self, subject: CachedSubject, *, classes: dict | None = None,
                 cache_bytes: int | None = None, level: int = 0):
        from .volume import Volume

        self.subject = subject
        self.level = level
        self.shape = tuple(subject.stats["levels"][level] if level else subject.stats["shape"])
        kwargs = {"threads": 1, "cache_bytes": cache_bytes}
        self.images = [Volume(p, **kwargs) for p in subject.images.values()]
        stats = subject.stats["channels"]
        self.mean = np.array([stats[c]["mean"] for c in subject.images], dtype=np.float32)
        self.scale = np.array([1.0 / max(stats[c]["std"], 1e-6) for c in subject.images],
                              dtype=np.float32)
        self.label = Volume(subject.label, **kwargs) if subject.label else None
        self.foreground = Volume(subject.foreground, **kwargs) if subject.foreground else None
        self.lookup = None
        if classes is not None:
            values = subject.stats["label_values"]
            unknown = [v for v in values if v not in classes]
            if unknown:
                raise DataError(f"{subject.where}: subject {subject.id}: label values {unknown} "
                                f"of {subject.label} are not among the training labels "
                                f"{sorted(classes)}")
            low = min(min(classes), min(values, default=0))
            self.lookup_offset = low
            self.lookup = np.zeros(max(max(classes), max(values, default=0)) - low + 1,
                                   dtype=np.int64)
            for value, index in classes.items():
                self.lookup[value - low] = index

    @property
    def channels(self) -> int:
        """Number of image channels."""
        return len(self.images)

    def read_input(self, start, size, out: np.ndarray | None = None) -> np.ndarray:
        """``(channels, *size)`` float32 z-scored intensities of the patch at ``start``."""
        if out is None:
            out = np.empty((len(self.images),) + tuple(size), dtype=np.float32)
        for c, volume in enumerate(self.images):
            out[c] = volume.read_patch(start, size, level=self.level)
            out[c] -= self.mean[c]
            out[c] *= self.scale[c]
        return out

    def read_label(self, start, size) -> np.ndarray:
        """``size`` int64 class indices of the patch at ``start``."""
        values = self.label.read_patch(start, size, level=self.level).astype(np.int64)
        return self.lookup[values - self.lookup_offset]

    def close(self) -> None:
        """Stops every volume's decode threads."""
        for volume in self.images + [v for v in (self.label, self.foreground) if v is not None]:
            volume.close()


class SeriesReader:
    """Voxel (vertex) time series of cached subjects, z-scored per series, read on demand.

    Row ``r`` of :attr:`rows` is ``(subject index, flat voxel index)`` over every usable
    (non-constant, inside the mask) series of every subject, in subject order; ``series(rows)``
    returns them float32 ``(len(rows), T)``. Every subject must have the same series length.
    """

    def __init__(self, subjects: list[CachedSubject]):
        from .volume import Volume

        lengths = {s.id: s.stats["length"] for s in subjects}
        if len(set(lengths.values())) != 1:
            raise DataMismatch("fmri_series subjects have different numbers of time points: "
                               + ", ".join(f"{k} {v}" for k, v in lengths.items())
                               + "; train on runs of one length (or crop them)")
        self.series_length = next(iter(lengths.values()))
        self.subjects = subjects
        self.volumes, self.means, self.stds, rows = [], [], [], []
        for index, subject in enumerate(subjects):
            voxels = np.load(subject.root / "series_voxels.npy")
            self.means.append(np.load(subject.root / "series_mean.npy").reshape(-1))
            self.stds.append(np.load(subject.root / "series_std.npy").reshape(-1))
            self.volumes.append(Volume(next(iter(subject.images.values())), threads=1))
            rows.append(np.stack([np.full(voxels.size, index, dtype=np.int64), voxels], axis=1))
        self.rows = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
        self.spatial = [tuple(s.stats["spatial_shape"]) for s in subjects]

    def __len__(self) -> int:
        return len(self.rows)

    def rows_of(self, subject_indices) -> np.ndarray:
        """Indices into :attr:`rows` of the given subjects' series."""
        return np.flatnonzero(np.isin(self.rows[:, 0], np.asarray(list(subject_indices))))

    def series(self, rows) -> np.ndarray:
        """z-scored float32 series ``(len(rows), T)`` of rows of :attr:`rows`."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.series_length), dtype=np.float32)
        for i, row in enumerate(rows):
            subject, flat = self.rows[row]
            volume = self.volumes[subject]
            coords = np.unravel_index(int(flat), self.spatial[subject])
            raw = volume.read_patch((0, *coords), (self.series_length,) + (1,) * len(coords))
            out[i] = (raw.reshape(-1).astype(np.float64) - self.means[subject][flat]) \
                / self.stds[subject][flat]
        return out

    def close(self) -> None:
        """Stops the volumes' decode threads."""
        for volume in self.volumes:
            volume.close()
