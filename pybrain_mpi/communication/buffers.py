"""The one place where torch tensors and numpy arrays become (address, count, dtype) buffers.

The native core never sees framework objects. A non-contiguous input is gathered into a
contiguous copy, and in-place operations scatter the result back when they finish.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# Codes of csrc/common/dtype.h (enum class DType).
FLOAT32, FLOAT64, FLOAT16, BFLOAT16, INT32, INT64 = range(6)

_NUMPY_CODES = {
    np.dtype(np.float32): FLOAT32,
    np.dtype(np.float64): FLOAT64,
    np.dtype(np.float16): FLOAT16,
    np.dtype(np.int32): INT32,
    np.dtype(np.int64): INT64,
}
_SUPPORTED = "float32, float64, float16, bfloat16 (torch), int32, int64"


_TORCH_CODES: dict | None = None


def _torch_codes() -> dict:
    global _TORCH_CODES
    if _TORCH_CODES is None:
        import torch

        _TORCH_CODES = {
            torch.float32: FLOAT32,
            torch.float64: FLOAT64,
            torch.float16: FLOAT16,
            torch.bfloat16: BFLOAT16,
            torch.int32: INT32,
            torch.int64: INT64,
        }
    return _TORCH_CODES


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _label(name: str | None) -> str:
    return f"tensor '{name}'" if name else "tensor"


class Buffer:
    """A contiguous view of a tensor or array, with what is needed to finish in place."""

    __slots__ = ("original", "work", "address", "count", "dtype_code", "copy_back")

    def __init__(self, original: Any, work: Any, address: int, count: int, dtype_code: int,
                 copy_back: bool):
        self.original = original
        self.work = work  # contiguous tensor/array the core reads and writes
        self.address = address
        self.count = count
        self.dtype_code = dtype_code
        self.copy_back = copy_back  # work is a copy: write it into original when done

    def finish(self) -> Any:
        """Writes the result into the original object (if it was copied) and returns it."""
        if self.copy_back:
            if _is_torch(self.original):
                self.original.detach().copy_(self.work)
            else:
                self.original[...] = self.work
        return self.original


def dtype_code(x: Any, name: str | None = None) -> int:
    """The core's dtype code for a tensor/array; TypeError naming it when unsupported."""
    if _is_torch(x):
        code = _torch_codes().get(x.dtype)
    elif isinstance(x, np.ndarray):
        code = _NUMPY_CODES.get(x.dtype)
    else:
        raise TypeError(
            f"{_label(name)}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
        )
    if code is None:
        raise TypeError(f"{_label(name)} has dtype {x.dtype}; supported: {_SUPPORTED}")
    return code


def as_buffer(x: Any, name: str | None = None, *, copy: bool = False) -> Buffer:
    """Adapts a tensor/array for the core.

    With ``copy`` the core works on a fresh contiguous copy (out-of-place operations) and
    the original is left untouched; otherwise it works in place, through a temporary
    contiguous copy only when ``x`` is not contiguous (or not writeable).
    """
    code = dtype_code(x, name)
    if isinstance(x, np.ndarray):
        if not copy and x.flags.c_contiguous and x.flags.writeable:
            return Buffer(x, x, x.ctypes.data, x.size, code, False)
        if not copy and not x.flags.writeable:
            raise ValueError(f"{_label(name)} is a read-only array and cannot be reduced in place; "
                             "use the out-of-place function (e.g. pbm.allreduce)")
        work = np.array(x, order="C", copy=True)
        return Buffer(x, work, work.ctypes.data, work.size, code, not copy)
    if not x.is_cpu:
        raise TypeError(f"{_label(name)} lives on {x.device}; pybrain-mpi collectives take CPU tensors")
    # data_ptr() of a tensor that requires grad is fine: the core writes through the
    # pointer, outside autograd, exactly like an in-place op under torch.no_grad().
    if not copy and x.is_contiguous():
        return Buffer(x, x, x.data_ptr(), x.numel(), code, False)
    work = x.detach().clone(memory_format=sys.modules["torch"].contiguous_format)
    return Buffer(x, work, work.data_ptr(), work.numel(), code, not copy)
