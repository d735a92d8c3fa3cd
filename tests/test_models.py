"""Reference models: shapes, parameter counts, DCA switches and loss, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from pybrain_mpi import models as M


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Small convolutions run erratically with 2 intra-op threads on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _independent_dca_count(length, hidden):
    # Written out layer by layer (not reusing the module's helper): conv weights + biases.
    enc = (1 * 32 * 21 + 32) + (32 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + (128 * 256 * 9 + 256)
    dec = (256 * 128 * 9 + 128) + (128 * 64 * 9 + 64) + (64 * 32 * 9 + 32) + (32 * 1 * 21 + 1)
    l4 = length
    for _ in range(4):
        l4 = math.floor(l4 / 2)
    flat = 256 * l4
    return enc + dec + flat * hidden + hidden + hidden * flat + flat


@pytest.mark.parametrize("length,hidden", [(284, 600), (40, 64), (37, 16)])
def test_dca_parameter_count_matches_layer_by_layer_formula(length, hidden):
    model = M.DCA(length, hidden)
    assert M.parameter_count(model) == _independent_dca_count(length, hidden)
    assert M.dca_parameter_count(length, hidden) == _independent_dca_count(length, hidden)


def test_dca_default_has_about_six_million_parameters():
    assert M.parameter_count(M.DCA()) == 6_003_545


@pytest.mark.parametrize("length", [284, 40, 37, 16])
def test_dca_reconstruction_keeps_input_shape_when_pooling_floors(length):
    torch.manual_seed(0)
    model = M.DCA(length, 32)
    for shape in [(3, length), (3, 1, length)]:
        x_hat, (z, z_prime) = model(torch.randn(*shape))
        assert x_hat.shape == shape
        assert z.shape == z_prime.shape == (3, 256, M.dca.pooled_length(length))


def test_dca_rejects_wrong_series_length_with_expected_shape():
    with pytest.raises(ValueError, match=r"\(N, 40\)"):
        M.DCA(40, 8)(torch.randn(2, 41))
    with pytest.raises(ValueError, match="at least 16"):
        M.DCA(15, 8)


def _capture_first_decoder_input(model):
    captured = {}

    def hook(module, args):
        captured["unpooled"] = args[0].detach().clone()
    handle = model.decoder_convs[0].register_forward_pre_hook(hook)
    return captured, handle


def test_dca_unpools_at_stored_argmax_switches():
    torch.manual_seed(1)
    model = M.DCA(284, 24).double()
    x = torch.randn(4, 284, dtype=torch.float64)
    pre_pool = {}
    model.encoder_convs[3].register_forward_hook(
        lambda m, a, out: pre_pool.__setitem__("last", F.relu(out).detach().clone()))
    captured, _ = _capture_first_decoder_input(model)
    _, (_, z_prime) = model(x)
    act = pre_pool["last"]                      # (N, 256, 35) before the last pooling
    unpooled = captured["unpooled"]             # (N, 256, 35) after the first unpooling
    assert unpooled.shape == act.shape == (4, 256, 35)
    pairs = act[..., :34].reshape(4, 256, 17, 2)
    # Ties (e.g. two ReLU zeros) resolve to the first element, as max_pool1d does.
    argmax = pairs.argmax(-1) + 2 * torch.arange(17)
    expected = torch.zeros_like(unpooled)
    expected.scatter_(2, argmax, z_prime.detach())
    torch.testing.assert_close(unpooled, expected, rtol=0, atol=0)
    assert torch.all(unpooled[..., 34] == 0)    # the floored tail never receives a value


def test_dca_decodes_without_switches_by_nearest_upsampling():
    torch.manual_seed(2)
    model = M.DCA(40, 8).double()
    captured, _ = _capture_first_decoder_input(model)
    h = torch.randn(2, 8, dtype=torch.float64)
    x_hat, z_prime = model.decode(h)
    assert x_hat.shape == (2, 1, 40)
    unpooled = captured["unpooled"]             # z' has length 2, first pooled length is 5
    index = [math.floor(i * 2 / 5) for i in range(5)]
    torch.testing.assert_close(unpooled, z_prime.detach()[..., index], rtol=0, atol=0)


def _reference_dca_loss(x, x_hat, z, zp, lam):
    # Plain Python float64 sums, per sample.
    per_sample = []
    for i in range(len(x)):
        rec = sum((a - b) ** 2 for a, b in zip(x[i].flatten().tolist(), x_hat[i].flatten().tolist()))
        code = sum((a - b) ** 2 for a, b in zip(z[i].flatten().tolist(), zp[i].flatten().tolist()))
        per_sample.append(0.5 * rec + 0.5 * lam * code)
    return per_sample


@pytest.mark.parametrize("lam", [0.006, 1.5])
def test_dca_loss_matches_hand_computed_float64_reference(lam):
    g = torch.Generator().manual_seed(3)
    x, x_hat = torch.randn(5, 40, generator=g, dtype=torch.float64), torch.randn(5, 40, generator=g, dtype=torch.float64)
    z, zp = torch.randn(5, 256, 2, generator=g, dtype=torch.float64), torch.randn(5, 256, 2, generator=g, dtype=torch.float64)
    ref = _reference_dca_loss(x, x_hat, z, zp, lam)
    eps = 64 * torch.finfo(torch.float64).eps
    assert M.dca_loss(x, x_hat, z, zp, lam, reduction="sum").item() == pytest.approx(sum(ref), rel=eps)
    assert M.dca_loss(x, x_hat, z, zp, lam).item() == pytest.approx(sum(ref) / 5, rel=eps)
    with pytest.raises(ValueError, match="reduction"):
        M.dca_loss(x, x_hat, z, zp, lam, reduction="none")


def _assert_all_gradients_flow(model, loss):
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_dca_gradients_reach_every_parameter():
    torch.manual_seed(4)
    model = M.DCA(40, 16)
    x = torch.randn(8, 40)
    x_hat, (z, zp) = model(x)
    _assert_all_gradients_flow(model, M.dca_loss(x, x_hat, z, zp))


def _independent_cnn3d_count(grid, fc1, fc2, out=1):
    # Bias-free convolutions, each followed by batch norm (weight + bias per channel).
    conv = 1 * 10 * 27 + 10 * 20 * 27 + 20 * 40 * 27 + 40 * 80 * 27
    bn = 2 * (10 + 20 + 40 + 80)
    flat = 80 * math.prod(grid)
    return conv + bn + flat * fc1 + fc1 + fc1 * fc2 + fc2 + fc2 * out + out


def test_naive_cnn3d_full_resolution_has_published_widths_and_527m_parameters():
    with torch.device("meta"):
        model = M.NaiveCNN3D((176, 176, 176))
    assert model.fc_widths == (4840, 2420)
    count = M.parameter_count(model)
    assert count == _independent_cnn3d_count((11, 11, 11), 4840, 2420)
    assert 526e6 < count < 528e6


def test_naive_cnn3d_shapes_and_count_with_configured_widths():
    torch.manual_seed(5)
    model = M.NaiveCNN3D((32, 48, 32), fc_widths=(20, 10), out_features=3, dropout=0.2)
    assert M.parameter_count(model) == _independent_cnn3d_count((2, 3, 2), 20, 10, 3)
    assert model(torch.randn(2, 1, 32, 48, 32)).shape == (2, 3)
    assert model(torch.randn(2, 32, 48, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="input_shape"):
        model(torch.randn(2, 1, 32, 32, 32))


def test_naive_cnn3d_gradients_reach_every_parameter():
    torch.manual_seed(6)
    model = M.NaiveCNN3D((16, 16, 16), dropout=0.0)
    out = model(torch.randn(4, 1, 16, 16, 16))
    _assert_all_gradients_flow(model, F.mse_loss(out, torch.randn(4, 1)))


def _independent_resnet_count(w, c_in_total, out):
    total = c_in_total * w * 7 ** 3 + 2 * w
    c_in = w
    for stage, blocks in enumerate([3, 4, 6, 3]):
        mid = w * 2 ** stage
        for b in range(blocks):
            total += c_in * mid + mid * mid * 27 + mid * 4 * mid + 2 * (mid + mid + 4 * mid)
            if b == 0:
                total += c_in * 4 * mid + 2 * 4 * mid
            c_in = 4 * mid
    return total + c_in * out + out


def test_resnet50_3d_default_has_about_47m_parameters():
    with torch.device("meta"):
        model = M.ResNet50_3D()
    count = M.parameter_count(model)
    assert count == _independent_resnet_count(64, 1, 1) == M.resnet50_3d_parameter_count()
    assert 45e6 < count < 48e6


def test_resnet50_3d_narrow_variant_shapes_and_gradients():
    torch.manual_seed(7)
    model = M.ResNet50_3D(in_channels=2, out_features=3, width=4)
    assert M.parameter_count(model) == _independent_resnet_count(4, 2, 3)
    out = model(torch.randn(2, 2, 16, 16, 16))
    assert out.shape == (2, 3)
    _assert_all_gradients_flow(model, out.pow(2).sum())


@pytest.mark.parametrize("activation", ["relu", "tanh", "none"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_encoding_mlp_shapes_and_parameter_count(activation, batch_norm):
    model = M.EncodingMLP(12, (16, 8), 30, activation=activation, batch_norm=batch_norm,
                          dropout=0.1)
    expected = 12 * 16 + 16 + 16 * 8 + 8 + 8 * 30 + 30 + (2 * (16 + 8) if batch_norm else 0)
    assert M.parameter_count(model) == expected
    assert model(torch.randn(4, 12)).shape == (4, 30)
    assert (model.fc1.in_features, model.fc2.in_features, model.fc3.out_features) == (12, 16, 30)


def test_encoding_mlp_without_activation_or_batch_norm_is_affine():
    torch.manual_seed(8)
    model = M.EncodingMLP(6, (5, 4), 3, activation="none", batch_norm=False).double()
    a, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    zero = model(torch.zeros(1, 6, dtype=torch.float64))
    torch.testing.assert_close(model(a + b), model(a) + model(b) - zero)


def test_encoding_mlp_tanh_hidden_layers_are_bounded_and_gradients_flow():
    torch.manual_seed(9)
    model = M.EncodingMLP(6, (5, 4), 3, activation="tanh", batch_norm=False)
    hidden = model.layers[:4](100 * torch.randn(7, 6))
    assert hidden.abs().max() <= 1.0
    _assert_all_gradients_flow(model, model(torch.randn(7, 6)).sum())


def test_build_model_names_the_unknown_argument():
    assert isinstance(M.build_model("dca", input_length=40, hidden_size=8), M.DCA)
    with pytest.raises(TypeError, match="hidden_units"):
        M.build_model("dca", hidden_units=8)
    with pytest.raises(KeyError, match="naive_cnn3d"):
        M.build_model("cnn")
