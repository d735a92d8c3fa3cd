"""The gradient compression the trainer hands to DistributedDataParallel.

``[train.compression] kind`` maps to a codec of :mod:`pybrain_mpi.compression`: "fp16" and
"bf16" send 16-bit values (``Cast``), "3lc" the two-stage 3LC allreduce with error feedback
(``ThreeLC(sparsity, block=block)``), whose per-bucket residuals DDP keeps and checkpoints carry.
"""

from __future__ import annotations

from ..compression import Cast, ThreeLC
from ..errors import PbmError

__all__ = ["build_codec"]


def build_codec(kind: str, sparsity: float = 1.0, block: int = 0):
    """The codec for ``[train.compression]`` (``None`` for "none")."""
    if kind == "none":
        return None
    if kind in ("fp16", "bf16"):
        return Cast(kind)
    if kind == "3lc":
        return ThreeLC(sparsity, block=block)
    raise PbmError(f'[train.compression] kind = "{kind}" is unknown; use "none", "fp16", "bf16" or "3lc"')
