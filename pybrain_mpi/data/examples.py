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

**The cache** (:mod:`pybrain_mpi.data.cache`): each example lives in its own directory
(``nitime_fmri/``, ``mni152/``) under ``$PBM_CACHE_DIR`` (else ``~/.cache/pybrain-mpi``),
stamped with the source files and a SHA-256 of every store, built aside and renamed into
place; a missing, stale or damaged one is rebuilt. Version 1 of the cache (before Zarr) kept ``.npy``
files ``nitime_fmri_s*_h*_{train,held_out}.npy`` in the cache root; they are removed when
version 2 is built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

from .cache import (CACHE_VERSION, STAMP_NAME, CacheError, default_cache_dir, ensure_cache,
                    open_cache)

__all__ = ["NITIME_FMRI_FILES", "CACHE_VERSION", "STAMP_NAME", "ExampleCacheError",
           "DCAExample", "MNI152Example", "NitimeFMRI", "default_cache_dir", "package_data_path",
           "nitime_fmri_paths", "load_nitime_fmri_series", "split_by_voxel",
           "prepare_dca_example", "prepare_mni152_example", "ensure_cache", "open_cache",
           "mni152_paths", "atomic_save_npy", "load_nitime_roi_timeseries", "build_mni152_cohort",
           "prepare_mni152_cohort", "prepare_nitime_runs", "MNI152_COHORT_COLUMNS"]

NITIME_FMRI_FILES = ("fmri1.nii.gz", "fmri2.nii.gz")
_MNI152_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_LEGACY_NPY = "nitime_fmri_s*_h*_*.npy"


ExampleCacheError = CacheError  # the name the examples have always raised


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


def _remove_legacy_npy(cache: Path) -> None:
    """Remove cache version 1's .npy files of the DCA example (superseded by the Zarr stores)."""
    for path in cache.glob(_LEGACY_NPY):
        try:
            path.unlink()
        except OSError:
            pass  # not ours to insist on: version 2 never reads them


def _build_nitime(tmp: Path) -> dict:
    from . import convert

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
        from . import TimeSeriesSampler, Volume

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

    from . import convert

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


# ----------------------------------------------------------------------------- cohorts
#: Columns of the MNI152 cohort's manifest.
MNI152_COHORT_COLUMNS = ("subject", "t1", "brain_mask", "gm", "brain_volume_ml", "gm_volume_ml",
                         "synthetic")


def _mni152_brain_mask(t1: np.ndarray) -> np.ndarray:
    """nilearn's ``load_mni152_brain_mask()``: the T1 template rescaled to [0, 1] above 0.2."""
    return (t1.astype(np.float64) / float(t1.max())) > 0.2


def _warp_matrix(rng: np.random.Generator) -> np.ndarray:
    """A seeded 3x3 linear warp: rotations up to 6 degrees about each axis, scalings 0.92-1.08."""
    angles = np.deg2rad(rng.uniform(-6, 6, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    return rotation @ np.diag(rng.uniform(0.92, 1.08, size=3))


def build_mni152_cohort(directory: str | os.PathLike, subjects: int = 6, seed: int = 0,
                        voxel_mm: float = 2.0) -> Path:
    """A small cohort made from nilearn's MNI152 (real) and seeded warps of it (synthetic),
    written as NIfTI files and a manifest ``subjects.tsv`` into ``directory``; returns the
    manifest's path.

    Subject ``mni152`` is the real template (T1, its brain mask as nilearn defines it: the
    rescaled T1 above 0.2, and the grey-matter probability map) resampled to ``voxel_mm``.
    Subjects ``synth-01``... are **synthetic**: the template under a seeded affine warp
    (rotations up to 6 degrees, scalings 0.92-1.08 per axis, shifts up to 4 mm; T1 and GM
    linear, the mask nearest-neighbour) and intensity changes (gain 0.85-1.15, gamma
    0.8-1.25, a smooth multiplicative bias field of up to about 15%, and Rician noise of 2-5%
    of the range everywhere, so the background is noisy as in a real scan). The manifest's
    ``synthetic`` column says which is which; ``brain_volume_ml`` and ``gm_volume_ml`` are
    each subject's mask volume and grey-matter volume (per-subject regression targets).
    """
    import nibabel as nib
    from scipy import ndimage

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = mni152_paths()
    t1_img = nib.load(str(paths["t1"]))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float32)
    mask = _mni152_brain_mask(t1).astype(np.float32)
    affine_in = np.asarray(t1_img.affine, dtype=np.float64)
    shape = tuple(int(np.ceil(n / voxel_mm)) for n in t1.shape)
    affine_out = affine_in @ np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    centre = affine_in @ np.append((np.array(t1.shape) - 1) / 2.0, 1.0)
    voxel_ml = voxel_mm ** 3 / 1000.0
    rows = []
    for index in range(subjects):
        rng = np.random.default_rng([seed, index])
        warp = np.eye(4)
        if index:
            linear = _warp_matrix(rng)
            shift = rng.uniform(-4, 4, size=3)
            # Output world point w comes from input world point c + L^-1 (w - c - shift).
            inverse = np.linalg.inv(linear)
            warp[:3, :3] = inverse
            warp[:3, 3] = centre[:3] - inverse @ (centre[:3] + shift)
        # Output voxel -> input voxel: inv(A_in) @ warp @ A_out.
        mapping = np.linalg.inv(affine_in) @ warp @ affine_out

        def resample(volume, order):
            return ndimage.affine_transform(volume, mapping[:3, :3], mapping[:3, 3],
                                            output_shape=shape, order=order, mode="constant")
        name = "mni152" if index == 0 else f"synth-{index:02d}"
        t1_out, gm_out = resample(t1, 1), resample(gm, 1)
        mask_out = resample(mask, 0) > 0.5
        if index:
            gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.25)
            grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
            coefficients = rng.uniform(-0.08, 0.08, size=3)
            bias = np.exp(sum(c * g for c, g in zip(coefficients, grid)))
            signal = 255.0 * (np.clip(t1_out, 0, None) / 255.0) ** gamma * gain * bias
            sigma = rng.uniform(0.02, 0.05) * 255.0
            noise = rng.normal(0.0, sigma, size=(2,) + shape)
            t1_out = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
            t1_data, t1_dtype = np.round(t1_out).astype(np.int16), np.int16
        else:
            t1_data, t1_dtype = np.round(np.clip(t1_out, 0, 255)).astype(np.uint8), np.uint8
        gm_data = np.round(np.clip(gm_out, 0, 255)).astype(np.uint8)
        files = {"t1": f"{name}/t1.nii.gz", "brain_mask": f"{name}/brain_mask.nii.gz",
                 "gm": f"{name}/gm.nii.gz"}
        (directory / name).mkdir(exist_ok=True)
        for column, data in (("t1", t1_data), ("brain_mask", mask_out.astype(np.uint8)),
                             ("gm", gm_data)):
            img = nib.Nifti1Image(data, affine_out)
            img.header.set_data_dtype(t1_dtype if column == "t1" else np.uint8)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(directory / files[column]))
        rows.append([name, files["t1"], files["brain_mask"], files["gm"],
                     f"{mask_out.sum() * voxel_ml:.3f}", f"{gm_data.sum() / 255.0 * voxel_ml:.3f}",
                     "0" if index == 0 else "1"])
    manifest = directory / "subjects.tsv"
    text = "\t".join(MNI152_COHORT_COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
    tmp = manifest.with_suffix(".tsv.tmp")
    tmp.write_text(text)
    os.replace(tmp, manifest)
    return manifest


def prepare_mni152_cohort(cache_dir: str | os.PathLike | None = None, subjects: int = 6,
                          seed: int = 0, voxel_mm: float = 2.0, build: bool = True,
                          wait_s: float = 0.0) -> Path:
    """The manifest of :func:`build_mni152_cohort`'s cohort in the cache (built once, stamped
    with the template files; see :func:`prepare_dca_example` for ``build`` and ``wait_s``)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = mni152_paths()
    name = f"mni152_cohort_{subjects}s_seed{seed}_{voxel_mm:g}mm"
    def write(tmp: Path) -> dict:
        build_mni152_cohort(tmp, subjects, seed, voxel_mm)
        return {}
    if build:
        ensure_cache(name, write, [paths["t1"], paths["gm"]], cache)
    root, _ = open_cache(name, cache, wait_s)
    return root / "subjects.tsv"


def prepare_nitime_runs(cache_dir: str | os.PathLike | None = None, build: bool = True,
                        wait_s: float = 0.0) -> Path:
    """A manifest (``subject``, ``bold``) of nitime's two real 4D fMRI runs, in the cache.

    nitime ships two runs of one scan session; the manifest lists them as two subjects
    (``run-1``, ``run-2``), so a subject-level split trains on one run and holds out the other.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    runs = nitime_fmri_paths()

    def write(tmp: Path) -> dict:
        lines = ["subject\tbold"] + [f"run-{i + 1}\t{path}" for i, path in enumerate(runs)]
        (tmp / "subjects.tsv").write_text("\n".join(lines) + "\n")
        return {}
    if build:
        ensure_cache("nitime_runs", write, runs, cache)
    root, _ = open_cache("nitime_runs", cache, wait_s)
    return root / "subjects.tsv"
