"""Prefetching patch loader: background threads read (and augment) batches while the model trains.

Threads rather than processes: chunk decoding (Blosc/zstd) and the numba augmentations
release the GIL, and threads share one chunk cache per :class:`Volume` instead of one copy
of the data per worker process.

Memory: the read-ahead is bounded in bytes (``prefetch_bytes``, default 4 MiB) as well as in
batches (``threads + 1`` by default), so large batches are read one ahead, not four. The threads share the samples of the batches in flight (one task per sample), so even
one batch ahead keeps every thread busy: the next batch is started the moment the loop takes
one, and a loop slower than the loader never waits. Each batch is one preallocated numpy array per volume
that the samples are read straight into; torch tensors wrap it (``torch.from_numpy``, no copy).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .augment import Augment
from .errors import ChunkError, DataMismatch, SampleError
from .samplers import PatchSpec, Sampler, TimeSeriesSampler
from .volume import Volume

__all__ = ["PatchLoader"]

# torch has no unsigned 16/32/64-bit tensors worth training on; widen them.
_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.int64}

#: Default bound on the bytes of batches read ahead of the training loop (``prefetch_bytes``).
#: 4 MiB: one 64^3 float32 batch of 4, so the usual batches are read one ahead (at least one
#: always is). One batch ahead keeps every thread busy (one task per sample) and leaves the
#: loop waiting only when the loader is slower than the loop anyway; each extra batch ahead is
#: resident memory. Measured (benchmarks/patches.py, MNI152 T1 1 mm, 2 threads, torch
#: imported): 64^3 data beyond imports 34 MB at depth 1 vs 42 at depth 3 (the former 32 MiB
#: default), patches/s within noise (~1000); 128^3 batches (32 MiB) were already one ahead.
DEFAULT_PREFETCH_BYTES = 4 * 2**20


def prefetch_depth(batch_bytes: int, threads: int, prefetch_batches: int | None = None,
                   prefetch_bytes: int | None = None) -> int:
    """Batches a :class:`PatchLoader` reads ahead of the training loop.

    ``prefetch_batches`` alone (the loader's original setting) is used as given. Otherwise the
    depth is as many batches as fit in ``prefetch_bytes`` (default ``DEFAULT_PREFETCH_BYTES``),
    at most ``prefetch_batches`` (default ``threads + 1``: enough to keep every thread busy
    while the loop consumes one), and always at least 1.
    """
    if prefetch_bytes is None and prefetch_batches is not None:
        return max(1, int(prefetch_batches))
    budget = DEFAULT_PREFETCH_BYTES if prefetch_bytes is None else int(prefetch_bytes)
    cap = threads + 1 if prefetch_batches is None else int(prefetch_batches)
    return max(1, min(cap, budget // max(1, int(batch_bytes))))


class PatchLoader:
    """Iterates over batches of a sampler's patches, read by background threads.

    Args:
        volumes: a :class:`Volume` (named ``"image"``) or a dict name -> Volume read at the same
            regions (e.g. ``{"image": t1, "label": seg}``); all must share the sampler's grid.
        sampler: any :class:`pybrain_mpi.data.samplers.Sampler`.
        batch_size: samples per batch.
        threads: prefetch threads; they share the samples of the batches in flight.
        prefetch_batches: batches read ahead at most. Given alone, exactly this many (as
            before); by default ``threads + 1``, further bounded by ``prefetch_bytes``.
        prefetch_bytes: bytes of batches read ahead at most (default 4 MiB; at least one
            batch is always read ahead). With the default, 32^3 float32 batches of 4 (0.5 MiB)
            are read 3 ahead with 2 threads, 64^3 and 128^3 ones 1 ahead. Resident batch
            memory is :attr:`prefetch_depth` + 2 batches: those read ahead, the one being
            handed out and the one the loop still holds.
        augment: an :class:`Augment` (applied per sample with the sample's seed) or None.
        intensity_keys: arrays returned as float32 (the rest keep their integer dtype).
        drop_last: drop a final short batch.
        output: ``"torch"`` (tensors, the default) or ``"numpy"`` (arrays). With ``"numpy"``
            the loader never imports torch, so a data-only process (preprocessing, feeding
            another framework) does not carry torch's ~180 MB of resident memory.

    Each batch is a dict: one tensor (or array) per volume, ``(B, 1, *patch)`` for patches or ``(B, T)`` for
    voxel time series; ``"start"`` (B, ndim) and ``"index"`` (B,) int64 locate the samples.
    The sampler's ``position`` advances as batches are handed out, so ``sampler.state_dict()``
    (or :meth:`state_dict`) saved between batches resumes after the last batch consumed.
    """

    def __init__(self, volumes, sampler: Sampler, batch_size: int, *, threads: int = 2,
                 prefetch_batches: int | None = None, prefetch_bytes: int | None = None,
                 augment: Augment | None = None, intensity_keys=("image",), drop_last: bool = False,
                 output: str = "torch"):
        if output not in ("torch", "numpy"):
            raise ValueError(f"PatchLoader output must be 'torch' or 'numpy', not {output!r}")
        self.output = output
        self.volumes = {"image": volumes} if isinstance(volumes, Volume) else dict(volumes)
        if not self.volumes:
            raise ValueError("PatchLoader needs at least one volume")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.threads = max(1, int(threads))
        self.prefetch_batches = prefetch_batches
        self.prefetch_bytes = prefetch_bytes
        self.augment = augment
        self.intensity_keys = tuple(intensity_keys)
        self.drop_last = drop_last
        self.series = isinstance(sampler, TimeSeriesSampler)
        expect = sampler.volume_shape if self.series else sampler.shape
        for name, vol in self.volumes.items():
            shape = vol.shape
            if tuple(shape) != tuple(expect):
                raise DataMismatch(f"PatchLoader: volume {name!r} ({vol.path}) has shape {tuple(shape)} "
                                   f"but the sampler covers {tuple(expect)}; every volume must share its grid")
        self._stop = threading.Event()

    # ---------------------------------------------------------------- sizes
    def _sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample of one volume: ``(T,)`` or ``(1, *patch)``."""
        if self.series:
            return (int(self.sampler.volume_shape[0]),)
        return (1,) + tuple(int(n) for n in self.sampler.patch_size)

    def _dtype(self, name: str) -> np.dtype:
        vol = self.volumes[name]
        return np.dtype(np.float32 if name in self.intensity_keys else _WIDEN.get(vol.dtype, vol.dtype))

    @property
    def batch_bytes(self) -> int:
        """Bytes of one full batch (every volume's array)."""
        per_sample = int(np.prod(self._sample_shape()))
        return sum(self.batch_size * per_sample * self._dtype(name).itemsize for name in self.volumes)

    @property
    def prefetch_depth(self) -> int:
        """Batches read ahead of the training loop (see ``prefetch_batches``/``prefetch_bytes``)."""
        return prefetch_depth(self.batch_bytes, self.threads, self.prefetch_batches, self.prefetch_bytes)

    def __len__(self) -> int:
        left = len(self.sampler) - self.sampler.position
        n = left if left > 0 else len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        """The sampler's state: resumes after the last batch handed out."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restores the sampler's state (see :meth:`Sampler.load_state_dict`)."""
        self.sampler.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        """Starts the sampler's epoch ``epoch``."""
        self.sampler.set_epoch(epoch)

    # ---------------------------------------------------------------- workers
    def _read_sample(self, spec: PatchSpec, buffers: dict, row: int) -> None:
        sample = {}
        for name, vol in self.volumes.items():
            if self.series:
                view = buffers[name][row]  # (T,)
                view[...] = vol.read_patch(spec.start, spec.size).reshape(-1)
            else:
                view = buffers[name][row, 0]  # the patch, read straight into the batch
                vol.read_patch(spec.start, spec.size, out=view)
            sample[name] = view
        if self.augment is not None:
            done = self.augment(dict(sample), spec.seed)
            for name, arr in done.items():
                if arr is not sample[name]:  # flips return new arrays
                    sample[name][...] = arr

    def _read_row(self, k: int, buffers: dict, row: int) -> PatchSpec | None:
        """Reads this rank's sample ``k`` into ``row`` of the batch buffers (a prefetch task)."""
        if self._stop.is_set():
            return None
        spec = self.sampler[k]
        try:
            self._read_sample(spec, buffers, row)
        except Exception as err:
            where = (f"sample {spec.index} (rank {self.sampler.rank}, epoch {self.sampler.epoch}, "
                     f"start {spec.start}, size {spec.size})")
            if isinstance(err, ChunkError):
                raise SampleError(f"{where} failed reading chunk {err.key} of store {err.store}: {err}",
                                  spec.index, spec.start, err.key, err.store) from err
            raise SampleError(f"{where} failed: {type(err).__name__}: {err}",
                              spec.index, spec.start) from err
        return spec

    def _submit_batch(self, pool: ThreadPoolExecutor, lo: int, hi: int):
        """Allocates the batch's arrays and queues one read task per sample."""
        shape = (hi - lo,) + self._sample_shape()
        buffers = {name: np.empty(shape, dtype=self._dtype(name)) for name in self.volumes}
        return buffers, [pool.submit(self._read_row, k, buffers, row) for row, k in enumerate(range(lo, hi))]

    def _finish_batch(self, buffers: dict, futures: list):
        """Waits for the batch's samples (re-raising a worker's SampleError) and wraps it."""
        specs = [fut.result() for fut in futures]
        batch = dict(buffers)
        batch["start"] = np.array([s.start for s in specs], dtype=np.int64)
        batch["index"] = np.array([s.index for s in specs], dtype=np.int64)
        if self.output == "numpy":
            return batch
        import torch  # only here: a numpy-output loader never imports torch

        return {name: torch.from_numpy(arr) for name, arr in batch.items()}

    # ---------------------------------------------------------------- iteration
    def __iter__(self):
        n = len(self.sampler)
        if self.sampler.position >= n:
            self.sampler.position = 0  # a finished epoch repeats, as the sampler's own iteration
        ranges = [(k, min(k + self.batch_size, n)) for k in range(self.sampler.position, n, self.batch_size)]
        if self.drop_last and ranges and ranges[-1][1] - ranges[-1][0] < self.batch_size:
            ranges.pop()
        depth = self.prefetch_depth
        self._stop.clear()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pbm-prefetch")
        pending: deque = deque()
        todo = iter(ranges)
        try:
            for lo, hi in todo:
                pending.append((hi, *self._submit_batch(pool, lo, hi)))
                if len(pending) >= depth:
                    break
            while pending:
                hi, buffers, futures = pending.popleft()
                batch = self._finish_batch(buffers, futures)
                del buffers, futures  # the batch alone keeps its arrays alive
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt[1], *self._submit_batch(pool, *nxt)))
                self.sampler.position = hi
                yield batch
                del batch  # not held here while the loop works on the next one
        finally:
            # Runs on normal end, on an exception and when the loop breaks (generator close):
            # stop workers between samples, drop queued batches, join the threads.
            self._stop.set()
            for _, _, futures in pending:
                for fut in futures:
                    fut.cancel()
            pending.clear()
            pool.shutdown(wait=True, cancel_futures=True)
