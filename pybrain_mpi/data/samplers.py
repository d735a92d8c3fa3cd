"""Patch and voxel-series samplers, deterministic from (seed, epoch, sample index) and sharded
across MPI ranks.

Every sampler is a random-access sequence of :class:`PatchSpec` for the current epoch and
this rank: ``sampler[k]`` is the k-th sample of this rank's shard, ``len(sampler)`` the shard
length. Iterating advances ``position``, which :meth:`Sampler.state_dict` saves so a resumed
run continues the identical sequence.

Sharding. An epoch is a global list of ``N`` samples; rank ``r`` of ``W`` takes the contiguous
block ``[r*L, (r+1)*L)`` (contiguous so each rank's patches cluster in its own chunks when
the global order has locality, as in grid sampling). With ``uneven="drop"`` ``L = N // W`` and
the last ``N mod W`` samples are dropped this epoch (shards disjoint). With ``uneven="pad"``
``L = ceil(N / W)`` and indices past ``N`` wrap to the start of the epoch (every sample is
covered; at most ``W-1`` repeats). Random samplers default to drop, :class:`GridSampler` to pad.

Random samplers draw sample ``g`` of epoch ``e`` from a generator seeded by
``SeedSequence([seed, e, g])``, so a rank computes exactly its own samples and never
another rank's, whatever the world size.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import DataMismatch
from .volume import Volume

__all__ = ["PatchSpec", "Sampler", "UniformSampler", "WeightedSampler", "LabelSampler",
           "GridSampler", "GridAggregator", "TimeSeriesSampler"]


@dataclass(frozen=True)
class PatchSpec:
    """One sample: ``index`` in the epoch's global list, region ``[start, start + size)`` in
    stored axis order, and ``seed`` for its augmentations."""

    index: int
    start: tuple[int, ...]
    size: tuple[int, ...]
    seed: int


def _default_rank_world(rank, world_size) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    import pybrain_mpi

    if pybrain_mpi.is_initialized():
        return (pybrain_mpi.rank() if rank is None else int(rank),
                pybrain_mpi.size() if world_size is None else int(world_size))
    return (0 if rank is None else int(rank), 1 if world_size is None else int(world_size))


class Sampler:
    """Shared bookkeeping: epoch, position, rank shard, seeds and saved state."""

    default_uneven = "drop"

    def __init__(self, global_length: int, seed: int, rank, world_size, uneven: str | None):
        self.rank, self.world_size = _default_rank_world(rank, world_size)
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
                               f"be split over {self.world_size} ranks with uneven='drop'")
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


def _morton_key(start: Sequence[int]) -> int:
    """Z-order (Morton) code of a position: interleaves the coordinates' bits, so positions
    close in space get close codes and sorting by it walks the volume region by region."""
    key = 0
    ndim = len(start)
    for bit in range(32):
        for axis, c in enumerate(start):
            key |= ((int(c) >> bit) & 1) << (bit * ndim + axis)
    return key


class UniformSampler(Sampler):
    """Patches at uniformly random positions fully inside the volume.

    Args:
        volume: a :class:`Volume` (or its shape).
        patch_size: patch shape, one entry per axis.
        samples_per_epoch: global epoch length (all ranks together).
        seed, rank, world_size, uneven: see the module docstring; rank/world_size default to
            pybrain_mpi's when it is initialized, else 0 and 1.
        local_window: 0 (default): samples come in independent random order. ``W > 1``: the
            epoch is cut into windows of ``W`` consecutive samples and each window's positions
            (the very same uniform draws as with 0) are visited in Z-order, so consecutive
            patches overlap in chunks and a chunk cache much smaller than the volume is
            re-used. Measured, random 64^3 patches on 32^3 chunks of the MNI152 T1 upsampled
            2x (277 MiB) with the automatic 27 MiB cache, warm read amplification: 2.8 with
            0, 1.9 with ``W=128``, 0.85 with ``W=480`` (``benchmarks/patches.py --upsample 2
            --local-window W``). Locality needs windows dense in the volume: ``W`` of the
            order of the number of patch-sized regions it holds. The price: consecutive
            patches (a batch) come from one region of the volume rather than from all over
            it, as a TorchIO Queue's patches come from few subjects.
    """

    def __init__(self, volume, patch_size: Sequence[int], samples_per_epoch: int, *, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, uneven: str | None = None,
                 local_window: int = 0):
        self.shape, self.patch_size = _patch_target(volume, patch_size, "UniformSampler")
        self.local_window = int(local_window)
        if self.local_window < 0:
            raise ValueError(f"UniformSampler: local_window must be 0 (random order) or a window "
                             f"length, not {local_window}")
        # A few windows' visiting orders (prefetch threads ask for neighbouring samples).
        self._windows: dict = {}
        self._windows_lock = threading.Lock()
        super().__init__(samples_per_epoch, seed, rank, world_size, uneven)

    def _uniform_start(self, g: int) -> tuple[int, ...]:
        rng = self._rng(g)
        return tuple(int(rng.integers(0, d - n + 1)) for d, n in zip(self.shape, self.patch_size))

    def _window_order(self, w: int) -> list:
        """The starts of window ``w`` of this epoch, in Z-order."""
        key = (self.epoch, w)
        with self._windows_lock:
            hit = self._windows.get(key)
        if hit is None:
            lo = w * self.local_window
            starts = [self._uniform_start(g) for g in range(lo, min(lo + self.local_window, self.global_length))]
            hit = sorted(starts, key=_morton_key)
            with self._windows_lock:
                if len(self._windows) >= 8:
                    self._windows.pop(next(iter(self._windows)))
                self._windows[key] = hit
        return hit

    def _make(self, g: int) -> PatchSpec:
        if self.local_window > 1:
            start = self._window_order(g // self.local_window)[g % self.local_window]
        else:
            start = self._uniform_start(g)
        return PatchSpec(g, start, self.patch_size, self._sample_seed(g))

    def state_dict(self) -> dict:
        """The base state plus ``local_window`` (the visiting order depends on it)."""
        return dict(super().state_dict(), local_window=self.local_window)

    def load_state_dict(self, state: dict) -> None:
        """As :meth:`Sampler.load_state_dict`; also refuses a different ``local_window``."""
        if int(state.get("local_window", 0)) != self.local_window:
            raise DataMismatch(f"UniformSampler: saved state has local_window={state.get('local_window', 0)!r} "
                               f"but this sampler has local_window={self.local_window}; resume with "
                               "the same configuration")
        super().load_state_dict(state)


class _BlockSource:
    """A weight or label map read block by block: a :class:`Volume` (blocks = its chunks, read
    through its cache) or an in-memory array (blocks of 32 per axis)."""

    def __init__(self, source, who: str, name: str):
        self.volume = source if isinstance(source, Volume) else None
        self.array = None if self.volume is not None else np.asarray(source)
        self.shape = self.volume.shape if self.volume is not None else self.array.shape
        self.block = self.volume.chunks if self.volume is not None else tuple(min(32, n) for n in self.shape)
        self.grid = tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block))
        self.name = self.volume.path if self.volume is not None else f"{name} array"
        self.who = who

    def check_grid(self, image) -> None:
        shape = image.shape if hasattr(image, "shape") else tuple(image)
        if tuple(shape) != tuple(self.shape):
            raise DataMismatch(f"{self.who}: {self.name} has shape {tuple(self.shape)} but the image "
                               f"has shape {tuple(shape)}; they must share one voxel grid "
                               "(resample the map onto the image grid)")
        if isinstance(image, Volume) and self.volume is not None and \
                not np.allclose(image.affine, self.volume.affine, atol=1e-4):
            raise DataMismatch(f"{self.who}: {self.name} and {image.path} have the same shape but "
                               f"different affines\n{self.volume.affine}\nvs\n{image.affine}; "
                               "they must share one voxel grid")

    def block_origin(self, flat: int) -> tuple[int, ...]:
        coords = np.unravel_index(flat, self.grid)
        return tuple(int(c) * b for c, b in zip(coords, self.block))

    def read_block(self, flat: int) -> tuple[tuple[int, ...], np.ndarray]:
        origin = self.block_origin(flat)
        size = tuple(min(b, n - o) for b, n, o in zip(self.block, self.shape, origin))
        if self.volume is not None:
            return origin, self.volume.read_patch(origin, size)
        return origin, self.array[tuple(slice(o, o + s) for o, s in zip(origin, size))]

    def blocks(self):
        for flat in range(int(np.prod(self.grid))):
            yield flat, self.read_block(flat)[1]


def _centered_start(center, size, shape) -> tuple[int, ...]:
    """Start of a patch containing ``center`` as near its middle as the volume allows."""
    return tuple(int(min(max(c - n // 2, 0), d - n)) for c, n, d in zip(center, size, shape))


class WeightedSampler(Sampler):
    """Patches centred (as far as the edges allow) on voxels drawn with probability proportional
    to a weight map: a probability map or a 0/1 mask on the image's grid (foreground sampling).

    The map is summed per block once at construction (streaming, bounded memory); each sample
    then picks a block by its sum and a voxel inside it, reading only that block.
    """

    def __init__(self, volume, weights, patch_size: Sequence[int], samples_per_epoch: int, *,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 uneven: str | None = None):
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
        self._inner_limit = max(1, (64 * 2**20) // (8 * int(np.prod(self.weights.block))))
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
        rng = self._rng(g)
        flat = int(np.searchsorted(self._cumsum, rng.random() * self._cumsum[-1], side="right"))
        flat = min(flat, len(self._cumsum) - 1)
        origin, block_shape, inner = self._inner_cumsum(flat)
        voxel = int(np.searchsorted(inner, rng.random() * inner[-1], side="right"))
        voxel = min(voxel, inner.size - 1)
        center = tuple(o + int(i) for o, i in zip(origin, np.unravel_index(voxel, block_shape)))
        return PatchSpec(g, _centered_start(center, self.patch_size, self.shape), self.patch_size,
                         self._sample_seed(g))


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
        import torch

        import pybrain_mpi

        pybrain_mpi.allreduce_(torch.from_numpy(self.sum), op="sum")
        pybrain_mpi.allreduce_(torch.from_numpy(self.weight), op="sum")
        return self

    def result(self) -> np.ndarray:
        """The stitched volume; raises if some voxel was covered by no patch."""
        if not np.all(self.weight > 0):
            missing = np.argwhere(self.weight <= 0)
            raise DataMismatch(f"GridAggregator: {len(missing)} voxels received no patch (first at "
                               f"{tuple(missing[0])}); add every grid patch (all ranks: allreduce_)")
        return self.sum / self.weight


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
