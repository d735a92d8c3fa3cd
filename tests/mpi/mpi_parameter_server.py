"""pbm.parallel.ParameterServer (Downpour SGD) on real MPI ranks: 1 server + 1..3 workers and
2 servers + 2 workers.

With one worker that pushes and fetches every step and plain SGD on the server, asynchronous
training is ordinary SGD: the result must equal single-process SGD bit for bit in float64 (the
same element-wise update, only split into shards). With several workers: the shards cover every
parameter exactly once, the staleness bound holds on every applied push, the warm start keeps
the other workers waiting, and training still lowers the loss. Killed workers and servers are in
tests/test_parameter_server.py (tests/workers/ps_worker.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
from mpi4py import MPI

import pybrain_mpi as pbm
from pybrain_mpi.parallel import ParameterServer
from .helpers import WORLD, on

RANKS = (2, 3, 4)
TIMEOUT_S = 400

SERVERS = {2: 1, 3: 1, 4: 2}  # 1 server + 1 or 2 workers; 2 servers + 2 workers


@pytest.fixture(autouse=True)
def float64_single_thread():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)


def make_model(seed: int = 0) -> torch.nn.Sequential:
    """Uneven parameter sizes (3*2*3=18, 3, 30*7=210, 7, 7*2=14, 2): shards straddle them."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(30, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))


def batch(step: int, worker: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + step)
    x = torch.randn(n, 2, 10, generator=g)
    return x, x[:, :, :2].sum(dim=2) + 0.1 * torch.randn(n, 2, generator=g)


def loss_of(model: torch.nn.Module, step: int, worker: int = 0) -> torch.Tensor:
    x, y = batch(step, worker)
    return torch.nn.functional.mse_loss(model(x), y)


def train_worker(ps: ParameterServer, steps: int) -> None:
    for step in range(steps):
        ps.begin_step()
        loss_of(ps.model, step, ps.worker).backward()
        ps.step()
    ps.finish()


@on(2)
def test_one_worker_pushing_and_fetching_every_step_equals_single_process_sgd_exactly(rank):
    model = make_model()
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    ps = ParameterServer(model, sgd, servers=1, fetch_every=1, push_every=1)
    steps = 25
    if ps.is_server:
        report = ps.serve()
        assert report.pushes_applied == steps and report.lost_workers == [] and report.done_workers == [1]
        assert report.staleness_histogram == {0: steps}
        final = None
    else:
        train_worker(ps, steps)
        final = [p.detach().clone() for p in model.parameters()]
        reference = make_model()
        optimizer = sgd(reference.parameters())
        for step in range(steps):
            optimizer.zero_grad()
            loss_of(reference, step).backward()
            optimizer.step()
        for mine, theirs in zip(final, reference.parameters()):
            assert torch.equal(mine, theirs.detach()), (mine - theirs).abs().max()
        assert ps.stats()["max_staleness"] == 0 and ps.stats()["pushes"] == steps


def test_shards_cover_every_parameter_exactly_once_balanced_by_bytes(rank):
    servers = SERVERS[WORLD]
    model = make_model(seed=3)
    sizes = [p.numel() for p in model.parameters()]
    shards = pbm.parallel.shard_ranges(sizes, servers, 8)
    covered = [torch.zeros(n, dtype=torch.int64) for n in sizes]
    for shard in shards:
        for index, start, stop in shard:
            covered[index][start:stop] += 1
    assert all(bool((c == 1).all()) for c in covered)
    elements = [sum(b - a for _, a, b in shard) for shard in shards]
    assert max(elements) - min(elements) <= 1, elements
    # On real ranks: what a worker fetches is every server's slice of the servers' model.
    ps = ParameterServer(make_model(seed=3), servers=servers)
    if ps.is_server:
        report = ps.serve()
        assert report.elements == elements[ps.rank] and report.fetches == ps.workers
    else:
        fresh = make_model(seed=99)
        ps.model.load_state_dict(fresh.state_dict())
        ps.fetch()
        for mine, theirs in zip(ps.model.parameters(), model.parameters()):
            assert torch.equal(mine.detach(), theirs.detach())
        ps.finish(final_fetch=False)


@on(3, 4)
def test_staleness_is_measured_and_bounded_with_several_workers(rank):
    servers = SERVERS[WORLD]
    bound = 1
    ps = ParameterServer(make_model(), functools.partial(torch.optim.Adagrad, lr=0.05), servers=servers,
                         fetch_every=2, push_every=1, max_staleness=bound)
    steps = 30
    if ps.is_server:
        report = ps.serve()
        counts = (report.pushes_applied, report.pushes_dropped_stale)
        assert report.max_staleness <= bound, report.staleness_histogram
        assert report.pushes_applied + report.pushes_dropped_stale == steps * ps.workers, counts
        assert sorted(report.done_workers) == list(range(servers, WORLD)) and report.lost_workers == []
        result = ("server", report.as_dict())
    else:
        before = sum(float(loss_of(make_model(), s, ps.worker).detach()) for s in range(steps, steps + 5))
        train_worker(ps, steps)
        after = sum(float(loss_of(ps.model, s, ps.worker).detach()) for s in range(steps, steps + 5))
        stats = ps.stats()
        assert stats["max_staleness"] <= bound and stats["steps"] == steps
        assert after < before, (before, after)
        result = ("worker", stats)
    results = MPI.COMM_WORLD.allgather(result)
    applied = sum(r["pushes_applied"] for kind, r in results if kind == "server")
    pushed = sum(r["pushes"] for kind, r in results if kind == "worker")
    # Every applied push is counted once by its server and once by the worker that sent it.
    assert applied == pushed, (applied, pushed)


@on(3, 4)
def test_warm_start_keeps_other_workers_waiting_until_worker0_is_past_it(rank):
    servers = SERVERS[WORLD]
    warm = 6
    ps = ParameterServer(make_model(), functools.partial(torch.optim.SGD, lr=0.05), servers=servers,
                         warm_start_steps=warm)
    steps = 10
    if ps.is_server:
        report = ps.serve()
        assert report.pushes_applied == steps * ps.workers
    else:
        ps.begin_step()
        first = min(ps._fetched)
        if ps.worker == 0:
            assert first == 0
        else:
            assert first >= warm, first  # worker 0 had pushed its warm-start steps
        loss_of(ps.model, 0, ps.worker).backward()
        ps.step()
        for step in range(1, steps):
            ps.begin_step()
            loss_of(ps.model, step, ps.worker).backward()
            ps.step()
        ps.finish()


def test_misuse_is_refused_with_clear_errors(rank):
    servers = SERVERS[WORLD]
    with pytest.raises(pbm.PbmError, match="fetch_every must be an integer >= 1"):
        ParameterServer(make_model(), servers=servers, fetch_every=0)
    with pytest.raises(pbm.PbmError, match="need at least one worker"):
        ParameterServer(make_model(), servers=WORLD)
    with pytest.raises(pbm.PbmError, match="same dtype"):
        pbm.parallel.shard_ranges([3, 4], 1, [4, 8])


@on(2)
def test_state_saved_mid_push_interval_and_restored_continues_exactly(rank):
    """Server state (shard, Adagrad sums, version) and worker state (fetched parameters, unpushed
    gradient sum, step count) saved after step 3 of push_every=2 / fetch_every=3 and restored
    into fresh ParameterServers: the run ends bit for bit where the uninterrupted one does."""
    adagrad = functools.partial(torch.optim.Adagrad, lr=0.05)
    kwargs = dict(servers=1, fetch_every=3, push_every=2)

    def run(first: int, last: int, state=None):
        model = make_model()
        ps = ParameterServer(model, adagrad, **kwargs)
        if ps.is_server:
            if state is not None:
                ps.load_state_dict(state)
            ps.serve()
            return ps.state_dict()
        if state is not None:
            ps.load_worker_state_dict(state)
        assert ps.local_steps == first
        for step in range(first, last):
            ps.begin_step()
            loss_of(ps.model, step).backward()
            ps.step()
        state = ps.worker_state_dict()
        final = last == 7
        ps.finish(final_fetch=final, push_pending=final)
        return [p.detach().clone() for p in model.parameters()] if final else state

    whole = run(0, 7)
    middle = run(0, 3)
    if rank == 1:
        assert middle["pending_grads"] == 1 and middle["fetched"] == [1] and middle["local_steps"] == 3
    resumed = run(3, 7, middle)
    if rank == 0:
        assert resumed["version"] == whole["version"] == 4
        assert torch.equal(resumed["shard"], whole["shard"])
    else:
        for a, b in zip(whole, resumed):
            assert torch.equal(a, b)
