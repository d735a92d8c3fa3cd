"""Self-describing compressed payloads (format: csrc/compression/payload.h)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._native import _core
from ..communication.buffers import BFLOAT16, FLOAT16, FLOAT32, FLOAT64

__all__ = ["Payload", "CODEC_NAMES", "HEADER_BYTES"]

HEADER_BYTES = _core.PAYLOAD_HEADER_BYTES
RAW, THREELC, CAST = 0, 1, 2
CODEC_NAMES = {RAW: "NoCompression", THREELC: "ThreeLC", CAST: "Cast"}
DTYPE_NAMES = {FLOAT32: "float32", FLOAT64: "float64", FLOAT16: "float16", BFLOAT16: "bfloat16"}
_ITEMSIZE = {FLOAT32: 4, FLOAT64: 8, FLOAT16: 2, BFLOAT16: 2}


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

    __slots__ = ("_data", "codec", "dtype_code", "wire_dtype_code", "count", "scale", "body_nbytes")

    def __init__(self, data: Any, name: str | None = None):
        array = _as_uint8(data)
        header = _core.read_payload_header(array.ctypes.data, array.size, name or "")
        self._data = array
        self.codec: int = header["codec"]
        self.dtype_code: int = header["dtype"]
        self.wire_dtype_code: int = header["wire_dtype"]
        self.count: int = header["count"]
        self.scale: float = header["scale"]
        self.body_nbytes: int = header["body_bytes"]

    @property
    def nbytes(self) -> int:
        """Total size in bytes, header included (what goes over the wire)."""
        return int(self._data.size)

    @property
    def codec_name(self) -> str:
        """``"ThreeLC"``, ``"Cast"`` or ``"NoCompression"``."""
        return CODEC_NAMES[self.codec]

    @property
    def dtype(self) -> str:
        """Name of the dtype of the tensor that was encoded."""
        return DTYPE_NAMES[self.dtype_code]

    @property
    def compression_ratio(self) -> float:
        """Size of the original tensor over the payload size (header included)."""
        return self.count * _ITEMSIZE[self.dtype_code] / self.nbytes

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
        scale = f", scale={self.scale:.6g}" if self.codec == THREELC else ""
        return (f"Payload({self.codec_name}, {self.dtype}[{self.count}], {self.nbytes} bytes, "
                f"{self.compression_ratio:.1f}x{scale})")
