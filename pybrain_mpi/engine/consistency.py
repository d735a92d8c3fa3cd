"""Cross-rank checks run when a model is wrapped: every rank must hold the same parameters."""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import torch

from ..communication import context
from ..communication.collectives import allreduce_
from ..communication.objects import allgather_objects
from ..errors import CollectiveMismatch


def _signature(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple, str]]:
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in named]


def check_same_parameters(named_tensors: list[tuple[str, torch.Tensor]], what: str = "parameter",
                          group=None) -> None:
    """Raises CollectiveMismatch on every rank unless all ranks hold the same names, shapes and
    dtypes, in the same order.

    A cheap 8-byte digest is compared first (one small allreduce); only on a mismatch are the
    full lists gathered to name the first differing entry and the ranks that differ.
    ``group`` (a :class:`pybrain_mpi.parallel.Group`): compare among its ranks only.
    """
    ctx = context.current() if group is None else group
    if ctx.size == 1:
        return
    signature = _signature(named_tensors)
    digest = int.from_bytes(hashlib.blake2b(repr(signature).encode(), digest_size=7).digest(), "little")
    # Through the engine, so a rank that never wraps its model (or is stopped) is named in a
    # CollectiveTimeout after PBM_TIMEOUT_S instead of freezing the others.
    bounds = np.array([digest, -digest], dtype=np.int64)
    allreduce_(bounds, op="min", name=f"{what} check (digest)", group=group)
    low, high = int(bounds[0]), -int(bounds[1])
    if low == high:
        return
    signatures = allgather_objects(signature, name=f"{what} check (signatures)", group=group)
    reference = signatures[0]
    differing = [r for r, s in enumerate(signatures) if s != reference]
    first_index = None
    for r in differing:
        s = signatures[r]
        for i in range(max(len(s), len(reference))):
            a = reference[i] if i < len(reference) else None
            b = s[i] if i < len(s) else None
            if a != b:
                first_index = i if first_index is None else min(first_index, i)
                break

    def entry(r: int) -> str:
        s = signatures[r]
        if first_index is None or first_index >= len(s):
            return f"(no {what} #{first_index}; {len(s)} in total)"
        name, shape, dtype = s[first_index]
        return f"{name} shape={list(shape)} dtype={dtype}"

    lines = [f"rank {r}: {entry(r)}" for r in [0, *differing]]
    raise CollectiveMismatch(
        f"rank {ctx.rank}: ranks hold different models: {what} #{first_index} differs on rank(s) "
        f"{', '.join(map(str, differing))} (compared with rank 0):\n  " + "\n  ".join(lines)
        + "\nBuild the same model on every rank before wrapping it."
    )
