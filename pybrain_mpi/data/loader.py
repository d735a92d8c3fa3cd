"""Prefetching patch loader: background threads read (and augment) batches while the model trains.

Threads rather than processes: chunk decoding (Blosc/zstd) and the numba augmentations
release the GIL, and threads share one chunk cache per :class:`Volume` instead of one copy
of the data per worker process.
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


class PatchLoader:
    """Iterates over batches of a sampler's patches, read by background threads.

    Args:
        volumes: a :class:`Volume` (named ``"image"``) or a dict name -> Volume read at the same
            regions (e.g. ``{"image": t1, "label": seg}``); all must share the sampler's grid.
        sampler: any :class:`pybrain_mpi.data.samplers.Sampler`.
        batch_size: samples per batch.
        threads: prefetch threads; each builds whole batches.
        prefetch_batches: batches in flight at most (the bounded queue); memory is about
            ``prefetch_batches`` x batch bytes.
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
                 prefetch_batches: int = 4, augment: Augment | None = None,
                 intensity_keys=("image",), drop_last: bool = False, output: str = "torch"):
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
        self.prefetch_batches = max(1, int(prefetch_batches))
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

    def _make_batch(self, lo: int, hi: int):
        specs = [self.sampler[k] for k in range(lo, hi)]
        buffers = {}
        for name, vol in self.volumes.items():
            dtype = np.float32 if name in self.intensity_keys else _WIDEN.get(vol.dtype, vol.dtype)
            shape = (len(specs), specs[0].size[0]) if self.series else (len(specs), 1) + tuple(specs[0].size)
            buffers[name] = np.empty(shape, dtype=dtype)
        for row, spec in enumerate(specs):
            if self._stop.is_set():
                return None
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
        self._stop.clear()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pbm-prefetch")
        pending: deque = deque()
        todo = iter(ranges)
        try:
            for lo, hi in todo:
                pending.append((hi, pool.submit(self._make_batch, lo, hi)))
                if len(pending) >= self.prefetch_batches:
                    break
            while pending:
                hi, fut = pending.popleft()
                batch = fut.result()  # re-raises a worker's SampleError here, in the training loop
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt[1], pool.submit(self._make_batch, *nxt)))
                self.sampler.position = hi
                yield batch
        finally:
            # Runs on normal end, on an exception and when the loop breaks (generator close):
            # stop workers between samples, drop queued batches, join the threads.
            self._stop.set()
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
