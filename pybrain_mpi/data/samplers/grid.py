"""Sliding-window inference: patches on a regular grid, and their aggregation into a volume."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DataMismatch
from .base import PatchSpec, Sampler, _patch_target

__all__ = ["GridSampler", "GridAggregator"]


class GridSampler(Sampler):
    """Patches on a regular grid covering the whole volume (sliding-window inference).

    Consecutive patches overlap by ``overlap`` voxels per axis; the last patch of each axis is
    moved back to end at the edge so coverage is complete. Defaults to ``uneven="pad"`` so the
    ranks together cover every position (the few repeats average out in
    :class:`GridAggregator`).
    """

    default_uneven = "pad"

    def __init__(self, volume, patch_size: Sequence[int], overlap: int | Sequence[int] = 0, *,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 uneven: str | None = None):
        self.shape, self.patch_size = _patch_target(volume, patch_size, "GridSampler")
        overlap = (overlap,) * len(self.shape) if np.isscalar(overlap) else tuple(overlap)
        self.overlap = tuple(int(o) for o in overlap)
        axes = []
        for d, n, o in zip(self.shape, self.patch_size, self.overlap):
            if not 0 <= o < n:
                raise DataMismatch(f"GridSampler: overlap {o} must be in [0, patch size {n})")
            pos = list(range(0, d - n + 1, n - o))
            if pos[-1] != d - n:
                pos.append(d - n)
            axes.append(pos)
        self.axis_positions = axes
        self._grid = tuple(len(p) for p in axes)
        super().__init__(int(np.prod(self._grid)), seed, rank, world_size, uneven)

    def _make(self, g: int) -> PatchSpec:
        idx = np.unravel_index(g, self._grid)
        start = tuple(int(self.axis_positions[a][i]) for a, i in enumerate(idx))
        return PatchSpec(g, start, self.patch_size, self._sample_seed(g))


class GridAggregator:
    """Stitches patch predictions back into a volume: a weighted average of every patch that
    covers each voxel.

    Args:
        shape: spatial shape of the output (the sampled volume's shape).
        patch_size: patch shape.
        weighting: ``"average"`` (equal weights) or ``"gaussian"`` (weights fall off from the
            patch centre with sigma = ``sigma_fraction`` x patch size, damping edge artefacts).
        channels: number of channels of a prediction ``(B, C, *patch)``; None for ``(B, *patch)``.
        dtype: accumulator dtype; float64 makes averaging of identical values exact.
    """

    def __init__(self, shape: Sequence[int], patch_size: Sequence[int], weighting: str = "average", *,
                 sigma_fraction: float = 0.125, channels: int | None = None, dtype=np.float64):
        self.shape = tuple(int(n) for n in shape)
        self.patch_size = tuple(int(n) for n in patch_size)
        if len(self.shape) != len(self.patch_size):
            raise DataMismatch(f"GridAggregator: shape {self.shape} and patch size {self.patch_size} differ in rank")
        self.channels = channels
        lead = () if channels is None else (int(channels),)
        self.sum = np.zeros(lead + self.shape, dtype=dtype)
        self.weight = np.zeros(self.shape, dtype=dtype)
        if weighting == "average":
            self.patch_weight = np.ones(self.patch_size, dtype=dtype)
        elif weighting == "gaussian":
            w = np.ones((), dtype=np.float64)
            for n in self.patch_size:
                x = np.arange(n) - (n - 1) / 2
                g = np.exp(-0.5 * (x / (sigma_fraction * n)) ** 2)
                w = np.multiply.outer(w, g)
            self.patch_weight = (w / w.max()).astype(dtype)
        else:
            raise ValueError(f"weighting must be 'average' or 'gaussian', not {weighting!r}")
        self.weighting = weighting

    def add(self, starts, patches) -> None:
        """Adds a batch: ``starts`` (B, ndim) and ``patches`` (B, [C,] *patch_size); torch tensors
        or arrays."""
        starts = np.asarray(starts.cpu() if hasattr(starts, "cpu") else starts).reshape(-1, len(self.shape))
        patches = patches.detach().cpu().numpy() if hasattr(patches, "detach") else np.asarray(patches)
        expect = ((self.channels,) if self.channels is not None else ()) + self.patch_size
        if patches.shape[1:] != expect or patches.shape[0] != starts.shape[0]:
            raise DataMismatch(f"GridAggregator.add: patches of shape {patches.shape} for {starts.shape[0]} "
                               f"starts; expected (B, {', '.join(map(str, expect))})")
        for start, patch in zip(starts, patches):
            region = tuple(slice(int(s), int(s) + n) for s, n in zip(start, self.patch_size))
            self.sum[(Ellipsis,) + region] += patch * self.patch_weight
            self.weight[region] += self.patch_weight

    def merge_(self, other: "GridAggregator") -> "GridAggregator":
        """Adds another aggregator's sums (e.g. another rank's, after gathering)."""
        self.sum += other.sum
        self.weight += other.weight
        return self

    def allreduce_(self) -> "GridAggregator":
        """Sums the accumulators over all MPI ranks in place (pybrain_mpi must be initialized)."""
        from ...communication.collectives import allreduce_

        allreduce_(self.sum, op="sum", name="GridAggregator.sum")
        allreduce_(self.weight, op="sum", name="GridAggregator.weight")
        return self

    def result(self) -> np.ndarray:
        """The stitched volume; raises if some voxel was covered by no patch."""
        if not np.all(self.weight > 0):
            missing = np.argwhere(self.weight <= 0)
            raise DataMismatch(f"GridAggregator: {len(missing)} voxels received no patch (first at "
                               f"{tuple(missing[0])}); add every grid patch (all ranks: allreduce_)")
        return self.sum / self.weight
