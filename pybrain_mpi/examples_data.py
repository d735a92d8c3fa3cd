"""Real brain data for the shipped examples, found inside installed packages (offline).

- **DCA example**: nitime ships two real fMRI runs (``nitime/data/fmri1.nii.gz`` and
  ``fmri2.nii.gz``, 10x10x18 voxels x 40 volumes, int16, TR 1.35 s). Every voxel whose series
  is not constant is one sample, as in the DCA paper (one voxel's time series per sample);
  each series is z-scored on its own, and voxels are split into train and held-out sets with
  a seed. :func:`prepare_dca_example` writes both as float32 ``.npy`` files
  ``(n_voxels, 40)`` into a cache directory and reuses them on later calls.
- **3D example**: nilearn's MNI152 2009a T1 template and its grey-matter probability map
  (197x233x189, 1 mm, same grid): :func:`mni152_paths`.

The cache directory is ``$PBM_CACHE_DIR`` if set, else ``~/.cache/pybrain-mpi``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["NITIME_FMRI_FILES", "DCAExample", "default_cache_dir", "package_data_path",
           "nitime_fmri_paths", "load_nitime_fmri_series", "split_by_voxel",
           "prepare_dca_example", "mni152_paths", "atomic_save_npy"]

NITIME_FMRI_FILES = ("fmri1.nii.gz", "fmri2.nii.gz")
_MNI152_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


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


@dataclasses.dataclass(frozen=True)
class DCAExample:
    """Cached DCA example data: train and held-out voxel series as float32 ``.npy`` files."""

    train_path: Path
    held_out_path: Path
    n_train: int
    n_held_out: int
    series_length: int

    def load(self, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(train, held_out)`` arrays (memory-mapped read-only with ``mmap=True``)."""
        mode = "r" if mmap else None
        return np.load(self.train_path, mmap_mode=mode), np.load(self.held_out_path, mmap_mode=mode)


def prepare_dca_example(cache_dir: str | os.PathLike | None = None,
                        held_out_fraction: float = 0.2, seed: int = 0,
                        overwrite: bool = False) -> DCAExample:
    """Build (once) and return the DCA example data from nitime's real fMRI.

    Files are named after the split (``nitime_fmri_s{seed}_h{fraction}_{train,held_out}.npy``)
    so different splits coexist; an existing pair is reused unless ``overwrite``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = f"nitime_fmri_s{seed}_h{held_out_fraction:.3f}"
    train_path = cache / f"{stem}_train.npy"
    held_out_path = cache / f"{stem}_held_out.npy"
    if overwrite or not (train_path.is_file() and held_out_path.is_file()):
        train, held_out = split_by_voxel(load_nitime_fmri_series(), held_out_fraction, seed)
        try:
            atomic_save_npy(train_path, train)
            atomic_save_npy(held_out_path, held_out)
        except OSError as exc:
            raise OSError(f"cannot write the DCA example cache in {cache}: {exc}; set "
                          f"PBM_CACHE_DIR or [data] cache_dir to a writable directory") from exc
    train = np.load(train_path, mmap_mode="r")
    held_out = np.load(held_out_path, mmap_mode="r")
    if train.ndim != 2 or held_out.ndim != 2 or train.shape[1] != held_out.shape[1]:
        raise ValueError(f"corrupt DCA example cache {train_path} / {held_out_path} "
                         f"(shapes {train.shape}, {held_out.shape}); delete them to rebuild")
    return DCAExample(train_path, held_out_path, train.shape[0], held_out.shape[0],
                      train.shape[1])


def mni152_paths() -> dict[str, Path]:
    """Paths of nilearn's MNI152 2009a templates: ``{"t1": ..., "gm": ..., "wm": ...}``.

    1 mm, 197x233x189 uint8, one grid; ``gm``/``wm`` are tissue probability maps (0-255).
    """
    return {tissue: package_data_path("nilearn", "datasets", "data",
                                      _MNI152_TEMPLATE.format(tissue))
            for tissue in ("t1", "gm", "wm")}
