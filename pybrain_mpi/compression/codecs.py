"""The codecs: :class:`ThreeLC` (with error feedback), :class:`Cast`, :class:`NoCompression`.

Each turns a tensor/array into a :class:`Payload` and back, and describes its own wire for
the allreduce (``wire(state, count, name)``: what the core needs, handed on unread by
:mod:`pybrain_mpi.communication`). The arithmetic runs in the native core with the GIL
released; this module only adapts buffers and holds the per-tensor state, whose residual
buffers the core lays out and owns (``_core.ThreeLCState``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..core.buffers import as_buffer
from ..core.library import _core
from .payload import Payload

__all__ = ["Compressor", "ThreeLC", "ThreeLCState", "Cast", "NoCompression", "HorovodCompression"]

_DType = _core.DType
_Codec = _core.PayloadCodec
_Residual = _core.ResidualKind
_FLOATS = (_DType.float32, _DType.float64, _DType.float16, _DType.bfloat16)
_HALF_AND_FLOAT32 = (_DType.float32, _DType.float16, _DType.bfloat16)
# ThreeLC's default block size B (0 would be one scale per tensor).
DEFAULT_BLOCK = 0


def _label(name: str | None) -> str:
    return f"tensor '{name}'" if name else "tensor"


def _finish_payload(out: np.ndarray, used: int, name: str | None) -> Payload:
    # Keep a tight copy when most of the worst-case buffer went unused (3LC bodies are
    # usually 10-100x smaller than the bound), so payloads do not pin large buffers.
    data = out[:used].copy() if used * 2 < out.size else out[:used]
    return Payload(data, name)


def _encode(wire: Any, buffer: Any, name: str | None) -> tuple[np.ndarray, int]:
    """(output buffer, bytes used) of the payload of ``wire``'s codec for ``buffer``."""
    out = np.empty(_core.payload_max_bytes(wire, buffer.count, buffer.dtype), dtype=np.uint8)
    return out, _core.encode_payload(wire, buffer.address, buffer.count, buffer.dtype, out, name or "")


class Compressor:
    """Base class: a codec that encodes a tensor into a :class:`Payload` and decodes it.

    ``decode(payload, out)`` overwrites ``out`` (a float32/bfloat16/float16 tensor or
    array of the same element count; NoCompression also takes float64); with ``add=True``
    it adds the decoded values to ``out`` instead, the step of a reduction.
    """

    codec_id = _Codec.NoCompression

    def new_state(self, tensor: Any, name: str | None = None) -> Any:
        """Per-tensor state that must persist across steps (None for stateless codecs)."""
        return None

    def encode(self, tensor: Any, state: Any = None, name: str | None = None) -> Payload:
        """Encodes ``tensor``; ``state`` comes from :meth:`new_state` for stateful codecs."""
        raise NotImplementedError

    def _payload_codecs(self) -> tuple:
        """The payload codec ids this codec decodes."""
        return (self.codec_id,)

    def wire(self, state: Any, count: int, name: str | None = None) -> Any:
        """What an allreduce under this codec asks of the core (``_core.Wire``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot compress an allreduce")

    def decode(self, payload: Any, out: Any, *, add: bool = False, name: str | None = None) -> Any:
        """Writes (or with ``add`` adds) the decoded payload into ``out`` and returns ``out``."""
        payload = payload if isinstance(payload, Payload) else Payload(payload, name)
        if payload.codec not in self._payload_codecs():
            raise ValueError(
                f"{_label(name)}: the payload was made by {payload.codec_name}, not "
                f"{self.codec_id.name}; decode it with the codec that encoded it"
            )
        buffer = as_buffer(out, name)
        if buffer.dtype not in self._decode_dtypes():
            raise TypeError(f"{_label(name)}: cannot decode into dtype {out.dtype}; "
                            f"use float32, bfloat16 or float16")
        _core.decode_payload(payload.numpy(), buffer.address, buffer.count, buffer.dtype, bool(add), name or "")
        return buffer.finish()

    def _decode_dtypes(self) -> tuple:
        return _HALF_AND_FLOAT32

    def _input(self, tensor: Any, name: str | None):
        buffer = as_buffer(tensor, name)
        if buffer.dtype not in _HALF_AND_FLOAT32:
            raise TypeError(f"{_label(name)} has dtype {tensor.dtype}; {type(self).__name__} "
                            "encodes float32, bfloat16 or float16 tensors (convert with .float())")
        return buffer


class ThreeLCState:
    """Error-feedback state of one tensor under 3LC.

    ``residual`` holds what was not transmitted yet (accumulated gradient minus what was
    sent); 3LC adds it to the next gradient, so nothing is lost, only delayed. A compressed
    allreduce keeps a second residual for the partition this rank owns, and a hierarchical
    one keeps both for the node slices this rank owns; the core lays those out for the path
    that runs (``owner_residual``, ``hierarchical_residual``, ``hierarchical_owner_residual``:
    None until that path has run). Keep one state per tensor (or bucket) for the whole
    training run; :meth:`state_dict` holds every residual for an exact resume.
    """

    _BUFFERS = tuple(_Residual.__members__)

    def __init__(self, count: int, name: str | None = None):
        self.count = int(count)
        self.name = name
        self.steps = 0
        self._native = _core.ThreeLCState(self.count)

    @property
    def residual(self) -> np.ndarray:
        """First-stage residual of the whole tensor (float32; the flat allreduce and encode)."""
        return self._native.buffer(_Residual.residual)

    @property
    def owner_residual(self) -> np.ndarray | None:
        """Second-stage residual of this rank's partition (flat compressed allreduce)."""
        return self._native.buffer(_Residual.owner_residual)

    @property
    def hierarchical_residual(self) -> np.ndarray | None:
        """First-stage residual of the node slices this rank owns (hierarchical 3LC)."""
        return self._native.buffer(_Residual.hierarchical_residual)

    @property
    def hierarchical_owner_residual(self) -> np.ndarray | None:
        """Second-stage residual of this rank's partitions of those slices (hierarchical 3LC)."""
        return self._native.buffer(_Residual.hierarchical_owner_residual)

    def reset(self) -> None:
        """Drops the accumulated residuals (e.g. after loading a checkpoint)."""
        self._native.reset()
        self.steps = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every residual that exists, by name (``residual`` always)."""
        out = {}
        for key in self._BUFFERS:
            buffer = self._native.buffer(_Residual.__members__[key])
            if buffer is not None:
                out[key] = buffer.copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (same tensor and world); the next
        allreduce checks each residual's length against its path's layout."""
        for key, value in state.items():
            if key not in self._BUFFERS:
                raise KeyError(f"{_label(self.name)}: {key!r} is not a ThreeLC residual ({', '.join(self._BUFFERS)})")
            self._native.load(_Residual.__members__[key], np.asarray(value, dtype=np.float32).reshape(-1))

    def __repr__(self) -> str:
        return f"ThreeLCState({_label(self.name)}, count={self.count}, steps={self.steps})"


class ThreeLC(Compressor):
    """3LC: 3-value quantization with error feedback, quartic and zero-run encoding.

    Per tensor and step (Lim, Andersen, Kaminsky, SysML 2019; docs/background.md section 4):

    1. acc = residual + gradient (float32 error-accumulation buffer);
    2. M = max|acc| * s; q = round(acc / M) in {-1, 0, 1}; residual = acc - q * M;
    3. quartic encoding: 5 trits per byte, sum (q_i + 1) * 3^i, values 0..242
       (121 = five zeros; a last group shorter than 5 is padded with zeros);
    4. zero-run encoding: k = 2..14 consecutive 121-bytes become the byte 241 + k.

    The payload carries M and the bytes; decode yields q * M. ``block`` = B > 0 computes M
    per block of B consecutive elements instead (step 2 per block, the last one may be
    shorter): the body then starts with the ceil(n / B) float32 scales (4 / B extra bytes
    per element, 1/16 byte at B = 64) and the payload's codec is ``ThreeLCBlock``; error
    feedback is the same, per block. ``block=0`` (the default) is one M per tensor (or per
    allreduce partition). Measured (benchmarks/compression_quality.py, README): with Adam,
    ``block=32``/``64`` came within 1-2% of uncompressed held-out R^2 where one M per tensor
    lost 6-12%, but with SGD-momentum on one source small blocks made training unstable, so
    the default stays one M per tensor. ``sparsity`` (s in [1, 2))
    trades detail for size: larger s sends fewer nonzeros (higher ratio). Inputs may be
    float32, bfloat16 or float16; a NaN/Inf in gradient + residual raises PbmError naming
    the tensor and leaves the state unchanged.

    ``per_tensor`` (default True) tells :class:`pybrain_mpi.DistributedDataParallel` to give
    every parameter tensor its own bucket, hence its own scale M and residuals: one M per
    mixed bucket is set by its largest gradients and starves every tensor whose gradients
    are much smaller (benchmarks/compression_quality.py measures the difference).
    """

    codec_id = _Codec.ThreeLC

    def __init__(self, sparsity: float = 1.0, per_tensor: bool = True, block: int = DEFAULT_BLOCK):
        sparsity = float(sparsity)
        if not 1.0 <= sparsity < 2.0:
            raise ValueError(f"ThreeLC sparsity multiplier must be in [1, 2), got {sparsity}: "
                             "1 keeps the most detail, values towards 2 send fewer nonzeros")
        if isinstance(block, bool) or int(block) != block or not 0 <= int(block) < 2**32:
            raise ValueError(f"ThreeLC block must be an integer in [0, 2**32) (0: one scale per tensor), got {block!r}")
        self.sparsity = sparsity
        self.per_tensor = bool(per_tensor)
        self.block = int(block)

    def _payload_codecs(self) -> tuple:
        # The payload names its own format (and block size), so either decodes.
        return (_Codec.ThreeLC, _Codec.ThreeLCBlock)

    def new_state(self, tensor: Any, name: str | None = None) -> ThreeLCState:
        """A zero residual shaped for ``tensor`` (only its element count matters)."""
        count = int(tensor.numel()) if hasattr(tensor, "numel") and callable(tensor.numel) else int(np.size(tensor))
        return ThreeLCState(count, name)

    def _checked(self, state: Any, count: int, name: str | None, what: str) -> Any:
        """The core's wire for ``state``, after checking it belongs to a tensor of ``count``."""
        if not isinstance(state, ThreeLCState):
            raise TypeError(f"{_label(name)}: {what} needs the tensor's state from codec.new_state(tensor), kept "
                            "across steps (it holds the error-feedback residuals)")
        if count != state.count:
            raise ValueError(f"{_label(name)} has {count} elements but its ThreeLC state was made for "
                             f"{state.count}; keep one state per tensor")
        return _core.Wire.threelc(self.sparsity, state._native, self.block)

    def wire(self, state: Any, count: int, name: str | None = None) -> Any:
        """The two-stage 3LC-compressed allreduce with ``state``'s error feedback (one more
        step of the state)."""
        wire = self._checked(state, count, name, "a ThreeLC allreduce")
        state.steps += 1
        return wire

    def encode(self, tensor: Any, state: ThreeLCState | None = None, name: str | None = None) -> Payload:
        """Encodes ``tensor`` + ``state.residual`` and updates the residual in place."""
        name = name or (state.name if state is not None else None)
        if not isinstance(state, ThreeLCState):
            raise TypeError(f"{_label(name)}: ThreeLC.encode needs the tensor's state from "
                            "codec.new_state(tensor); it holds the error-feedback residual")
        buffer = self._input(tensor, name)
        wire = self._checked(state, buffer.count, name, "ThreeLC.encode")
        out, used = _encode(wire, buffer, name)
        state.steps += 1
        return _finish_payload(out, used, name)

    def __repr__(self) -> str:
        return f"ThreeLC(sparsity={self.sparsity}, per_tensor={self.per_tensor}, block={self.block})"


class Cast(Compressor):
    """Plain precision casting: send bfloat16 (``"bf16"``) or float16 (``"fp16"``).

    2x smaller than float32, no state. Values that overflow the 16-bit type, or NaN/Inf
    inputs, raise PbmError naming the tensor instead of sending Inf.
    """

    codec_id = _Codec.Cast
    _WIRE = {"bf16": _DType.bfloat16, "bfloat16": _DType.bfloat16, "fp16": _DType.float16, "float16": _DType.float16}

    def __init__(self, dtype: str = "bf16"):
        try:
            self.wire_dtype = self._WIRE[str(dtype).lower()]
        except KeyError:
            raise ValueError(f"Cast dtype must be 'bf16' or 'fp16', got {dtype!r}") from None
        self.dtype = "bf16" if self.wire_dtype == _DType.bfloat16 else "fp16"

    def wire(self, state: Any, count: int, name: str | None = None) -> Any:
        """16-bit values on the wire, summed as 16-bit (accumulating in float32)."""
        return _core.Wire.half(self.wire_dtype)

    def stage(self, x: Any, name: str | None = None) -> tuple[Any, Callable[[Any], None]]:
        """(the 16-bit copy of ``x`` the allreduce reduces, how its result returns into ``x``)."""
        if isinstance(x, np.ndarray):
            if self.wire_dtype != _DType.float16:
                raise TypeError("numpy arrays can be cast to fp16 only (numpy has no bfloat16); use a torch tensor")
            low = np.ascontiguousarray(x, dtype=np.float16)
            low = low if low is not x else low.copy()

            def restore(result: Any) -> None:
                x[...] = result
        else:
            import torch

            low = x.detach().to(torch.bfloat16 if self.wire_dtype == _DType.bfloat16 else torch.float16)

            def restore(result: Any) -> None:
                x.detach().copy_(result)
        return low, restore

    def encode(self, tensor: Any, state: Any = None, name: str | None = None) -> Payload:
        """Rounds ``tensor`` to the wire dtype (nearest even)."""
        buffer = self._input(tensor, name)
        out, used = _encode(_core.Wire.half(self.wire_dtype), buffer, name)
        return Payload(out[:used], name)

    def __repr__(self) -> str:
        return f"Cast({self.dtype!r})"


class NoCompression(Compressor):
    """The baseline: the tensor's own bytes behind the same validated header."""

    codec_id = _Codec.NoCompression

    def wire(self, state: Any, count: int, name: str | None = None) -> Any:
        """The buffer's own values (no compression)."""
        return _core.Wire.plain()

    def encode(self, tensor: Any, state: Any = None, name: str | None = None) -> Payload:
        """Copies ``tensor`` (float32, float64, bfloat16 or float16) into a payload."""
        buffer = as_buffer(tensor, name)
        if buffer.dtype not in _FLOATS:
            raise TypeError(f"{_label(name)} has dtype {tensor.dtype}; NoCompression takes "
                            "floating-point tensors")
        out, used = _encode(_core.Wire.plain(), buffer, name)
        return Payload(out[:used], name)

    def _decode_dtypes(self) -> tuple:
        return _FLOATS

    def __repr__(self) -> str:
        return "NoCompression()"


class HorovodCompression:
    """An object with Horovod's ``compress(tensor) -> (tensor, ctx)`` and
    ``decompress(tensor, ctx) -> tensor`` (e.g. ``pybrain_mpi.horovod.Compression.fp16``)
    as an allreduce codec: the compressed tensor is reduced as it is (plain wire) and
    decompressed into the caller's tensor when the allreduce finishes."""

    def __init__(self, compressor: Any):
        if not (callable(getattr(compressor, "compress", None)) and callable(getattr(compressor, "decompress", None))):
            raise TypeError("compression must be a pybrain_mpi.compression codec or have Horovod's "
                            f"compress()/decompress(), got {type(compressor).__name__}")
        self.compressor = compressor

    def wire(self, state: Any, count: int, name: str | None = None) -> Any:
        return _core.Wire.plain()

    def stage(self, x: Any, name: str | None = None) -> tuple[Any, Callable[[Any], None]]:
        compressed, ctx = self.compressor.compress(x)

        def restore(result: Any) -> None:
            x.copy_(self.compressor.decompress(result, ctx))

        return compressed, restore

    def __repr__(self) -> str:
        return f"HorovodCompression({self.compressor!r})"
