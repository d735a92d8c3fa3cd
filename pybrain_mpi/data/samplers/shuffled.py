"""Sample indices of an in-memory or indexed dataset, reshuffled every epoch.

The trainer's sampler: which of ``n_samples`` training samples (voxel series, patches, feature
rows) each rank uses, batch by batch.

**Resuming on another world size.** A run interrupted in epoch ``e`` after ``s`` steps on ``N``
ranks has used, of epoch ``e``'s permutation, each old rank's first ``s * batch_size`` shard
positions (:meth:`ShuffledSampler.used_mask`). Resumed on ``M`` ranks, the rest of that epoch
is an :class:`EpochRemainder`: every sample of the epoch not used yet, in permutation order
(the up to ``N - 1`` samples an ``N``-rank epoch leaves out included), dealt step by step:
step ``k`` takes the next ``M * batch_size`` of them and splits them evenly over the ranks
(sizes differ by at most one; a last step with fewer samples than ranks is merged into the
step before). So in the interrupted epoch no sample is skipped or used twice, whatever ``N``
and ``M``; the trainer weights each rank's loss by its share of the step's samples, so the
averaged gradient is the mean over the step's samples. Later epochs are ordinary ``M``-rank
epochs. Consumed positions form a prefix of the remainder, so a remainder re-derived from a
checkpoint written inside it (its used mask) continues it exactly on the same ``M``.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Sampler

__all__ = ["ShuffledSampler", "EpochRemainder", "pack_mask", "unpack_mask"]


class ShuffledSampler(Sampler):
    """A seeded permutation of ``range(n_samples)`` per epoch, sharded like every sampler.

    Epoch ``e`` uses ``permutation(n_samples)`` drawn from ``default_rng([seed, e])`` (the same
    on every rank); rank ``r`` takes positions ``[r * per_rank, (r + 1) * per_rank)`` with
    ``per_rank = n_samples // world_size`` (the remainder is dropped, so every rank runs the
    same number of steps), used in batches of ``batch_size`` (the last may be short, equally on
    every rank). Its state is ``(epoch, step in epoch)``, which makes resuming exact; on another
    world size the rest of the epoch is an :class:`EpochRemainder` (:meth:`remainder`).

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

    def used_mask(self, epoch: int, steps_done: int, world_size: int | None = None) -> np.ndarray:
        """Boolean mask over sample indices: the samples the first ``steps_done`` steps of
        ``epoch`` used on all ``world_size`` ranks (default: this sampler's world) together."""
        world = self.world_size if world_size is None else int(world_size)
        per_rank = self.global_length // world
        taken = min(int(steps_done) * self.batch_size, per_rank)
        order = self._permutation(epoch)
        used = np.zeros(self.global_length, dtype=bool)
        for r in range(world):
            used[order[r * per_rank:r * per_rank + taken]] = True
        return used

    def remainder(self, epoch: int, used: np.ndarray) -> "EpochRemainder":
        """The rest of ``epoch`` for this rank: the samples ``used`` does not mark, in the
        epoch's permutation order, dealt over this sampler's world (see the module docstring)."""
        used = np.asarray(used, dtype=bool)
        if used.shape != (self.global_length,):
            raise ValueError(f"used mask of {used.shape} for {self.global_length} samples")
        order = self._permutation(epoch)
        return EpochRemainder(epoch, order[~used[order]], self.batch_size, self.rank,
                              self.world_size)


class EpochRemainder:
    """What is left of one epoch, dealt over ``world_size`` ranks (see the module docstring).

    ``pool`` holds the unused sample indices in the order they are used. Step ``k`` covers
    ``pool[k * M * B : (k + 1) * M * B]`` (``M`` ranks, batch ``B``), the last step the rest
    (a tail of fewer than ``M`` samples joins the step before); within a step rank ``r`` takes
    the ``r``-th of ``M`` even, contiguous pieces.
    """

    def __init__(self, epoch: int, pool: np.ndarray, batch_size: int, rank: int, world_size: int):
        self.epoch = int(epoch)
        self.pool = np.asarray(pool, dtype=np.int64)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        per_step = self.world_size * self.batch_size
        n = len(self.pool)
        steps = math.ceil(n / per_step)
        if steps > 1 and n - (steps - 1) * per_step < self.world_size:
            steps -= 1
        self.steps = steps
        self._per_step = per_step

    def step_bounds(self, k: int) -> tuple[int, int]:
        """``[begin, end)`` of step ``k`` in :attr:`pool`."""
        if not 0 <= k < self.steps:
            raise IndexError(f"step {k} outside the {self.steps} remaining steps of epoch {self.epoch}")
        begin = k * self._per_step
        end = len(self.pool) if k == self.steps - 1 else begin + self._per_step
        return begin, end

    def batch(self, k: int, rank: int | None = None) -> np.ndarray:
        """Sample indices of step ``k`` on ``rank`` (default: this rank); may be empty only
        when the whole remainder has fewer samples than ranks."""
        begin, end = self.step_bounds(k)
        count, parts = end - begin, self.world_size
        r = self.rank if rank is None else int(rank)
        per, extra = divmod(count, parts)
        start = begin + r * per + min(r, extra)
        return self.pool[start:start + per + (1 if r < extra else 0)]

    def step_samples(self, k: int) -> int:
        """Samples of step ``k`` on all ranks together."""
        begin, end = self.step_bounds(k)
        return end - begin

    def used_after(self, steps_done: int, n_samples: int) -> np.ndarray:
        """Boolean mask over all ``n_samples``: used before this remainder began, or by its
        first ``steps_done`` steps."""
        used = np.ones(n_samples, dtype=bool)
        used[self.pool] = False
        end = 0 if steps_done <= 0 else self.step_bounds(min(steps_done, self.steps) - 1)[1]
        used[self.pool[:end]] = True
        return used


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as bytes (one bit per sample) for a checkpoint."""
    return np.packbits(np.asarray(mask, dtype=bool))


def unpack_mask(packed: np.ndarray, n: int) -> np.ndarray:
    """The boolean mask :func:`pack_mask` packed, ``n`` entries."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size != (n + 7) // 8:
        raise ValueError(f"packed mask of {packed.size} bytes does not hold {n} samples")
    return np.unpackbits(packed, count=n).astype(bool)
