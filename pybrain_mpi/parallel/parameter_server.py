"""Asynchronous data parallelism with parameter-server ranks (Downpour SGD).

Dean et al., "Large Scale Distributed Deep Networks" (NIPS 2012), section 4.1: the model's
parameters live on server ranks, split into shards; each worker trains on its own data, fetches
fresh parameters every ``fetch_every`` steps and pushes its accumulated gradients every
``push_every`` steps; the servers apply them with their own optimizer (Adagrad there and by
default here) in whatever order they arrive. No worker ever waits for another worker, only for
the servers' replies. See docs/parameter_server.md.

    ps = pbm.parallel.ParameterServer(model, servers=1, fetch_every=1, push_every=1)
    if ps.is_server:
        report = ps.serve()                 # until every worker is done (or lost)
    else:
        for x, y in loader:
            ps.begin_step()                 # fetches when due (warm start, staleness bound)
            loss_fn(model(x), y).backward()
            ps.step()                       # accumulates model's .grad; pushes/fetches when due
        ps.finish()                         # tells the servers this worker is done

Ranks ``0 .. servers-1`` of ``comm`` are servers, the others workers (worker ``w`` is rank
``servers + w``). Protocol (one request, one reply per server and step):

1. A worker sends a request ``[flags, worker_step, fetched_version]`` (``flags``: push, fetch,
   done, warm-start fetch) and, with a push, its gradient slice for that server.
2. The server applies a push unless it is too stale (``version - fetched_version >
   max_staleness``: then it is dropped and counted), replies ``[version, staleness, applied,
   ready]`` and, for a fetch, sends its shard (a snapshot: the live shard keeps changing).
3. A warm-start fetch (workers other than 0, while worker 0 trains the first
   ``warm_start_steps`` steps alone) is answered ``ready = 0`` after at most a second; the
   worker asks again, so the server keeps hearing from it.

Failures: the server polls with :meth:`Channel.probe_any` (native, GIL released), so a silent
worker costs it nothing; a worker not heard from for ``worker_timeout_s`` is reported lost and
the server carries on with the others (it rejoins if it speaks again). A worker whose server is
gone gets :class:`~pybrain_mpi.CollectiveTimeout` naming the server rank within the deadline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..communication import context
from ..errors import PbmError
from .p2p import Channel

__all__ = ["ParameterServer", "ServerReport", "shard_ranges"]

# Message tags on the parameter server's own channel.
_TAG_REQUEST = 1
_TAG_GRAD = 2
_TAG_REPLY = 3
_TAG_PARAMS = 4

# Request flags.
_PUSH = 1
_FETCH = 2
_DONE = 4
_WARM = 8  # a fetch that waits for the end of the warm start

_WARM_RETRY_S = 1.0  # a deferred warm-start fetch is answered "not ready" after this long


def shard_ranges(numels: Sequence[int], servers: int, element_bytes: int | Sequence[int] = 1
                 ) -> list[list[tuple[int, int, int]]]:
    """Splits parameters (``numels`` elements each, in order) over ``servers`` shards balanced by
    bytes: the parameters' concatenation is cut into ``servers`` contiguous runs whose byte sizes
    differ by at most one element's. Returns, per server, its pieces ``(parameter index, start,
    stop)`` (element offsets inside that parameter); a parameter may straddle two servers.

    Every element belongs to exactly one piece. Only element-wise optimizers (SGD, Adam,
    Adagrad, ...) give the same result on a shard as on whole parameters."""
    if servers < 1:
        raise PbmError(f"parameter server: servers must be >= 1, got {servers}")
    if isinstance(element_bytes, int):
        element_bytes = [element_bytes] * len(numels)
    if len(set(element_bytes)) > 1:
        raise PbmError("parameter server: every parameter must have the same dtype "
                       f"(element sizes {sorted(set(element_bytes))} bytes)")
    total = sum(int(n) for n in numels)
    if total < servers:
        raise PbmError(f"parameter server: {total} parameter elements cannot fill {servers} shards")
    bounds = [total * s // servers for s in range(servers + 1)]
    shards: list[list[tuple[int, int, int]]] = [[] for _ in range(servers)]
    offset = 0
    for index, numel in enumerate(numels):
        lo, hi = offset, offset + int(numel)
        for s in range(servers):
            a, b = max(lo, bounds[s]), min(hi, bounds[s + 1])
            if a < b:
                shards[s].append((index, a - offset, b - offset))
        offset = hi
    return shards


@dataclass
class ServerReport:
    """What one server rank saw: its shard, the pushes it applied or dropped, their staleness
    (server version when the gradient arrived minus the version it was computed from), and the
    workers that finished, were lost (silent past the deadline) or rejoined (world ranks)."""

    rank: int
    elements: int
    version: int = 0
    pushes_applied: int = 0
    pushes_dropped_stale: int = 0
    fetches: int = 0
    staleness_histogram: dict[int, int] = field(default_factory=dict)
    done_workers: list[int] = field(default_factory=list)
    lost_workers: list[int] = field(default_factory=list)
    rejoined_workers: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    wall_s: float = 0.0

    @property
    def max_staleness(self) -> int:
        """Largest staleness of an applied push (0 when none was applied)."""
        return max(self.staleness_histogram, default=0)

    @property
    def mean_staleness(self) -> float:
        """Mean staleness of the applied pushes."""
        n = sum(self.staleness_histogram.values())
        return sum(k * v for k, v in self.staleness_histogram.items()) / n if n else 0.0

    def as_dict(self) -> dict:
        """JSON-ready form (summary.json)."""
        return {"rank": self.rank, "elements": self.elements, "version": self.version,
                "pushes_applied": self.pushes_applied, "pushes_dropped_stale": self.pushes_dropped_stale,
                "fetches": self.fetches, "max_staleness": self.max_staleness,
                "mean_staleness": self.mean_staleness,
                "staleness_histogram": {str(k): v for k, v in sorted(self.staleness_histogram.items())},
                "done_workers": self.done_workers, "lost_workers": self.lost_workers,
                "rejoined_workers": self.rejoined_workers, "bytes_sent": self.bytes_sent,
                "wall_s": self.wall_s}


def _default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=1e-2)


class ParameterServer:
    """Downpour SGD over the ranks of ``comm`` (default: pybrain-mpi's world); collective over it.

    ``model``: the same architecture on every rank (servers take their shard's initial values
    from their own copy; workers start from a fetch). ``optimizer``: a factory
    ``f(params) -> torch.optim.Optimizer`` run on each server over its flat shard (default
    ``torch.optim.Adagrad(lr=0.01)``; ``pbm.optim.FusedAdagrad`` and the other project optimizers
    fit, e.g. ``functools.partial(pbm.optim.FusedAdagrad, lr=0.05)``); it must be element-wise.
    ``servers``: how many leading ranks are servers. ``fetch_every`` / ``push_every``: worker
    steps between fetches / pushes (gradients are summed locally in between). ``warm_start_steps``:
    only worker 0 trains for its first N steps, the others wait for their first fetch until then.
    ``max_staleness``: the bound on staleness (None: unbounded); a worker whose last fetched
    version lags the last version it heard of by more fetches before computing, and a server
    drops a push that arrives staler still. ``worker_timeout_s``: how long a server waits to hear
    from a worker before reporting it lost (default: the channel's ``PBM_TIMEOUT_S``).
    ``timeout_s``: deadline of a worker's waits on a server.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 *, servers: int = 1, fetch_every: int = 1, push_every: int = 1, warm_start_steps: int = 0,
                 max_staleness: int | None = None, worker_timeout_s: float | None = None,
                 timeout_s: float | None = None, comm: Any = None):
        for name, value, low in (("servers", servers, 1), ("fetch_every", fetch_every, 1),
                                 ("push_every", push_every, 1), ("warm_start_steps", warm_start_steps, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PbmError(f"parameter server: {name} must be an integer >= {low}, got {value!r}")
        if max_staleness is not None and (not isinstance(max_staleness, int) or max_staleness < 0):
            raise PbmError(f"parameter server: max_staleness must be an integer >= 0 or None, got {max_staleness!r}")
        if not context.is_initialized():
            context.init()
        factory = optimizer or _default_optimizer
        comm = context.current().comm if comm is None else comm
        if comm.Get_rank() < servers:
            # The first optimizer step imports parts of torch (seconds on a loaded machine): done
            # on a throwaway tensor before the channel's set-up, which the workers wait for, so
            # their first fetch does not spend its deadline on it.
            probe = torch.nn.Parameter(torch.zeros(1, dtype=next(model.parameters()).dtype))
            probe.grad = torch.zeros_like(probe)
            factory([probe]).step()
        self.channel = Channel(comm, timeout_s=timeout_s)
        if self.channel.size < servers + 1:
            raise PbmError(f"parameter server: {servers} server rank(s) need at least one worker, but the "
                           f"communicator has {self.channel.size} rank(s)")
        self.model = model
        self.servers = servers
        self.workers = self.channel.size - servers
        self.fetch_every, self.push_every = fetch_every, push_every
        self.warm_start_steps = warm_start_steps
        self.max_staleness = max_staleness
        self.worker_timeout_s = self.channel.timeout_s if worker_timeout_s is None else float(worker_timeout_s)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise PbmError("parameter server: the model has no trainable parameters")
        self.dtype = self.params[0].dtype
        self.shards = shard_ranges([p.numel() for p in self.params], servers,
                                   [p.element_size() for p in self.params])
        self.shard_sizes = [sum(b - a for _, a, b in shard) for shard in self.shards]
        self.rank = self.channel.rank
        self.is_server = self.rank < servers
        self.world_rank = self.channel.world_ranks[self.rank]
        if self.is_server:
            self._shard = torch.nn.Parameter(self._gather(self.rank, [p.detach() for p in self.params]).clone())
            self._optimizer = factory([self._shard])
            self._version = 0
            self.report = ServerReport(rank=self.world_rank, elements=self.shard_sizes[self.rank])
        else:
            self.worker = self.rank - servers
            self._accumulated = [torch.zeros_like(p) for p in self.params]
            self._local_steps = 0          # steps taken by this worker
            self._pending_grads = 0        # steps accumulated since the last push
            self._fetched = [-1] * servers  # version of each shard last fetched
            self._known = [0] * servers     # newest version of each shard heard of
            self.staleness: list[int] = []  # staleness of this worker's applied pushes
            self.dropped_pushes = 0
            self.fetches = 0
            self._finished = False

    # ------------------------------------------------------------------ shards
    def _gather(self, server: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The flat slice of ``tensors`` (one per parameter) that ``server`` holds."""
        pieces = [tensors[i].reshape(-1)[a:b] for i, a, b in self.shards[server]]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()

    def _scatter(self, server: int, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        offset = 0
        for i, a, b in self.shards[server]:
            tensors[i].data.view(-1)[a:b].copy_(flat[offset:offset + b - a])
            offset += b - a

    # ------------------------------------------------------------------ server
    def serve(self, *, checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0) -> ServerReport:
        """Runs this server's update loop until every worker is done or lost; returns its report.

        Each request is handled as it comes, from whichever worker sent it; the wait for the next
        one polls in the native core with the GIL released. With ``checkpoint_dir`` the shard is
        saved there (:meth:`save`) every ``checkpoint_every`` versions (0: only at the end) and
        when the loop ends."""
        if not self.is_server:
            raise PbmError(f"rank {self.world_rank}: serve() is for server ranks; this rank is a worker")
        ch, report = self.channel, self.report
        started = time.monotonic()
        workers = list(range(self.servers, ch.size))
        heard = {w: started for w in workers}
        active = set(workers)
        lost: set[int] = set()
        warm_waiting: dict[int, float] = {}  # worker -> when its warm-start fetch came
        warm_done = self.warm_start_steps == 0
        sends: list = []                      # replies/shards in flight (to (worker, message))
        poll_s = min(0.2, self.worker_timeout_s / 4)
        while active or warm_waiting:
            sends = [(w, m) for w, m in sends if not m.done()]
            source = ch.probe_any(_TAG_REQUEST, poll_s)
            now = time.monotonic()
            if source >= 0:
                request = ch.recv(source, _TAG_REQUEST, "ps request")
                flags, worker_step, fetched = (int(v) for v in request.tolist())
                heard[source] = now
                if source in lost:  # a worker that returns rejoins (it fetches first)
                    lost.discard(source)
                    active.add(source)
                    report.rejoined_workers.append(ch.world_ranks[source])
                reply = [self._version, -1, 0, 1]
                if flags & _PUSH:
                    grad = ch.irecv((self.shard_sizes[self.rank],), self.dtype, source, _TAG_GRAD,
                                    "ps gradient").wait()
                    staleness = self._version - fetched
                    reply[1] = staleness
                    if self.max_staleness is not None and staleness > self.max_staleness:
                        report.pushes_dropped_stale += 1
                    else:
                        self._shard.grad = grad
                        self._optimizer.step()
                        self._shard.grad = None
                        self._version += 1
                        report.pushes_applied += 1
                        if checkpoint_dir is not None and checkpoint_every and self._version % checkpoint_every == 0:
                            self.save(checkpoint_dir)
                        report.staleness_histogram[staleness] = report.staleness_histogram.get(staleness, 0) + 1
                        reply[2] = 1
                    reply[0] = self._version
                    if source == self.servers and worker_step >= self.warm_start_steps:
                        warm_done = True
                if flags & _DONE:
                    active.discard(source)
                    warm_waiting.pop(source, None)
                    report.done_workers.append(ch.world_ranks[source])
                    if source == self.servers:
                        warm_done = True  # worker 0 stopped early: nobody to wait for
                if flags & _WARM and not warm_done:
                    warm_waiting[source] = now
                elif flags & (_PUSH | _FETCH):  # "done" alone is not answered: nobody would read it
                    self._reply(sends, source, reply, bool(flags & _FETCH))
            # Deferred warm-start fetches: served once worker 0 is past the warm start (or gone),
            # else told "not ready" within a second so they ask again.
            for w, since in list(warm_waiting.items()):
                if warm_done or now - since >= _WARM_RETRY_S:
                    del warm_waiting[w]
                    self._reply(sends, w, [self._version, -1, 0, int(warm_done)], warm_done)
            for w in list(active):
                if w not in warm_waiting and now - heard[w] > self.worker_timeout_s:
                    active.discard(w)
                    lost.add(w)
                    report.lost_workers.append(ch.world_ranks[w])
                    if w == self.servers:
                        warm_done = True
        # Replies still in flight to live workers are finished; those to lost ones abandoned.
        for w, message in sends:
            if w not in lost:
                message.wait()
        if checkpoint_dir is not None:
            self.save(checkpoint_dir)
        report.version = self._version
        report.bytes_sent = ch.bytes_sent
        report.wall_s = time.monotonic() - started
        return report

    def _reply(self, sends: list, worker: int, reply: list[int], with_shard: bool) -> None:
        ch = self.channel
        sends.append((worker, ch.isend(torch.tensor(reply, dtype=torch.int64), worker, _TAG_REPLY, "ps reply")))
        if with_shard:
            self.report.fetches += 1
            sends.append((worker, ch.isend(self._shard.detach().clone(), worker, _TAG_PARAMS, "ps shard")))

    # ------------------------------------------------------------------ server state
    def state_dict(self) -> dict:
        """A server's shard, optimizer state and version (for checkpoints)."""
        self._require_server("state_dict")
        return {"shard": self._shard.detach().clone(), "optimizer": self._optimizer.state_dict(),
                "version": self._version, "servers": self.servers, "server": self.rank,
                "elements": self.shard_sizes[self.rank]}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (same model, same number of servers)."""
        self._require_server("load_state_dict")
        if state["servers"] != self.servers or state["server"] != self.rank or \
                state["elements"] != self.shard_sizes[self.rank]:
            raise PbmError(f"rank {self.world_rank}: parameter-server checkpoint is shard {state['server']} "
                           f"of {state['servers']} ({state['elements']} elements); this rank holds shard "
                           f"{self.rank} of {self.servers} ({self.shard_sizes[self.rank]} elements)")
        with torch.no_grad():
            self._shard.copy_(state["shard"])
        self._optimizer.load_state_dict(state["optimizer"])
        self._version = int(state["version"])

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes this server's shard to ``directory/ps_shard<server>.pt`` atomically (a temporary
        file renamed over the old one: a crash leaves the previous checkpoint whole)."""
        self._require_server("save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"ps_shard{self.rank}.pt"
        temporary = directory / f".ps_shard{self.rank}.pt.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            torch.save(self.state_dict(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return path

    def load(self, directory: str | os.PathLike) -> None:
        """Restores :meth:`save`'s file for this server (tensors and plain values only: the file
        is read with ``torch.load(weights_only=True)``, never as an arbitrary pickle)."""
        self._require_server("load")
        path = Path(directory) / f"ps_shard{self.rank}.pt"
        if not path.exists():
            raise PbmError(f"rank {self.world_rank}: no parameter-server checkpoint {path} "
                           f"(shard {self.rank} of {self.servers})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated file, or one holding more than weights
            raise PbmError(f"rank {self.world_rank}: cannot read parameter-server checkpoint {path}: "
                           f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
        self.load_state_dict(state)

    def _require_server(self, what: str) -> None:
        if not self.is_server:
            raise PbmError(f"rank {self.world_rank}: {what}() is for server ranks; this rank is a worker")

    # ------------------------------------------------------------------ worker
    def _request(self, flags: int) -> list[Any]:
        """Sends one request (and this worker's gradient slices with a push) to every server;
        returns the posted messages (kept alive until their replies arrive)."""
        ch = self.channel
        posted = []
        for s in range(self.servers):
            header = torch.tensor([flags, self._local_steps, self._fetched[s]], dtype=torch.int64)
            posted.append(ch.isend(header, s, _TAG_REQUEST, "ps request"))
            if flags & _PUSH:
                posted.append(ch.isend(self._gather(s, self._accumulated), s, _TAG_GRAD, "ps gradient"))
        return posted

    def _exchange(self, flags: int) -> list[torch.Tensor]:
        """One round trip with every server; returns the replies. Raises
        :class:`~pybrain_mpi.CollectiveTimeout` naming a server that does not answer."""
        ch = self.channel
        posted = self._request(flags)
        replies = [ch.irecv((4,), torch.int64, s, _TAG_REPLY, f"ps reply from server {ch.world_ranks[s]}")
                   for s in range(self.servers)]
        out = [r.wait() for r in replies]
        ready = all(int(r[3]) == 1 for r in out)
        if flags & _FETCH and ready:
            shards = [ch.irecv((self.shard_sizes[s],), self.dtype, s, _TAG_PARAMS,
                               f"ps shard from server {ch.world_ranks[s]}") for s in range(self.servers)]
            for s, message in enumerate(shards):
                self._scatter(s, message.wait(), self.params)
                self._fetched[s] = int(out[s][0])
            self.fetches += 1
        for message in posted:
            message.wait()
        for s, r in enumerate(out):
            self._known[s] = max(self._known[s], int(r[0]))
        return out

    def _require_worker(self, what: str) -> None:
        if self.is_server:
            raise PbmError(f"rank {self.world_rank}: {what}() is for worker ranks; this rank is a server")

    def fetch(self) -> None:
        """Copies the servers' current parameters into the model (a worker other than 0 waits for
        the end of the warm start on its first fetch)."""
        self._require_worker("fetch")
        warm = self.warm_start_steps > 0 and self.worker != 0 and min(self._fetched) < 0
        while True:
            out = self._exchange(_FETCH | (_WARM if warm else 0))
            if all(int(r[3]) == 1 for r in out):
                return

    def push(self, grads: Sequence[torch.Tensor] | None = None, *, fetch: bool = False) -> list[int]:
        """Adds ``grads`` (one per trainable parameter; default: the model's ``.grad``) to the local
        sum and sends the sum to the servers now (then clears it); with ``fetch`` the servers'
        new parameters come back in the same round trip. Returns each server's staleness for this
        push (-1 where it was dropped as too stale: the worker then fetches)."""
        self._require_worker("push")
        self._accumulate(grads)
        return self._push(fetch)

    def _accumulate(self, grads: Sequence[torch.Tensor] | None) -> None:
        if grads is None:
            grads = [p.grad for p in self.params]
        if len(grads) != len(self.params):
            raise PbmError(f"push: {len(grads)} gradients for {len(self.params)} trainable parameters")
        for total, grad in zip(self._accumulated, grads):
            if grad is not None:
                total.add_(grad.detach())
        self._pending_grads += 1

    def _push(self, fetch: bool) -> list[int]:
        out = self._exchange(_PUSH | (_FETCH if fetch else 0))
        for total in self._accumulated:
            total.zero_()
        self._pending_grads = 0
        result = []
        for r in out:
            if int(r[2]):
                self.staleness.append(int(r[1]))
                result.append(int(r[1]))
            else:
                result.append(-1)
        if -1 in result:
            self.dropped_pushes += 1
            if not fetch:
                self.fetch()
        return result

    def lag(self) -> int:
        """Versions the servers are known to be ahead of this worker's parameters (largest shard)."""
        return max(k - f for k, f in zip(self._known, self._fetched))

    def begin_step(self) -> None:
        """Before a worker computes its gradient: fetches on the first step (after the warm start
        for workers other than 0), when the staleness bound would otherwise be passed, or waits
        out the warm start."""
        self._require_worker("begin_step")
        if min(self._fetched) < 0:
            self.fetch()
        elif self.max_staleness is not None and self.lag() > self.max_staleness:
            self.fetch()

    def step(self, grads: Sequence[torch.Tensor] | None = None) -> None:
        """After backward: accumulates the gradients (default: the model's ``.grad``, then zeroed)
        and pushes / fetches when ``push_every`` / ``fetch_every`` say so."""
        self._require_worker("step")
        self._accumulate(grads)
        if grads is None:
            for p in self.params:
                p.grad = None
        self._local_steps += 1
        push = self._local_steps % self.push_every == 0
        fetch = self._local_steps % self.fetch_every == 0
        if push:
            self._push(fetch)
        elif fetch:
            self.fetch()

    def finish(self, *, final_fetch: bool = True, push_pending: bool = True) -> None:
        """Pushes what is left (unless ``push_pending`` is false: a worker stopping to resume
        later keeps its partial gradient sum in :meth:`worker_state_dict` instead), optionally
        fetches the final parameters, and tells every server this worker is done (then they stop
        waiting for it)."""
        self._require_worker("finish")
        if self._finished:
            return
        if self._pending_grads and push_pending:
            self._push(final_fetch)
        elif final_fetch:
            self.fetch()
        for message in self._request(_DONE):
            message.wait()
        self._finished = True

    def worker_state_dict(self) -> dict:
        """A worker's whole state, for an exact resume: its parameters (the last fetched values it
        computes gradients on), the gradient sum not pushed yet, its step count and the shard
        versions it fetched and heard of, and its statistics. Plain tensors, ints and lists."""
        self._require_worker("worker_state_dict")
        return {"params": [p.detach().clone() for p in self.params],
                "accumulated": [t.clone() for t in self._accumulated],
                "local_steps": self._local_steps, "pending_grads": self._pending_grads,
                "fetched": list(self._fetched), "known": list(self._known),
                "staleness": list(self.staleness), "dropped_pushes": self.dropped_pushes,
                "fetches": self.fetches, "servers": self.servers, "workers": self.workers,
                "worker": self.worker, "elements": sum(self.shard_sizes)}

    def load_worker_state_dict(self, state: dict) -> None:
        """Restores :meth:`worker_state_dict` (same model, servers and worker count, same worker);
        a worker that had fetched before computes on its saved parameters, without fetching
        first."""
        self._require_worker("load_worker_state_dict")
        mine = (self.servers, self.workers, self.worker, sum(self.shard_sizes))
        saved = (state["servers"], state["workers"], state["worker"], state["elements"])
        if saved != mine:
            raise PbmError(f"rank {self.world_rank}: parameter-server worker state is worker {saved[2]} of "
                           f"{saved[1]} with {saved[0]} server(s) ({saved[3]} elements); this rank is "
                           f"worker {mine[2]} of {mine[1]} with {mine[0]} server(s) ({mine[3]} elements)")
        with torch.no_grad():
            for p, value in zip(self.params, state["params"]):
                p.copy_(value)
            for total, value in zip(self._accumulated, state["accumulated"]):
                total.copy_(value)
        self._local_steps = int(state["local_steps"])
        self._pending_grads = int(state["pending_grads"])
        self._fetched = [int(v) for v in state["fetched"]]
        self._known = [int(v) for v in state["known"]]
        self.staleness = [int(v) for v in state["staleness"]]
        self.dropped_pushes = int(state["dropped_pushes"])
        self.fetches = int(state["fetches"])

    @property
    def local_steps(self) -> int:
        """Steps this worker has taken (counting restored ones)."""
        return self._local_steps

    @property
    def known_versions(self) -> list[int]:
        """Each server's newest shard version this worker has heard of (from its last replies)."""
        return list(self._known)

    @property
    def pending_grads(self) -> int:
        """Steps summed into the local gradient since the last push."""
        return self._pending_grads

    def stats(self) -> dict:
        """A worker's own figures: steps, fetches, pushes dropped, staleness of its pushes."""
        self._require_worker("stats")
        s = self.staleness
        return {"rank": self.world_rank, "worker": self.worker, "steps": self._local_steps,
                "fetches": self.fetches, "pushes": len(s), "pushes_dropped_stale": self.dropped_pushes,
                "max_staleness": max(s, default=0), "mean_staleness": (sum(s) / len(s)) if s else 0.0,
                "bytes_sent": self.channel.bytes_sent}
