"""pbm.optim.LossScaler: skipping, back-off, growth, agreement across ranks, references."""

from __future__ import annotations

import pytest
import torch

from pybrain_mpi import optim
from pybrain_mpi.optim import LossScaler


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=generator), torch.randn(16, 3, generator=generator)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer_kind", ["torch", "fused"])
def test_inf_gradient_skips_the_step_and_backs_off(optimizer_kind):
    model = small_model()
    opt = (torch.optim.SGD if optimizer_kind == "torch" else optim.FusedSGD)(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=1024.0, backoff_factor=0.25)
    x, y = batch(1)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    next(model.parameters()).grad.view(-1)[-1] = float("inf")
    before = params_of(model)
    assert scaler.step(opt) is None
    assert scaler.found_inf()
    scaler.update()
    assert scaler.get_scale() == 256.0 and scaler.skipped_steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_scale_grows_after_growth_interval_clean_steps():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = LossScaler(init_scale=8.0, growth_factor=2.0, growth_interval=3)
    history = []
    for step in range(7):
        opt.zero_grad()
        x, y = batch(step)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        history.append(scaler.get_scale())
    assert history == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]


def test_unscale_and_check_divides_parameters_and_flat_buffers_exactly():
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(200_000, generator=generator), torch.randn(50, dtype=torch.float64,
                                                                    generator=generator)]
    originals = [g.clone() for g in grads]
    scaler = LossScaler(init_scale=2.0 ** 10, num_threads=2)
    assert scaler.unscale_and_check(grads) is True
    for g, o in zip(grads, originals):
        assert torch.equal(g, o / 2.0 ** 10)  # a power of two: exact
    scaler.update()
    grads[0][123_456] = float("nan")
    assert scaler.unscale_and_check(grads) is False


def test_matches_torch_grad_scaler_with_bf16_autocast_and_natural_overflow():
    # A loss of about 1e4 scaled by 2^127 (float32 max is about 2^128) overflows: both scalers
    # must back off step by step until it fits, then train identically, growing every 4 clean
    # steps but never past float32's range.
    ours_model, ref_model = small_model(), small_model()
    ours_opt = optim.FusedAdam(ours_model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    ours = LossScaler(init_scale=2.0 ** 127, growth_interval=4)
    reference = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=4)
    ours_scales, ref_scales = [], []
    for step in range(30):
        x, y = batch(100 + step)
        y = y * 100  # a loss of about 1e4: times 2^127 it overflows float32
        for model, opt, scaler in ((ours_model, ours_opt, ours), (ref_model, ref_opt, reference)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        ours_scales.append(ours.get_scale())
        ref_scales.append(reference.get_scale())
    assert ours_scales == ref_scales
    assert ours.skipped_steps >= 3, ours_scales
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


def test_matches_an_unfused_reference_loop():
    ours_model, ref_model = small_model(), small_model()
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    ours = LossScaler(init_scale=2.0 ** 16, growth_interval=5)
    scale, tracker = 2.0 ** 16, 0
    for step in range(25):
        x, y = batch(200 + step)
        poison = step in (3, 4, 11)
        for model, opt in ((ours_model, ours_opt), (ref_model, ref_opt)):
            opt.zero_grad()
            current = ours.get_scale() if model is ours_model else scale
            (torch.nn.functional.mse_loss(model(x), y) * current).backward()
            if poison:
                model[2].bias.grad[0] = float("nan")
        ours.step(ours_opt)
        ours.update()
        # Reference: separate unscale, isfinite check and step, scale logic written out.
        grads = [p.grad for p in ref_model.parameters()]
        for g in grads:
            g.mul_(1.0 / scale)
        if all(bool(torch.isfinite(g).all()) for g in grads):
            ref_opt.step()
            tracker += 1
            if tracker == 5:
                scale, tracker = scale * 2.0, 0
        else:
            scale, tracker = scale * 0.5, 0
        assert ours.get_scale() == scale
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_custom_allreduce_decides_for_all_ranks():
    # Another rank reports an overflow: this rank's finite gradients must not be applied.
    model = small_model()
    opt = optim.FusedAdam(model.parameters(), lr=0.1)
    scaler = LossScaler(allreduce_fn=lambda flag: torch.maximum(flag, torch.ones_like(flag)))
    x, y = batch(5)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    before = params_of(model)
    scaler.step(opt)
    assert scaler.found_inf()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_state_dict_round_trips_through_torch_grad_scaler():
    ours = LossScaler(init_scale=512.0, growth_interval=7)
    ours._growth_tracker = 3
    theirs = torch.amp.GradScaler("cpu")
    theirs.load_state_dict(ours.state_dict())
    assert theirs.get_scale() == 512.0 and theirs.get_growth_interval() == 7
    restored = LossScaler()
    restored.load_state_dict(theirs.state_dict())
    assert restored.state_dict() == ours.state_dict()
