"""Point-to-point tensor messages between ranks, through the native core (csrc/collectives/p2p.h).

A :class:`Channel` owns a duplicated communicator of its own (its traffic never matches the
engine's collectives). Sends and receives are non-blocking and return a :class:`Message`
whose ``wait()`` is bounded by a deadline (``PBM_TIMEOUT_S``); a timeout names the rank at
fault, following the chain of waits (stage 0 waits for stage 1, which waits for the stopped
stage 2: both name rank 2). A receive either declares the dtype and shape it expects (checked
against the sender's header: :class:`~pybrain_mpi.CollectiveMismatch` names both ranks) or
learns them from the header (:meth:`Channel.recv`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..communication import context
from ..communication.setup_wait import bounded_allgather_ints
from ..core.buffers import as_buffer, dtype_of
from ..errors import PbmError

__all__ = ["Channel", "Message"]

_TORCH_OF: dict | None = None
# Buffers of messages that failed: MPI may still touch them once a stopped peer resumes, so
# they are never freed.
_ABANDONED: list[Any] = []


def _torch_dtype(code: Any) -> torch.dtype:
    global _TORCH_OF
    if _TORCH_OF is None:
        from ..core.library import _core

        _TORCH_OF = {member: getattr(torch, name) for name, member in _core.DType.__members__.items()}
    return _TORCH_OF[code]


class Message:
    """A posted send or receive; keeps its tensor alive until :meth:`wait` returns."""

    __slots__ = ("_channel", "_request", "tensor", "_finished")

    def __init__(self, channel: "Channel", request: Any, tensor: torch.Tensor):
        self._channel = channel
        self._request = request
        self.tensor = tensor
        self._finished = False

    def wait(self, timeout_s: float | None = None) -> torch.Tensor:
        """Waits until the message is sent (its buffer may be reused) or received; returns the
        tensor. Raises :class:`~pybrain_mpi.CollectiveTimeout` naming the ranks at fault."""
        if not self._finished:
            try:
                limit = self._channel.timeout_s if timeout_s is None else float(timeout_s)
                self._channel._core.wait(self._request, limit)
            except Exception:
                _ABANDONED.append(self.tensor)
                raise
            self._finished = True
        return self.tensor

    def __del__(self) -> None:
        # Dropped unfinished (a failed step): a receive is cancelled by the core, a send may
        # still be read by MPI when its peer resumes: its tensor must outlive this object.
        if not self._finished:
            _ABANDONED.append(self.tensor)

    def done(self) -> bool:
        """Whether the message completed (never blocks)."""
        if not self._finished and self._channel._core.test(self._request):
            self._finished = True
        return self._finished


class Channel:
    """Tensor messages among the ranks of ``comm`` (mpi4py; default: pybrain-mpi's world).

    Collective over ``comm`` (it is duplicated). Peers are ranks of ``comm``; errors speak
    world ranks (``pbm.rank()``). ``timeout_s`` (default ``PBM_TIMEOUT_S``) bounds every wait
    that is not given its own; it may be changed between waits.
    """

    def __init__(self, comm: Any = None, timeout_s: float | None = None):
        if not context.is_initialized():
            context.init()
        from mpi4py import MPI

        from ..core.library import _core

        ctx = context.current()
        self.comm = ctx.comm if comm is None else comm
        self.timeout_s = ctx.timeout_s if timeout_s is None else float(timeout_s)
        # Bounded (names the ranks that never build it) before the core's blocking Dup.
        world = [entry[0] for entry in bounded_allgather_ints(
            self.comm, [ctx.rank], timeout_s=self.timeout_s, what="pybrain_mpi.parallel.Channel set-up")]
        self._core = _core.PointToPoint(self.comm.py2f(), self.timeout_s, world)
        self.world_ranks = world
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        del MPI

    def isend(self, tensor: torch.Tensor, dest: int, tag: int, name: str) -> Message:
        """Starts sending ``tensor`` (any shape; a contiguous copy is made when needed)."""
        work = tensor.detach()
        if not work.is_contiguous():
            work = work.contiguous()
        buffer = as_buffer(work, name)
        request = self._core.isend(buffer.address, buffer.count, buffer.dtype, list(work.shape), int(dest),
                                   int(tag), name)
        return Message(self, request, work)

    def irecv(self, shape: Sequence[int], dtype: torch.dtype, source: int, tag: int, name: str,
              out: torch.Tensor | None = None) -> Message:
        """Posts the receive of a message declared to be ``dtype`` of ``shape``; ``wait()``
        raises :class:`~pybrain_mpi.CollectiveMismatch` when the sender's differ."""
        tensor = torch.empty(tuple(shape), dtype=dtype) if out is None else out
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype or not tensor.is_contiguous():
            raise PbmError(f"recv '{name}': out must be a contiguous {dtype} tensor of shape {tuple(shape)}")
        buffer = as_buffer(tensor, name)
        request = self._core.irecv(buffer.address, buffer.count, buffer.dtype, list(shape), int(source),
                                   int(tag), name, True)
        return Message(self, request, tensor)

    def recv(self, source: int, tag: int, name: str, timeout_s: float | None = None) -> torch.Tensor:
        """Receives the next message on ``tag`` from ``source``, whatever its dtype and shape."""
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        code, shape = self._core.recv_header(int(source), int(tag), name, limit)
        tensor = torch.empty(tuple(shape), dtype=_torch_dtype(code))
        buffer = as_buffer(tensor, name)
        request = self._core.irecv(buffer.address, buffer.count, buffer.dtype, list(shape), int(source),
                                   int(tag), name, False)
        return Message(self, request, tensor).wait(timeout_s)

    def probe_any(self, tag: int, timeout_s: float) -> int:
        """Waits up to ``timeout_s`` (GIL released) for a message on ``tag`` from any other
        rank; returns that rank (take it with :meth:`recv`), or -1 when none came. A timeout
        here is no failure: nothing is blamed and the channel stays usable."""
        return int(self._core.probe_any(int(tag), float(timeout_s)))

    def abort(self) -> None:
        """Makes every wait of this channel give up promptly."""
        self._core.abort()

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank handed to MPI through this channel."""
        return self._core.bytes_sent


def check_dtype(tensor: torch.Tensor, name: str) -> None:
    """Raises TypeError naming the tensor when the core cannot carry its dtype."""
    dtype_of(tensor, name)
