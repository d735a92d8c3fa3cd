"""What every sampler shares: the sample record, rank sharding, seeds and saved state.

Sharding. An epoch is a global list of ``N`` samples; rank ``r`` of ``W`` takes the contiguous
block ``[r*L, (r+1)*L)`` (contiguous so each rank's patches cluster in its own chunks when
the global order has locality, as in grid sampling). With ``uneven="drop"`` ``L = N // W`` and
the last ``N mod W`` samples are dropped this epoch (shards disjoint). With ``uneven="pad"``
``L = ceil(N / W)`` and indices past ``N`` wrap to the start of the epoch (every sample is
covered; at most ``W-1`` repeats). Random samplers default to drop, grid sampling to pad.

Random samplers draw sample ``g`` of epoch ``e`` from a generator seeded by
``SeedSequence([seed, e, g])``, so a rank computes exactly its own samples and never
another rank's, whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import DataMismatch
from ..volume import Volume

__all__ = ["PatchSpec", "Sampler", "rank_and_world"]


@dataclass(frozen=True)
class PatchSpec:
    """One sample: ``index`` in the epoch's global list, region ``[start, start + size)`` in
    stored axis order, and ``seed`` for its augmentations."""

    index: int
    start: tuple[int, ...]
    size: tuple[int, ...]
    seed: int


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """A sampler's (rank, world size): as given, else those of
    :func:`pybrain_mpi.init` when it has run, else a single process (0, 1)."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    from ...communication import context

    if context.is_initialized():
        return (context.rank() if rank is None else int(rank),
                context.size() if world_size is None else int(world_size))
    return (0 if rank is None else int(rank), 1 if world_size is None else int(world_size))


class Sampler:
    """Shared bookkeeping: epoch, position, rank shard, seeds and saved state."""

    default_uneven = "drop"

    def __init__(self, global_length: int, seed: int, rank, world_size, uneven: str | None):
        self.rank, self.world_size = rank_and_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        self.uneven = uneven or self.default_uneven
        if self.uneven not in ("drop", "pad"):
            raise ValueError(f"uneven must be 'drop' or 'pad', not {self.uneven!r}")
        self.global_length = int(global_length)
        if self.global_length <= 0:
            raise DataMismatch(f"{type(self).__name__}: an epoch needs at least one sample")
        if self.uneven == "drop" and self.global_length < self.world_size:
            raise DataMismatch(f"{type(self).__name__}: {self.global_length} samples per epoch cannot "
                               f"be split over {self.world_size} ranks with uneven='drop' (each "
                               "needs at least one); use fewer ranks or more data")
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0

    # sharding ----------------------------------------------------------------
    def __len__(self) -> int:
        if self.uneven == "drop":
            return self.global_length // self.world_size
        return math.ceil(self.global_length / self.world_size)

    def global_index(self, k: int) -> int:
        """Global epoch index of this rank's k-th sample."""
        if not 0 <= k < len(self):
            raise IndexError(f"sample {k} outside this rank's shard of {len(self)}")
        return (self.rank * len(self) + k) % self.global_length

    def __getitem__(self, k: int) -> PatchSpec:
        return self._make(self.global_index(k))

    def __iter__(self):
        """Yields this rank's samples from ``position`` on. Iterating again after the epoch
        ended repeats it (like torch's DistributedSampler); call :meth:`set_epoch` for new
        samples."""
        if self.position >= len(self):
            self.position = 0
        while self.position < len(self):
            spec = self[self.position]
            self.position += 1
            yield spec

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch ``epoch`` from its first sample."""
        self.epoch = int(epoch)
        self.position = 0
        self._on_epoch()

    # seeds -------------------------------------------------------------------
    def _rng(self, g: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, g, 0]))

    def _sample_seed(self, g: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, g, 1]).generate_state(1)[0])

    # state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What :meth:`load_state_dict` needs to continue the identical sequence."""
        return {"sampler": type(self).__name__, "seed": self.seed, "epoch": self.epoch,
                "position": self.position, "rank": self.rank, "world_size": self.world_size,
                "global_length": self.global_length, "uneven": self.uneven}

    def load_state_dict(self, state: dict) -> None:
        """Restores epoch and position; refuses a state from a differently configured sampler."""
        mine = self.state_dict()
        for key in ("sampler", "seed", "world_size", "global_length", "uneven", "rank"):
            if state.get(key) != mine[key]:
                raise DataMismatch(
                    f"{type(self).__name__}: saved state has {key}={state.get(key)!r} but this sampler "
                    f"has {key}={mine[key]!r}; resume with the same configuration and world size")
        self.epoch = int(state["epoch"])
        self._on_epoch()
        self.position = int(state["position"])

    # hooks -------------------------------------------------------------------
    def _on_epoch(self) -> None:
        pass

    def _make(self, g: int) -> PatchSpec:  # pragma: no cover - abstract
        raise NotImplementedError


def _patch_target(volume, patch_size, who: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validates a patch sampler's volume (or shape) and patch size at construction."""
    if isinstance(volume, Volume):
        if volume.time_axis is not None:
            raise DataMismatch(
                f"{who}: {volume.path} is a {volume.ndim}-D time series (axes {volume.axes}); patch "
                "samplers need a spatial volume. Use TimeSeriesSampler for voxel series")
        shape = volume.shape
    elif hasattr(volume, "shape"):
        shape = tuple(volume.shape)
    else:
        shape = tuple(int(n) for n in volume)
    size = tuple(int(n) for n in patch_size)
    if len(size) != len(shape):
        raise DataMismatch(f"{who}: patch size {size} has {len(size)} axes but the volume has shape "
                           f"{shape}" + (" (4D data: use TimeSeriesSampler)" if len(shape) == 4 else ""))
    if any(n <= 0 for n in size) or any(n > d for n, d in zip(size, shape)):
        raise DataMismatch(f"{who}: patch size {size} does not fit in the volume of shape {shape}; "
                           "use a smaller patch or pad the volume")
    return tuple(int(n) for n in shape), size


def _centered_start(center, size, shape) -> tuple[int, ...]:
    """Start of a patch containing ``center`` as near its middle as the volume allows."""
    return tuple(int(min(max(c - n // 2, 0), d - n)) for c, n, d in zip(center, size, shape))
