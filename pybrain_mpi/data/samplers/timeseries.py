"""Voxel time series of a 4D fMRI volume."""

from __future__ import annotations

import numpy as np

from ..errors import DataMismatch
from ..volume import Volume
from .base import PatchSpec, Sampler

__all__ = ["TimeSeriesSampler"]


class TimeSeriesSampler(Sampler):
    """Voxel time series from a 4D time-first volume (``(t, x, y, z)``, as ``convert`` stores
    fMRI), optionally restricted to a mask; each epoch is a seeded permutation of the voxels.

    A spec's region is ``start=(0, x, y, z)``, ``size=(T, 1, 1, 1)``.

    Args:
        volume: 4D :class:`Volume` with a time axis.
        mask: optional 3D array or :class:`Volume` on the spatial grid; nonzero voxels are used.
        voxels_per_epoch: global epoch length (default: every voxel in the mask).
        shuffle: permute voxels each epoch (else mask order, x slowest).
    """

    def __init__(self, volume: Volume, mask=None, *, voxels_per_epoch: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, uneven: str | None = None):
        if not isinstance(volume, Volume) or volume.ndim != 4 or volume.time_axis != 0:
            what = f"{volume.path} with axes {volume.axes}" if isinstance(volume, Volume) else type(volume).__name__
            raise DataMismatch(f"TimeSeriesSampler needs a 4D time-first Volume (t, x, y, z), got {what}; "
                               "convert a 4D NIfTI with `pybrain-mpi convert`")
        self.volume_shape = volume.shape
        spatial = volume.shape[1:]
        if mask is None:
            voxels = np.arange(int(np.prod(spatial)), dtype=np.int64)
        else:
            m = mask.read() if isinstance(mask, Volume) else np.asarray(mask)
            if m.shape != spatial:
                raise DataMismatch(f"TimeSeriesSampler: mask of shape {m.shape} is not on the fMRI grid "
                                   f"{spatial}; resample the mask to the functional image")
            if isinstance(mask, Volume) and not np.allclose(mask.affine, volume.affine, atol=1e-4):
                raise DataMismatch(f"TimeSeriesSampler: mask {mask.path} and {volume.path} have "
                                   "different affines; they must share one voxel grid")
            voxels = np.flatnonzero(m)
            if voxels.size == 0:
                raise DataMismatch("TimeSeriesSampler: the mask is empty")
        self.voxels = voxels
        self.spatial_shape = spatial
        self.shuffle = shuffle
        n = voxels.size if voxels_per_epoch is None else int(voxels_per_epoch)
        if n > voxels.size:
            raise DataMismatch(f"TimeSeriesSampler: {n} voxels per epoch but only {voxels.size} in the mask")
        super().__init__(n, seed, rank, world_size, uneven)
        self._order = None
        self._on_epoch()

    def _on_epoch(self) -> None:
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 2**31]))
            self._order = rng.permutation(self.voxels.size)[: self.global_length]
        else:
            self._order = np.arange(self.global_length)

    def _make(self, g: int) -> PatchSpec:
        flat = int(self.voxels[self._order[g]])
        xyz = tuple(int(i) for i in np.unravel_index(flat, self.spatial_shape))
        return PatchSpec(g, (0,) + xyz, (self.volume_shape[0], 1, 1, 1), self._sample_seed(g))
