"""pybrain_mpi.compute: the device / precision / memory-format policy."""

from __future__ import annotations

import pytest
import torch

from pybrain_mpi import compute
from pybrain_mpi.models import DCA, NaiveCNN3D

NO_BF16 = frozenset({"avx2", "avx512f"})
NATIVE_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AMX = frozenset({"amx_tile", "amx_bf16"})


def test_auto_precision_is_bf16_only_where_the_cpu_has_native_bfloat16():
    model = DCA(input_length=40, hidden_size=8)
    assert compute.resolve(model, device="cpu", features=NATIVE_BF16).precision == "bf16"
    assert compute.resolve(model, device="cpu", features=AMX).precision == "bf16"
    slow = compute.resolve(model, device="cpu", features=NO_BF16)
    assert slow.precision == "fp32"
    assert any("AVX512_BF16" in note for note in slow.notes), slow.notes


def test_auto_precision_keeps_fp32_for_models_too_small_to_repay_autocast():
    from pybrain_mpi.models import EncodingMLP

    small = EncodingMLP(in_features=31, hidden=(64, 64), out_features=28)
    policy = compute.resolve(small, device="cpu", features=NATIVE_BF16)
    assert policy.precision == "fp32" and any("too small" in n for n in policy.notes)
    large = EncodingMLP(in_features=768, hidden=(1024, 1024), out_features=2048)
    assert compute.resolve(large, device="cpu", features=NATIVE_BF16).precision == "bf16"


def test_auto_memory_format_is_channels_last_for_3d_convolutions_only():
    cnn = NaiveCNN3D(input_shape=(16, 16, 16))
    assert compute.resolve(cnn, device="cpu", features=NO_BF16).memory_format == "channels_last"
    dca = DCA(input_length=40, hidden_size=8)
    assert compute.resolve(dca, device="cpu", features=NO_BF16).memory_format == "contiguous"


def test_explicit_choices_are_kept():
    cnn = NaiveCNN3D(input_shape=(16, 16, 16))
    policy = compute.resolve(cnn, device="cpu", precision="fp32", memory_format="contiguous",
                             features=NATIVE_BF16)
    assert (policy.device, policy.precision, policy.memory_format) == ("cpu", "fp32", "contiguous")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_cuda_without_a_visible_device_is_refused_in_one_line():
    with pytest.raises(compute.ComputeError) as error:
        compute.resolve(None, device="cuda")
    message = str(error.value)
    assert "\n" not in message and "cuda" in message and "cpu" in message


def test_unknown_choices_name_the_allowed_values():
    with pytest.raises(compute.ComputeError, match="precision 'fp8'.*fp32"):
        compute.resolve(None, device="cpu", precision="fp8")


def test_threads_per_rank_prefers_omp_then_slurm_then_cores_over_ranks(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
    assert compute.threads_per_rank(2) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert compute.threads_per_rank(2) == (5, "SLURM_CPUS_PER_TASK")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    threads, source = compute.threads_per_rank(64)
    assert threads == 1 and "ranks" in source


def test_channels_last_policy_prepares_model_and_batches_in_channels_last_3d():
    cnn = NaiveCNN3D(input_shape=(16, 16, 16))
    policy = compute.ComputePolicy("cpu", "fp32", "channels_last")
    model = policy.prepare(cnn)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = policy.input(torch.randn(2, 1, 16, 16, 16))
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    assert policy.input(torch.randn(2, 1)).shape == (2, 1)


def test_bf16_autocast_step_matches_fp32_within_bfloat16_precision():
    torch.manual_seed(0)
    cnn = NaiveCNN3D(input_shape=(16, 16, 16), dropout=0.0).eval()
    x = torch.randn(3, 1, 16, 16, 16)
    reference = cnn(x).double()
    policy = compute.ComputePolicy("cpu", "bf16", "channels_last")
    model = policy.prepare(cnn)
    with policy.autocast():
        out = model(policy.input(x))
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits (eps 2^-7); a few layers of rounding stay well within
    # 2^-4 of the output scale.
    scale = reference.abs().max().item()
    assert (out.double() - reference).abs().max().item() <= 2 ** -4 * scale + 1e-6


def test_describe_is_one_line_with_the_reasons():
    policy = compute.resolve(NaiveCNN3D(input_shape=(16, 16, 16)), device="cpu", features=NO_BF16)
    text = policy.describe()
    assert "\n" not in text and "fp32" in text and "channels_last_3d" in text


def test_a_visible_gpu_is_not_used_until_cuda_ranks_exist_and_cuda_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    policy = compute.resolve(DCA(input_length=40, hidden_size=8), features=NO_BF16)
    assert policy.device == "cpu" and any("GPU is visible" in n for n in policy.notes)
    with pytest.raises(compute.ComputeError, match="CPU tensors only"):
        compute.resolve(None, device="cuda")
    assert compute.cuda_device_for(3) == "cuda:1"
