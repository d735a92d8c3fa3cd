"""Patch augmentations as numba kernels, deterministic per sample seed.

:class:`Augment` draws every random parameter from ``numpy.random.default_rng(seed)`` with the
sample's seed (see :class:`pybrain_mpi.data.samplers.PatchSpec`), and Gaussian noise from
a SplitMix64 stream seeded per sample inside the kernel (so the noise does not depend on
which prefetch thread runs it). The
kernels release the GIL, so prefetch threads augment in parallel.

Order inside one call: flips (every array of the sample, so image and label stay aligned),
then on the intensity arrays only: z-scoring, gamma, scale/shift, noise.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

__all__ = ["Augment", "flip", "zscore_", "gamma_", "scale_shift_", "gaussian_noise_"]


def _flip3(src, dst, f0, f1, f2):
    n0, n1, n2 = src.shape
    for i in range(n0):
        si = n0 - 1 - i if f0 else i
        for j in range(n1):
            sj = n1 - 1 - j if f1 else j
            if f2:
                for k in range(n2):
                    dst[i, j, k] = src[si, sj, n2 - 1 - k]
            else:
                for k in range(n2):
                    dst[i, j, k] = src[si, sj, k]


def _zscore(x, nonzero):
    # Two passes in float64: exact enough for float32 data of any size.
    total = 0.0
    count = 0
    for i in range(x.size):
        if not nonzero or x[i] != 0:
            total += x[i]
            count += 1
    if count == 0:
        return
    mean = total / count
    var = 0.0
    for i in range(x.size):
        if not nonzero or x[i] != 0:
            d = x[i] - mean
            var += d * d
    std = np.sqrt(var / count)
    inv = 1.0 / std if std > 0 else 1.0
    for i in range(x.size):
        if not nonzero or x[i] != 0:
            x[i] = (x[i] - mean) * inv


def _gamma(x, gamma):
    # Gamma acts on intensities rescaled to [0, 1] and mapped back, so negative
    # (z-scored) values are allowed.
    lo = x[0]
    hi = x[0]
    for i in range(x.size):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
    span = hi - lo
    if span <= 0:
        return
    inv = 1.0 / span
    for i in range(x.size):
        v = (x[i] - lo) * inv
        # exp(g log v) instead of v ** g: the generic pow is several times slower here.
        x[i] = lo + span * (np.exp(gamma * np.log(v)) if v > 0 else 0.0)


def _scale_shift(x, scale, shift):
    for i in range(x.size):
        x[i] = x[i] * scale + shift


def _splitmix64(state):
    # SplitMix64 (Steele, Lea, Flood 2014): one 64-bit add and a mix per draw; the stream
    # depends only on the seed, not on the thread that runs it.
    state = (state + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    z = state
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    return state, z ^ (z >> np.uint64(31))


def _noise(x, std, seed):
    # Box-Muller on pairs of uniforms in (0, 1]; numba's np.random is ~10x slower per draw.
    state = np.uint64(seed)
    scale = 1.0 / 9007199254740992.0  # 2**-53
    n = x.size
    i = 0
    while i < n:
        state, a = _splitmix64(state)
        state, b = _splitmix64(state)
        u1 = ((a >> np.uint64(11)) + np.uint64(1)) * scale
        u2 = (b >> np.uint64(11)) * scale
        r = std * np.sqrt(-2.0 * np.log(u1))
        x[i] += r * np.cos(2.0 * np.pi * u2)
        if i + 1 < n:
            x[i + 1] += r * np.sin(2.0 * np.pi * u2)
        i += 2


_KERNELS = ("_splitmix64", "_flip3", "_zscore", "_gamma", "_scale_shift", "_noise")
_compiled: dict = {}
_compile_lock = threading.Lock()


def _jit():
    """Compiles the kernels on first use: importing numba costs ~55 MB of resident memory,
    which a loader without augmentations should not pay."""
    if len(_compiled) < len(_KERNELS):
        with _compile_lock:  # prefetch threads may arrive together
            if len(_compiled) < len(_KERNELS):
                import numba

                for name in _KERNELS:  # _splitmix64 first: _noise calls it as a compiled global
                    fn = numba.njit(nogil=True, cache=True)(globals()[name])
                    globals()[name] = fn
                    _compiled[name] = fn
    return _compiled


def flip(x: np.ndarray, axes: Sequence[bool]) -> np.ndarray:
    """``x`` flipped along the axes marked True (a new array)."""
    if x.ndim == 3:
        out = np.empty_like(x)
        _jit()["_flip3"](np.ascontiguousarray(x), out, bool(axes[0]), bool(axes[1]), bool(axes[2]))
        return out
    return np.ascontiguousarray(np.flip(x, axis=tuple(i for i, f in enumerate(axes) if f)))


def zscore_(x: np.ndarray, nonzero: bool = False) -> np.ndarray:
    """In place: zero mean, unit standard deviation (over nonzero voxels only if ``nonzero``)."""
    _jit()["_zscore"](x.reshape(-1), nonzero)
    return x


def gamma_(x: np.ndarray, gamma: float) -> np.ndarray:
    """In place: ``lo + span * ((x - lo) / span) ** gamma`` with lo/span the patch's range."""
    _jit()["_gamma"](x.reshape(-1), float(gamma))
    return x


def scale_shift_(x: np.ndarray, scale: float, shift: float) -> np.ndarray:
    """In place: ``x * scale + shift``."""
    _jit()["_scale_shift"](x.reshape(-1), float(scale), float(shift))
    return x


def gaussian_noise_(x: np.ndarray, std: float, seed: int) -> np.ndarray:
    """In place: adds N(0, std^2) noise drawn from ``seed``."""
    _jit()["_noise"](x.reshape(-1), float(std), int(seed) % (2**32))
    return x


class Augment:
    """Random augmentations for one sample; each is off unless its argument is given.

    Args:
        flip_axes: axes that may be flipped, each with probability ``flip_probability``.
        scale: (low, high) of a uniform intensity scale factor.
        shift: (low, high) of a uniform intensity shift.
        gamma: (low, high) of a log-uniform gamma exponent.
        noise_std: (low, high) of a uniform noise standard deviation.
        zscore: z-score each patch (``"nonzero"``: over nonzero voxels only).
        intensity_keys: names of the arrays intensity transforms apply to (labels are only
            flipped).
    """

    def __init__(self, *, flip_axes: Sequence[int] = (), flip_probability: float = 0.5,
                 scale: tuple[float, float] | None = None, shift: tuple[float, float] | None = None,
                 gamma: tuple[float, float] | None = None, noise_std: tuple[float, float] | None = None,
                 zscore: bool | str = False, intensity_keys: Sequence[str] = ("image",)):
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.flip_probability = float(flip_probability)
        self.scale, self.shift, self.gamma, self.noise_std = scale, shift, gamma, noise_std
        if gamma is not None and min(gamma) <= 0:
            raise ValueError(f"gamma range {gamma} must be positive")
        self.zscore = zscore
        self.intensity_keys = tuple(intensity_keys)

    def __call__(self, sample: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
        """Augments ``sample`` (name -> array without channel axis) with parameters from ``seed``;
        intensity arrays must be floating point and are modified in place."""
        rng = np.random.default_rng(seed)
        if self.flip_axes:
            ndim = next(iter(sample.values())).ndim
            flags = [False] * ndim
            for ax in self.flip_axes:
                flags[ax] = bool(rng.random() < self.flip_probability)
            if any(flags):
                sample = {k: flip(v, flags) for k, v in sample.items()}
        scale = rng.uniform(*self.scale) if self.scale is not None else None
        shift = rng.uniform(*self.shift) if self.shift is not None else None
        gamma = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1])))) \
            if self.gamma is not None else None
        noise = rng.uniform(*self.noise_std) if self.noise_std is not None else None
        noise_seed = int(rng.integers(0, 2**32))
        for key in self.intensity_keys:
            if key not in sample:
                continue
            x = sample[key]
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"Augment: intensity array {key!r} must be floating point, not {x.dtype}")
            if self.zscore:
                zscore_(x, nonzero=self.zscore == "nonzero")
            if gamma is not None:
                gamma_(x, gamma)
            if scale is not None or shift is not None:
                scale_shift_(x, 1.0 if scale is None else scale, 0.0 if shift is None else shift)
            if noise is not None and noise > 0:
                gaussian_noise_(x, noise, noise_seed)
        return sample
