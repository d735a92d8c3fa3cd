"""Gradient compression codecs the trainer hands to DistributedDataParallel.

A codec has ``compress(tensor) -> (payload, ctx)`` and ``decompress(payload, ctx, out)``;
DDP allreduces the payload instead of the gradient bucket and writes the result back into the
bucket. :class:`CastCodec` sends 16-bit floats: half the bytes, about 3 (bf16) or 4 (fp16)
significant decimal digits per gradient value.
"""

from __future__ import annotations

import torch

from ..errors import PbmError

__all__ = ["CastCodec", "build_codec"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CastCodec:
    """Casts gradients to ``fp16``/``bf16`` for the wire and back to the bucket's dtype."""

    def __init__(self, kind: str):
        if kind not in _DTYPES:
            raise ValueError(f"CastCodec: kind must be one of {sorted(_DTYPES)}, got {kind!r}")
        self.kind = kind
        self.dtype = _DTYPES[kind]

    def compress(self, tensor: torch.Tensor):
        """Return ``(tensor cast to 16 bits, its original dtype)``."""
        return tensor.to(self.dtype), tensor.dtype

    def decompress(self, payload: torch.Tensor, ctx, out: torch.Tensor | None = None) -> torch.Tensor:
        """Cast the reduced payload back (into ``out`` when given)."""
        if out is None:
            return payload.to(ctx)
        out.copy_(payload)
        return out

    def state_dict(self) -> dict:
        """Codec state for checkpoints (a cast keeps no residuals)."""
        return {"kind": self.kind}


def build_codec(kind: str):
    """The codec for ``[train.compression] kind`` (``None`` for "none")."""
    if kind == "none":
        return None
    if kind in _DTYPES:
        return CastCodec(kind)
    raise PbmError(f'[train.compression] kind = "{kind}" is not available yet in this version '
                   f'of pybrain-mpi; use "none", "fp16" or "bf16"')
