"""pbm.DistributedDataParallel on real MPI ranks.

Each rank trains on its shard of a global batch; it also trains a local copy on the whole
global batch (the single-process reference) and compares parameters.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch

import pybrain_mpi as pbm
from .helpers import grouping, nodes, on  # noqa: F401  (nodes: the fixture)

RANKS = (1, 2, 3, 4)
TIMEOUT_S = 600


@pytest.fixture(autouse=True)
def float64_single_thread():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)


def make_model(seed: int = 0, hidden: int = 24) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 5), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 28, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3),
    )


def global_batch(step: int, per_rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(per_rank * n, 1, 32, generator=g)
    y = torch.randn(per_rank * n, 3, generator=g)
    return x, y


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4)


def _equivalence(comm, optimizer_kind: str, bucket_kib: str = "1", algorithm: str = "ring") -> None:
    """n ranks with per-rank batches == 1 rank on the concatenated batch, 20 steps."""
    n, r = comm.Get_size(), comm.Get_rank()
    per_rank = 4
    # Different initial weights per rank: the wrap-time broadcast must make them equal.
    model = make_model(seed=r)
    reference = make_model(seed=0)
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=int(bucket_kib) * 1024, first_bucket_bytes=512,
                                      algorithm=algorithm)
    opt = make_optimizer(optimizer_kind, ddp.parameters())
    ref_opt = make_optimizer(optimizer_kind, reference.parameters())
    loss_fn = torch.nn.MSELoss()
    for step in range(20):
        x, y = global_batch(step, per_rank, n)
        mine = slice(r * per_rank, (r + 1) * per_rank)
        opt.zero_grad(set_to_none=(step % 2 == 0))  # both styles of zeroing
        loss_fn(ddp(x[mine]), y[mine]).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(reference(x), y).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    assert len(ddp.bucket_sizes_bytes) > 1, ddp.bucket_sizes_bytes
    # all ranks bitwise identical
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert all(t == flat.numpy().tobytes() for t in comm.allgather(flat.numpy().tobytes()))


def _no_sync(comm) -> None:
    """Gradient accumulation: two no_sync micro-batches plus one synced == reference."""
    n, r = comm.Get_size(), comm.Get_rank()
    model, reference = make_model(0), make_model(0)
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=2048)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    for step in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        for micro in range(3):
            x, y = global_batch(10 * step + micro, 2, n)
            mine = slice(r * 2, (r + 1) * 2)
            if micro < 2:
                with ddp.no_sync():
                    loss_fn(ddp(x[mine]), y[mine]).backward()
            else:
                loss_fn(ddp(x[mine]), y[mine]).backward()
            (loss_fn(reference(x), y) / n).backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-11)


def _overlap(comm) -> None:
    """Bucket allreduces start before backward ends (recorded timestamps)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(256, 256), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=300_000, first_bucket_bytes=100_000)
    x = torch.randn(64, 256)
    early = 0
    for _ in range(3):
        ddp.zero_grad()
        ddp(x).pow(2).mean().backward()
        backward_end = ddp.backward_finished_at
        early = max(early, sum(1 for b in ddp.timeline if b["launched_at"] < backward_end))
    assert len(ddp.timeline) >= 4, ddp.timeline
    assert early >= 2, f"only {early} of {len(ddp.timeline)} buckets launched before backward ended"
    print(f"rank {comm.Get_rank()}: {early}/{len(ddp.timeline)} buckets started during backward")


def _unused(comm) -> None:
    """A parameter used only on rank 0 neither hangs nor desynchronizes the ranks."""
    n, r = comm.Get_size(), comm.Get_rank()

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)

        def forward(self, x, use_b):
            return self.b(self.a(x)) if use_b else self.a(x)

    torch.manual_seed(0)
    model = Branchy()
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=64, first_bucket_bytes=64)
    x = torch.ones(2, 4)
    for _ in range(3):
        ddp.zero_grad(set_to_none=True)
        ddp(x, use_b=(r == 0)).sum().backward()
    # rank 0's gradient of b, averaged with zeros from the others
    torch.manual_seed(0)
    ref = Branchy()
    ref(x, True).sum().backward()
    torch.testing.assert_close(model.b.weight.grad, ref.b.weight.grad / n)


def _mismatch(comm) -> None:
    """A rank with a different model raises CollectiveMismatch naming the parameter."""
    n, r = comm.Get_size(), comm.Get_rank()
    model = make_model(0, hidden=24 if r != n - 1 else 25)
    try:
        pbm.DistributedDataParallel(model)
    except pbm.CollectiveMismatch as error:
        text = str(error)
        assert "3.weight" in text and f"rank {n - 1}" in text, text
        print(f"rank {r}: {text.splitlines()[0]}")
    else:
        raise AssertionError("model mismatch not detected")


def _stall(comm) -> None:
    """A slow rank triggers a stall warning naming it; training then completes."""
    n, r = comm.Get_size(), comm.Get_rank()
    model = make_model(0)
    ddp = pbm.DistributedDataParallel(model, stall_warn_s=0.5)
    x, y = global_batch(0, 2, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if r == n - 1:
            time.sleep(2.5)
        torch.nn.functional.mse_loss(ddp(x[:2]), y[:2]).backward()
    if r == 0:
        stalls = [str(w.message) for w in caught if "has waited" in str(w.message)]
        assert stalls and f"[{n - 1}]" in stalls[0], [str(w.message) for w in caught]
        print(f"stall warning: {stalls[0]}")


def _horovod_compression(comm) -> None:
    """A Horovod-style compress()/decompress() object goes through DDP's one launch path:
    every bucket's handle is a pbm.Handle, and fp16 on the wire trains like the reference."""
    import pybrain_mpi.horovod as hvd

    n, r = comm.Get_size(), comm.Get_rank()
    model, reference = make_model(0), make_model(0)
    ddp = pbm.DistributedDataParallel(model, bucket_bytes=1024, first_bucket_bytes=512,
                                      compression=hvd.Compression.fp16, check_finite=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(5):
        x, y = global_batch(step, 4, n)
        mine = slice(r * 4, (r + 1) * 4)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        assert all(isinstance(b.handle, pbm.Handle) for b in ddp._buckets)
        assert ddp.grads_finite is None  # a compressor's tensor says nothing about the gradient
        assert all(p.grad.dtype == torch.float64 for p in model.parameters())
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-2, atol=1e-3)
    assert len(ddp.bucket_sizes_bytes) > 1


def _resume_3lc(comm, algorithms: str, steps_text: str, block: int = 0) -> None:
    """3LC DDP saved after k steps and resumed in a fresh wrapper (model, optimizer and
    compression state loaded) continues bitwise like the run that was never interrupted:
    every residual of the path (flat, or both hierarchical stages) is in the state dict.
    `block`: ThreeLC's block size (0: one scale per tensor)."""
    from pybrain_mpi.compression import ThreeLC

    n, r = comm.Get_size(), comm.Get_rank()
    k = int(steps_text)

    def wrap(seed: int) -> tuple:
        model = make_model(seed).float()
        ddp = pbm.DistributedDataParallel(model, bucket_bytes=2048, first_bucket_bytes=256,
                                          algorithm=algorithm, compression=ThreeLC(1.0, block=block))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        return model, ddp, opt

    def train(model, ddp, opt, first: int, last: int) -> None:
        for step in range(first, last):
            x, y = global_batch(step, 4, n)
            mine = slice(r * 4, (r + 1) * 4)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x[mine].float()), y[mine].float()).backward()
            opt.step()

    def snapshot(model) -> bytes:
        return b"".join(p.detach().numpy().tobytes() for p in model.parameters())

    for algorithm in algorithms.split(","):
        model, ddp, opt = wrap(0)
        assert len(ddp.bucket_sizes_bytes) > 1, ddp.bucket_sizes_bytes
        train(model, ddp, opt, 0, k)
        saved_model = {key: v.clone() for key, v in model.state_dict().items()}
        saved_opt = copy.deepcopy(opt.state_dict())
        saved_compression = {key: v.clone() for key, v in ddp.compression_state_dict().items()}
        train(model, ddp, opt, k, 2 * k)
        uninterrupted = snapshot(model)

        model2, ddp2, opt2 = wrap(seed=r + 1)  # other initial weights: everything must come from the state
        model2.load_state_dict(saved_model)
        opt2.load_state_dict(saved_opt)
        ddp2.load_compression_state_dict(saved_compression)
        train(model2, ddp2, opt2, k, 2 * k)
        resumed = snapshot(model2)
        differing = sum(a != b for a, b in zip(uninterrupted, resumed))
        assert resumed == uninterrupted, (
            f"{algorithm} on {n} ranks: the resumed 3LC run differs from the uninterrupted one "
            f"({differing} bytes differ); saved keys {sorted(saved_compression)}")
        ddp.remove_hooks()
        ddp2.remove_hooks()
        pbm.shared_reset()
        print(f"rank {r}: {algorithm} resume exact, keys {sorted(saved_compression)}", flush=True)


# --- tests ---------------------------------------------------------------------------------

@on(2, 3)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_ranks_with_shards_match_one_process_on_the_whole_batch(comm, optimizer):
    _equivalence(comm, optimizer)


@on(1)
def test_single_rank_wrap_trains_like_the_plain_model(comm):
    _equivalence(comm, "sgd")


@grouping((2, 2), (3, 2))
def test_ddp_with_shared_memory_buckets_matches_one_process(comm, nodes):
    _equivalence(comm, "sgd", "1", "shm" if pbm.size() == 2 else "hierarchical")


@on(2, 3)
def test_no_sync_accumulates_gradients_locally(comm):
    _no_sync(comm)


@on(2, 3)
def test_sync_buffers_gives_every_rank_rank_0s_batch_norm_statistics(comm):
    # A training forward updates each rank's running statistics from its own batch, after
    # forward broadcast rank 0's: without sync_buffers the ranks evaluate different models.
    r = comm.Get_rank()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ddp = pbm.DistributedDataParallel(module)
    torch.manual_seed(10 + r)
    ddp(torch.randn(8, 4) * (r + 1)).sum().backward()
    stats = torch.cat([module[1].running_mean, module[1].running_var])
    gathered = comm.allgather(stats.clone())
    assert not torch.equal(gathered[0], gathered[1]), "the ranks' batches should differ"
    ddp.sync_buffers()
    stats = torch.cat([module[1].running_mean, module[1].running_var])
    assert torch.equal(stats, gathered[0]), f"rank {r} kept its own statistics"
    ddp.remove_hooks()


@on(2)
def test_bucket_allreduces_start_before_backward_ends(comm):
    _overlap(comm)


@on(2, 3)
def test_parameter_unused_on_some_ranks_does_not_hang(comm):
    _unused(comm)


@on(2, 3)
def test_different_models_raise_mismatch_naming_the_parameter(comm):
    _mismatch(comm)


@on(3)
def test_slow_rank_triggers_stall_warning_naming_it(comm, capsys):
    _stall(comm)
    if comm.Get_rank() == 0:
        assert "stall warning" in capsys.readouterr().out


@on(2)
def test_horovod_style_compression_runs_through_the_same_launch_path(comm):
    _horovod_compression(comm)


@grouping((4, 2), (3, 2))
def test_resumed_3lc_run_matches_the_uninterrupted_one_bitwise(comm, nodes):
    # 2 nodes of 2 ranks, and 2 + 1 (a lone node rank owning both slices); hierarchical 3LC
    # (both stages' residuals per owned slice) and the flat 3LC allreduce
    _resume_3lc(comm, "hierarchical,ring", "3")


@grouping((4, 2), (3, 2))
def test_resumed_block_scaled_3lc_run_matches_the_uninterrupted_one_bitwise(comm, nodes):
    _resume_3lc(comm, "hierarchical,ring", "3", block=64)


@on(2, 3)
def test_3lc_per_tensor_gives_each_parameter_its_own_scale_and_residuals(comm):
    _per_tensor_3lc(comm, block=0)


@on(2, 3)
def test_block_scaled_3lc_ddp_matches_allreduce_of_each_parameter(comm):
    _per_tensor_3lc(comm, block=64)


def _per_tensor_3lc(comm, block: int) -> None:
    # ThreeLC(per_tensor=True) (the default): one bucket per parameter, so each gradient is
    # 3LC-averaged with its own scale(s) and error feedback, exactly as allreduce_ of that
    # tensor alone with its own state; per_tensor=False keeps the byte-size buckets.
    from pybrain_mpi.compression import ThreeLC

    n, r = comm.Get_size(), comm.Get_rank()
    model = make_model(seed=0).float()
    ddp = pbm.DistributedDataParallel(model, compression=ThreeLC(1.0, block=block))
    assert len(ddp.bucket_sizes_bytes) == len(list(model.parameters()))
    shadow = make_model(seed=0).float()
    codec = ThreeLC(1.0, block=block)
    states = [codec.new_state(p, name=name) for name, p in shadow.named_parameters()]
    for step in range(4):
        x, y = global_batch(step, 4, n)
        mine = slice(r * 4, (r + 1) * 4)
        model.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[mine].float()), y[mine].float()).backward()
        shadow.zero_grad()
        torch.nn.functional.mse_loss(shadow(x[mine].float()), y[mine].float()).backward()
        # DDP launches buckets in reverse parameter order; the states are per tensor, so the
        # order of these allreduces does not change their results.
        for (name, p), q, state in zip(model.named_parameters(), shadow.parameters(), states):
            expected = q.grad.detach().clone().reshape(-1)
            pbm.allreduce_(expected, op="avg", compression=codec, state=state, name=name)
            assert torch.equal(p.grad.reshape(-1), expected), f"step {step}: {name} differs on rank {r}"
    ddp.remove_hooks()
    bucketed = pbm.DistributedDataParallel(make_model(seed=0).float(), compression=ThreeLC(1.0, per_tensor=False))
    assert len(bucketed.bucket_sizes_bytes) == 1, bucketed.bucket_sizes_bytes
    bucketed.remove_hooks()
