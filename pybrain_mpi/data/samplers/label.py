"""Label-balanced patches: a label first, then a voxel of it."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DataMismatch
from .base import PatchSpec, Sampler, _centered_start, _patch_target
from .maps import _BlockSource

__all__ = ["LabelSampler"]


class LabelSampler(Sampler):
    """Label-balanced patches: a label is drawn from ``label_probabilities`` (default: every label
    present, equally likely), then a voxel of that label uniformly, and the patch is centred
    on it as far as the edges allow.

    Label counts per block are gathered once at construction (streaming).
    """

    def __init__(self, volume, labels, patch_size: Sequence[int], samples_per_epoch: int, *,
                 label_probabilities: dict | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, uneven: str | None = None):
        self.shape, self.patch_size = _patch_target(volume, patch_size, "LabelSampler")
        self.labels = _BlockSource(labels, "LabelSampler", "label")
        self.labels.check_grid(volume)
        nblocks = int(np.prod(self.labels.grid))
        counts: dict[int, np.ndarray] = {}
        for flat, block in self.labels.blocks():
            if not np.issubdtype(block.dtype, np.integer):
                if not np.array_equal(block, np.round(block)):
                    raise DataMismatch(f"LabelSampler: {self.labels.name} holds non-integer values; "
                                       "pass a label map (integers)")
            values, n = np.unique(block, return_counts=True)
            for v, c in zip(values.tolist(), n.tolist()):
                counts.setdefault(int(v), np.zeros(nblocks, dtype=np.int64))[flat] = c
        if label_probabilities is None:
            label_probabilities = {v: 1.0 for v in counts}
        missing = [v for v, p in label_probabilities.items() if p > 0 and int(v) not in counts]
        if missing:
            raise DataMismatch(f"LabelSampler: labels {missing} do not occur in {self.labels.name}; "
                               f"present: {sorted(counts)}")
        self.label_values = np.array([int(v) for v, p in label_probabilities.items() if p > 0])
        probs = np.array([float(p) for p in label_probabilities.values() if p > 0])
        if probs.size == 0:
            raise DataMismatch("LabelSampler: every label probability is zero")
        self.label_probs = probs / probs.sum()
        self._cumsums = {int(v): np.cumsum(counts[int(v)]) for v in self.label_values}
        super().__init__(samples_per_epoch, seed, rank, world_size, uneven)

    def _make(self, g: int) -> PatchSpec:
        rng = self._rng(g)
        label = int(self.label_values[rng.choice(len(self.label_values), p=self.label_probs)])
        cums = self._cumsums[label]
        flat = int(np.searchsorted(cums, rng.integers(0, cums[-1]), side="right"))
        origin, block = self.labels.read_block(flat)
        where = np.flatnonzero(block.ravel() == label)
        voxel = int(where[rng.integers(0, where.size)])
        center = tuple(o + int(i) for o, i in zip(origin, np.unravel_index(voxel, block.shape)))
        return PatchSpec(g, _centered_start(center, self.patch_size, self.shape), self.patch_size,
                         self._sample_seed(g))
