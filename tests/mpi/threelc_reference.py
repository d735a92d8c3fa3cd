"""The reference of the 3LC suites: 3LC step 2 in float32, the even partitions and the
gradients every rank can regenerate for every rank (mpi_compressed.py, mpi_hierarchical.py)."""

from __future__ import annotations

import numpy as np


def quantize(acc: np.ndarray, sparsity: float) -> tuple[np.ndarray, np.float32]:
    """3LC step 2 in float32: q in {-1,0,1} with ties away from zero; M = max|acc|*s."""
    peak = np.float32(np.abs(acc).max()) if acc.size else np.float32(0)
    scale = np.float32(min(float(peak * np.float32(sparsity)), float(np.finfo(np.float32).max)))
    if scale == 0:
        return np.zeros(acc.shape, np.float32), np.float32(0)
    half = scale / np.float32(2)
    q = np.where(acc >= half, 1, np.where(acc <= -half, -1, 0)).astype(np.float32)
    return q, scale


def quantize_blocks(acc: np.ndarray, sparsity: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-scaled 3LC step 2: `quantize` on each block of `block` elements (block 0: the
    whole array); returns q and each element's scale M_b (float32 arrays of acc's shape)."""
    if block == 0:
        q, scale = quantize(acc, sparsity)
        return q, np.full(acc.shape, scale, np.float32)
    q = np.zeros(acc.shape, np.float32)
    scales = np.zeros(acc.shape, np.float32)
    for b in range(0, acc.size, block):
        q[b:b + block], scales[b:b + block] = quantize(acc[b:b + block], sparsity)
    return q, scales


def partitions(count: int, n: int) -> list[slice]:
    bounds = [(count // n) * p + min(p, count % n) for p in range(n + 1)]
    return [slice(bounds[p], bounds[p + 1]) for p in range(n)]


def gradients(step: int, count: int, n: int) -> list[np.ndarray]:
    out = []
    for rank in range(n):
        rng = np.random.default_rng([step, rank])
        g = rng.standard_normal(count).astype(np.float32)
        g[rng.random(count) < 0.3] *= 10  # heavy tails, like real gradients
        out.append(g)
    return out
