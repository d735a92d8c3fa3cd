"""Zero-copy buffers for the shared-memory allreduce: arrays that live in MPI shared memory.

An allreduce with ``algorithm="shm"`` (or ``"hierarchical"``/``"auto"``) on an ordinary
tensor copies the slices its node peers reduce into a shared arena first. A tensor made by
:func:`shared_empty` already lives in this rank's segment of a node shared-memory window that
every rank of the node has mapped, so the node stage reads peers' buffers in place: each
rank reduces its slice straight from all node ranks' tensors and copies the other slices
from their owners, one pass over memory each.

    grad = pbm.shared_empty((1 << 24,), "float32")   # collective over the node
    grad.copy_(local_gradient)
    pbm.allreduce_(grad, op="avg", algorithm="shm")  # zero-copy node stage

Zero-copy applies when every rank of the node passes the buffer made by the same
:func:`shared_empty` call (same shape, same order of calls); otherwise the allreduce falls
back to the copying path, with the same result.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from . import context

__all__ = ["shared_empty", "shared_reset"]

_NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
          "int32": np.int32, "int64": np.int64}


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    table = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "int32": torch.int32, "int64": torch.int64}
    if name not in table:
        raise TypeError(f"shared_empty: unsupported dtype {dtype!r}; use one of {sorted(table)}")
    return table[name]


def shared_empty(shape: Any, dtype: Any = "float32", *, torch: bool = True) -> Any:
    """An uninitialized tensor (or numpy array) in this rank's shared-memory segment.

    Collective over the ranks of this node (like :func:`pybrain_mpi.init`): every node rank
    must call it with the same shape and dtype, in the same order, so that equal buffers sit
    at equal offsets on every rank; that is what lets an allreduce of the tensor skip copying
    it (zero-copy node stage). A buffer allocated differently on some rank still reduces
    correctly, through the copying path.

    Args:
        shape: int or tuple of ints.
        dtype: ``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"`` (torch only),
            ``"int32"``, ``"int64"``, or the matching numpy/torch dtype.
        torch: return a ``torch.Tensor`` (default) or a ``numpy.ndarray``.

    The memory stays valid until :func:`shared_reset` or :func:`pybrain_mpi.shutdown`;
    using the tensor after either is undefined (it aliases newer buffers; after shutdown its
    pages are handed back to the system, so it reads zeros, and it is unmapped at exit). Memory comes from windows that double in size, so many small calls are cheap.
    """
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if any(d < 0 for d in shape):
        raise ValueError(f"shared_empty: negative dimension in shape {shape}")
    if torch:
        import torch as _torch

        tdtype = _torch_dtype(dtype)
        itemsize = _torch.empty((), dtype=tdtype).element_size()
    else:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        if name not in _NUMPY:
            raise TypeError(f"shared_empty: numpy arrays take {sorted(_NUMPY)}, not {dtype!r}")
        itemsize = np.dtype(_NUMPY[name]).itemsize
    nbytes = count * itemsize
    address = context.current().engine.shared_alloc(nbytes)
    raw = (ctypes.c_char * max(nbytes, 1)).from_address(address)
    if torch:
        if nbytes == 0:
            return _torch.empty(shape, dtype=tdtype)
        return _torch.frombuffer(raw, dtype=tdtype, count=count).view(shape)
    return np.frombuffer(raw, dtype=_NUMPY[name], count=count).reshape(shape)


def shared_reset() -> None:
    """Makes all memory given out by :func:`shared_empty` reusable.

    Call it on every rank of the node at the same point (e.g. before rebuilding a model's
    gradient buckets); every earlier shared tensor then aliases the next ones.
    """
    context.current().engine.shared_reset()
