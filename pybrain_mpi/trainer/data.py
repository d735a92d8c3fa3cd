"""Data adapters for the trainer: what a config's [data] section turns into.

Every adapter exposes the same small interface (:class:`TrainingData`), so the trainer never
knows where samples come from:

- ``size(split)``: number of samples of ``"train"`` (per epoch), ``"val"`` or ``"held_out"``;
- ``batch(split, epoch, indices) -> (inputs, targets)`` as float numpy arrays;
- ``input_shape`` (one sample) and ``autoencoder`` (targets are the inputs);
- ``task``: ``"autoencoder"``, ``"regression"`` or ``"segmentation"`` (class-index targets);
- ``model_defaults``: model sizes the data determines (``input_length``, ``in_channels``,
  ``out_channels``, ...), used for the model arguments a config leaves out;
- ``roi_labels``: one ROI name per output when metrics are also reported per ROI, else None;
- optionally ``evaluate(split, step, rank, size, batch_size) -> report``, when the metrics are
  not per sample (whole-volume Dice, per-subject regression); the trainer then calls it with
  ``step(x, y) -> (loss summed over the batch, model output)`` instead of its own loop.

:class:`pybrain_mpi.data.ShuffledSampler` decides which training samples each rank sees: a
seeded permutation per epoch (the same on every rank), cut into equal shards (the remainder
dropped, so every rank runs the same number of steps), batched in order. Its whole state is
``(epoch, step in epoch)``, which makes resuming exact.

Adapters:

- :class:`FMRISeries` (``kind = "fmri_series"``): one voxel time series per sample. With
  ``source = "nitime_fmri"`` the series come from nitime's real fMRI, converted once by rank 0
  into Zarr stores in a cache and read on demand through :class:`pybrain_mpi.data.Volume`
  (:class:`~pybrain_mpi.data.examples.NitimeFMRI`); with ``source = "path"`` from a ``.npy``
  file ``(voxels, time points)`` held in memory.
- :class:`VolumePatches` (``kind = "volume_patches"``): 3D patches of a T1 volume with a
  grey-matter target. ``source = "mni152"``: nilearn's MNI152 template converted once into
  Zarr stores, patches read on demand (only the chunks a patch touches) through
  :class:`pybrain_mpi.data.Volume`, positions drawn by :class:`pybrain_mpi.data.UniformSampler`;
  ``source = "path"``: an ``.npz`` file with 3D arrays ``input`` and ``target`` in memory.
- Cohorts (``[data] manifest`` / ``bids``, ``source = "mni152_cohort"`` / ``"nitime_runs"``):
  segmentation, per-subject regression and fMRI series of many subjects, in
  :mod:`pybrain_mpi.trainer.cohorts`.
- :class:`LaggedEncoding` (``kind = "encoding"``): an encoding model's data, features ->
  responses of outputs grouped into ROIs (per-ROI metrics). ``source = "nitime_rois"``: real
  ROI signals of nitime's ``fmri_timeseries.csv`` (see :func:`nitime_roi_encoding`);
  ``source = "path"``: an ``.npz`` with ``features`` ``(N, F)``, ``targets`` ``(N, K)`` and
  optionally ``roi_labels`` ``(K,)``, rows in time order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import DataConfig
from ..data.errors import DataError

__all__ = ["TrainingData", "FMRISeries", "VolumePatches",
           "LaggedEncoding", "nitime_roi_encoding", "build_data", "SPLITS"]

SPLITS = ("train", "val", "held_out")


class TrainingData:
    """Interface of a data adapter (see the module docstring)."""

    input_shape: tuple = ()
    autoencoder: bool = False
    task: str = "regression"
    model_defaults: dict = {}
    description: str = ""
    roi_labels: list | None = None

    def size(self, split: str) -> int:
        """Number of samples in ``split`` (``"train"`` counts one epoch)."""
        raise NotImplementedError

    def batch(self, split: str, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, targets)`` of the samples ``indices`` of ``split`` in ``epoch``."""
        raise NotImplementedError


def _check_finite(array: np.ndarray, what: str) -> None:
    """Raise naming the first sample with a NaN/Inf (before any step is run)."""
    finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1) if array.ndim > 1 \
        else np.isfinite(array)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{what} contains NaN or infinite values in {bad.size} sample(s), the "
                        f"first at index {int(bad[0])}; clean or mask them before training")


def _split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (kept, taken) with ``round(fraction * n)`` taken."""
    order = np.random.default_rng(seed).permutation(n)
    taken = int(round(fraction * n))
    return np.sort(order[taken:]), np.sort(order[:taken])


class FMRISeries(TrainingData):
    """Voxel time series (autoencoder data): train/val/held-out rows.

    Either in-memory 2D arrays ``train`` and ``held_out`` (voxels, time points), or
    ``reader`` (an object with ``series(rows) -> float32 (len(rows), T)`` and
    ``series_length``, e.g. :class:`~pybrain_mpi.data.examples.NitimeFMRI`) with the row
    indices ``train`` and ``held_out`` into it: then each batch is read on demand.
    """

    autoencoder = True
    task = "autoencoder"

    def __init__(self, train: np.ndarray, held_out: np.ndarray, val_fraction: float, seed: int,
                 where: str, reader: Any = None):
        self.reader = reader
        if reader is None:
            train = np.asarray(train, dtype=np.float32)
            held_out = np.asarray(held_out, dtype=np.float32)
            for name, array in (("training", train), ("held-out", held_out)):
                if array.ndim != 2 or array.shape[0] == 0:
                    raise DataError(f"{where}: {name} series must be a 2D array (voxels, time "
                                    f"points) with at least one voxel, got shape {array.shape}")
                _check_finite(array, f"{where} ({name} series)")
            if train.shape[1] != held_out.shape[1]:
                raise DataError(f"{where}: training series have {train.shape[1]} time points but "
                                f"held-out series {held_out.shape[1]}")
            length = train.shape[1]
        else:
            train, held_out = np.asarray(train, np.int64), np.asarray(held_out, np.int64)
            if len(train) == 0 or len(held_out) == 0:
                raise DataError(f"{where}: no training or held-out voxels")
            length = int(reader.series_length)
        keep, val = _split_rows(len(train), val_fraction, seed)
        self.arrays = {"train": train[keep], "val": train[val], "held_out": held_out}
        self.input_shape = (length,)
        self.model_defaults = {"input_length": length}
        self.description = (f"{where}: {len(keep)} train / {len(val)} val / {len(held_out)} "
                            f"held-out voxel series of {length} time points")

    def size(self, split: str) -> int:
        return len(self.arrays[split])

    def batch(self, split, epoch, indices):
        rows = self.arrays[split][indices]
        x = rows if self.reader is None else self.reader.series(rows)
        return x, x


class _ArrayPatches:
    """Patch reads from an in-memory 3D array (the ``source = "path"`` .npz case)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape

    def read(self, corner, size) -> np.ndarray:
        (a, b, c), (px, py, pz) = corner, size
        return self.array[a:a + px, b:b + py, c:c + pz]


class _VolumePatches:
    """Patch reads from a Zarr store through :class:`pybrain_mpi.data.Volume` (only the chunks
    a patch intersects are decoded; decoded chunks stay in the Volume's LRU cache)."""

    def __init__(self, volume):
        self.volume = volume
        self.shape = tuple(volume.shape)

    def read(self, corner, size) -> np.ndarray:
        return self.volume.read_patch(tuple(int(c) for c in corner), size)


class VolumePatches(TrainingData):
    """3D patches of one volume regressing a grey-matter target.

    ``image``/``gm``: in-memory 3D arrays, or :class:`pybrain_mpi.data.Volume` objects read
    patch by patch; for Volumes, ``stats`` (``brain_lo``, ``brain_hi``, ``t1_mean``,
    ``t1_std``, ``gm_max``, as computed at conversion) replaces a pass over the data.

    The volume is cut along its first axis into slabs: the last ``held_out_fraction`` of the
    brain's extent is held out, the ``val_fraction`` before it is validation, the rest is
    training, so no patch of one split overlaps another's centre region. Patch corners are
    drawn uniformly (:class:`pybrain_mpi.data.UniformSampler`) inside the brain's bounding
    box of the split: training corners fresh each epoch (sampler epoch = training epoch),
    val/held-out corners once. Inputs are z-scored with the brain's mean and standard
    deviation; the GM target is scaled by the map's maximum.
    """

    autoencoder = False

    eval_patches = 64  # fixed val / held-out patches

    def __init__(self, image, gm, config: DataConfig, val_fraction: float, where: str,
                 stats: dict | None = None):
        """``config``: the run's [data] (patch_size, patches_per_volume, target,
        held_out_fraction, split_seed); ``val_fraction``: the [train] validation share."""
        patch_size, target, seed = config.patch_size, config.target, config.split_seed
        from ..data import Volume

        if isinstance(image, Volume) and isinstance(gm, Volume):
            if stats is None:
                raise DataError(f"{where}: reading patches from Zarr stores needs the volume's "
                                "statistics (stats=...)")
            self.image_source, self.gm_source = _VolumePatches(image), _VolumePatches(gm)
            if image.ndim != 3 or tuple(gm.shape) != tuple(image.shape):
                raise DataError(f"{where}: input and target must be 3D volumes of one shape, got "
                                f"{list(image.shape)} and {list(gm.shape)}")
            lo, hi = np.asarray(stats["brain_lo"]), np.asarray(stats["brain_hi"])
            mean, std, gm_max = stats["t1_mean"], stats["t1_std"], stats["gm_max"]
        else:
            image = np.asarray(image, dtype=np.float32)
            gm = np.asarray(gm, dtype=np.float32)
            if image.ndim != 3 or gm.shape != image.shape:
                raise DataError(f"{where}: input and target must be 3D volumes of one shape, got "
                                f"{image.shape} and {gm.shape}")
            _check_finite(image[None], f"{where} (input volume)")
            _check_finite(gm[None], f"{where} (target volume)")
            brain = np.argwhere(image > 0)
            if len(brain) == 0:
                raise DataError(f"{where}: the input volume has no voxel > 0 (no brain to sample)")
            lo, hi = brain.min(axis=0), brain.max(axis=0) + 1
            inside = image[image > 0].astype(np.float64)
            mean, std, gm_max = float(inside.mean()), float(inside.std()), float(gm.max())
            self.image_source, self.gm_source = _ArrayPatches(image), _ArrayPatches(gm)
        self.shape = tuple(int(n) for n in self.image_source.shape)
        self.patch = tuple(int(p) for p in patch_size)
        if any(p > s for p, s in zip(self.patch, self.shape)):
            raise DataError(f"{where}: patch_size {list(self.patch)} is larger than the volume "
                            f"{list(self.shape)}")
        # Normalise intensities over the brain so the network sees unit-scale inputs.
        self.mean = np.float32(mean)
        self.scale = np.float32(1.0 / max(std, 1e-6))
        self.gm_scale = np.float32(1.0 / max(gm_max, 1e-6))
        self.target = target
        self.seed = int(seed)
        self.patches_per_volume = int(config.patches_per_volume)
        # Slab boundaries along axis 0 (corner ranges so whole patches stay in the volume).
        extent = int(hi[0] - lo[0])
        held = max(self.patch[0], int(round(config.held_out_fraction * extent)))
        val = max(self.patch[0], int(round(val_fraction * extent))) if val_fraction > 0 else 0
        train_end = int(hi[0]) - held - val
        if train_end - lo[0] < self.patch[0]:
            raise DataError(f"{where}: the brain spans {extent} voxels along the first axis, too "
                            f"few for train/val/held-out slabs of patches {list(self.patch)}")
        self.regions = {"train": (int(lo[0]), train_end), "val": (train_end, train_end + val),
                        "held_out": (int(hi[0]) - held, int(hi[0]))}
        self.lo, self.hi = lo, hi
        self.input_shape = self.patch
        self.fixed = {split: self._corners(split, 3 * self.seed + 1 + i, 0, self.eval_patches)
                      for i, split in enumerate(("val", "held_out")) if val or split == "held_out"}
        if "val" not in self.fixed:
            self.fixed["val"] = np.zeros((0, 3), dtype=np.int64)
        self._epoch_corners: tuple[int, np.ndarray] | None = None
        self.description = (f"{where}: volume {list(self.shape)}, {self.patches_per_volume} "
                            f"train patches per epoch, {len(self.fixed['val'])} val / "
                            f"{len(self.fixed['held_out'])} held-out patches of "
                            f"{list(self.patch)}, target {target}")

    def _corners(self, split: str, seed: int, epoch: int, count: int) -> np.ndarray:
        from ..data import UniformSampler

        # Axis 0: whole patches inside the split's slab. Axes 1, 2: inside the brain's
        # bounding box where it is large enough, else anywhere in the volume.
        start, stop = self.regions[split]
        lows, highs = [start], [stop - self.patch[0] + 1]
        for d in (1, 2):
            low = max(0, min(int(self.lo[d]), self.shape[d] - self.patch[d]))
            high = max(low + 1, min(int(self.hi[d]), self.shape[d]) - self.patch[d] + 1)
            lows.append(low)
            highs.append(high)
        # The sampler draws starts in [0, region - patch]: a region of (high - low) corners.
        region = tuple(h - lw + p - 1 for lw, h, p in zip(lows, highs, self.patch))
        sampler = UniformSampler(region, self.patch, count, seed=seed, rank=0, world_size=1)
        sampler.set_epoch(epoch)
        starts = np.array([sampler[k].start for k in range(count)], dtype=np.int64)
        return starts.reshape(count, 3) + np.asarray(lows, dtype=np.int64)

    def size(self, split: str) -> int:
        return self.patches_per_volume if split == "train" else len(self.fixed[split])

    def corners(self, split: str, epoch: int) -> np.ndarray:
        """Patch corners of ``split`` (training corners depend on the epoch)."""
        if split != "train":
            return self.fixed[split]
        if self._epoch_corners is None or self._epoch_corners[0] != epoch:
            self._epoch_corners = (epoch, self._corners("train", 3 * self.seed, int(epoch),
                                                        self.patches_per_volume))
        return self._epoch_corners[1]

    def batch(self, split, epoch, indices):
        corners = self.corners(split, epoch)[indices]
        px, py, pz = self.patch
        xs = np.empty((len(corners), px, py, pz), dtype=np.float32)
        ys = np.empty((len(corners), 1), dtype=np.float32)
        for i, corner in enumerate(corners):
            xs[i] = (self.image_source.read(corner, self.patch).astype(np.float32) - self.mean) \
                * self.scale
            gm = self.gm_source.read(corner, self.patch).astype(np.float32) * self.gm_scale
            ys[i, 0] = gm.mean() if self.target == "gm_mean" else gm[px // 2, py // 2, pz // 2]
        return xs, ys


class LaggedEncoding(TrainingData):
    """Encoding-model data: feature vectors -> responses of ``K`` outputs grouped into ROIs.

    Rows are in time order and split into contiguous blocks (the last ``held_out_fraction``
    held out, the ``val_fraction`` of the rest before it for validation), because
    neighbouring fMRI samples are correlated and a random split would leak. ``roi_labels``
    names each output's ROI; the trainer reports metrics per ROI (mean of the outputs'
    values) besides the summary.
    """

    autoencoder = False

    def __init__(self, features: np.ndarray, targets: np.ndarray, roi_labels, held_out_fraction: float,
                 val_fraction: float, where: str, feature_names: str = "features"):
        features = np.asarray(features, dtype=np.float32)
        targets = np.asarray(targets, dtype=np.float32)
        if features.ndim != 2 or targets.ndim != 2 or len(features) != len(targets):
            raise DataError(f"{where}: features must be (samples, features) and targets "
                            f"(samples, outputs) with the same number of rows, got "
                            f"{features.shape} and {targets.shape}")
        _check_finite(features, f"{where} (features)")
        _check_finite(targets, f"{where} (targets)")
        labels = [str(x) for x in (roi_labels if roi_labels is not None
                                   else [f"output{k}" for k in range(targets.shape[1])])]
        if len(labels) != targets.shape[1]:
            raise DataError(f"{where}: {len(labels)} ROI labels for {targets.shape[1]} outputs; "
                            "give one label per target column")
        n = len(features)
        held = max(1, int(round(held_out_fraction * n)))
        val = int(round(val_fraction * (n - held)))
        train_end = n - held - val
        if train_end < 2:
            raise DataError(f"{where}: {n} samples leave {train_end} for training after the "
                            f"held-out ({held}) and validation ({val}) blocks")
        self.features, self.targets = features, targets
        self.rows = {"train": np.arange(0, train_end), "val": np.arange(train_end, n - held),
                     "held_out": np.arange(n - held, n)}
        self.input_shape = (features.shape[1],)
        self.n_outputs = targets.shape[1]
        self.roi_labels = labels
        self.description = (f"{where}: {train_end} train / {val} val / {held} held-out time "
                            f"points (contiguous blocks), {features.shape[1]} {feature_names} -> "
                            f"{self.n_outputs} outputs in {len(set(labels))} ROIs")

    def size(self, split: str) -> int:
        return len(self.rows[split])

    def batch(self, split, epoch, indices):
        rows = self.rows[split][indices]
        return self.features[rows], self.targets[rows]


def _roi_structure(name: str) -> str:
    """Bilateral structure of a nitime ROI column: ``LCau``/``RCau`` -> ``Cau``. The left
    anterior parahippocampal gyrus is spelled ``APHG`` (right: ``RAntPHG``)."""
    if name == "APHG":
        return "AntPHG"
    return name[1:] if name[:1] in ("L", "R") and name[1:2].isupper() else name


def nitime_roi_encoding(lags: int, held_out_fraction: float, val_fraction: float) -> LaggedEncoding:
    """Encoding data from nitime's real ROI signals (``fmri_timeseries.csv``, 250 volumes).

    What is predicted: the 28 ROI signals (14 structures x 2 hemispheres) at volume ``t``.
    What the "stimulus features" are, honestly: this scan has no stimulus annotation, so the
    features are the recording's own past, all 31 signals (the 28 ROIs and the white-matter,
    ventricle and whole-brain signals) at volumes ``t-1 .. t-lags`` (lag-major), i.e. a
    lagged, autoregressive encoding model, not a stimulus-driven one. ROIs for the per-ROI
    metrics are the 14 bilateral structures (left and right outputs of one structure form
    one ROI). Every signal is z-scored with the mean and standard deviation of the
    training block only, so nothing of the held-out block leaks into the scaling.
    """
    from ..data.examples import load_nitime_roi_timeseries

    names, values = load_nitime_roi_timeseries()
    globals_ = {"WM", "Vent", "Brain"}
    roi_columns = [i for i, name in enumerate(names) if name not in globals_]
    if lags < 1 or lags >= len(values) // 2:
        raise DataError(f"[data] lags = {lags}: must be in [1, {len(values) // 2})")
    n = len(values) - lags
    held = max(1, int(round(held_out_fraction * n)))
    train_end = n - held - int(round(val_fraction * (n - held)))
    fit = values[:train_end + lags]  # the volumes the training samples see (inputs and targets)
    z = (values - fit.mean(axis=0)) / fit.std(axis=0)
    features = np.concatenate([z[lags - lag:len(values) - lag] for lag in range(1, lags + 1)], axis=1)
    targets = z[lags:, roi_columns]
    labels = [_roi_structure(names[i]) for i in roi_columns]
    return LaggedEncoding(features, targets, labels, held_out_fraction, val_fraction,
                          "nitime ROI signals (fmri_timeseries.csv)",
                          feature_names=f"lagged signals (31 x {lags} lags)")


def _load_series_file(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"[data] path {path} does not exist; point it at a .npy file of shape "
                        "(voxels, time points) or use source = \"nitime_fmri\"")
    if path.suffix != ".npy":
        raise DataError(f"[data] path {path}: fmri_series data must be a .npy file of shape "
                        "(voxels, time points)")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read [data] path {path}: {exc}") from None


def _load_npz(path: Path, required: tuple, what: str) -> dict:
    if not path.exists():
        raise DataError(f"[data] path {path} does not exist; point it at an .npz file with "
                        f"{what}")
    try:
        with np.load(path) as archive:
            missing = [k for k in required if k not in archive.files]
            if missing:
                raise DataError(f"[data] path {path} lacks array(s) {missing}; it has "
                                f"{archive.files}")
            return {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read [data] path {path}: {exc}") from None


def _cache_wait_s() -> float:
    return float(os.environ.get("PBM_CACHE_WAIT_S", "600"))


def _from_rank0_cache(what: str, cache_dir, rank: int, share: Callable, prepare: Callable):
    """Rank 0 runs ``prepare(build=True)`` (converting into the cache if needed) while the
    others wait up to ``PBM_CACHE_WAIT_S`` (600 s); then every rank opens the cache with
    ``prepare(build=False)``."""
    from ..errors import CollectiveTimeout
    from ..data.examples import ExampleCacheError, default_cache_dir

    where = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    error = None
    result = None
    if rank == 0:
        try:
            result = prepare(build=True)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the waiting ranks
            error = str(exc) if isinstance(exc, (OSError, ValueError)) \
                else f"{type(exc).__name__}: {exc}"
    wait_s = _cache_wait_s()
    try:
        error = share(error, wait_s)
    except CollectiveTimeout:
        raise DataError(f"rank {rank} waited {wait_s:.0f} s for rank 0 to prepare the {what} in "
                        f"{where} (converted to Zarr on the first run); see rank 0's output, "
                        "raise PBM_CACHE_WAIT_S, or prepare it once with one rank") from None
    if error is not None:
        raise DataError(f"preparing the {what} on rank 0 failed: {error}")
    if result is not None:
        return result
    try:
        # A shared file system may show rank 0's rename a little later on another node.
        return prepare(build=False, wait_s=30.0)
    except ExampleCacheError as exc:
        raise DataError(f"rank {rank}: {exc}") from None


def build_data(config: DataConfig, val_fraction: float, rank: int, share: Callable, *,
               seed: int = 0, world_size: int = 1) -> TrainingData:
    """The adapter for a config's [data] section.

    ``share(value, timeout_s)`` returns rank 0's ``value`` on every rank (a collective; the
    trainer waits at a barrier with ``timeout_s``). For the example data, rank 0 converts
    it into the cache (once) while the others wait, so ranks never race on the same files;
    a cohort's subjects are converted by all ranks, each subject by one. ``seed`` seeds the
    cohorts' patch draws. Raises :class:`DataError`.
    """
    from .cohorts import build_cohort_data, is_cohort

    if is_cohort(config):
        return build_cohort_data(config, val_fraction, seed, rank, world_size, share)
    if config.kind == "fmri_series":
        if config.source == "nitime_fmri":
            from ..data.examples import ExampleCacheError, prepare_dca_example

            example = _from_rank0_cache(
                "nitime fMRI example", config.cache_dir, rank, share,
                lambda build, wait_s=0.0: prepare_dca_example(
                    config.cache_dir, config.held_out_fraction, config.split_seed, build=build,
                    wait_s=wait_s))
            try:
                reader = example.open(threads=1)
            except (OSError, ValueError, ExampleCacheError) as exc:
                raise DataError(f"cannot read the nitime fMRI example cache {example.root}: "
                                f"{exc}; delete that directory to have it rebuilt") from None
            return FMRISeries(example.train_rows, example.held_out_rows, val_fraction,
                              config.split_seed + 1, f"nitime fMRI (Zarr, {example.root})",
                              reader=reader)
        from ..data.examples import split_by_voxel

        series = _load_series_file(config.path)
        if series.ndim != 2 or len(series) < 2:
            raise DataError(f"[data] path {config.path}: expected a 2D array (voxels, time "
                            f"points) with at least 2 voxels, got shape {series.shape}")
        # Checked before the split so the index names the row of the file.
        _check_finite(np.asarray(series), f"[data] path {config.path}")
        train, held_out = split_by_voxel(np.asarray(series), config.held_out_fraction,
                                         config.split_seed)
        return FMRISeries(train, held_out, val_fraction, config.split_seed + 1, str(config.path))

    if config.kind == "encoding":
        if config.source == "nitime_rois":
            return nitime_roi_encoding(config.lags, config.held_out_fraction, val_fraction)
        arrays = _load_npz(config.path, ("features", "targets"),
                           "arrays 'features' (samples, features), 'targets' (samples, outputs) "
                           "and optionally 'roi_labels' (outputs,)")
        return LaggedEncoding(arrays["features"], arrays["targets"], arrays.get("roi_labels"),
                              config.held_out_fraction, val_fraction, str(config.path))

    if config.source == "mni152":
        from ..data import Volume
        from ..data.examples import prepare_mni152_example

        example = _from_rank0_cache(
            "MNI152 example", config.cache_dir, rank, share,
            lambda build, wait_s=0.0: prepare_mni152_example(config.cache_dir, build=build,
                                                             wait_s=wait_s))
        try:
            # One decode thread per rank (ranks already share the cores); decoded uint8
            # chunks of both templates (2 x 8.7 MB) stay cached after the first epoch.
            image = Volume(example.t1, threads=1, cache_bytes=64 * 2**20)
            gm = Volume(example.gm, threads=1, cache_bytes=64 * 2**20)
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"cannot open the MNI152 example cache {example.root}: {exc}; "
                            "delete that directory to have it rebuilt") from None
        return VolumePatches(image, gm, config, val_fraction, f"MNI152 (Zarr, {example.root})",
                             stats=example.stats)
    arrays = _load_npz(config.path, ("input", "target"), "3D arrays 'input' and 'target', or use "
                       "source = \"mni152\"")
    return VolumePatches(arrays["input"], arrays["target"], config, val_fraction, str(config.path))
