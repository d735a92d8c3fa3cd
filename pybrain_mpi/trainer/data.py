"""Data adapters for the trainer: what a config's [data] section turns into.

Every adapter exposes the same small interface (:class:`TrainingData`), so the trainer never
knows where samples come from and the in-memory patch sampler can later be swapped for the
Zarr-backed ``pybrain_mpi.data`` readers:

- ``size(split)``: number of samples of ``"train"`` (per epoch), ``"val"`` or ``"held_out"``;
- ``batch(split, epoch, indices) -> (inputs, targets)`` as float numpy arrays;
- ``input_shape`` (one sample) and ``autoencoder`` (targets are the inputs).

:class:`ShardedSampler` decides which training samples each rank sees: a seeded permutation
per epoch (the same on every rank), cut into ``size`` equal shards (the remainder dropped, so
every rank runs the same number of steps), batched in order. Its whole state is
``(epoch, step in epoch)``, which makes resuming exact.

Adapters:

- :class:`FMRISeries` (``kind = "fmri_series"``): one voxel time series per sample, from
  nitime's real fMRI (``source = "nitime_fmri"``, prepared once by rank 0 into a cache) or a
  ``.npy`` file ``(voxels, time points)`` (``source = "path"``).
- :class:`VolumePatches` (``kind = "volume_patches"``): 3D patches of a T1 volume with a
  grey-matter target, from nilearn's MNI152 template (``source = "mni152"``) or an ``.npz``
  file with 3D arrays ``input`` and ``target`` (``source = "path"``), held in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import PbmError

__all__ = ["DataError", "ShardedSampler", "TrainingData", "FMRISeries", "VolumePatches",
           "build_data", "SPLITS"]

SPLITS = ("train", "val", "held_out")


class DataError(PbmError, ValueError):
    """The training data is missing, malformed or does not fit the model."""


class ShardedSampler:
    """Deterministic per-epoch sharding of ``n_samples`` training samples over ranks.

    Epoch ``e`` uses ``permutation(n_samples)`` drawn from ``default_rng([seed, e])``; rank
    ``r`` takes positions ``[r * per_rank, (r + 1) * per_rank)`` with
    ``per_rank = n_samples // size``, in batches of ``batch_size`` (the last may be short,
    equally on every rank).
    """

    def __init__(self, n_samples: int, batch_size: int, rank: int, size: int, seed: int):
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.rank, self.size, self.seed = int(rank), int(size), int(seed)
        self.per_rank = self.n_samples // self.size
        if self.per_rank < 1:
            raise DataError(f"{self.n_samples} training samples cannot be shared by {self.size} "
                            "ranks (each needs at least one); use fewer ranks or more data")
        self.steps_per_epoch = math.ceil(self.per_rank / self.batch_size)
        self._cached_epoch: int | None = None
        self._shard: np.ndarray | None = None

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in the order they are used."""
        if self._cached_epoch != epoch:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_samples)
            self._shard = order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            self._cached_epoch = epoch
        return self._shard

    def batch_indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """Indices of batch ``step_in_epoch`` of ``epoch`` on this rank."""
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise IndexError(f"step {step_in_epoch} outside an epoch of {self.steps_per_epoch} steps")
        start = step_in_epoch * self.batch_size
        return self.shard(epoch)[start:start + self.batch_size]


class TrainingData:
    """Interface of a data adapter (see the module docstring)."""

    input_shape: tuple = ()
    autoencoder: bool = False
    description: str = ""

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
    """Voxel time series (autoencoder data): train/val/held-out rows of 2D float arrays."""

    autoencoder = True

    def __init__(self, train: np.ndarray, held_out: np.ndarray, val_fraction: float, seed: int,
                 where: str):
        train = np.asarray(train, dtype=np.float32)
        held_out = np.asarray(held_out, dtype=np.float32)
        for name, array in (("training", train), ("held-out", held_out)):
            if array.ndim != 2 or array.shape[0] == 0:
                raise DataError(f"{where}: {name} series must be a 2D array (voxels, time points) "
                                f"with at least one voxel, got shape {array.shape}")
            _check_finite(array, f"{where} ({name} series)")
        if train.shape[1] != held_out.shape[1]:
            raise DataError(f"{where}: training series have {train.shape[1]} time points but "
                            f"held-out series {held_out.shape[1]}")
        keep, val = _split_rows(len(train), val_fraction, seed)
        self.arrays = {"train": train[keep], "val": train[val], "held_out": held_out}
        self.input_shape = (train.shape[1],)
        self.description = (f"{where}: {len(keep)} train / {len(val)} val / {len(held_out)} "
                            f"held-out voxel series of {train.shape[1]} time points")

    def size(self, split: str) -> int:
        return len(self.arrays[split])

    def batch(self, split, epoch, indices):
        x = self.arrays[split][indices]
        return x, x


class VolumePatches(TrainingData):
    """3D patches of one in-memory volume regressing a grey-matter target.

    The volume is cut along its first axis into slabs: the last ``held_out_fraction`` of the
    brain's extent is held out, the ``val_fraction`` before it is validation, the rest is
    training, so no patch of one split overlaps another's centre region. Patch corners are
    drawn uniformly inside the brain's bounding box of the split: training corners from
    ``default_rng([seed, epoch])`` (fresh each epoch), val/held-out corners once.
    """

    autoencoder = False

    def __init__(self, image: np.ndarray, gm: np.ndarray, patch_size, patches_per_volume: int,
                 target: str, held_out_fraction: float, val_fraction: float, seed: int,
                 where: str, eval_patches: int = 64):
        image = np.asarray(image, dtype=np.float32)
        gm = np.asarray(gm, dtype=np.float32)
        if image.ndim != 3 or gm.shape != image.shape:
            raise DataError(f"{where}: input and target must be 3D volumes of one shape, got "
                            f"{image.shape} and {gm.shape}")
        _check_finite(image[None], f"{where} (input volume)")
        _check_finite(gm[None], f"{where} (target volume)")
        self.patch = tuple(int(p) for p in patch_size)
        if any(p > s for p, s in zip(self.patch, image.shape)):
            raise DataError(f"{where}: patch_size {list(self.patch)} is larger than the volume "
                            f"{list(image.shape)}")
        brain = np.argwhere(image > 0)
        lo, hi = brain.min(axis=0), brain.max(axis=0) + 1
        # Normalise intensities over the brain so the network sees unit-scale inputs.
        inside = image[image > 0]
        self.image = (image - inside.mean()) / max(float(inside.std()), 1e-6)
        self.gm = gm / max(float(gm.max()), 1e-6)
        self.target = target
        self.seed = int(seed)
        self.patches_per_volume = int(patches_per_volume)
        # Slab boundaries along axis 0 (corner ranges so whole patches stay in the volume).
        extent = hi[0] - lo[0]
        held = max(self.patch[0], int(round(held_out_fraction * extent)))
        val = max(self.patch[0], int(round(val_fraction * extent))) if val_fraction > 0 else 0
        train_end = hi[0] - held - val
        if train_end - lo[0] < self.patch[0]:
            raise DataError(f"{where}: the brain spans {extent} voxels along the first axis, too "
                            f"few for train/val/held-out slabs of patches {list(self.patch)}")
        self.regions = {"train": (lo[0], train_end), "val": (train_end, train_end + val),
                        "held_out": (hi[0] - held, hi[0])}
        self.lo, self.hi = lo, hi
        self.input_shape = self.patch
        self.fixed = {split: self._corners(split, np.random.default_rng([self.seed, 1 + i]),
                                           eval_patches)
                      for i, split in enumerate(("val", "held_out")) if val or split == "held_out"}
        if "val" not in self.fixed:
            self.fixed["val"] = np.zeros((0, 3), dtype=np.int64)
        self._epoch_corners: tuple[int, np.ndarray] | None = None
        self.description = (f"{where}: volume {list(image.shape)}, {self.patches_per_volume} "
                            f"train patches per epoch, {len(self.fixed['val'])} val / "
                            f"{len(self.fixed['held_out'])} held-out patches of "
                            f"{list(self.patch)}, target {target}")

    def _corners(self, split: str, rng: np.random.Generator, count: int) -> np.ndarray:
        # Axis 0: whole patches inside the split's slab. Axes 1, 2: inside the brain's
        # bounding box where it is large enough, else anywhere in the volume.
        start, stop = self.regions[split]
        lows, highs = [start], [stop - self.patch[0] + 1]
        for d in (1, 2):
            low = max(0, min(int(self.lo[d]), self.image.shape[d] - self.patch[d]))
            high = max(low + 1, min(int(self.hi[d]), self.image.shape[d]) - self.patch[d] + 1)
            lows.append(low)
            highs.append(high)
        return np.stack([rng.integers(lows[d], highs[d], size=count) for d in range(3)], axis=1)

    def size(self, split: str) -> int:
        return self.patches_per_volume if split == "train" else len(self.fixed[split])

    def corners(self, split: str, epoch: int) -> np.ndarray:
        """Patch corners of ``split`` (training corners depend on the epoch)."""
        if split != "train":
            return self.fixed[split]
        if self._epoch_corners is None or self._epoch_corners[0] != epoch:
            rng = np.random.default_rng([self.seed, 1000 + int(epoch)])
            self._epoch_corners = (epoch, self._corners("train", rng, self.patches_per_volume))
        return self._epoch_corners[1]

    def batch(self, split, epoch, indices):
        corners = self.corners(split, epoch)[indices]
        px, py, pz = self.patch
        xs = np.empty((len(corners), px, py, pz), dtype=np.float32)
        ys = np.empty((len(corners), 1), dtype=np.float32)
        for i, (a, b, c) in enumerate(corners):
            xs[i] = self.image[a:a + px, b:b + py, c:c + pz]
            gm = self.gm[a:a + px, b:b + py, c:c + pz]
            ys[i, 0] = gm.mean() if self.target == "gm_mean" else gm[px // 2, py // 2, pz // 2]
        return xs, ys


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


def _load_volume_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"[data] path {path} does not exist; point it at an .npz file with 3D "
                        "arrays 'input' and 'target', or use source = \"mni152\"")
    try:
        with np.load(path) as archive:
            missing = [k for k in ("input", "target") if k not in archive.files]
            if missing:
                raise DataError(f"[data] path {path} lacks array(s) {missing}; it has "
                                f"{archive.files}")
            return archive["input"], archive["target"]
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read [data] path {path}: {exc}") from None


def build_data(config: DataConfig, val_fraction: float, rank: int, barrier) -> TrainingData:
    """The adapter for a config's [data] section.

    For the nitime example, rank 0 prepares the cache while the others wait at ``barrier``
    and then read it (so ranks never race on the same files). Raises :class:`DataError`.
    """
    if config.kind == "fmri_series":
        if config.source == "nitime_fmri":
            from ..examples_data import prepare_dca_example

            error = None
            if rank == 0:
                try:
                    prepare_dca_example(config.cache_dir, config.held_out_fraction, config.split_seed)
                except (OSError, ValueError) as exc:
                    error = exc
            barrier()
            if error is not None:
                raise DataError(f"preparing the nitime fMRI example failed: {error}")
            example = prepare_dca_example(config.cache_dir, config.held_out_fraction,
                                          config.split_seed)
            train, held_out = example.load()
            where = f"nitime fMRI ({example.train_path.parent})"
        else:
            from ..examples_data import split_by_voxel

            series = _load_series_file(config.path)
            if series.ndim != 2 or len(series) < 2:
                raise DataError(f"[data] path {config.path}: expected a 2D array (voxels, time "
                                f"points) with at least 2 voxels, got shape {series.shape}")
            # Checked before the split so the index names the row of the file.
            _check_finite(np.asarray(series), f"[data] path {config.path}")
            train, held_out = split_by_voxel(np.asarray(series), config.held_out_fraction,
                                             config.split_seed)
            where = str(config.path)
        return FMRISeries(train, held_out, val_fraction, config.split_seed + 1, where)

    if config.source == "mni152":
        import nibabel as nib

        from ..examples_data import mni152_paths

        paths = mni152_paths()
        image = np.asarray(nib.load(str(paths["t1"])).dataobj, dtype=np.float32)
        gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float32)
        where = f"MNI152 ({paths['t1'].parent})"
    else:
        image, gm = _load_volume_pair(config.path)
        where = str(config.path)
    return VolumePatches(image, gm, config.patch_size, config.patches_per_volume, config.target,
                         config.held_out_fraction, val_fraction, config.split_seed, where)
