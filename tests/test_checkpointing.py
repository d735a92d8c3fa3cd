"""pbm.models.recompute: checkpointed sequential models give the same gradients as plain ones."""

from __future__ import annotations

import pytest
import torch

from pybrain_mpi.models.recompute import CheckpointedSequential, checkpoint_sequential, segments_for_policy


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


# --- TiledSegment ---------------------------------------------------------------------------

from pybrain_mpi.models.recompute import TiledSegment  # noqa: E402


def tileable_block(seed=0, pool=2):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 3, (5, 3, 5), padding=(2, 1, 2)), torch.nn.GELU(),
        torch.nn.MaxPool3d(pool)).double()


@pytest.mark.parametrize("shape,tile,pool", [
    ((18, 14, 22), 6, 2),    # sizes not multiples of the tile, halo 3 crossing tiles
    ((8, 8, 8), 64, 2),      # one tile larger than the volume
    ((12, 9, 15), 3, 3),     # pooling by 3, tile of one pooled voxel
    ((10, 6, 4), 2, 1),      # no pooling (identity pool), tiny tiles
])
def test_tiled_segment_equals_the_whole_block_in_values_and_gradients(shape, tile, pool):
    block = tileable_block(pool=pool)
    x = torch.randn(2, 2, *shape, dtype=torch.float64, requires_grad=True)
    reference = block(x)
    upstream = torch.randn_like(reference)
    want = torch.autograd.grad(reference, [x, *block.parameters()], upstream)
    out = TiledSegment(block, tile=tile)(x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    got = torch.autograd.grad(out, [x, *block.parameters()], upstream)
    for g, w in zip(got, want):
        # float64 sums in another order: a few ulps of the largest entries
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))


def test_tiled_segment_trains_like_the_block_with_frozen_input_and_no_grad():
    block = tileable_block()
    x = torch.randn(1, 2, 12, 12, 12, dtype=torch.float64)  # input without grad (first layer)
    tiled = TiledSegment(block, tile=4)
    with torch.no_grad():
        torch.testing.assert_close(tiled(x), block(x), rtol=0, atol=1e-12)
    block.zero_grad()
    block(x).sum().backward()
    want = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    tiled(x).sum().backward()
    for p, w in zip(block.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer,words", [
    (torch.nn.BatchNorm3d(4), "BatchNorm"),
    (torch.nn.Dropout3d(0.1), "dropout"),
    (torch.nn.Conv3d(4, 4, 3, padding=1, stride=2), "stride 1"),
    (torch.nn.Conv3d(4, 4, 3, padding=0), "'same' zero padding"),
    (torch.nn.Conv3d(4, 4, 2, padding=1), "odd kernels"),
    (torch.nn.MaxPool3d(3, stride=2), "stride == kernel"),
])
def test_tiled_segment_refuses_layers_it_cannot_tile_exactly(layer, words):
    with pytest.raises(ValueError, match=words):
        TiledSegment(torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), layer), tile=4)


def test_tiled_segment_checks_tile_and_input_shape():
    block = tileable_block()
    with pytest.raises(ValueError, match="multiple of the pooling factor"):
        TiledSegment(block, tile=5)
    tiled = TiledSegment(block, tile=4)
    with pytest.raises(ValueError, match="not divisible"):
        tiled(torch.randn(1, 2, 9, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        tiled(torch.randn(2, 8, 8, 8, dtype=torch.float64))
