"""The codecs: :class:`ThreeLC` (with error feedback), :class:`Cast`, :class:`NoCompression`.

Each turns a tensor/array into a :class:`Payload` and back. The arithmetic runs in the native
core with the GIL released; this module only adapts buffers and holds the per-tensor state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._native import _core
from ..communication.buffers import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, as_buffer
from .payload import CAST, CODEC_NAMES, RAW, THREELC, Payload

__all__ = ["Compressor", "ThreeLC", "ThreeLCState", "Cast", "NoCompression"]

_FLOATS = (FLOAT32, FLOAT64, FLOAT16, BFLOAT16)


def _label(name: str | None) -> str:
    return f"tensor '{name}'" if name else "tensor"


def _finish_payload(out: np.ndarray, used: int, name: str | None) -> Payload:
    # Keep a tight copy when most of the worst-case buffer went unused (3LC bodies are
    # usually 10-100x smaller than the bound), so payloads do not pin large buffers.
    data = out[:used].copy() if used * 2 < out.size else out[:used]
    return Payload(data, name)


class Compressor:
    """Base class: a codec that encodes a tensor into a :class:`Payload` and decodes it.

    ``decode(payload, out)`` overwrites ``out`` (a float32/bfloat16/float16 tensor or
    array of the same element count; NoCompression also takes float64); with ``add=True``
    it adds the decoded values to ``out`` instead, the step of a reduction.
    """

    codec_id = RAW

    def new_state(self, tensor: Any, name: str | None = None) -> Any:
        """Per-tensor state that must persist across steps (None for stateless codecs)."""
        return None

    def encode(self, tensor: Any, state: Any = None, name: str | None = None) -> Payload:
        """Encodes ``tensor``; ``state`` comes from :meth:`new_state` for stateful codecs."""
        raise NotImplementedError

    def decode(self, payload: Any, out: Any, *, add: bool = False, name: str | None = None) -> Any:
        """Writes (or with ``add`` adds) the decoded payload into ``out`` and returns ``out``."""
        payload = payload if isinstance(payload, Payload) else Payload(payload, name)
        if payload.codec != self.codec_id:
            raise ValueError(
                f"{_label(name)}: the payload was made by {payload.codec_name}, not "
                f"{CODEC_NAMES[self.codec_id]}; decode it with the codec that encoded it"
            )
        buffer = as_buffer(out, name)
        if buffer.dtype_code not in self._decode_dtypes():
            raise TypeError(f"{_label(name)}: cannot decode into dtype {out.dtype}; "
                            f"use float32, bfloat16 or float16")
        data = payload.numpy()
        _core.decode_payload(data.ctypes.data, data.size, buffer.address, buffer.count,
                             buffer.dtype_code, bool(add), name or "")
        return buffer.finish()

    def _decode_dtypes(self) -> tuple[int, ...]:
        return (FLOAT32, FLOAT16, BFLOAT16)

    def _input(self, tensor: Any, name: str | None):
        buffer = as_buffer(tensor, name)
        if buffer.dtype_code not in (FLOAT32, FLOAT16, BFLOAT16):
            raise TypeError(f"{_label(name)} has dtype {tensor.dtype}; {type(self).__name__} "
                            "encodes float32, bfloat16 or float16 tensors (convert with .float())")
        return buffer


class ThreeLCState:
    """Error-feedback state of one tensor under 3LC: the float32 residual buffer.

    The residual holds what was not transmitted yet (accumulated gradient minus what was
    sent); 3LC adds it to the next gradient, so nothing is lost, only delayed. Keep one
    state per tensor (or bucket) for the whole training run.
    """

    def __init__(self, count: int, name: str | None = None):
        self.count = int(count)
        self.name = name
        self.residual = np.zeros(self.count, dtype=np.float32)
        self.steps = 0

    def reset(self) -> None:
        """Drops the accumulated residual (e.g. after loading a checkpoint)."""
        self.residual[...] = 0
        self.steps = 0
        self.owner_residual = None
        self.hierarchical_residual = None
        self.hierarchical_owner_residual = None

    # The compressed allreduce keeps a second residual for the partition this rank owns
    # (its size depends on the number of ranks and this rank's index).
    owner_residual: np.ndarray | None = None
    owner_layout: tuple[int, int] | None = None

    def owner_residual_for(self, world_size: int, rank: int) -> np.ndarray:
        """The second-stage residual of this rank's partition (created on first use)."""
        layout = (world_size, rank)
        if self.owner_residual is None:
            count = self.count // world_size + (1 if rank < self.count % world_size else 0)
            self.owner_residual = np.zeros(count, dtype=np.float32)
            self.owner_layout = layout
        elif self.owner_layout != layout:
            raise ValueError(f"{_label(self.name)}: this ThreeLC state belongs to rank "
                             f"{self.owner_layout[1]} of {self.owner_layout[0]}, not rank {rank} of "
                             f"{world_size}; make a new state after changing the world")
        return self.owner_residual

    # A compressed hierarchical allreduce compresses only the slices this rank owns after
    # the node stage; its two residuals are sized for them (by the engine's layout).
    hierarchical_residual: np.ndarray | None = None
    hierarchical_owner_residual: np.ndarray | None = None

    def hierarchical_residuals_for(self, first: int, second: int) -> tuple[np.ndarray, np.ndarray]:
        """(first-stage, second-stage) residuals of a compressed hierarchical allreduce, made
        on first use with the element counts the engine computed for this rank's slices."""
        if self.hierarchical_residual is None:
            self.hierarchical_residual = np.zeros(int(first), dtype=np.float32)
            self.hierarchical_owner_residual = np.zeros(int(second), dtype=np.float32)
        elif (self.hierarchical_residual.size, self.hierarchical_owner_residual.size) != (first, second):
            raise ValueError(f"{_label(self.name)}: this ThreeLC state was laid out for another "
                             "topology; make a new state after changing the world")
        return self.hierarchical_residual, self.hierarchical_owner_residual

    def __repr__(self) -> str:
        return f"ThreeLCState({_label(self.name)}, count={self.count}, steps={self.steps})"


class ThreeLC(Compressor):
    """3LC: 3-value quantization with error feedback, quartic and zero-run encoding.

    Per tensor and step (Lim, Andersen, Kaminsky, SysML 2019; REFERENCE.md section 4):

    1. acc = residual + gradient (float32 error-accumulation buffer);
    2. M = max|acc| * s; q = round(acc / M) in {-1, 0, 1}; residual = acc - q * M;
    3. quartic encoding: 5 trits per byte, sum (q_i + 1) * 3^i, values 0..242
       (121 = five zeros; a last group shorter than 5 is padded with zeros);
    4. zero-run encoding: k = 2..14 consecutive 121-bytes become the byte 241 + k.

    The payload carries M and the bytes; decode yields q * M. ``sparsity`` (s in [1, 2))
    trades detail for size: larger s sends fewer nonzeros (higher ratio). Inputs may be
    float32, bfloat16 or float16; a NaN/Inf in gradient + residual raises PbmError naming
    the tensor and leaves the state unchanged.
    """

    codec_id = THREELC

    def __init__(self, sparsity: float = 1.0):
        sparsity = float(sparsity)
        if not 1.0 <= sparsity < 2.0:
            raise ValueError(f"ThreeLC sparsity multiplier must be in [1, 2), got {sparsity}: "
                             "1 keeps the most detail, values towards 2 send fewer nonzeros")
        self.sparsity = sparsity

    def new_state(self, tensor: Any, name: str | None = None) -> ThreeLCState:
        """A zero residual shaped for ``tensor`` (only its element count matters)."""
        count = int(tensor.numel()) if hasattr(tensor, "numel") and callable(tensor.numel) else int(np.size(tensor))
        return ThreeLCState(count, name)

    def encode(self, tensor: Any, state: ThreeLCState | None = None, name: str | None = None) -> Payload:
        """Encodes ``tensor`` + ``state.residual`` and updates the residual in place."""
        name = name or (state.name if state is not None else None)
        if not isinstance(state, ThreeLCState):
            raise TypeError(f"{_label(name)}: ThreeLC.encode needs the tensor's state from "
                            "codec.new_state(tensor); it holds the error-feedback residual")
        buffer = self._input(tensor, name)
        if buffer.count != state.count:
            raise ValueError(f"{_label(name)} has {buffer.count} elements but its ThreeLC state "
                             f"was made for {state.count}; use one state per tensor")
        capacity = _core.payload_max_bytes(THREELC, buffer.count, buffer.dtype_code, 0)
        out = np.empty(capacity, dtype=np.uint8)
        used = _core.threelc_encode_payload(buffer.address, buffer.dtype_code, buffer.count,
                                            state.residual.ctypes.data, self.sparsity,
                                            out.ctypes.data, capacity, name or "")
        state.steps += 1
        return _finish_payload(out, used, name)

    def __repr__(self) -> str:
        return f"ThreeLC(sparsity={self.sparsity})"


class Cast(Compressor):
    """Plain precision casting: send bfloat16 (``"bf16"``) or float16 (``"fp16"``).

    2x smaller than float32, no state. Values that overflow the 16-bit type, or NaN/Inf
    inputs, raise PbmError naming the tensor instead of sending Inf.
    """

    codec_id = CAST
    _WIRE = {"bf16": BFLOAT16, "bfloat16": BFLOAT16, "fp16": FLOAT16, "float16": FLOAT16}

    def __init__(self, dtype: str = "bf16"):
        try:
            self.wire_dtype_code = self._WIRE[str(dtype).lower()]
        except KeyError:
            raise ValueError(f"Cast dtype must be 'bf16' or 'fp16', got {dtype!r}") from None
        self.dtype = "bf16" if self.wire_dtype_code == BFLOAT16 else "fp16"

    def encode(self, tensor: Any, state: Any = None, name: str | None = None) -> Payload:
        """Rounds ``tensor`` to the wire dtype (nearest even)."""
        buffer = self._input(tensor, name)
        capacity = _core.payload_max_bytes(CAST, buffer.count, buffer.dtype_code, self.wire_dtype_code)
        out = np.empty(capacity, dtype=np.uint8)
        used = _core.cast_encode_payload(buffer.address, buffer.dtype_code, buffer.count,
                                         self.wire_dtype_code, out.ctypes.data, capacity, name or "")
        return Payload(out[:used], name)

    def __repr__(self) -> str:
        return f"Cast({self.dtype!r})"


class NoCompression(Compressor):
    """The baseline: the tensor's own bytes behind the same validated header."""

    codec_id = RAW

    def encode(self, tensor: Any, state: Any = None, name: str | None = None) -> Payload:
        """Copies ``tensor`` (float32, float64, bfloat16 or float16) into a payload."""
        buffer = as_buffer(tensor, name)
        if buffer.dtype_code not in _FLOATS:
            raise TypeError(f"{_label(name)} has dtype {tensor.dtype}; NoCompression takes "
                            "floating-point tensors")
        capacity = _core.payload_max_bytes(RAW, buffer.count, buffer.dtype_code, buffer.dtype_code)
        out = np.empty(capacity, dtype=np.uint8)
        used = _core.raw_encode_payload(buffer.address, buffer.dtype_code, buffer.count,
                                        out.ctypes.data, capacity, name or "")
        return Payload(out[:used], name)

    def _decode_dtypes(self) -> tuple[int, ...]:
        return _FLOATS

    def __repr__(self) -> str:
        return "NoCompression()"
