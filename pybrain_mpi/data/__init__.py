"""Brain volumes as Zarr: conversion, on-demand patch reading, samplers and a prefetching loader.

    import pybrain_mpi as pbm
    pbm.data.convert("t1.nii.gz", "t1.zarr", chunks=(32, 32, 32))
    vol = pbm.data.Volume("t1.zarr")
    sampler = pbm.data.UniformSampler(vol, patch_size=(64, 64, 64), samples_per_epoch=1000)
    for batch in pbm.data.PatchLoader(vol, sampler, batch_size=4):
        ...

Cohorts (many subjects, from a manifest or BIDS) are read by :mod:`.cohort` and converted once
into the cache by :mod:`.subjects`; the trainer turns them into training data.
"""

from .convert import CODECS, convert, default_chunks
from .errors import ChunkError, DataError, DataMismatch, PatchOutOfBounds, SampleError
from .volume import Volume
from .samplers import (GridAggregator, GridSampler, LabelSampler, PatchSpec, Sampler, ShuffledSampler,
                       TimeSeriesSampler, UniformSampler, WeightedSampler)
from .augment import Augment
from .loader import PatchLoader

__all__ = ["CODECS", "convert", "default_chunks", "Volume", "PatchSpec", "Sampler", "UniformSampler",
           "WeightedSampler", "LabelSampler", "GridSampler", "GridAggregator", "TimeSeriesSampler",
           "ShuffledSampler", "Augment", "PatchLoader", "DataError", "ChunkError", "DataMismatch",
           "PatchOutOfBounds", "SampleError"]
