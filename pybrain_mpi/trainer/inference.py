"""Sliding-window inference over a volume, shared across ranks.

:func:`predict_region` covers a region of a volume with a grid of patches
(:class:`~pybrain_mpi.data.GridSampler`, overlapping by ``overlap`` voxels), each rank running
the model on its share of the grid (the sampler shards it: ``uneven="pad"``, so every rank
runs as many patches and the few repeats average out), and stitches the outputs with a
:class:`~pybrain_mpi.data.GridAggregator` whose sums are then allreduced: every rank ends with
the whole prediction. Used by the trainer's whole-volume evaluation and by ``pybrain-mpi
predict``, so both compute exactly the same thing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["predict_region", "grid_overlap"]


def grid_overlap(patch: Sequence[int], fraction: float) -> tuple[int, ...]:
    """Overlap in voxels per axis for a fraction of the patch (always less than the patch)."""
    return tuple(min(int(p) - 1, int(round(float(fraction) * int(p)))) for p in patch)


def predict_region(forward: Callable[[np.ndarray], np.ndarray],
                   read_input: Callable[[tuple, tuple], np.ndarray],
                   origin: Sequence[int], size: Sequence[int], patch: Sequence[int],
                   channels: int, *, overlap: Sequence[int] | int = 0, batch_size: int = 4,
                   rank: int = 0, world_size: int = 1, weighting: str = "gaussian") -> np.ndarray:
    """The model's output over ``[origin, origin + size)``: ``(channels, *size)`` float32.

    ``forward(x)`` maps a batch ``(B, C_in, *patch)`` to ``(B, channels, *patch)`` (numpy);
    ``read_input(start, size)`` reads one input patch ``(C_in, *patch)`` at absolute voxel
    ``start``. ``patch`` must fit in ``size``. With ``world_size > 1`` this is collective: every
    rank must call it with the same region (two bounded allreduces of the sums).
    """
    from ..data import GridAggregator, GridSampler

    origin = tuple(int(o) for o in origin)
    size = tuple(int(n) for n in size)
    patch = tuple(int(p) for p in patch)
    sampler = GridSampler(size, patch, overlap, rank=rank, world_size=world_size)
    aggregator = GridAggregator(size, patch, weighting, channels=int(channels), dtype=np.float32)
    specs = list(sampler)
    for lo in range(0, len(specs), max(1, int(batch_size))):
        batch = specs[lo:lo + max(1, int(batch_size))]
        x = np.stack([read_input(tuple(o + s for o, s in zip(origin, spec.start)), patch)
                      for spec in batch])
        out = np.asarray(forward(x), dtype=np.float32)
        aggregator.add(np.array([spec.start for spec in batch]), out)
    if world_size > 1:
        aggregator.allreduce_()
    return aggregator.result().astype(np.float32, copy=False)
