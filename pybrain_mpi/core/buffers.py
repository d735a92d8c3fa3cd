"""The one place where torch tensors and numpy arrays become (address, count, dtype) buffers.

The native core never sees framework objects. A non-contiguous input is gathered into a
contiguous copy, and in-place operations scatter the result back when they finish. A codec
may stand a tensor of its own in for the caller's (a 16-bit copy, a Horovod-style
compressed tensor): :func:`staged_buffer` reduces that one and hands the result back.

Element types are the core's ``DType`` enum (exported by ``csrc/bindings.cpp``); the tables
from torch and numpy dtypes are built from it on first use, so importing this module loads
nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

__all__ = ["Buffer", "as_buffer", "dtype_of", "element_count", "span", "staged_buffer"]

_SUPPORTED = "float32, float64, float16, bfloat16 (torch), int32, int64"

_NUMPY_DTYPES: dict | None = None
_TORCH_DTYPES: dict | None = None


def _dtype_enum() -> Any:
    from .library import _core

    return _core.DType


def __getattr__(name: str) -> Any:
    # FLOAT32, FLOAT64, ...: the core's DType members under their upper-case names.
    members = _dtype_enum().__members__ if name.isupper() else {}
    if name.lower() in members:
        return members[name.lower()]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _numpy_dtypes() -> dict:
    global _NUMPY_DTYPES
    if _NUMPY_DTYPES is None:
        # numpy has every core dtype but bfloat16, under the same names.
        _NUMPY_DTYPES = {np.dtype(name): member for name, member in _dtype_enum().__members__.items()
                         if name != "bfloat16"}
    return _NUMPY_DTYPES


def _torch_dtypes() -> dict:
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch

        _TORCH_DTYPES = {getattr(torch, name): member for name, member in _dtype_enum().__members__.items()}
    return _TORCH_DTYPES


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _label(name: str | None) -> str:
    return f"tensor '{name}'" if name else "tensor"


class Buffer:
    """A contiguous view of a tensor or array, with what is needed to finish in place."""

    __slots__ = ("original", "work", "address", "count", "dtype", "copy_back", "restore")

    def __init__(self, original: Any, work: Any, address: int, count: int, dtype: Any, copy_back: bool,
                 restore: Callable[[Any], None] | None = None):
        self.original = original
        self.work = work  # contiguous tensor/array the core reads and writes
        self.address = address
        self.count = count
        self.dtype = dtype  # the core's DType
        self.copy_back = copy_back  # work is a copy: write it into original when done
        self.restore = restore  # staged buffers: how work's result goes back into original

    def finish(self) -> Any:
        """Writes the result into the original object (if it was copied) and returns it."""
        if self.restore is not None:
            self.restore(self.work)
        elif self.copy_back:
            if _is_torch(self.original):
                self.original.detach().copy_(self.work)
            else:
                self.original[...] = self.work
        return self.original


def dtype_of(x: Any, name: str | None = None) -> Any:
    """The core's DType of a tensor/array; TypeError naming it when unsupported."""
    if _is_torch(x):
        dtype = _torch_dtypes().get(x.dtype)
    elif isinstance(x, np.ndarray):
        dtype = _numpy_dtypes().get(x.dtype)
    else:
        raise TypeError(
            f"{_label(name)}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
        )
    if dtype is None:
        raise TypeError(f"{_label(name)} has dtype {x.dtype}; supported: {_SUPPORTED}")
    return dtype


def element_count(x: Any, name: str | None = None) -> int:
    """Number of elements of a supported tensor/array (TypeError like :func:`dtype_of`)."""
    dtype_of(x, name)
    return int(x.numel()) if _is_torch(x) else int(x.size)


def as_buffer(x: Any, name: str | None = None, *, copy: bool = False) -> Buffer:
    """Adapts a tensor/array for the core.

    With ``copy`` the core works on a fresh contiguous copy (out-of-place operations) and
    the original is left untouched; otherwise it works in place, through a temporary
    contiguous copy only when ``x`` is not contiguous (or not writeable).
    """
    dtype = dtype_of(x, name)
    if isinstance(x, np.ndarray):
        if not copy and x.flags.c_contiguous and x.flags.writeable:
            return Buffer(x, x, x.ctypes.data, x.size, dtype, False)
        if not copy and not x.flags.writeable:
            raise ValueError(f"{_label(name)} is a read-only array and cannot be reduced in place; "
                             "use the out-of-place function (e.g. pbm.allreduce)")
        work = np.array(x, order="C", copy=True)
        return Buffer(x, work, work.ctypes.data, work.size, dtype, not copy)
    if not x.is_cpu:
        raise TypeError(f"{_label(name)} lives on {x.device}; pybrain-mpi collectives take CPU tensors")
    # data_ptr() of a tensor that requires grad is fine: the core writes through the
    # pointer, outside autograd, exactly like an in-place op under torch.no_grad().
    if not copy and x.is_contiguous():
        return Buffer(x, x, x.data_ptr(), x.numel(), dtype, False)
    work = x.detach().clone(memory_format=sys.modules["torch"].contiguous_format)
    return Buffer(x, work, work.data_ptr(), work.numel(), dtype, not copy)


def staged_buffer(x: Any, work: Any, restore: Callable[[Any], None], name: str | None = None) -> Buffer:
    """A buffer over ``work``, a codec's stand-in for ``x``; ``finish()`` calls
    ``restore(result)`` (which writes the reduced values into ``x``) and returns ``x``."""
    inner = as_buffer(work, name)
    return Buffer(x, inner.work, inner.address, inner.count, inner.dtype, False,
                  lambda result: restore(inner.finish()))


def span(x: Any, begin: int, count: int, name: str | None = None) -> int:
    """Address of elements ``[begin, begin + count)`` of a contiguous CPU tensor or array, for
    the kernels that update a flat buffer piece by piece (fused optimizers, loss scaling).

    The tensor itself is not copied: a non-contiguous one, or a range outside it, is refused
    with a message naming the tensor, since the kernel writes through the address.
    """
    if _is_torch(x):
        if not (x.is_cpu and x.is_contiguous()):
            raise TypeError(f"{_label(name)} must be a contiguous CPU tensor, got one on {x.device}"
                            f"{'' if x.is_contiguous() else ' that is not contiguous'}")
        total, base, itemsize = x.numel(), x.data_ptr(), x.element_size()
    elif isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise TypeError(f"{_label(name)} must be a C-contiguous array")
        total, base, itemsize = x.size, x.ctypes.data, x.itemsize
    else:
        raise TypeError(f"{_label(name)}: expected a torch.Tensor or numpy.ndarray, got "
                        f"{type(x).__name__}")
    if not (0 <= begin and 0 <= count and begin + count <= total):
        raise IndexError(f"{_label(name)}: elements [{begin}, {begin + count}) outside its {total}")
    return base + itemsize * begin
