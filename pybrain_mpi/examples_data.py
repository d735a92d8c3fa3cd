"""Real brain data for the shipped examples, found inside installed packages (offline) and
converted on first use into Zarr stores (through :func:`pybrain_mpi.data.convert`) in a cache.

- **DCA example**: nitime ships two real fMRI runs (``nitime/data/fmri1.nii.gz`` and
  ``fmri2.nii.gz``, 10x10x18 voxels x 40 volumes, int16, TR 1.35 s). They are converted into
  time-first OME-Zarr stores ``(t, x, y, z)``; :class:`NitimeFMRI` reads voxel series from
  them on demand through :class:`pybrain_mpi.data.Volume`. Every voxel whose series is not
  constant is one sample (one voxel's time series per sample, as in the DCA paper); each
  series is z-scored on its own, and voxels are split into train and held-out sets with a
  seed (:func:`prepare_dca_example`).
- **3D example**: nilearn's MNI152 2009a T1 template and its grey-matter probability map
  (197x233x189, 1 mm, same grid, uint8) converted into OME-Zarr stores with 32^3 chunks;
  the brain's bounding box and intensity statistics are computed once at conversion and kept
  with them (:func:`prepare_mni152_example`).
- **Encoding example**: nitime's ``fmri_timeseries.csv`` (250 volumes x 31 named ROI signals),
  read directly (:func:`load_nitime_roi_timeseries`); it is 62 KB of text, no cache needed.

**The cache.** ``$PBM_CACHE_DIR`` if set, else ``~/.cache/pybrain-mpi``. Each example lives
in its own directory (``nitime_fmri/``, ``mni152/``) with a stamp file
(:data:`STAMP_NAME`) written last: format, :data:`CACHE_VERSION`, the source files (size) and
a SHA-256 of every store's decoded contents. A directory is built in a temporary sibling and
renamed into place, so readers never see half of one. A directory whose stamp is missing
(a crash before the rename is impossible, but a copy may be partial), unreadable, of another
cache version, made from different source files, or whose stores do not match their
checksums is rebuilt (with a message). Version 1 of the cache (before Zarr) kept ``.npy``
files ``nitime_fmri_s*_h*_{train,held_out}.npy`` in the cache root; they are removed when
version 2 is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PbmError

__all__ = ["NITIME_FMRI_FILES", "CACHE_VERSION", "STAMP_NAME", "ExampleCacheError",
           "DCAExample", "MNI152Example", "NitimeFMRI", "default_cache_dir", "package_data_path",
           "nitime_fmri_paths", "load_nitime_fmri_series", "split_by_voxel",
           "prepare_dca_example", "prepare_mni152_example", "ensure_cache", "open_cache",
           "mni152_paths", "atomic_save_npy", "load_nitime_roi_timeseries"]

NITIME_FMRI_FILES = ("fmri1.nii.gz", "fmri2.nii.gz")
_MNI152_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
#: Version of the cache layout; 1 was .npy files, 2 is Zarr stores with a stamp.
CACHE_VERSION = 2
#: Name of the stamp file that marks a complete cache directory.
STAMP_NAME = "pybrain-mpi-cache.json"
_STAMP_FORMAT = "pybrain-mpi-example-cache"
_LEGACY_NPY = "nitime_fmri_s*_h*_*.npy"


class ExampleCacheError(PbmError, ValueError):
    """An example's cache cannot be built, or is not (yet) usable where it is read."""


def default_cache_dir() -> Path:
    """``$PBM_CACHE_DIR`` if set, else ``~/.cache/pybrain-mpi``."""
    env = os.environ.get("PBM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pybrain-mpi"


def package_data_path(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside ``package``, located without importing it.

    Raises ``FileNotFoundError`` naming the package and the pip command that provides it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the example data comes from the '{package}' package, which is "
                                f"not installed: pip install {package} "
                                f"(or pip install 'pybrain-mpi[examples]')")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed '{package}' package; "
                                f"reinstall it: pip install --force-reinstall {package}")
    return path


def nitime_fmri_paths() -> list[Path]:
    """Paths of nitime's two real fMRI runs (10x10x18x40 int16 NIfTI)."""
    return [package_data_path("nitime", "data", name) for name in NITIME_FMRI_FILES]


def load_nitime_fmri_series() -> np.ndarray:
    """Every non-constant voxel's series from both nitime runs, z-scored per voxel.

    Returns a float32 array ``(n_voxels, 40)``: run 1's voxels (C order over x, y, z), then
    run 2's. Constant voxels (zero variance, e.g. outside the brain) are dropped, since a
    z-score is undefined for them.
    """
    import nibabel as nib  # optional dependency ([data] extra); only needed here

    runs = []
    for path in nitime_fmri_paths():
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        if data.ndim != 4:
            raise ValueError(f"{path}: expected a 4D fMRI run, got shape {data.shape}")
        series = data.reshape(-1, data.shape[-1])
        std = series.std(axis=1)
        brain = std > 0
        z = (series[brain] - series[brain].mean(axis=1, keepdims=True)) / std[brain, None]
        runs.append(z)
    lengths = {r.shape[1] for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"nitime runs have different lengths {sorted(lengths)}")
    return np.concatenate(runs).astype(np.float32)


def split_by_voxel(series: np.ndarray, held_out_fraction: float, seed: int):
    """Split rows (voxels) into ``(train, held_out)`` with a seeded permutation."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    order = np.random.default_rng(seed).permutation(len(series))
    n_held_out = max(1, int(round(held_out_fraction * len(series))))
    return series[np.sort(order[n_held_out:])], series[np.sort(order[:n_held_out])]


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as .npy so readers never see a partial file.

    Writes a temporary file in the same directory, fsyncs it and renames it over ``path``
    (a rename within one file system is atomic), so concurrent ranks preparing the same
    cache each produce a complete file and the last rename wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256_of_store(path: Path) -> tuple[str, list[int], str]:
    """``(sha256 of the decoded level-0 array, shape, dtype)`` of a Zarr store, read through
    :class:`pybrain_mpi.data.Volume` (so a missing or corrupt chunk raises ``ChunkError``)."""
    from .data import Volume

    with Volume(path, threads=1, cache_bytes=0) as volume:
        array = np.ascontiguousarray(volume.read())
    return hashlib.sha256(array.tobytes()).hexdigest(), list(array.shape), str(array.dtype)


def _read_stamp(root: Path) -> dict | None:
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == _STAMP_FORMAT else None


def _stamp_problem(root: Path, sources: list[Path], verify: bool) -> str | None:
    """Why ``root`` is not a usable cache (None when it is)."""
    if not root.exists():
        return "it does not exist yet"
    stamp = _read_stamp(root)
    if stamp is None:
        return f"it has no readable {STAMP_NAME} (incomplete or from an older version)"
    if stamp.get("version") != CACHE_VERSION:
        return f"it was written by cache version {stamp.get('version')}, this is {CACHE_VERSION}"
    recorded = {s.get("name"): s.get("size") for s in stamp.get("sources", [])}
    for source in sources:
        if recorded.get(source.name) != source.stat().st_size:
            return f"its source {source.name} changed (package upgraded?)"
    for name, entry in stamp.get("stores", {}).items():
        if not (root / name).is_dir():
            return f"store {name} is missing"
        if verify:
            try:
                digest, shape, dtype = _sha256_of_store(root / name)
            except Exception as exc:  # a broken store can fail in many ways (zarr, codecs)
                return f"store {name} cannot be read ({type(exc).__name__}: {exc})"
            if (digest, shape, dtype) != (entry.get("sha256"), entry.get("shape"), entry.get("dtype")):
                return f"store {name} does not match its checksum (damaged)"
    return None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def ensure_cache(name: str, build: Callable[[Path], dict], sources: list[Path],
                 cache_dir: str | os.PathLike | None = None, verify: bool = True,
                 echo: Callable[[str], None] | None = None) -> Path:
    """The cache directory ``<cache>/<name>``, built by ``build(tmp_dir)`` unless it is usable.

    ``build`` writes Zarr stores (directories ending ``.zarr``) into ``tmp_dir`` and returns
    extra stamp content (JSON-serialisable). The stamp (version, ``sources`` sizes, a SHA-256
    of every store) is written last, then the directory is renamed into place; a stale
    directory is moved aside first and deleted afterwards. With ``verify`` every store is
    read back and checked against its checksum (a damaged cache is rebuilt). Call this on
    one process (rank 0); the others use :func:`open_cache`.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / name
    problem = _stamp_problem(root, sources, verify)
    if problem is None:
        return root
    say = echo or (lambda text: print(f"pybrain-mpi: {text}", file=sys.stderr, flush=True))
    if root.exists():
        say(f"rebuilding the example cache {root}: {problem}")
    else:
        say(f"converting the {name} example data to Zarr in {root} (first run)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}.", suffix=".tmp"))
    except OSError as exc:
        raise ExampleCacheError(f"cannot write the example cache in {cache}: {exc}; set "
                                "PBM_CACHE_DIR or [data] cache_dir to a writable directory") from None
    old = None
    try:
        extra = build(tmp)
        stores = {}
        for store in sorted(p for p in tmp.iterdir() if p.name.endswith(".zarr")):
            digest, shape, dtype = _sha256_of_store(store)
            stores[store.name] = {"sha256": digest, "shape": shape, "dtype": dtype}
        stamp = {"format": _STAMP_FORMAT, "version": CACHE_VERSION, "name": name,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "sources": [{"name": s.name, "path": str(s), "size": s.stat().st_size}
                             for s in sources],
                 "stores": stores, **extra}
        with open(tmp / STAMP_NAME, "w") as f:
            json.dump(stamp, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is read like any data
        if root.exists():
            old = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}.", suffix=".old"))
            os.replace(root, old / "stale")
        os.replace(tmp, root)
    except OSError as exc:
        _remove_tree(tmp)
        raise ExampleCacheError(f"cannot write the example cache {root}: {exc}; set "
                                "PBM_CACHE_DIR or [data] cache_dir to a writable directory") from None
    except BaseException:
        _remove_tree(tmp)
        raise
    finally:
        if old is not None:
            _remove_tree(old)
    return root


def open_cache(name: str, cache_dir: str | os.PathLike | None = None,
               wait_s: float = 0.0) -> tuple[Path, dict]:
    """``(directory, stamp)`` of a cache built by :func:`ensure_cache`, without building it.

    Waits up to ``wait_s`` for the stamp to appear (another process may be renaming it into
    place, or a shared file system may show it late), then raises
    :class:`ExampleCacheError` saying what to do.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / name
    deadline = time.monotonic() + wait_s
    while True:
        stamp = _read_stamp(root)
        if stamp is not None and stamp.get("version") == CACHE_VERSION:
            return root, stamp
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise ExampleCacheError(
        f"the {name} example cache {root} is not there (or not complete) after {wait_s:.0f} s; "
        "it is built by rank 0: on several nodes [data] cache_dir (or PBM_CACHE_DIR) must be on "
        "a file system every node shares")


def _remove_legacy_npy(cache: Path) -> None:
    """Remove cache version 1's .npy files of the DCA example (superseded by the Zarr stores)."""
    for path in cache.glob(_LEGACY_NPY):
        try:
            path.unlink()
        except OSError:
            pass  # not ours to insist on: version 2 never reads them


def _build_nitime(tmp: Path) -> dict:
    from .data import convert

    for path in nitime_fmri_paths():
        # Default chunks span the whole time axis: one voxel's series is one chunk read.
        convert(path, tmp / (path.name.split(".")[0] + ".zarr"), progress=False)
    return {}


class NitimeFMRI:
    """nitime's two fMRI runs from the Zarr cache: z-scored voxel series read on demand.

    Rows are every non-constant voxel of run 1 (C order over x, y, z), then of run 2, as in
    :func:`load_nitime_fmri_series`. Opening reads each run once through its
    :class:`~pybrain_mpi.data.Volume` to find the brain voxels and their mean and standard
    deviation (float64, the same operations as :func:`load_nitime_fmri_series`, so the series
    are bitwise the same); :meth:`series` then reads the requested voxels' series from the
    store (through the Volume's chunk cache) and z-scores them.
    """

    def __init__(self, root: Path, threads: int = 1):
        from .data import TimeSeriesSampler, Volume

        self.root = Path(root)
        self.volumes = []
        runs, starts, means, stds = [], [], [], []
        for index, name in enumerate(NITIME_FMRI_FILES):
            volume = Volume(self.root / (name.split(".")[0] + ".zarr"), threads=threads)
            if volume.ndim != 4 or volume.time_axis != 0:
                raise ExampleCacheError(f"{volume.path} is not a time-first 4D store "
                                        f"(axes {volume.axes}); delete {self.root} to rebuild it")
            full = volume.read()  # (t, x, y, z)
            length = full.shape[0]
            series = np.ascontiguousarray(full.reshape(length, -1).T, dtype=np.float64)
            std = series.std(axis=1)
            brain = std > 0
            means.append(series[brain].mean(axis=1))
            stds.append(std[brain])
            # The sampler checks the store is a time-first series on the mask's grid; its
            # voxels (flat, x slowest, like the rows above) become the series' start corners
            # (building every PatchSpec would also derive a per-sample seed we do not use).
            sampler = TimeSeriesSampler(volume, mask=brain.reshape(full.shape[1:]), shuffle=False,
                                        rank=0, world_size=1, uneven="drop")
            xyz = np.unravel_index(sampler.voxels, sampler.spatial_shape)
            starts.append(np.stack([np.zeros_like(xyz[0]), *xyz], axis=1).astype(np.int64))
            runs.append(np.full(len(sampler.voxels), index, dtype=np.int64))
            self.volumes.append(volume)
        lengths = {v.shape[0] for v in self.volumes}
        if len(lengths) != 1:
            raise ExampleCacheError(f"nitime runs in {self.root} have different lengths {sorted(lengths)}")
        self.series_length = lengths.pop()
        self.run = np.concatenate(runs)
        self.start = np.concatenate(starts)
        self.mean = np.concatenate(means)
        self.std = np.concatenate(stds)
        self._buffer = np.empty((self.series_length, 1, 1, 1), dtype=self.volumes[0].dtype)

    def __len__(self) -> int:
        return len(self.run)

    def series(self, rows) -> np.ndarray:
        """z-scored float32 series ``(len(rows), T)`` of the given rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        raw = np.empty((len(rows), self.series_length), dtype=np.float64)
        size = self._buffer.shape
        for i, row in enumerate(rows):
            self.volumes[self.run[row]].read_patch(self.start[row], size, out=self._buffer)
            raw[i] = self._buffer.reshape(-1)
        z = (raw - self.mean[rows, None]) / self.std[rows, None]
        return z.astype(np.float32)

    def close(self) -> None:
        """Stop the volumes' decode threads."""
        for volume in self.volumes:
            volume.close()


@dataclasses.dataclass(frozen=True)
class DCAExample:
    """The cached DCA example: Zarr stores under ``root`` and the voxel split (row indices)."""

    root: Path
    train_rows: np.ndarray
    held_out_rows: np.ndarray
    series_length: int

    @property
    def n_train(self) -> int:
        """Number of training voxel series."""
        return len(self.train_rows)

    @property
    def n_held_out(self) -> int:
        """Number of held-out voxel series."""
        return len(self.held_out_rows)

    def open(self, threads: int = 1) -> NitimeFMRI:
        """The runs opened for reading series on demand."""
        return NitimeFMRI(self.root, threads=threads)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(train, held_out)`` float32 arrays ``(voxels, T)`` read whole from the stores."""
        runs = self.open()
        try:
            return runs.series(self.train_rows), runs.series(self.held_out_rows)
        finally:
            runs.close()


def prepare_dca_example(cache_dir: str | os.PathLike | None = None,
                        held_out_fraction: float = 0.2, seed: int = 0, build: bool = True,
                        wait_s: float = 0.0) -> DCAExample:
    """The DCA example from nitime's real fMRI, converted to Zarr on first use.

    With ``build`` (one process: rank 0) a missing, stale or damaged cache is (re)built and
    verified; without it the cache is only opened (waiting up to ``wait_s`` for it). The
    split of voxels into train and held-out rows is recomputed (seeded, cheap) each time.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if build:
        ensure_cache("nitime_fmri", _build_nitime, nitime_fmri_paths(), cache)
        _remove_legacy_npy(cache)
    root, _ = open_cache("nitime_fmri", cache, wait_s)
    # The split needs only the number of brain voxels: count them from the stores.
    runs = NitimeFMRI(root)
    try:
        n, length = len(runs), runs.series_length
    finally:
        runs.close()
    train, held_out = split_by_voxel(np.arange(n), held_out_fraction, seed)
    return DCAExample(root, train, held_out, length)


@dataclasses.dataclass(frozen=True)
class MNI152Example:
    """The cached MNI152 T1 and grey-matter stores plus statistics computed at conversion.

    ``stats``: ``brain_lo``/``brain_hi`` (bounding box of T1 > 0, half-open), ``t1_mean`` and
    ``t1_std`` (float64, over the brain voxels), ``gm_max``.
    """

    root: Path
    t1: Path
    gm: Path
    stats: dict


def _build_mni152(tmp: Path) -> dict:
    import nibabel as nib

    from .data import convert

    paths = mni152_paths()
    for tissue in ("t1", "gm"):
        # 32^3 chunks: a 32^3 training patch touches at most 8 chunks of 32 KiB (uint8).
        convert(paths[tissue], tmp / f"{tissue}.zarr", chunks=(32, 32, 32), progress=False)
    t1 = np.asarray(nib.load(str(paths["t1"])).dataobj, dtype=np.float64)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float64)
    brain = t1 > 0
    where = np.argwhere(brain)
    inside = t1[brain]
    return {"stats": {"brain_lo": where.min(axis=0).tolist(),
                      "brain_hi": (where.max(axis=0) + 1).tolist(),
                      "t1_mean": float(inside.mean()), "t1_std": float(inside.std()),
                      "gm_max": float(gm.max())}}


def prepare_mni152_example(cache_dir: str | os.PathLike | None = None, build: bool = True,
                           wait_s: float = 0.0) -> MNI152Example:
    """nilearn's MNI152 T1 and GM templates as Zarr stores, converted on first use (see
    :func:`prepare_dca_example` for ``build`` and ``wait_s``)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = mni152_paths()
    if build:
        ensure_cache("mni152", _build_mni152, [paths["t1"], paths["gm"]], cache)
    root, stamp = open_cache("mni152", cache, wait_s)
    if "stats" not in stamp:
        raise ExampleCacheError(f"{root / STAMP_NAME} lacks the template statistics; delete "
                                f"{root} to rebuild it")
    return MNI152Example(root, root / "t1.zarr", root / "gm.zarr", stamp["stats"])


def load_nitime_roi_timeseries() -> tuple[list[str], np.ndarray]:
    """nitime's ``fmri_timeseries.csv``: ``(names, float64 array (250, 31))``.

    31 real BOLD signals of one scan, one column each: three global signals (``WM``, ``Vent``,
    ``Brain``: white matter, ventricles, whole brain, in scanner units) and 28 ROI averages
    (``L``/``R`` prefix: hemisphere; e.g. ``LCau`` left caudate, ``RPCC`` right posterior
    cingulate), mean-removed.
    """
    path = package_data_path("nitime", "data", "fmri_timeseries.csv")
    with open(path) as f:
        header = f.readline()
    names = [n.strip().strip('"') for n in header.strip().split(",")]
    values = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"{path}: expected {len(names)} columns, got shape {values.shape}")
    return names, values


def mni152_paths() -> dict[str, Path]:
    """Paths of nilearn's MNI152 2009a templates: ``{"t1": ..., "gm": ..., "wm": ...}``.

    1 mm, 197x233x189 uint8, one grid; ``gm``/``wm`` are tissue probability maps (0-255).
    """
    return {tissue: package_data_path("nilearn", "datasets", "data",
                                      _MNI152_TEMPLATE.format(tissue))
            for tissue in ("t1", "gm", "wm")}
