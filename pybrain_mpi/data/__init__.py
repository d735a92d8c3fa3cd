"""Brain volumes as Zarr: conversion, on-demand patch reading, samplers and a prefetching loader.

    import pybrain_mpi as pbm
    pbm.data.convert("t1.nii.gz", "t1.zarr", chunks=(32, 32, 32))
    vol = pbm.data.Volume("t1.zarr")
    sampler = pbm.data.UniformSampler(vol, patch_size=(64, 64, 64), samples_per_epoch=1000)
    for batch in pbm.data.PatchLoader(vol, sampler, batch_size=4):
        ...
"""

from .convert import CODECS, convert, default_chunks
from .errors import ChunkError, DataMismatch, PatchOutOfBounds, SampleError
from .volume import Volume
from .samplers import (GridAggregator, GridSampler, LabelSampler, PatchSpec, Sampler, TimeSeriesSampler,
                       UniformSampler, WeightedSampler)
from .augment import Augment
from .loader import PatchLoader

__all__ = ["CODECS", "convert", "default_chunks", "Volume", "PatchSpec", "Sampler", "UniformSampler",
           "WeightedSampler", "LabelSampler", "GridSampler", "GridAggregator", "TimeSeriesSampler",
           "Augment", "PatchLoader", "ChunkError", "DataMismatch", "PatchOutOfBounds", "SampleError"]
