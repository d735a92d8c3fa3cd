"""Layers built one at a time, each under its own seed: a rank materialises only its stage's.

A model too large for one rank cannot be built whole on every rank and then cut (the peak
memory would be the whole model's). :class:`StagedLayers` holds one *builder* per layer
(``builder(group) -> nn.Module``) and builds layer ``i`` under the seed
``layer_seed(seed, i)`` (the global RNG is restored afterwards), so layer ``i`` gets the same
initial weights whichever other layers a rank builds: a pipeline's stages together hold exactly
the unsplit model's weights. ``group`` is ``None`` for an ordinary layer, or the
:class:`~pybrain_mpi.parallel.Group` of the ranks sharing a pipeline stage: a builder may then
return a tensor-split layer (e.g. :meth:`ColumnParallelLinear.like_linear`, which draws the
unsplit layer's weights block by block) holding only this rank's block.

    layers = naive_cnn3d_layers((176, 176, 176), seed=0)      # nothing built yet
    pipe = Pipeline(layers, balance=[4, 8], stage_ranks=[1, 3], micro_batches=4)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["StagedLayers", "layer_seed"]


def layer_seed(seed: int, index: int) -> int:
    """The seed layer ``index`` of a model seeded ``seed`` is built under."""
    return (int(seed) << 20) + int(index)


class StagedLayers:
    """The layers of a model as builders, built on demand (module docstring).

    Args:
        builders: one callable per layer, ``builder(group)`` returning the layer (``group``:
            None, or the Group of a multi-rank stage).
        seed: the model's seed; ``None`` builds in order from the global RNG as it stands
            (as an ordinary constructor would; only :meth:`build_all` allows it).
    """

    def __init__(self, builders: Sequence[Callable[[Any], nn.Module]], seed: int | None = 0):
        self.builders = list(builders)
        self.seed = None if seed is None else int(seed)
        if not self.builders:
            raise ValueError("StagedLayers: a model needs at least one layer")

    def __len__(self) -> int:
        return len(self.builders)

    def build(self, index: int, group: Any = None) -> nn.Module:
        """Layer ``index`` with its own seed (the global RNG is left as it was)."""
        if self.seed is None:
            raise ValueError("StagedLayers(seed=None) builds the whole model in order only (build_all)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(self.seed, index))
            return self._built(index, group)

    def build_range(self, start: int, end: int, group: Any = None) -> list[nn.Module]:
        """Layers ``start..end-1``, each with its own seed."""
        if not 0 <= start < end <= len(self):
            raise ValueError(f"StagedLayers: layer range {start}..{end - 1} is outside the {len(self)} layers")
        return [self.build(i, group) for i in range(start, end)]

    def build_all(self) -> list[nn.Module]:
        """Every layer, unsplit: the model one rank would hold."""
        if self.seed is None:
            return [self._built(i, None) for i in range(len(self))]
        return self.build_range(0, len(self))

    def _built(self, index: int, group: Any) -> nn.Module:
        layer = self.builders[index](group)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"StagedLayers: builder {index} returned a {type(layer).__name__}, not an nn.Module")
        return layer
