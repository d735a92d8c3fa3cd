"""Patch, voxel-series and index samplers, deterministic from (seed, epoch, sample index) and
sharded across MPI ranks; one module per strategy, the shared bookkeeping in :mod:`.base`.

Every sampler is a random-access sequence for the current epoch and this rank:
``sampler[k]`` is the k-th sample of this rank's shard (a :class:`PatchSpec`, or an index for
:class:`ShuffledSampler`), ``len(sampler)`` the shard length. Iterating advances
``position``, which :meth:`Sampler.state_dict` saves so a resumed run continues the identical
sequence. Each sampler is told its ``rank`` and ``world_size`` (default: those of
:func:`pybrain_mpi.init` when it has run, else one process).

- :class:`UniformSampler` (``uniform.py``): uniform random positions.
- :class:`WeightedSampler` (``weighted.py``): centred on voxels drawn from a weight map.
- :class:`LabelSampler` (``label.py``): label-balanced.
- :class:`GridSampler`, :class:`GridAggregator` (``grid.py``): sliding-window inference.
- :class:`TimeSeriesSampler` (``timeseries.py``): voxel series of 4D fMRI.
- :class:`ShuffledSampler` (``shuffled.py``): sample indices, reshuffled each epoch.
"""

from .base import PatchSpec, Sampler, rank_and_world
from .grid import GridAggregator, GridSampler
from .label import LabelSampler
from .shuffled import ShuffledSampler
from .timeseries import TimeSeriesSampler
from .uniform import UniformSampler, _morton_key
from .weighted import WeightedSampler

__all__ = ["PatchSpec", "Sampler", "UniformSampler", "WeightedSampler", "LabelSampler",
           "GridSampler", "GridAggregator", "TimeSeriesSampler", "ShuffledSampler",
           "rank_and_world"]
