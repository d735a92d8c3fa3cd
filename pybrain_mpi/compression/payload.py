"""Self-describing compressed payloads (format: csrc/compression/payload.h)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.library import _core

__all__ = ["Payload", "HEADER_BYTES"]

HEADER_BYTES = _core.PAYLOAD_HEADER_BYTES


def _as_uint8(data: Any) -> np.ndarray:
    """A contiguous, 8-byte-aligned uint8 view (or copy) of any bytes-like object."""
    if isinstance(data, Payload):
        return data.numpy()
    array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if array.dtype != np.uint8 or array.ndim != 1:
        array = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    if not array.flags.c_contiguous or array.ctypes.data % 8 != 0:
        array = np.array(array, dtype=np.uint8, copy=True)
    return array


class Payload:
    """One encoded tensor: a 32-byte header followed by the codec's body.

    Bytes-like: ``bytes(payload)``, ``len(payload)``, ``payload.nbytes`` and
    ``memoryview(payload.numpy())``. Send it with any transport and rebuild it on the other
    side with ``Payload(received_bytes)``; construction validates the header, the length
    and the checksum, so a truncated or corrupted payload raises :class:`PbmError` here.
    """

    __slots__ = ("_data", "codec", "tensor_dtype", "wire_dtype", "count", "scale", "block", "body_nbytes")

    def __init__(self, data: Any, name: str | None = None):
        array = _as_uint8(data)
        header = _core.read_payload_header(array, name or "")
        self._data = array
        self.codec = header["codec"]  # the core's PayloadCodec
        self.tensor_dtype = header["dtype"]  # the core's DType of the encoded tensor
        self.wire_dtype = header["wire_dtype"]
        self.count: int = header["count"]
        self.scale: float = header["scale"]  # ThreeLC's M (0 for ThreeLCBlock: its scales lead the body)
        self.block: int = header["block"]  # ThreeLCBlock's block size B (else 0)
        self.body_nbytes: int = header["body_bytes"]

    @property
    def nbytes(self) -> int:
        """Total size in bytes, header included (what goes over the wire)."""
        return int(self._data.size)

    @property
    def codec_name(self) -> str:
        """``"ThreeLC"``, ``"ThreeLCBlock"``, ``"Cast"`` or ``"NoCompression"``."""
        return self.codec.name

    @property
    def dtype(self) -> str:
        """Name of the dtype of the tensor that was encoded."""
        return self.tensor_dtype.name

    @property
    def compression_ratio(self) -> float:
        """Size of the original tensor over the payload size (header included)."""
        return self.count * self.tensor_dtype.itemsize / self.nbytes

    def numpy(self) -> np.ndarray:
        """The payload bytes as a read-only-by-convention uint8 array (no copy)."""
        return self._data

    def __bytes__(self) -> bytes:
        return self._data.tobytes()

    def __len__(self) -> int:
        return self.nbytes

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Payload):
            return np.array_equal(self._data, other._data)
        return NotImplemented

    def __repr__(self) -> str:
        scale = f", scale={self.scale:.6g}" if self.codec == _core.PayloadCodec.ThreeLC else ""
        scale = f", block={self.block}" if self.codec == _core.PayloadCodec.ThreeLCBlock else scale
        return (f"Payload({self.codec_name}, {self.dtype}[{self.count}], {self.nbytes} bytes, "
                f"{self.compression_ratio:.1f}x{scale})")
