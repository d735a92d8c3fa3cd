"""pbm.optim fused optimizers against torch.optim (float32) and a float64 reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pybrain_mpi import optim

EPS32 = torch.finfo(torch.float32).eps
# Several shapes, one just big enough (2 x 65,600 elements) to be split across two threads.
SHAPES = [(7, 5), (300,), (3, 4, 5), (1,), (128, 1025)]

CASES = [
    (optim.FusedSGD, torch.optim.SGD, dict(lr=0.05)),
    (optim.FusedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (optim.FusedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.1, maximize=True)),
    (optim.FusedAdam, torch.optim.Adam, dict(lr=0.01)),
    (optim.FusedAdam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    (optim.FusedAdam, torch.optim.Adam, dict(lr=0.01, betas=(0.3, 0.9), maximize=True)),
    (optim.FusedAdamW, torch.optim.AdamW, dict(lr=0.01)),
    (optim.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True)),
    (optim.FusedAdagrad, torch.optim.Adagrad, dict(lr=0.1)),
    (optim.FusedAdagrad, torch.optim.Adagrad,
     dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, eps=1e-6)),
]
IDS = [f"{fused.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for fused, _, kw in CASES]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch.optim references on one thread: on a shared 2-core machine torch's spinning
    intra-op threads make tiny steps very slow. Our kernels still get num_threads=2."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_params(dtype=torch.float32, seed=1, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]


def random_grads(params, generator):
    return [torch.randn(p.shape, generator=generator) for p in params]


def max_abs_error(params, reference):
    return max((p.detach().double() - r.detach()).abs().max().item() for p, r in zip(params, reference))


@pytest.mark.parametrize("fused_cls,torch_cls,kwargs", CASES, ids=IDS)
def test_fused_optimizer_matches_torch_optim_over_100_steps(fused_cls, torch_cls, kwargs):
    ours, theirs, exact = make_params(), make_params(), make_params(torch.float64)
    opt_ours = fused_cls(ours, num_threads=2, **kwargs)
    opt_theirs, opt_exact = torch_cls(theirs, **kwargs), torch_cls(exact, **kwargs)
    generator = torch.Generator().manual_seed(2)
    for _ in range(100):
        for p, q, r, g in zip(ours, theirs, exact, random_grads(ours, generator)):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.double()
        opt_ours.step()
        opt_theirs.step()
        opt_exact.step()
    # "Within float32 rounding": no further from the float64 run than torch's own float32
    # implementation is (with slack for a different but equally valid rounding order).
    scale = max(r.abs().max().item() for r in exact)
    torch_error = max_abs_error(theirs, exact)
    assert max_abs_error(ours, exact) <= 2 * torch_error + 16 * EPS32 * scale
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=3 * torch_error + 16 * EPS32 * scale)


@pytest.mark.parametrize("bad_value", [float("inf"), float("nan"), -float("inf")])
@pytest.mark.parametrize("fused_cls,kwargs", [(optim.FusedSGD, dict(lr=0.1, momentum=0.9)),
                                              (optim.FusedAdam, dict(lr=0.1)),
                                              (optim.FusedAdagrad, dict(lr=0.1))])
def test_nonfinite_gradient_skips_the_whole_step(fused_cls, kwargs, bad_value):
    params = make_params()
    opt = fused_cls(params, **kwargs)
    generator = torch.Generator().manual_seed(3)
    for p, g in zip(params, random_grads(params, generator)):
        p.grad = g
    opt.step()  # creates state, so the skipped step below must leave state alone too
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for s in opt.state.values() for k, v in s.items()}
    for p, g in zip(params, random_grads(params, generator)):
        p.grad = g
    params[-1].grad.view(-1)[-1] = bad_value  # the very last element: checked before any write
    opt.step()
    assert opt.last_step_finite is False
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    state_after = {k: v for s in opt.state.values() for k, v in s.items()}
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key
    params[-1].grad.view(-1)[-1] = 0.5
    opt.step()
    assert opt.last_step_finite is True
    assert not torch.equal(params[0].detach(), before[0])


def test_gradient_overflowing_only_after_scaling_counts_as_nonfinite():
    params = make_params(shapes=[(10,)])
    opt = optim.FusedSGD(params, lr=0.1)
    params[0].grad = torch.full((10,), 1e30)
    before = params[0].detach().clone()
    opt.step(grad_scale=1e10)  # 1e40 overflows float32
    assert opt.last_step_finite is False and torch.equal(params[0].detach(), before)


@pytest.mark.parametrize("fused_cls,torch_cls,kwargs", [CASES[1], CASES[4], CASES[7], CASES[9]],
                         ids=[IDS[1], IDS[4], IDS[7], IDS[9]])
def test_state_dict_round_trips_through_torch_optim(fused_cls, torch_cls, kwargs):
    ours, theirs = make_params(), make_params()
    opt_ours = fused_cls(ours, **kwargs)
    generator = torch.Generator().manual_seed(4)
    for _ in range(5):
        for p, g in zip(ours, random_grads(ours, generator)):
            p.grad = g
        opt_ours.step()
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(p)
    # ours -> torch: same keys, dtypes and shapes, and the continuation agrees.
    opt_theirs = torch_cls(theirs, **kwargs)
    opt_theirs.load_state_dict(copy.deepcopy(opt_ours.state_dict()))  # torch aliases loaded tensors
    reference = torch_cls(make_params(), **kwargs).state_dict()
    for key, value in opt_theirs.state_dict()["state"][0].items():
        assert value.dtype == reference["state"].get(0, {}).get(key, value).dtype
    # torch -> a fresh fused optimizer: its flat buffers take the loaded state.
    restored = make_params()
    with torch.no_grad():
        for p, q in zip(restored, ours):
            p.copy_(q)
    opt_restored = fused_cls(restored, **kwargs)
    opt_restored.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))
    for _ in range(5):
        grads = random_grads(ours, generator)
        for p, q, r, g in zip(ours, theirs, restored, grads):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        opt_restored.step()
    for p, q, r in zip(ours, theirs, restored):
        assert torch.equal(r.detach(), p.detach())  # identical arithmetic, identical state
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)
    saved, loaded = opt_ours.state_dict()["state"], opt_theirs.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for index in saved:
        assert saved[index].keys() == loaded[index].keys()
        for key in saved[index]:
            assert saved[index][key].dtype == loaded[index][key].dtype
            assert saved[index][key].shape == loaded[index][key].shape


def test_grad_scale_and_clipping_match_torch_unscale_then_clip_grad_norm():
    ours, theirs = make_params(), make_params()
    opt_ours = optim.FusedAdam(ours, lr=0.01)
    opt_theirs = torch.optim.Adam(theirs, lr=0.01)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        grads = random_grads(ours, generator)
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g * 4.0  # e.g. a loss scale of 4 and a sum over 2 ranks
            q.grad = g * 4.0
        opt_ours.step(grad_scale=1 / 8, max_grad_norm=1.0)
        for q in theirs:
            q.grad.mul_(1 / 8)
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0).item()
        opt_theirs.step()
        assert math.isclose(opt_ours.last_grad_norm, norm, rel_tol=1e-5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)


def test_step_flat_bucket_by_bucket_equals_step():
    ours, reference = make_params(), make_params()
    opt = optim.FusedAdamW(ours, lr=0.01)
    opt_ref = optim.FusedAdamW(reference, lr=0.01)
    offsets = opt.param_offsets(0)
    generator = torch.Generator().manual_seed(6)
    for _ in range(3):
        grads = random_grads(ours, generator)
        flat = torch.cat([g.reshape(-1) for g in grads]) * 2  # a "summed over 2 ranks" bucket
        # Two buckets on a parameter boundary, applied in reverse order as allreduces finish.
        split = offsets[3]
        assert opt.step_flat(0, flat[split:].contiguous(), grad_scale=0.5, offset=split)
        assert opt.step_flat(0, flat[:split].contiguous(), grad_scale=0.5, offset=0)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        opt_ref.step()
    for p, q in zip(ours, reference):
        assert torch.equal(p.detach(), q.detach())


def test_step_flat_reports_nonfinite_and_rejects_misaligned_ranges():
    params = make_params()
    opt = optim.FusedSGD(params, lr=0.1)
    flat = torch.zeros(opt.param_offsets(0)[-1])
    flat[5] = float("nan")
    before = opt.flat_param(0).clone()
    assert opt.step_flat(0, flat) is False
    assert torch.equal(opt.flat_param(0), before)
    with pytest.raises(ValueError, match="parameter boundaries"):
        opt.step_flat(0, flat[:10].contiguous(), offset=1)


def test_zero_grad_without_none_keeps_gradients_as_flat_views():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = optim.FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    for p, view in zip(model.parameters(), _views(opt.flat_param(0), opt.param_offsets(0), model)):
        assert p.data_ptr() == view.data_ptr()  # parameters live in the flat buffer
    opt.zero_grad(set_to_none=False)
    model(torch.randn(4, 8)).sum().backward()
    flat_grad = opt.flat_grad(0)
    for p, view in zip(model.parameters(), _views(flat_grad, opt.param_offsets(0), model)):
        assert p.grad.data_ptr() == view.data_ptr()  # backward accumulated in place
    assert flat_grad.abs().sum() > 0


def _views(flat, offsets, model):
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def test_parameters_without_gradients_are_skipped_like_torch():
    ours, theirs = make_params(), make_params()
    opt_ours = optim.FusedAdam(ours, lr=0.01)
    opt_theirs = torch.optim.Adam(theirs, lr=0.01)
    generator = torch.Generator().manual_seed(7)
    for step in range(6):
        grads = random_grads(ours, generator)
        for i, (p, q, g) in enumerate(zip(ours, theirs, grads)):
            missing = (i == 1 and step % 2 == 0) or (i == 3 and step < 3)
            p.grad = None if missing else g.clone()
            q.grad = None if missing else g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert opt_ours.state[ours[1]]["step"].item() == opt_theirs.state[theirs[1]]["step"].item() == 3


def test_grad_sq_norm_and_finite_matches_float64():
    grad = torch.randn(1_000_003, generator=torch.Generator().manual_seed(8))
    sq, finite = optim.grad_sq_norm_and_finite(grad, scale=0.25, num_threads=2)
    expected = ((grad.double() * 0.25) ** 2).sum().item()
    # float32 partial sums of 128 terms per lane: relative error well below 128 * eps32.
    assert finite and math.isclose(sq, expected, rel_tol=128 * EPS32)


def test_huge_but_finite_gradients_are_not_reported_as_overflow():
    grad = torch.full((100_000,), 1e30)  # squares overflow float32, not float64
    sq, finite = optim.grad_sq_norm_and_finite(grad)
    assert finite and math.isclose(sq, 1e65, rel_tol=1e-6)


def test_non_float32_parameters_are_rejected_with_a_clear_message():
    with pytest.raises(TypeError, match="parameter 0 of group 0.*float64"):
        optim.FusedSGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=0.1)
