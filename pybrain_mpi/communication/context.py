"""Process-wide state: the communicator pybrain-mpi uses, its engine and the topology.

There is exactly one context per process. It owns the duplicated MPI communicator and the
native engine with its background progress thread (see csrc/collectives/engine.h).
"""

from __future__ import annotations

import atexit
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from ..errors import CollectiveTimeout, PbmError
from .setup_wait import bounded_allgather_ints, node_leader

DEFAULT_TIMEOUT_S = 300.0

__all__ = [
    "init",
    "shutdown",
    "is_initialized",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "cross_rank",
    "cross_size",
    "comm",
    "bytes_sent",
    "shm_bytes",
    "default_timeout_s",
    "exit_timeout_s",
]


@dataclass
class _Context:
    comm: Any  # the mpi4py communicator given to init()
    engine: Any  # pybrain_mpi._core.Engine
    rank: int
    size: int
    local_comm: Any
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    timeout_s: float
    thread_level: int


_context: _Context | None = None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise PbmError(f"environment variable {name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise PbmError(f"environment variable {name}={raw!r} must be positive")
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise PbmError(f"environment variable {name}={raw!r} is not an integer") from None
    if value <= 0:
        raise PbmError(f"environment variable {name}={raw!r} must be positive")
    return value


def default_timeout_s() -> float:
    """The timeout of blocking waits: ``PBM_TIMEOUT_S`` or 300 s."""
    return _env_float("PBM_TIMEOUT_S", DEFAULT_TIMEOUT_S)


def init(comm: Any = None, *, timeout_s: float | None = None, ranks_per_node: int | None = None) -> None:
    """Initializes pybrain-mpi on an mpi4py communicator (default ``MPI.COMM_WORLD``).

    Idempotent: calling it again with the same communicator (or none) does nothing.
    MPI itself is initialized through mpi4py (thread level MULTIPLE, so the progress
    thread can run collectives while Python calls MPI too).

    Args:
        comm: any mpi4py intracommunicator; pybrain-mpi duplicates it for its own traffic.
        timeout_s: how long a collective may wait for other ranks before raising
            :class:`~pybrain_mpi.CollectiveTimeout`; default ``PBM_TIMEOUT_S`` or 300.
        ranks_per_node: treat consecutive blocks of this many ranks as one node instead of
            asking MPI which ranks share memory (``PBM_RANKS_PER_NODE``); lets tests
            emulate several nodes on one machine.
    """
    global _context
    from .launcher import check_before_mpi_init, check_world  # refuse mis-launches in one line

    check_before_mpi_init()
    from mpi4py import MPI

    from ..core.library import _core, check_mpi_library

    if comm is None:
        comm = MPI.COMM_WORLD
    if _context is not None:
        if comm is _context.comm or comm == _context.comm:
            return
        raise PbmError(
            f"rank {_context.rank}: pybrain_mpi is already initialized on another communicator; "
            "call pybrain_mpi.shutdown() first"
        )
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    check_mpi_library(MPI.Get_library_version())
    check_world(MPI.COMM_WORLD.Get_size())

    timeout = float(timeout_s) if timeout_s is not None else default_timeout_s()
    thread_level = MPI.Query_thread()
    progress_thread = thread_level == MPI.THREAD_MULTIPLE
    if not progress_thread:
        warnings.warn(
            "MPI was initialized without MPI_THREAD_MULTIPLE; pybrain-mpi runs asynchronous "
            "collectives at submission instead of on its progress thread",
            RuntimeWarning,
            stacklevel=2,
        )
    rank_, size_ = comm.Get_rank(), comm.Get_size()
    # Every rank must be here before the blocking set-up collectives below (the engine's
    # communicator duplicates, Split/Split_type): a bounded rendezvous names the ranks that
    # never call init (setup_wait.py) instead of waiting for them with no message.
    try:
        bounded_allgather_ints(comm, [rank_], timeout_s=timeout,
                               what="pybrain_mpi.init waits for every rank of its communicator")
    except CollectiveTimeout:
        _guard_exit(rank_, size_, timeout)  # MPI_Finalize would wait for the missing rank too
        raise
    engine = _core.Engine(comm.py2f(), timeout, progress_thread)
    local_comm = _node_comm(MPI, comm, ranks_per_node)
    # Nodes are numbered by their lowest world rank, so every rank derives the same order.
    leader = node_leader(local_comm, comm)
    try:
        leaders = sorted({entry[0] for entry in bounded_allgather_ints(
            comm, [leader], timeout_s=timeout, what="pybrain_mpi.init (node leaders)")})
    except CollectiveTimeout:
        engine.shutdown()
        _guard_exit(rank_, size_, timeout)
        raise
    # The shared-memory node stage (algorithms "shm", "hierarchical", "auto") uses the same
    # grouping: its node communicator is split by the node's lowest rank.
    engine.configure_nodes(leader)
    _tune_from_environment(engine)
    _context = _Context(
        comm=comm,
        engine=engine,
        rank=rank_,
        size=size_,
        local_comm=local_comm,
        local_rank=local_comm.Get_rank(),
        local_size=local_comm.Get_size(),
        cross_rank=leaders.index(leader),
        cross_size=len(leaders),
        timeout_s=timeout,
        thread_level=thread_level,
    )
    atexit.register(shutdown)
    _guard_exit(rank_, size_, timeout)
    if size_ > 1 and os.environ.get("PBM_ABORT_ON_ERROR", "1") != "0":
        _abort_on_uncaught_exception(MPI, rank_)


def _node_comm(MPI: Any, comm: Any, ranks_per_node: int | None) -> Any:
    """The communicator of this rank's node: ranks sharing memory, or forced blocks of ranks.

    ``ranks_per_node`` (else ``PBM_RANKS_PER_NODE``) groups consecutive blocks of that many
    ranks, so tests can emulate several nodes on one machine.
    """
    rank_ = comm.Get_rank()
    forced = ranks_per_node if ranks_per_node is not None else _env_int("PBM_RANKS_PER_NODE")
    if forced is None:
        return comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank_)
    if forced <= 0:
        raise PbmError(f"ranks_per_node must be positive, got {forced}")
    return comm.Split(color=rank_ // forced, key=rank_)


def _tune_from_environment(engine: Any) -> None:
    """Applies the engine tunables that PBM_* environment variables set (README lists them)."""
    for variable, attribute, zero_means_default in (
            ("PBM_RING_CHUNK_BYTES", "ring_chunk_bytes", True),
            ("PBM_SHM_MIN_BYTES", "shm_min_bytes", False),
            ("PBM_SMALL_MAX_BYTES", "small_max_bytes", False),
            ("PBM_SHM_CHUNK_BYTES", "shm_chunk_bytes", True)):
        value = _env_int(variable)
        if value is None or (zero_means_default and value == 0):
            continue
        setattr(engine, attribute, value)


_exit_guard: dict = {}


EXIT_TIMEOUT_MIN_S = 30.0


def exit_timeout_s(timeout_s: float | None = None) -> float:
    """How long a rank may take to exit after a collective failed on it:
    ``PBM_EXIT_TIMEOUT_S``, else the larger of the collectives' timeout (``timeout_s``,
    default ``PBM_TIMEOUT_S``) and 30 s (peers that are merely late, and the interpreter's own
    teardown, need a moment; a short ``PBM_TIMEOUT_S`` must not cut a healthy exit)."""
    explicit = os.environ.get("PBM_EXIT_TIMEOUT_S")
    if explicit:
        return _env_float("PBM_EXIT_TIMEOUT_S", EXIT_TIMEOUT_MIN_S)
    base = default_timeout_s() if timeout_s is None else float(timeout_s)
    return max(base, EXIT_TIMEOUT_MIN_S)


def _guard_exit(rank_: int, size_: int, timeout: float) -> None:
    """Registers (once per process) :func:`_bound_exit_after_failure` to run at interpreter
    exit before :func:`shutdown` (atexit runs last-registered first)."""
    first = not _exit_guard
    _exit_guard.update(rank=rank_, size=size_, timeout_s=timeout)
    if first:
        atexit.register(_bound_exit_after_failure)


def _bound_exit_after_failure() -> None:
    """After a collective failed on this rank, exiting cannot wait on the peers forever.

    MPI_Finalize (mpi4py calls it once the interpreter is gone) waits for every rank; with a
    peer stopped (SIGSTOP) or lost, a rank that already reported the failure and called
    ``sys.exit`` would stay alive until the peer resumes. So when a
    :class:`~pybrain_mpi.CollectiveTimeout` or :class:`~pybrain_mpi.PeerFailure` was raised
    in this process, exiting is bounded by :func:`exit_timeout_s`: a rank still alive after
    that long says so on stderr and ends with status 1 without finalizing MPI (mpiexec and
    srun then end the job). A rank whose peers are merely late finalizes normally.
    """
    from .. import errors

    if not errors.WORLD_FAILURES or _exit_guard.get("size", 1) <= 1:
        return
    ranks = sorted({r for record in errors.WORLD_FAILURES for r in record})
    timeout = exit_timeout_s(float(_exit_guard["timeout_s"]))
    waiting = f"rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks))}" if ranks \
        else "the other ranks"
    message = (f"pybrain-mpi: rank {_exit_guard['rank']}: still exiting {timeout:g} s after a failed "
               f"collective (MPI_Finalize waits for {waiting}); ending with status 1 without "
               "finalizing MPI\n")
    try:
        from ..core.library import _core

        _core.watch_exit(timeout, message, 1)
    except Exception:  # noqa: BLE001 - never let exit handling raise
        pass


def _abort_on_uncaught_exception(MPI: Any, rank_: int) -> None:
    """Makes an uncaught exception on one rank end the whole job.

    Otherwise the other ranks would wait in their next collective (until its timeout) or,
    worse, in a plain MPI call with no timeout at all. Same idea as ``python -m mpi4py``.
    """
    previous = sys.excepthook
    if getattr(previous, "_pbm_abort_hook", False):
        return

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stderr.write(
            f"pybrain-mpi: rank {rank_} raised an uncaught {kind.__name__}; aborting all ranks "
            "(set PBM_ABORT_ON_ERROR=0 to leave that to you)\n"
        )
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

    hook._pbm_abort_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def shutdown() -> None:
    """Stops the progress thread and releases pybrain-mpi's communicators.

    Queued collectives fail with :class:`~pybrain_mpi.PbmError`; one stuck waiting for a
    missing rank is aborted. MPI itself stays initialized (mpi4py finalizes it at exit).
    Safe to call more than once.
    """
    global _context
    if _context is None:
        return
    context, _context = _context, None
    context.engine.shutdown()
    try:
        context.local_comm.Free()
    except Exception:  # noqa: BLE001 - MPI may already be finalized at interpreter exit
        pass


def is_initialized() -> bool:
    """Whether :func:`init` has been called (and :func:`shutdown` not since)."""
    return _context is not None


def current() -> _Context:
    """The live context; raises :class:`PbmError` before :func:`init`."""
    if _context is not None:
        return _context
    raise PbmError("pybrain_mpi is not initialized: call pybrain_mpi.init() first")


def rank() -> int:
    """This process's rank in the communicator given to :func:`init`."""
    return current().rank


def size() -> int:
    """Number of ranks in the communicator given to :func:`init`."""
    return current().size


def local_rank() -> int:
    """Rank among the ranks of this node (MPI_COMM_TYPE_SHARED, or ``ranks_per_node``)."""
    return current().local_rank


def local_size() -> int:
    """Number of ranks on this node."""
    return current().local_size


def cross_rank() -> int:
    """Index of this rank's node (nodes ordered by their lowest rank)."""
    return current().cross_rank


def cross_size() -> int:
    """Number of nodes."""
    return current().cross_size


def comm() -> Any:
    """The mpi4py communicator given to :func:`init` (not pybrain-mpi's private duplicate)."""
    return current().comm


def bytes_sent() -> int:
    """Bytes this rank has handed to MPI sends in pybrain-mpi collectives so far.

    Bytes moved between ranks of a node through shared memory (algorithms ``"shm"`` and
    ``"hierarchical"``) are not sent through MPI and are counted by :func:`shm_bytes`.
    """
    return current().engine.bytes_sent


def shm_bytes() -> int:
    """Bytes this rank has copied through the node's shared memory in collectives so far
    (copy path: copy-in to and copy-out from peers' view; zero-copy buffers: the reduced
    slices this rank stored into peers' buffers). MPI traffic is :func:`bytes_sent`."""
    return current().engine.shm_bytes
