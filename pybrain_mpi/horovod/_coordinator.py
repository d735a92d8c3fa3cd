"""Name-matched negotiation for :mod:`pybrain_mpi.horovod` (the shim's own coordinator).

Horovod runs a collective once every rank has submitted a tensor of that *name*, in an order
all ranks agree on, whatever order the ranks submitted in. This module does the same at the
shim level, in one background thread per rank:

* Each cycle, every rank sends every other rank (point to point, on a communicator of its
  own) the requests it submitted since the last cycle and its join / exit flags, as JSON
  (names, dtypes, shapes: no pickles from peers).
* Every rank applies the same messages in the same order to the same table
  ``name -> {rank: description}``, so every rank computes the same list of ready requests
  (submitted by every member of their process set, joined ranks counting as present for
  allreduces) in the same order, and checks them the same way: a name whose dtype, shape, op
  or root differs across ranks fails on every rank with :class:`CollectiveMismatch` naming the
  ranks and both descriptions; an allgather/broadcast/alltoall/reducescatter while a rank has
  joined fails on the others.
* The ready requests are executed in that order by the same thread: allreduces of the
  global set through pybrain-mpi's engine (fused up to ``HOROVOD_FUSION_THRESHOLD`` bytes per
  cycle), everything else with non-blocking MPI on the set's communicator, each wait bounded
  by the engine's timeout.

The fast path: allreduces of the global set (any dtype, op sum/average/min/max) skip all of
the above. They go straight to pybrain-mpi's engine, which matches collectives by name natively
(``docs/negotiation.md``): ranks may submit them in different orders, a name whose description
differs fails on every rank (the Horovod dtype, shape and scale factors travel as the engine
header's ``signature``), and while ranks submit the same names in the same order they cost what
an engine allreduce costs. The coordinator keeps one duty for them, which the engine cannot do:
a rank that has joined must contribute zeros to the allreduces its peers still make. While any
rank is joined (the cycles tell every rank so, in the same round), each rank lists its
unfinished fast allreduces in its cycle messages with their per-name call number ``k``; a
joined rank submits zero tensors of those names to the engine until its own count of the name
reaches ``k`` (the k-th call of a name pairs with the k-th on every rank), so every call is
served exactly once.

Waiting callers are bounded too: :meth:`Coordinator.wait` raises :class:`CollectiveTimeout`
after ``PBM_TIMEOUT_S`` naming the ranks that have not submitted the name (or that have not
answered the negotiation at all).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CollectiveMismatch, CollectiveTimeout, PbmError

_TAG = 9181

# torch dtypes by name, the wire's spelling of a dtype.
DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.bool)}
TORCH_DTYPES = frozenset(DTYPES.values())
ENGINE_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64}


class HorovodInternalError(RuntimeError):
    """A collective failed (a peer timed out, a mismatch, a joined peer): Horovod's name."""


class HorovodTimeout(HorovodInternalError, CollectiveTimeout):
    """A collective waited past ``PBM_TIMEOUT_S``; ``missing_ranks`` names who is missing."""


class HorovodMismatch(HorovodInternalError, CollectiveMismatch):
    """Ranks submitted the same name with different dtype, shape, op or root."""


class Request:
    """One submitted collective: what the caller gave and, once done, the result or error."""

    __slots__ = ("name", "kind", "set_id", "desc", "tensor", "extra", "event", "result", "error",
                 "submitted", "on_done", "key")

    def __init__(self, name: str, kind: str, set_id: int, desc: dict, tensor: Any, extra: Any = None):
        self.name, self.kind, self.set_id, self.desc = name, kind, set_id, desc
        self.key = f"{set_id}/{name}"  # names are per process set, as in Horovod
        self.tensor, self.extra = tensor, extra
        self.event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.on_done: Callable | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.event.set()


class FastRequest:
    """An allreduce of the global set run by pybrain-mpi's engine directly (the fast path).

    ``k`` is this rank's call number of the name (1 for its first fast allreduce of that
    name): the engine pairs the k-th call of a name with the k-th on every rank.

    ``collected``: the caller has seen the call end (a blocking call returned, or its handle
    was synchronized or polled done). Until then the name is in flight on this rank, whether
    or not the engine has finished: a second call of the name raises on every rank alike
    (see :meth:`Coordinator.submit_fast`).
    """

    __slots__ = ("name", "key", "kind", "set_id", "k", "tensor", "work", "args", "operation",
                 "finished", "result", "error", "submitted", "reported", "event", "on_done", "args_op",
                 "collected")

    def __init__(self, name: str, k: int, tensor: torch.Tensor, work: torch.Tensor, args: Any):
        self.name, self.key, self.kind, self.set_id, self.k = name, f"0/{name}", "allreduce", 0, k
        self.tensor, self.work, self.args = tensor, work, args
        self.operation: Any = None  # the engine's Operation (async calls)
        self.finished = False  # set once the result (or error) is in place
        self.result: Any = None
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.reported = False  # listed in a cycle message (only while some rank is joined)
        self.event = self  # poll() and groups ask request.event.is_set()
        self.on_done: Callable | None = None
        self.args_op: Any = None  # the engine's ReduceOp (AllreduceArgs does not expose it)
        self.collected = False  # the caller has seen it end (see the class docstring)

    def is_set(self) -> bool:
        """Whether the engine has finished this call (successfully or not)."""
        return self.finished or (self.operation is not None and self.operation.done())

    def report(self) -> list:
        """What a cycle message says of this call: name, k and what a joined rank needs to
        submit its zeros (element count, wire dtype, op, signature)."""
        args = self.args
        return [self.name, self.k, int(args.count), str(args.dtype).split(".")[-1],
                str(self.args_op).split(".")[-1], int(args.signature)]


def describe(desc: dict) -> str:
    """A description as the error messages spell it."""
    parts = [desc["kind"], desc.get("dtype", ""), "shape " + str(desc.get("shape"))]
    for key in ("op", "root", "prescale", "postscale"):
        if key in desc:
            parts.append(f"{key}={desc[key]}")
    return " ".join(p for p in parts if p)


def _mismatch(kind: str, descs: dict[int, dict]) -> str | None:
    """Why the per-rank descriptions of one name cannot run together, or None."""
    ranks = sorted(descs)
    first = descs[ranks[0]]
    keys = ["kind", "dtype", "op", "root", "prescale", "postscale"]
    if kind in ("allreduce", "broadcast", "reducescatter"):
        keys.append("shape")
    elif kind in ("allgather", "alltoall"):
        keys += ["ndim", "trailing"]
    for rank in ranks[1:]:
        other = descs[rank]
        for key in keys:
            if first.get(key) != other.get(key):
                return (f"{key} differs: rank {ranks[0]} has {describe(first)}, "
                        f"rank {rank} has {describe(other)}")
    return None


class ProcessSetInfo:
    """Ranks and communicator of one process set (id 0: the global set)."""

    def __init__(self, set_id: int, ranks: list[int], comm: Any):
        self.set_id, self.ranks, self.comm = set_id, ranks, comm


class Coordinator:
    """The background negotiation and execution thread of one rank."""

    def __init__(self, comm: Any, engine_allreduce: Callable, timeout_s: float):
        from mpi4py import MPI

        self.MPI = MPI
        self.world = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.control = comm.Dup()  # negotiation messages
        self.data = comm.Dup()  # data of the global set (non-engine paths)
        self.admin = comm.Dup()  # process-set creation (main thread)
        self.engine_allreduce = engine_allreduce
        self.timeout_s = timeout_s
        self.fusion_bytes = int(os.environ.get("HOROVOD_FUSION_THRESHOLD", 64 * 1024 * 1024))
        self.cycle_s = float(os.environ.get("HOROVOD_CYCLE_TIME", 1.0)) / 1000.0
        self.sets: dict[int, ProcessSetInfo] = {0: ProcessSetInfo(0, list(range(self.size)), self.data)}
        self.lock = threading.Condition()
        self.outbox: list[Request] = []  # submitted, not yet announced
        self.mine: dict[str, Request] = {}  # announced or queued, by name
        self.table: OrderedDict[str, dict[int, dict]] = OrderedDict()
        self.joined: set[int] = set()
        self.prev_joined: set[int] = set()
        self.join_request: Request | None = None
        self.exiting: set[int] = set()
        self.want_exit = False
        self.round = 0
        self.unanswered: list[int] = []
        self.busy_everywhere = False
        self.timeline: Any = None
        self.failure: BaseException | None = None
        # The fast path (see the module docstring): this rank's fast allreduces by name (the
        # latest call of each), how many it has submitted of each name (served zeros
        # included), the highest unfinished call number peers reported per name while a rank
        # was joined, and the zero tensors this rank submitted while joined.
        self.fast_inflight: dict[str, FastRequest] = {}
        self.fast_counts: dict[str, int] = {}
        self.fast_wanted: dict[str, list] = {}
        self.served: list[tuple[Any, torch.Tensor]] = []
        self.engine: Any = None  # set by the API: the engine of pybrain-mpi's context
        self.engine_core: Any = None  # and the native core (AllreduceArgs, DType, ReduceOp)
        self.thread = threading.Thread(target=self._run, name="pbm-horovod-coordinator", daemon=True)
        self.thread.start()

    # -- called by the API (any thread) ---------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queues ``request`` for negotiation; ValueError if its name is already in flight here."""
        with self.lock:
            if self.failure is not None:
                raise HorovodInternalError(f"rank {self.rank}: the Horovod coordinator stopped: {self.failure}")
            if request.key in self.mine:
                raise ValueError(f"rank {self.rank}: a collective named '{request.name}' is already in "
                                 "flight on this rank; names of concurrent collectives must be unique")
            self.mine[request.key] = request
            self.outbox.append(request)
            if self.timeline is not None:
                self.timeline.begin(request.name, "NEGOTIATE_" + request.kind.upper())
            self.lock.notify_all()
        return request

    def submit_fast(self, name: str, tensor: torch.Tensor, work: torch.Tensor, args: Any, op: Any,
                    blocking: bool) -> FastRequest:
        """Runs an allreduce of the global set on the engine (``args`` describe ``work``, the
        contiguous engine-dtype tensor reduced in place; ``tensor`` receives the result).

        ``blocking``: run it on the calling thread and return once done (the error, if any,
        is kept for :meth:`wait`); else queue it on the engine's progress thread. ValueError if
        an allreduce of this name is already in flight on this rank.
        """
        # No lock: a contended lock costs a GIL hand-off (milliseconds) on this microsecond
        # path. Each step is one atomic dict operation, this rank has at most one call of a
        # name in flight (so its calls reach the engine in the order of their numbers k), and
        # the coordinator thread writes fast_counts only while this rank is joined (when no
        # thread of this rank submits).
        if self.failure is not None:
            raise HorovodInternalError(f"rank {self.rank}: the Horovod coordinator stopped: {self.failure}")
        # In flight means "not yet collected by the caller", not "not yet finished by the
        # engine": the engine may finish a call within microseconds when the peers' calls were
        # already waiting (on the last rank to submit), and sooner or later than the caller's
        # next statement depending on scheduling. A name's second call would then raise on the
        # early ranks and reach the engine on the late ones, a call no peer ever pairs: it
        # times out and leaves that rank's engine refusing every later collective.
        prior = self.fast_inflight.get(name)
        if (prior is not None and not prior.collected) or (self.mine and f"0/{name}" in self.mine):
            raise ValueError(f"rank {self.rank}: a collective named '{name}' is already in "
                             "flight on this rank; names of concurrent collectives must be unique")
        k = self.fast_counts.get(name, 0) + 1
        self.fast_counts[name] = k
        request = FastRequest(name, k, tensor, work, args)
        request.args_op = op
        self.fast_inflight[name] = request
        if self.timeline is not None:
            # The engine negotiates by itself; the timeline shows the submission as an empty
            # negotiation (and, with mark_cycles, a cycle), then the allreduce until it is waited for.
            self.timeline.begin(name, "NEGOTIATE_ALLREDUCE")
            self.timeline.cycle()
            self.timeline.begin(name, "ALLREDUCE")
        if self.joined:
            with self.lock:
                self.lock.notify_all()  # a peer is joined: report this call in the next cycle
        if blocking:
            try:
                self.engine.allreduce(args, self.timeout_s)
            except BaseException as error:
                request.error = self._fast_error(request, error)
            request.finished = True
            request.collected = True
        else:
            request.operation = self.engine.allreduce_async(args)
        return request

    def _fast_error(self, request: FastRequest, error: BaseException) -> BaseException:
        """The Horovod error for an engine error of a fast allreduce."""
        mine = f"{str(request.tensor.dtype).replace('torch.', '')} shape {list(request.tensor.shape)}"
        where = f"rank {self.rank}: allreduce '{request.name}' (this rank: {mine})"
        if isinstance(error, CollectiveTimeout):
            return HorovodTimeout(f"{where}: {error}", list(getattr(error, "missing_ranks", []) or []))
        if isinstance(error, CollectiveMismatch):
            return HorovodMismatch(f"{where}: {error}")
        return HorovodInternalError(f"{where} failed: {error}")

    def _wait_fast(self, request: FastRequest, timeout_s: float | None) -> Any:
        request.collected = True  # the caller waits for it (a timeout gives the name up too)
        if not request.finished:
            limit = self.timeout_s if timeout_s is None else timeout_s
            operation = request.operation
            if not operation.wait(max(0.0, request.submitted + limit - time.monotonic())):
                missing = list(operation.waiting_for())
                raise HorovodTimeout(
                    f"rank {self.rank}: allreduce '{request.name}' did not complete within {limit:g} s "
                    f"({operation.phase()}); ranks that have not submitted it: "
                    f"{', '.join(map(str, missing)) or 'unknown'}", missing)
            try:
                operation.check()
            except BaseException as error:
                request.error = self._fast_error(request, error)
            request.finished = True
        if self.timeline is not None:
            self.timeline.end(request.name)
        if request.error is not None:
            raise request.error
        if request.result is None:
            if request.work is not request.tensor:  # widened (8/16-bit integers, bool): cast back
                with torch.no_grad():
                    request.tensor.copy_(request.work.view(request.tensor.shape).to(request.tensor.dtype))
            request.result = request.tensor
        return request.result

    def wait(self, request: Request, timeout_s: float | None = None) -> Any:
        """Waits for ``request``; raises its error, or :class:`HorovodTimeout` naming the ranks
        that have not submitted it after ``timeout_s`` (default the engine's timeout)."""
        if isinstance(request, FastRequest):
            return self._wait_fast(request, timeout_s)
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not request.event.wait(max(0.0, request.submitted + limit - time.monotonic())):
            with self.lock:
                seen = set(self.table.get(request.key, {}))
                members = self.sets[request.set_id].ranks if request.set_id in self.sets else []
                missing = sorted(r for r in members if r not in seen and r != self.rank and r not in self.joined)
                missing = sorted(set(missing) | set(self.unanswered)) or sorted(self.unanswered)
                if request.key in self.mine and request in self.outbox:
                    self.outbox.remove(request)
                    self.mine.pop(request.key, None)
            if not request.event.is_set():
                raise HorovodTimeout(
                    f"rank {self.rank}: {request.kind} '{request.name}' did not complete within {limit:g} s; "
                    f"ranks that have not submitted it: {', '.join(map(str, missing)) or 'unknown'}", missing)
        if request.error is not None:
            raise request.error
        return request.result

    def join(self) -> int:
        """Marks this rank joined until every rank has; returns the last rank to join."""
        request = Request("__join__", "join", 0, {"kind": "join"}, None)
        with self.lock:
            if self.join_request is not None:
                raise ValueError(f"rank {self.rank}: join() is already in progress")
            self.join_request = request
            self.lock.notify_all()
        request.event.wait()  # joined ranks serve the others until all have joined; no deadline
        if request.error is not None:
            raise request.error
        return request.result

    def stop(self, timeout_s: float | None = None) -> None:
        """Leaves the negotiation once every rank is leaving (bounded by the timeout)."""
        with self.lock:
            self.want_exit = True
            self.lock.notify_all()
        self.thread.join(self.timeout_s if timeout_s is None else timeout_s)
        if self.thread.is_alive():
            self.failure = PbmError("stopped while peers were still negotiating")

    def add_set(self, set_id: int, ranks: list[int], comm: Any) -> None:
        """Registers a process set (its communicator already created by every rank)."""
        with self.lock:
            self.sets[set_id] = ProcessSetInfo(set_id, ranks, comm)

    def remove_set(self, set_id: int) -> None:
        """Forgets a process set and frees its communicator."""
        with self.lock:
            info = self.sets.pop(set_id, None)
        if info is not None and info.comm is not None and info.comm != self.MPI.COMM_NULL:
            info.comm.Free()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    idle = not self.outbox and not self.busy_everywhere and self.join_request is None \
                        and not self.mine and not self.want_exit
                    if idle:
                        self.lock.wait(self.cycle_s if self.cycle_s > 0 else 0.001)
                    outgoing = self.outbox
                    self.outbox = []
                    message = {"r": [[q.name, q.set_id, q.desc] for q in outgoing],
                               "j": 1 if self.join_request is not None else 0,
                               "x": 1 if self.want_exit else 0}
                    if self.joined or self.join_request is not None:
                        message["f"] = self._unreported_fast()
                received = self._exchange(message)
                if self._apply(received):
                    return
        except BaseException as error:  # keep waiting callers from hanging on a dead thread
            with self.lock:
                self.failure = error
                pending = list(self.mine.values())
                self.mine.clear()
            for request in pending:
                request.finish(error=HorovodInternalError(f"rank {self.rank}: coordinator failed: {error!r}"))
            if self.join_request is not None:
                self.join_request.finish(error=HorovodInternalError(f"rank {self.rank}: coordinator failed"))

    def _unreported_fast(self) -> list:
        """This rank's unfinished fast allreduces not yet listed in a cycle (caller holds the lock)."""
        out = []
        for request in list(self.fast_inflight.values()):  # one atomic copy: the API adds entries
            if not request.reported and not request.is_set():
                request.reported = True
                out.append(request.report())
        return out

    def _serve_joined(self, received: dict[int, dict]) -> None:
        """Records the peers' reported fast allreduces; while this rank is joined, submits
        zeros for every call number it has not submitted yet (the engine pairs them)."""
        for rank in range(self.size):
            for name, k, count, dtype, op, signature in received[rank].get("f", ()):
                wanted = self.fast_wanted.get(name)
                if wanted is None or wanted[0] < k:
                    self.fast_wanted[name] = [k, count, dtype, op, signature]
        if self.join_request is None or not self.fast_wanted:
            return
        core = self.engine_core
        self.served = [(op, t) for op, t in self.served if not op.done()]
        for name, (k, count, dtype, op, signature) in self.fast_wanted.items():
            while self.fast_counts.get(name, 0) < k:
                self.fast_counts[name] = self.fast_counts.get(name, 0) + 1
                zeros = torch.zeros(count, dtype=DTYPES[dtype])
                args = core.AllreduceArgs(zeros.data_ptr(), count, getattr(core.DType, dtype),
                                          getattr(core.ReduceOp, op), core.Algorithm.ring, fast_engine_name(name))
                args.signature = signature
                self.served.append((self.engine.allreduce_async(args), zeros))

    def _exchange(self, message: dict) -> dict[int, dict]:
        """One negotiation cycle: send ``message`` to every peer, receive theirs."""
        MPI = self.MPI
        payload = json.dumps(message).encode()
        sends = [self.control.Isend([payload, MPI.BYTE], dest=p, tag=_TAG)
                 for p in range(self.size) if p != self.rank]
        received = {self.rank: message}
        pending = [p for p in range(self.size) if p != self.rank]
        started = time.monotonic()
        pause = 0.00002
        spins = 0
        while pending:
            for peer in list(pending):
                status = MPI.Status()
                if self.control.Iprobe(source=peer, tag=_TAG, status=status):
                    buffer = bytearray(status.Get_count(MPI.BYTE))
                    self.control.Recv([buffer, MPI.BYTE], source=peer, tag=_TAG)
                    received[peer] = json.loads(buffer.decode())
                    pending.remove(peer)
            if pending:
                with self.lock:
                    self.unanswered = list(pending)
                spins += 1
                if spins < 200:  # a peer usually answers within microseconds: yield, do not sleep
                    time.sleep(0)
                    continue
                time.sleep(pause)
                pause = min(pause * 2, 0.0005 if time.monotonic() - started < 1 else 0.01)
        with self.lock:
            self.unanswered = []
        MPI.Request.Waitall(sends)
        return received

    def _apply(self, received: dict[int, dict]) -> bool:
        """Applies one cycle's messages (the same on every rank); runs what is ready.
        Returns True when every rank is exiting."""
        self.round += 1
        for rank in range(self.size):
            for name, set_id, desc in received[rank]["r"]:
                self.table.setdefault(f"{set_id}/{name}", {})[rank] = dict(desc, set_id=set_id)
        joined = {r for r in range(self.size) if received[r]["j"]}
        exiting = {r for r in range(self.size) if received[r]["x"]}
        with self.lock:
            self.joined = joined  # the same on every rank this round
            self._serve_joined(received)
        ready: list[tuple[str, dict[int, dict]]] = []
        for name, descs in self.table.items():
            set_id = next(iter(descs.values()))["set_id"]
            members = self.sets[set_id].ranks if set_id in self.sets else list(range(self.size))
            present = set(descs) | (joined if set_id == 0 else set())
            if present.issuperset(members):
                ready.append((name, descs))
        for name, _ in ready:
            del self.table[name]
        self.busy_everywhere = bool(self.table) or bool(ready) or any(received[r]["r"] for r in received)
        if self.timeline is not None and ready:
            self.timeline.cycle()
        self._execute(ready, joined)
        if joined and len(joined) == self.size:
            newly = joined - self.prev_joined
            last = max(newly) if newly else max(joined)
            self.prev_joined = set()
            with self.lock:
                # Every rank has served every call reported up to now: start afresh.
                self.fast_wanted.clear()
            request, self.join_request = self.join_request, None
            if request is not None:
                request.finish(result=last)
        else:
            self.prev_joined = joined
        if len(exiting) == self.size:
            return True
        return False

    # -- execution -----------------------------------------------------------------------

    def _execute(self, ready: list[tuple[str, dict[int, dict]]], joined: set[int]) -> None:
        fusable: list[tuple[Request | None, dict]] = []
        for key, descs in ready:
            first = descs[min(descs)]
            name = first.get("name", key)
            kind, set_id = first["kind"], first["set_id"]
            info = self.sets.get(set_id)
            mine = self.mine.get(key) if self.rank in descs else None
            if info is None or (self.rank not in info.ranks):
                if mine is not None:
                    self._done(mine, error=PbmError(f"rank {self.rank}: process set {set_id} of '{name}' "
                                                    "does not contain this rank"))
                continue
            problem = _mismatch(kind, descs)
            if problem is None and set_id == 0 and joined and kind not in ("allreduce", "barrier"):
                problem = (f"ranks {sorted(joined)} have joined; {kind} cannot run while a rank has joined "
                           "(only allreduce serves joined ranks, with zeros)")
                error: BaseException = HorovodInternalError(f"rank {self.rank}: {kind} '{name}': {problem}")
            else:
                error = HorovodMismatch(f"rank {self.rank}: {kind} '{name}': {problem}") if problem else None
            if error is not None:
                if mine is not None:
                    self._done(mine, error=error)
                continue
            if kind == "allreduce" and set_id == 0 and first["fuse"]:
                if fusable and not self._fuses(fusable, first):
                    self._flush(fusable)
                    fusable = []
                fusable.append((mine, first))
                continue
            if fusable:
                self._flush(fusable)
                fusable = []
            self._run_one(mine, name, first, info, descs)
        if fusable:
            self._flush(fusable)

    def _fuses(self, group: list[tuple[Request | None, dict]], desc: dict) -> bool:
        head = group[0][1]
        total = sum(d["count"] for _, d in group) + desc["count"]
        return (head["dtype"] == desc["dtype"] and head["op"] == desc["op"]
                and total * torch.empty((), dtype=DTYPES[desc["dtype"]]).element_size() <= self.fusion_bytes)

    def _done(self, request: Request, result: Any = None, error: BaseException | None = None) -> None:
        with self.lock:
            self.mine.pop(request.key, None)
        if self.timeline is not None:
            self.timeline.end(request.name)
        if error is None and request.on_done is not None:
            try:
                result = request.on_done(result)
            except BaseException as failure:  # a caller's finishing step must not stop the thread
                error = failure
        request.finish(result, error)

    def _flush(self, group: list[tuple[Request | None, dict]]) -> None:
        """One engine allreduce of the group's tensors (joined ranks send zeros)."""
        dtype = DTYPES[group[0][1]["dtype"]]
        parts = [(q.tensor.reshape(-1) if q is not None else torch.zeros(d["count"], dtype=dtype)) for q, d in group]
        for q, _ in group:
            if q is not None and self.timeline is not None:
                self.timeline.begin(q.name, "ALLREDUCE")
        try:
            if len(parts) == 1:
                fused = parts[0] if parts[0].is_contiguous() else parts[0].contiguous()
            else:
                fused = torch.cat(parts)
            self.engine_allreduce(fused, group[0][1]["op"], group[0][1]["name"], self.timeout_s)
        except BaseException as error:
            for q, _ in group:
                if q is not None:
                    self._done(q, error=HorovodInternalError(f"rank {self.rank}: allreduce '{q.name}' failed: {error}"))
            return
        offset = 0
        for (q, d), part in zip(group, parts):
            if q is not None:
                piece = fused[offset:offset + d["count"]]
                if piece.data_ptr() != q.tensor.data_ptr():
                    q.tensor.reshape(-1).copy_(piece) if q.tensor.is_contiguous() else q.tensor.copy_(piece.view(q.tensor.shape))
                self._done(q, q.tensor)
            offset += d["count"]

    def _wait_mpi(self, requests: list, what: str) -> None:
        """Waits for non-blocking MPI requests within the timeout."""
        deadline = time.monotonic() + self.timeout_s
        pause = 0.00002
        while not self.MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                raise HorovodTimeout(f"rank {self.rank}: {what} did not complete within {self.timeout_s:g} s "
                                     "(a peer stopped mid-collective)", [])
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _run_one(self, request: Request | None, name: str, desc: dict, info: ProcessSetInfo,
                 descs: dict[int, dict]) -> None:
        kind = desc["kind"]
        if request is not None and self.timeline is not None:
            self.timeline.begin(name, kind.upper())
        try:
            result = self._dispatch(request, name, desc, info, descs)
        except BaseException as error:
            if request is not None:
                self._done(request, error=error if isinstance(error, HorovodInternalError) else
                           HorovodInternalError(f"rank {self.rank}: {kind} '{name}' failed: {error}"))
            return
        if request is not None:
            self._done(request, result)

    def _dispatch(self, request: Request | None, name: str, desc: dict, info: ProcessSetInfo,
                  descs: dict[int, dict]) -> Any:
        MPI = self.MPI
        comm = info.comm
        kind = desc["kind"]
        dtype = DTYPES.get(desc.get("dtype", "uint8"), torch.uint8)
        if kind == "barrier":
            if comm is not None and comm.Get_size() > 1:
                self._wait_mpi([comm.Ibarrier()], f"barrier '{name}'")
            return None
        if request is None:  # a joined rank serving an allreduce it never submitted
            tensor = torch.zeros(desc["count"], dtype=dtype)
        else:
            tensor = request.tensor
        if comm.Get_size() == 1:
            if kind == "alltoall":
                return tensor, torch.tensor(request.extra, dtype=torch.int32)
            if kind == "allgather":
                request.extra = [tensor.shape[0]]
                return tensor.clone()
            return tensor
        if kind == "allreduce":
            work = _widened(tensor)
            array = work.numpy()
            if work.dtype == torch.bool:  # sum/max: any rank true; min/product: every rank true
                op = {"sum": MPI.LOR, "min": MPI.LAND, "max": MPI.LOR, "prod": MPI.LAND}[desc["op"]]
            else:
                op = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "prod": MPI.PROD}[desc["op"]]
            self._wait_mpi([comm.Iallreduce(MPI.IN_PLACE, array, op=op)], f"allreduce '{name}'")
            if work.data_ptr() != tensor.data_ptr():
                tensor.copy_(work.to(tensor.dtype).view(tensor.shape))
            return tensor
        raw = _bytes(tensor)
        if kind == "broadcast":
            self._wait_mpi([comm.Ibcast(raw, root=info.ranks.index(desc["root"]))], f"broadcast '{name}'")
            return tensor
        members = info.ranks
        row_bytes = desc["row_bytes"]
        if kind == "allgather":
            rows = [descs[r]["rows"] for r in members]
            if request is not None:
                request.extra = rows
            out = torch.empty(sum(rows) * row_bytes, dtype=torch.uint8)
            counts = [n * row_bytes for n in rows]
            self._wait_mpi([comm.Iallgatherv(raw, [out.numpy(), counts])], f"allgather '{name}'")
            return out.view(dtype).reshape([sum(rows)] + desc["trailing"])
        if kind == "alltoall":
            splits = request.extra  # rows this rank sends to each member
            send_rows = np.asarray(splits, dtype=np.int64)
            recv_rows = np.empty(len(members), dtype=np.int64)
            self._wait_mpi([comm.Ialltoall(send_rows, recv_rows)], f"alltoall '{name}' (splits)")
            out = torch.empty(int(recv_rows.sum()) * row_bytes, dtype=torch.uint8)
            send_counts = (send_rows * row_bytes).tolist()
            recv_counts = (recv_rows * row_bytes).tolist()
            send_displs = np.concatenate([[0], np.cumsum(send_counts)[:-1]]).astype(np.int64).tolist()
            recv_displs = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]).astype(np.int64).tolist()
            self._wait_mpi([comm.Ialltoallv([raw, (send_counts, send_displs)],
                                            [out.numpy(), (recv_counts, recv_displs)])], f"alltoall '{name}'")
            result = out.view(dtype).reshape([int(recv_rows.sum())] + desc["trailing"])
            return result, torch.tensor(recv_rows.astype(np.int32))
        raise PbmError(f"rank {self.rank}: unknown collective kind {kind!r} for '{name}'")


def fast_engine_name(name: str) -> str:
    """The engine's name of a fast allreduce (kept apart from a script's own pbm calls)."""
    return "hvd:" + name


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor MPI can reduce exactly: 16-bit floats in float32 (rounded back once),
    8/16-bit integers in int64 (cast back with Horovod's wrap-around), others as they are."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.to(torch.float32).contiguous()
    if tensor.dtype in (torch.uint8, torch.int8, torch.int16):
        return tensor.to(torch.int64).contiguous()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a writable numpy array (no copy)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8).numpy()
    return flat.view(torch.uint8).numpy()
