"""Patches centred on voxels drawn in proportion to a weight map (foreground sampling)."""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from ..errors import DataMismatch
from .base import PatchSpec, Sampler, _centered_start, _patch_target
from .maps import _BlockSource

__all__ = ["WeightedSampler"]


class WeightedSampler(Sampler):
    """Patches centred (as far as the edges allow) on voxels drawn with probability proportional
    to a weight map: a probability map or a 0/1 mask on the image's grid (foreground sampling).

    The map is summed per block once at construction (streaming, bounded memory); each sample
    then picks a block by its sum and a voxel inside it, reading only that block. The
    within-block cumulative sums of recently drawn blocks are kept, up to
    ``inner_cache_bytes`` (8 bytes per voxel of a block).
    """

    def __init__(self, volume, weights, patch_size: Sequence[int], samples_per_epoch: int, *,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 uneven: str | None = None, inner_cache_bytes: int = 64 * 2**20):
        self.shape, self.patch_size = _patch_target(volume, patch_size, "WeightedSampler")
        self.weights = _BlockSource(weights, "WeightedSampler", "weight")
        self.weights.check_grid(volume)
        sums = np.zeros(int(np.prod(self.weights.grid)), dtype=np.float64)
        for flat, block in self.weights.blocks():
            if np.issubdtype(block.dtype, np.floating) and not np.all(np.isfinite(block)):
                raise DataMismatch(f"WeightedSampler: {self.weights.name} has NaN or inf weights "
                                   f"in block at {self.weights.block_origin(flat)}")
            if block.min() < 0:
                raise DataMismatch(f"WeightedSampler: {self.weights.name} has negative weights "
                                   f"(block at {self.weights.block_origin(flat)})")
            sums[flat] = block.sum(dtype=np.float64)
        if sums.sum() <= 0:
            raise DataMismatch(f"WeightedSampler: {self.weights.name} is zero everywhere; nothing to sample")
        self._cumsum = np.cumsum(sums)
        # Within-block cumulative sums of recently drawn blocks (bounded; prefetch threads
        # share it, so it has a lock).
        self._inner: dict = {}
        self._inner_lock = threading.Lock()
        self._inner_limit = max(1, int(inner_cache_bytes) // (8 * int(np.prod(self.weights.block))))
        super().__init__(samples_per_epoch, seed, rank, world_size, uneven)

    def _inner_cumsum(self, flat: int):
        with self._inner_lock:
            hit = self._inner.get(flat)
        if hit is None:
            origin, block = self.weights.read_block(flat)
            hit = (origin, block.shape, np.cumsum(block.ravel(), dtype=np.float64))
            with self._inner_lock:
                if len(self._inner) >= self._inner_limit:
                    self._inner.pop(next(iter(self._inner)))
                self._inner[flat] = hit
        return hit

    def _make(self, g: int) -> PatchSpec:
        return PatchSpec(g, self.draw_start(self._rng(g)), self.patch_size, self._sample_seed(g))

    def draw_start(self, rng: np.random.Generator) -> tuple[int, ...]:
        """The start of one patch drawn with ``rng``: centred (as far as the edges allow) on a
        voxel drawn in proportion to the weights (for callers that keep their own seeds)."""
        flat = int(np.searchsorted(self._cumsum, rng.random() * self._cumsum[-1], side="right"))
        flat = min(flat, len(self._cumsum) - 1)
        origin, block_shape, inner = self._inner_cumsum(flat)
        voxel = int(np.searchsorted(inner, rng.random() * inner[-1], side="right"))
        voxel = min(voxel, inner.size - 1)
        center = tuple(o + int(i) for o, i in zip(origin, np.unravel_index(voxel, block_shape)))
        return _centered_start(center, self.patch_size, self.shape)
