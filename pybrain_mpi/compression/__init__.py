"""Gradient compression: 3LC, precision casting, and the uncompressed baseline.

    from pybrain_mpi.compression import ThreeLC
    codec = ThreeLC(sparsity=1.0)
    state = codec.new_state(grad)          # error-feedback residual, one per tensor
    payload = codec.encode(grad, state)    # bytes-like: bytes(payload), payload.nbytes
    codec.decode(payload, out)             # out = decoded gradient (add=True: out += ...)

Every codec produces a self-describing :class:`Payload` (header with format version, codec,
dtype, element count, scale, body length and checksum) that is validated on decode. The
codecs run in the native core (csrc/compression/); see docs/background.md section 4 for 3LC.
"""

from .codecs import Cast, Compressor, NoCompression, ThreeLC, ThreeLCState
from .payload import Payload

__all__ = ["Cast", "Compressor", "NoCompression", "Payload", "ThreeLC", "ThreeLCState"]
