"""Sample indices of an in-memory or indexed dataset, reshuffled every epoch.

The trainer's sampler: which of ``n_samples`` training samples (voxel series, patches, feature
rows) each rank uses, batch by batch.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Sampler

__all__ = ["ShuffledSampler"]


class ShuffledSampler(Sampler):
    """A seeded permutation of ``range(n_samples)`` per epoch, sharded like every sampler.

    Epoch ``e`` uses ``permutation(n_samples)`` drawn from ``default_rng([seed, e])`` (the same
    on every rank); rank ``r`` takes positions ``[r * per_rank, (r + 1) * per_rank)`` with
    ``per_rank = n_samples // world_size`` (the remainder is dropped, so every rank runs the
    same number of steps), used in batches of ``batch_size`` (the last may be short, equally on
    every rank). Its state is ``(epoch, step in epoch)``, which makes resuming exact.

    ``sampler[k]`` is the sample index at position ``k`` of this rank's shard for the current
    epoch; :meth:`shard` and :meth:`batch_indices` take the epoch explicitly.
    """

    def __init__(self, n_samples: int, batch_size: int, *, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"ShuffledSampler: batch_size must be at least 1, not {batch_size}")
        super().__init__(n_samples, seed, rank, world_size, "drop")
        self.per_rank = len(self)
        self.steps_per_epoch = math.ceil(self.per_rank / self.batch_size)
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.global_length)
            self._order_epoch = epoch
        return self._order

    def _make(self, g: int) -> int:
        return int(self._permutation(self.epoch)[g])

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in the order they are used."""
        begin = self.rank * self.per_rank
        return self._permutation(epoch)[begin:begin + self.per_rank]

    def batch_indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """Indices of batch ``step_in_epoch`` of ``epoch`` on this rank."""
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise IndexError(f"step {step_in_epoch} outside an epoch of {self.steps_per_epoch} steps")
        start = step_in_epoch * self.batch_size
        return self.shard(epoch)[start:start + self.batch_size]
