"""pbm.parallel on real MPI ranks: pipelines, the data x pipeline grid, tensor-split layers,
and the point-to-point channel under them.

Every check compares against the unsplit model run locally on each rank in float64: the
gradients a pipeline accumulates over its micro-batches must equal those of the whole batch
(up to summation order), with even and uneven balances and micro-batch counts that do not
divide the batch. Ranks stopped on purpose are in tests/workers/pipeline_worker.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import pybrain_mpi as pbm
from pybrain_mpi.parallel import (Channel, ColumnParallelLinear, Grid, Group, Pipeline,
                                  RowParallelLinear)
from .helpers import WORLD, on

RANKS = (2, 3, 4)
TIMEOUT_S = 600

# float64 reference, summed in another order: a few ulps of the largest terms.
RTOL, ATOL = 1e-11, 1e-13

# Layer counts per stage for each world size: even-ish and deliberately uneven.
BALANCES = {2: ([4, 3], [1, 6]), 3: ([3, 2, 2], [1, 5, 1]), 4: ([2, 2, 2, 1], [1, 1, 4, 1])}


@pytest.fixture(autouse=True)
def float64_single_thread():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)


def make_model(seed: int = 0) -> torch.nn.Sequential:
    """Seven layers: a conv front end (4-d activations cross stage boundaries), then a head."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(3 * 10, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6), torch.nn.Linear(6, 2),
    )


def batch(step: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 2, 10, generator=g), torch.randn(n, 2, generator=g)


def stage_params(reference: torch.nn.Sequential, pipe: Pipeline) -> list[torch.nn.Parameter]:
    start, end = pipe.layer_range
    return [p for layer in list(reference)[start:end] for p in layer.parameters()]


def assert_grads_match(pipe: Pipeline, reference: torch.nn.Sequential, what: str) -> None:
    mine, theirs = list(pipe.parameters()), stage_params(reference, pipe)
    assert len(mine) == len(theirs), (len(mine), len(theirs))
    for index, (p, q) in enumerate(zip(mine, theirs)):
        assert p.grad is not None, f"{what}: parameter {index} of stage {pipe.stage} got no gradient"
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what}: stage {pipe.stage} parameter {index}: {m}")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("which", [0, 1], ids=["balanced", "uneven"])
@pytest.mark.parametrize("micro_batches", [1, 3, 7])
def test_gradients_equal_the_unsplit_model(schedule, which, micro_batches):
    balance = BALANCES[WORLD][which]
    pipe = Pipeline(make_model(), balance=balance, micro_batches=micro_batches, schedule=schedule,
                    loss_fn=torch.nn.MSELoss())
    reference = make_model()
    x, y = batch(0)  # 7 samples: 3 micro-batches of 3, 2, 2
    loss = pipe.step(x if pipe.stage == 0 else None, y if pipe.stage == pipe.stages - 1 else None)
    expected = torch.nn.functional.mse_loss(reference(x), y)
    expected.backward()
    assert_grads_match(pipe, reference, f"{schedule} {balance} M={micro_batches}")
    # The batch loss reaches every stage.
    torch.testing.assert_close(loss, expected.detach(), rtol=RTOL, atol=ATOL)
    assert pipe.stats.micro_batches == micro_batches and 0 <= pipe.stats.idle_fraction < 1


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_training_steps_follow_the_unsplit_model(schedule):
    """Four SGD steps with momentum through the pipeline == four on the unsplit model."""
    balance = BALANCES[WORLD][1]
    pipe = Pipeline(make_model(), balance=balance, micro_batches=4, schedule=schedule)
    reference = make_model()
    # A stage may hold parameter-free layers only (Tanh): it still relays, with nothing to step.
    params = list(pipe.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if params else None
    full_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x, y = batch(step, n=9)
        if opt:
            opt.zero_grad()
        pipe.step(x, y)
        if opt:
            opt.step()
        full_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        full_opt.step()
    for index, (p, q) in enumerate(zip(pipe.parameters(), stage_params(reference, pipe))):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"stage {pipe.stage} parameter {index}: {m}")


def test_auto_balance_is_agreed_and_exact(comm):
    x, y = batch(1)
    # Only stage 0 profiles; the others learn the split from it.
    pipe = Pipeline(make_model(), balance="auto", micro_batches=2, sample=x if comm.Get_rank() == 0 else None)
    balances = comm.allgather(list(pipe.balance))
    assert all(b == balances[0] for b in balances), balances
    assert sum(pipe.balance) == 7 and min(pipe.balance) >= 1 and len(pipe.balance) == WORLD
    reference = make_model()
    pipe.step(x, y)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    assert_grads_match(pipe, reference, f"auto {pipe.balance}")


def test_predict_returns_the_unsplit_output_on_the_last_stage():
    pipe = Pipeline(make_model(), balance=BALANCES[WORLD][0], micro_batches=2)
    x, _ = batch(2)
    out = pipe.predict(x)
    if pipe.stage == pipe.stages - 1:
        torch.testing.assert_close(out, make_model()(x).detach(), rtol=RTOL, atol=ATOL)
    else:
        assert out is None


def test_bad_balance_is_refused_naming_the_layers():
    with pytest.raises(ValueError, match="cover all 7 layers"):
        Pipeline(make_model(), balance=[1] * WORLD, micro_batches=1)


def test_too_many_micro_batches_for_the_batch():
    pipe = Pipeline(make_model(), balance=BALANCES[WORLD][0], micro_batches=5)
    x, y = batch(0, n=4)
    if pipe.stage in (0, pipe.stages - 1):
        with pytest.raises(pbm.PbmError, match="cannot make 5 micro-batches"):
            pipe.step(x, y)


# ------------------------------------------------------------------------------- the channel
def test_channel_carries_every_dtype_and_learns_the_shape(comm):
    channel = Channel()
    r, n = comm.Get_rank(), comm.Get_size()
    tensors = [torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.arange(5, dtype=torch.int64) - 2,
               torch.linspace(-1, 1, 6, dtype=torch.bfloat16).reshape(1, 2, 3), torch.tensor(3.25)]
    if r == 0:
        messages = [channel.isend(t, n - 1, 7, f"t{i}") for i, t in enumerate(tensors)]
        for m in messages:
            m.wait()
    elif r == n - 1:
        for i, t in enumerate(tensors):
            got = channel.recv(0, 7, f"t{i}")
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), (i, got)


def test_declared_shape_mismatch_names_both_ranks(comm):
    channel = Channel()
    r, n = comm.Get_rank(), comm.Get_size()
    if r == 0:
        channel.isend(torch.zeros(3, 4, dtype=torch.float32), n - 1, 1, "act").wait()
    elif r == n - 1:
        message = channel.irecv((3, 4), torch.float64, 0, 1, "act")
        with pytest.raises(pbm.CollectiveMismatch) as error:
            message.wait()
        text = str(error.value)
        assert f"rank {r}" in text and "rank 0 sent float32 [3, 4]" in text and "expected float64 [3, 4]" in text, text
        assert "'act'" in text, text


def test_receive_with_nobody_sending_times_out_naming_the_sender(comm):
    channel = Channel(timeout_s=1.0)
    r, n = comm.Get_rank(), comm.Get_size()
    if r == n - 1:
        message = channel.irecv((2,), torch.float64, 0, 5, "nobody sends")
        with pytest.raises(pbm.CollectiveTimeout) as error:
            message.wait()
        assert error.value.missing_ranks == [0], (error.value.missing_ranks, str(error.value))
        assert "nobody sends" in str(error.value) and f"rank {r}" in str(error.value)
    comm.Barrier()


# -------------------------------------------------------------------------- data x pipeline
HYBRID = {2: (1,), 3: (1, 3), 4: (2, 1, 4)}  # pipeline_stages per world size


@pytest.mark.parametrize("stages", HYBRID[WORLD])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_hybrid_grid_matches_the_unsplit_model_on_the_global_batch(comm, stages, schedule):
    grid = Grid(pipeline_stages=stages)
    replicas = grid.data_parallel
    layers = 7
    balance = [layers // stages + (1 if i < layers % stages else 0) for i in range(stages)]
    # Different initial weights per replica: the wrap-time broadcast of DDP must equalise them.
    pipe = Pipeline(make_model(seed=grid.replica), balance=balance, micro_batches=3, schedule=schedule,
                    comm=grid.pipeline_comm, data_group=grid.data_group)
    reference = make_model(seed=0)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.05, momentum=0.9)
    full_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    per_replica = 5  # 5 samples in 3 micro-batches (2, 2, 1)
    for step in range(3):
        x, y = batch(step, n=per_replica * replicas)
        mine = slice(grid.replica * per_replica, (grid.replica + 1) * per_replica)
        opt.zero_grad()
        loss = pipe.step(x[mine], y[mine])
        full_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        if step == 0:
            assert_grads_match(pipe, reference, f"hybrid {grid.describe()}")
            # The loss is this replica's, on every stage of it.
            torch.testing.assert_close(loss, torch.nn.functional.mse_loss(make_model()(x[mine]), y[mine]).detach(),
                                       rtol=RTOL, atol=ATOL)
        opt.step()
        full_opt.step()
    for index, (p, q) in enumerate(zip(pipe.parameters(), stage_params(reference, pipe))):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{grid.describe()} stage {pipe.stage} parameter {index}: {m}")
    if grid.data_group is not None:
        grid.data_group.close()


def test_grid_refuses_a_stage_count_that_does_not_divide_the_world():
    if WORLD == 3:
        with pytest.raises(pbm.PbmError, match="does not divide the 3 ranks"):
            Grid(pipeline_stages=2)
    else:
        with pytest.raises(pbm.PbmError, match=f"does not divide the {WORLD} ranks"):
            Grid(pipeline_stages=WORLD + 1)


# ------------------------------------------------------------------------ tensor-split layers
def _groups(comm):
    """The world, and (on 4 ranks) two groups of two."""
    yield None, comm.Get_size(), comm.Get_rank()
    if comm.Get_size() == 4:
        sub = comm.Split(color=comm.Get_rank() // 2, key=comm.Get_rank())
        group = Group(sub)
        yield group, 2, sub.Get_rank()
        group.close()


def test_column_and_row_parallel_linear_equal_the_unsplit_layer(comm):
    for group, size, _ in _groups(comm):
        torch.manual_seed(3)
        # 11 output and 13 input features: blocks of uneven size on 2, 3 and 4 ranks.
        full = torch.nn.Linear(13, 11)
        x = torch.randn(5, 13)
        for kind in ("column", "row"):
            if kind == "column":
                layer = ColumnParallelLinear.from_linear(full, group=group)
            else:
                layer = RowParallelLinear.from_linear(full, group=group)
            xs = x.clone().requires_grad_(True)
            out = layer(xs)
            weights = torch.randn(5, 11, generator=torch.Generator().manual_seed(9))
            (out * weights).sum().backward()
            full.zero_grad()
            xr = x.clone().requires_grad_(True)
            expected = full(xr)
            (expected * weights).sum().backward()
            what = f"{kind} over {size} ranks"
            if kind == "column":
                block = slice(layer.out_start, layer.out_end)
                # The gather (zero-padded blocks summed) is exact: this rank's block of the
                # output is bitwise its own block's matmul. That matmul may round differently
                # from the whole layer's (BLAS picks kernels by shape: on AMD EPYC a 6-column
                # block differs by an ulp), hence a tolerance against the unsplit layer.
                own = torch.nn.functional.linear(x, full.weight[block].detach(), full.bias[block].detach())
                assert torch.equal(out[:, block].detach(), own), what
                torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
                torch.testing.assert_close(layer.weight.grad, full.weight.grad[block], rtol=RTOL, atol=ATOL)
                torch.testing.assert_close(layer.bias.grad, full.bias.grad[block], rtol=RTOL, atol=ATOL)
            else:
                torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
                block = slice(layer.in_start, layer.in_end)
                torch.testing.assert_close(layer.weight.grad, full.weight.grad[:, block], rtol=RTOL, atol=ATOL)
                torch.testing.assert_close(layer.bias.grad, full.bias.grad, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(xs.grad, xr.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} input grad: {m}")


def test_column_then_row_pair_equals_the_unsplit_mlp(comm):
    for group, size, _ in _groups(comm):
        torch.manual_seed(4)
        first, second = torch.nn.Linear(9, 14), torch.nn.Linear(14, 3)
        col = ColumnParallelLinear.from_linear(first, group=group, gather_output=False)
        row = RowParallelLinear.from_linear(second, group=group, input_is_parallel=True)
        x = torch.randn(6, 9)
        xs = x.clone().requires_grad_(True)
        row(torch.tanh(col(xs))).square().sum().backward()
        xr = x.clone().requires_grad_(True)
        second(torch.tanh(first(xr))).square().sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(col.weight.grad, first.weight.grad[col.out_start:col.out_end], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(row.weight.grad, second.weight.grad[:, row.in_start:row.in_end],
                                   rtol=RTOL, atol=ATOL, msg=lambda m: f"row block over {size} ranks: {m}")


@on(4)
def test_pipeline_over_a_sub_communicator_names_world_ranks(comm):
    """Two independent 2-stage pipelines on ranks (0, 1) and (2, 3): messages stay in each."""
    sub = comm.Split(color=comm.Get_rank() // 2, key=comm.Get_rank())
    pipe = Pipeline(make_model(), balance=[3, 4], micro_batches=2, comm=sub)
    assert pipe.world_ranks == [comm.Get_rank() // 2 * 2, comm.Get_rank() // 2 * 2 + 1]
    assert f"on rank {comm.Get_rank()}" in pipe.describe()
    x, y = batch(5 + comm.Get_rank() // 2)
    pipe.step(x, y)
    reference = make_model()
    torch.nn.functional.mse_loss(reference(x), y).backward()
    assert_grads_match(pipe, reference, "sub-communicator pipeline")


def test_each_stage_saves_its_shard_and_resume_is_exact(tmp_path_factory, comm):
    """Four steps straight == two steps, each stage saving its own shard (weights and optimizer
    state, loaded back weights-only), a fresh pipeline from other weights loading it, two more."""
    balance = BALANCES[WORLD][0]

    def run(pipe, opt, steps):
        for step in steps:
            x, y = batch(step, n=8)
            opt.zero_grad()
            pipe.step(x, y)
            opt.step()

    def build(seed):
        pipe = Pipeline(make_model(seed), balance=balance, micro_batches=3, schedule="1f1b")
        return pipe, torch.optim.Adam(pipe.parameters(), lr=1e-2)

    straight, straight_opt = build(0)
    run(straight, straight_opt, range(4))
    first, first_opt = build(0)
    run(first, first_opt, range(2))
    shard = tmp_path_factory.mktemp(f"stage{first.stage}") / "shard.pt"
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, shard)
    resumed, resumed_opt = build(7)  # other initial weights: the shard must overwrite them
    saved = torch.load(shard, weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    run(resumed, resumed_opt, range(2, 4))
    for index, (p, q) in enumerate(zip(resumed.parameters(), straight.parameters())):
        assert torch.equal(p.detach(), q.detach()), f"stage {resumed.stage} parameter {index} differs after resume"


# ------------------------------------------------ stages built alone, tensor-split inside a stage
# (stage_ranks, balance) per world size over NaiveCNN3D's 12 pipeline layers (4 conv blocks, the
# head's 8: Flatten, fc1, ReLU, Dropout, fc2, ReLU, Dropout, fc3). A stage of several ranks holds
# fc1 column-split over them; [2, 2] replicates the conv blocks on a 2-rank first stage.
STAGED = {2: [([1, 1], [4, 8]), ([1, 1], [6, 6])],
          3: [([1, 1, 1], [2, 3, 7]), ([1, 2], [4, 8])],
          4: [([1, 1, 1, 1], [1, 3, 2, 6]), ([1, 3], [5, 7]), ([2, 2], [4, 8])]}
CNN_SIDE = 16  # one voxel left after the four poolings: fc widths 80 -> 16 -> 8 -> 1


def _cnn_layers(seed: int = 5):
    from pybrain_mpi.models import naive_cnn3d_layers

    return naive_cnn3d_layers((CNN_SIDE,) * 3, dropout=0.0, batch_norm=False, seed=seed)


def _reference_block(pipe: Pipeline, reference: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(this rank's parameter, the unsplit model's value and gradient for it) pairs: a
    column-parallel layer's weight and bias are their rows of the unsplit layer."""
    start, end = pipe.layer_range
    pairs = []
    for mine, theirs in zip(pipe.stage_module, list(reference.pipeline_layers())[start:end]):
        rows = slice(mine.out_start, mine.out_end) if isinstance(mine, ColumnParallelLinear) else slice(None)
        for p, q in zip(mine.parameters(), theirs.parameters()):
            pairs.append((p, q, rows))
    return pairs


@pytest.mark.parametrize("layout", range(len(STAGED[WORLD])))
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_stages_built_alone_match_the_unsplit_naive_cnn3d(comm, layout, schedule):
    """Each rank builds only its stage's layers (StagedLayers, seeded per layer), a stage of
    several ranks with fc1 column-split over them: initial weights bitwise the unsplit
    NaiveCNN3D(seed=...)'s, gradients and loss over 5 samples in 3 micro-batches equal it."""
    from pybrain_mpi.models import NaiveCNN3D

    stage_ranks, balance = STAGED[WORLD][layout]
    pipe = Pipeline(_cnn_layers(), balance=balance, stage_ranks=stage_ranks, micro_batches=3,
                    schedule=schedule)
    reference = NaiveCNN3D((CNN_SIDE,) * 3, dropout=0.0, batch_norm=False, seed=5)
    what = f"{schedule} stage_ranks {stage_ranks} balance {balance} stage {pipe.stage}"
    shared = len(pipe.members[pipe.stage]) > 1
    split = [m for m in pipe.stage_module if isinstance(m, ColumnParallelLinear)]
    assert (pipe.tensor_group is not None) == shared and len(split) == int(shared and pipe.layer_range[0] <= 5
                                                                         < pipe.layer_range[1]), what
    pairs = _reference_block(pipe, reference)
    assert len(pairs) == len(list(pipe.parameters())), what
    for index, (p, q, rows) in enumerate(pairs):
        assert torch.equal(p.detach(), q.detach()[rows]), f"{what}: initial parameter {index} differs"
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(5, 1, *(CNN_SIDE,) * 3, generator=g), torch.randn(5, 1, generator=g)
    loss = pipe.step(x, y)
    expected = torch.nn.functional.mse_loss(reference(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=RTOL, atol=ATOL)
    for index, (p, q, rows) in enumerate(pairs):
        assert p.grad is not None, f"{what}: parameter {index} got no gradient"
        torch.testing.assert_close(p.grad, q.grad[rows], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what}: parameter {index}: {m}")
    if pipe.tensor_group is not None:
        pipe.tensor_group.close()


def test_staged_layers_refuse_auto_balance_and_bad_stage_ranks():
    with pytest.raises(ValueError, match="explicit balance"):
        Pipeline(_cnn_layers(), balance="auto", micro_batches=1)
    with pytest.raises(ValueError, match=f"summing to the {WORLD} ranks"):
        Pipeline(make_model(), balance=[7], stage_ranks=[WORLD + 1], micro_batches=1)
    # fc1's in-place gradient accumulation would bypass DDP's hooks.
    with pytest.raises(ValueError, match="data group with stages of several ranks"):
        Pipeline(make_model(), balance=[7], stage_ranks=[WORLD], micro_batches=1, data_group=object())
