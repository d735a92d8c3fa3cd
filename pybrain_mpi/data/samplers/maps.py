"""Voxel maps (weights, labels) read block by block, for the samplers that draw from them."""

from __future__ import annotations

import math

import numpy as np

from ..errors import DataMismatch
from ..volume import Volume


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
