"""pbm.checkpointing: checkpointed sequential models give the same gradients as plain ones."""

from __future__ import annotations

import pytest
import torch

from pybrain_mpi.checkpointing import CheckpointedSequential, checkpoint_sequential, segments_for_policy


def cnn3d(seed=0):
    torch.manual_seed(seed)
    layers = []
    channels = 1
    for width in (4, 8, 8, 8):
        layers += [torch.nn.Conv3d(channels, width, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout3d(0.2)]
        channels = width
    layers += [torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 2)]
    return torch.nn.Sequential(*layers)


def gradients(model, x, run):
    model.zero_grad()
    torch.manual_seed(123)  # same dropout masks in both runs
    run(model, x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("segments", ["sqrt", 2, 3, 100])
def test_checkpointed_gradients_equal_plain_gradients(segments):
    model = cnn3d()
    x = torch.randn(2, 1, 12, 12, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    plain = gradients(model, x, lambda m, v: m(v))
    x.grad = None
    checked = gradients(model, x, lambda m, v: checkpoint_sequential(m, segments, v))
    for a, b in zip(plain, checked):
        assert torch.equal(a, b)


def test_checkpointed_sequential_module_trains_like_the_plain_model():
    plain_model, wrapped = cnn3d(), CheckpointedSequential(cnn3d(), segments="sqrt")
    x = torch.randn(2, 1, 10, 10, 10, generator=torch.Generator().manual_seed(2))
    for model in (plain_model, wrapped):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            torch.manual_seed(7)
            model(x).square().sum().backward()
            opt.step()
    for p, q in zip(plain_model.parameters(), wrapped.module.parameters()):
        assert torch.equal(p, q)
    wrapped.eval()
    with torch.no_grad():
        plain_model.eval()
        assert torch.equal(wrapped(x), plain_model(x))


def test_checkpointing_stores_fewer_activations():
    # Count bytes saved for backward: the checkpointed run must keep far fewer.
    model = cnn3d()
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)

    def saved_bytes(run):
        total = []

        def pack(tensor):
            total.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(total)

    plain = saved_bytes(lambda: model(x))
    checked = saved_bytes(lambda: checkpoint_sequential(model, "sqrt", x))
    assert checked < plain / 2


def test_sqrt_policy_and_invalid_policies():
    assert [segments_for_policy(n, "sqrt") for n in (1, 4, 15, 16, 100)] == [1, 2, 4, 4, 10]
    assert segments_for_policy(5, 99) == 5 and segments_for_policy(5, "none") == 1
    with pytest.raises(ValueError, match="unknown checkpointing policy"):
        segments_for_policy(5, "log")
    with pytest.raises(TypeError, match="nn.Sequential"):
        checkpoint_sequential(torch.nn.Linear(2, 2), 2, torch.zeros(1, 2))
