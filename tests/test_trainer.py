"""Trainer on one rank, in this process (a singleton MPI world): sampler, schedule, codecs,
exact resume in float32, and bad input stopping before any training step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import pybrain_mpi as pbm
from pybrain_mpi.data import ShuffledSampler
from pybrain_mpi.config import parse_config
from pybrain_mpi.compression import Cast, ThreeLC
from pybrain_mpi.trainer import (Trainer, TrainingDiverged,
                                 TrainingSetupError, build_codec, checkpoint_path)
from pybrain_mpi.trainer.checkpoint import load_checkpoint
from pybrain_mpi.trainer.trainer import _lr_at


@pytest.fixture(scope="module", autouse=True)
def mpi_world():
    pbm.init()
    yield
    pbm.shutdown()


def synthetic_series(path: Path, voxels: int = 96, length: int = 32, seed: int = 0) -> Path:
    """Smooth random series (sums of a few sinusoids + noise), z-scored like real fMRI."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    freqs = rng.uniform(0.02, 0.2, size=(voxels, 3))
    phases = rng.uniform(0, 2 * np.pi, size=(voxels, 3))
    x = np.sin(2 * np.pi * freqs[:, :, None] * t + phases[:, :, None]).sum(1)
    x += 0.3 * rng.standard_normal(x.shape)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    np.save(path, x.astype(np.float32))
    return path


def dca_config(tmp_path: Path, data: Path, *, length: int = 32, hidden: int = 8,
               precision: str = "fp32", extra_train: str = "", output: Path | None = None,
               compression: str = "none") -> str:
    return f"""
[model]
name = "dca"
input_length = {length}
hidden_size = {hidden}

[data]
kind = "fmri_series"
source = "path"
path = "{data}"
held_out_fraction = 0.25

[train]
epochs = 50
batch_size = 8
lr = 1e-3
precision = "{precision}"
log_every = 1
val_fraction = 0.2
{extra_train}

[train.compression]
kind = "{compression}"

[output]
dir = "{output or tmp_path / 'run'}"
"""


def losses(output: Path) -> list[tuple[int, float]]:
    lines = (output / "logs" / "rank0.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "step" in r and "event" not in r]


# ------------------------------------------------------------------------ building blocks
def test_sampler_gives_each_rank_equal_disjoint_shards_that_change_per_epoch():
    samplers = [ShuffledSampler(103, 8, seed=5, rank=rank, world_size=4) for rank in range(4)]
    assert {s.per_rank for s in samplers} == {25} and {s.steps_per_epoch for s in samplers} == {4}
    shards = [s.shard(0) for s in samplers]
    together = np.concatenate(shards)
    assert len(set(together.tolist())) == 100  # disjoint, remainder of 3 dropped
    assert not np.array_equal(samplers[0].shard(1), shards[0])
    again = ShuffledSampler(103, 8, seed=5, rank=2, world_size=4)
    assert np.array_equal(again.batch_indices(1, 3), samplers[2].shard(1)[24:25])


def test_lr_schedule_warms_up_then_follows_cosine_to_min_lr():
    config = parse_config("""
[model]
name = "dca"
input_length = 40
[data]
kind = "fmri_series"
source = "nitime_fmri"
[train]
epochs = 1
batch_size = 1
lr = 0.1
[train.lr_schedule]
kind = "cosine"
warmup_steps = 4
min_lr = 0.01
""")
    assert _lr_at(config, 0, 0, 100) == pytest.approx(0.1 * math.cos(0) * 0.25, rel=1e-3)
    assert _lr_at(config, 50, 0, 100) == pytest.approx(0.01 + 0.09 * 0.5, rel=1e-12)
    assert _lr_at(config, 100, 0, 100) == pytest.approx(0.01, rel=1e-12)


def test_compression_kinds_map_to_the_native_codecs():
    cast = build_codec("bf16")
    assert isinstance(cast, Cast) and cast.dtype == "bf16"
    threelc = build_codec("3lc", 1.5)
    assert isinstance(threelc, ThreeLC) and threelc.sparsity == 1.5 and threelc.block == 0
    assert build_codec("3lc", 1.0, 64).block == 64
    assert build_codec("none") is None


# ------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("compression", ["none", "3lc"])
def test_float32_resume_continues_the_loss_curve_within_1e_6(tmp_path, compression):
    # With 3LC the curve only continues if the error-feedback residuals were checkpointed.
    data = synthetic_series(tmp_path / "s.npy")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(parse_config(dca_config(tmp_path, data, output=whole, compression=compression)), max_steps=9,
            progress=False, echo=False).fit()
    Trainer(parse_config(dca_config(tmp_path, data, output=parts, compression=compression)), max_steps=4,
            progress=False, echo=False).fit()
    resumed = Trainer(parse_config(dca_config(tmp_path, data, output=parts, compression=compression)),
                      resume=True, max_steps=9, progress=False, echo=False)
    assert resumed.step == 4
    summary = resumed.fit()
    a, b = losses(whole), losses(parts)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 10))
    assert max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b)) <= 1e-6
    assert summary["steps"] == 9 and (parts / "loss_curve.png").stat().st_size > 1000


# ------------------------------------------------------------------------ bad input
def test_missing_data_path_stops_before_training(tmp_path):
    config = parse_config(dca_config(tmp_path, tmp_path / "nope.npy"))
    with pytest.raises(TrainingSetupError, match=r"nope\.npy does not exist") as error:
        Trainer(config, progress=False, echo=False)
    assert "no training step was run" in str(error.value)
    assert not checkpoint_path(config).exists()


def test_series_length_that_does_not_fit_the_model_is_named(tmp_path):
    data = synthetic_series(tmp_path / "s.npy", length=32)
    config = parse_config(dca_config(tmp_path, data, length=48))
    with pytest.raises(TrainingSetupError, match="32 time points but \\[model\\] input_length = 48"):
        Trainer(config, progress=False, echo=False)


def test_nan_in_inputs_names_the_file_row(tmp_path):
    data = synthetic_series(tmp_path / "s.npy")
    array = np.load(data)
    array[37, 5] = np.nan
    np.save(data, array)
    config = parse_config(dca_config(tmp_path, data))
    with pytest.raises(TrainingSetupError, match="NaN or infinite values in 1 sample.*index 37"):
        Trainer(config, progress=False, echo=False)


def test_unwritable_output_dir_is_reported(tmp_path):
    data = synthetic_series(tmp_path / "s.npy")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = parse_config(dca_config(tmp_path, data, output=blocker / "run"))
    with pytest.raises(TrainingSetupError, match=r"\[output\] dir .*a_file/run is not writable"):
        Trainer(config, progress=False, echo=False)


def test_checkpoint_of_another_model_is_refused_and_left_intact(tmp_path):
    data = synthetic_series(tmp_path / "s.npy")
    Trainer(parse_config(dca_config(tmp_path, data, hidden=8)), max_steps=2,
            progress=False, echo=False).fit()
    path = checkpoint_path(parse_config(dca_config(tmp_path, data)))
    before = path.read_bytes()
    other = parse_config(dca_config(tmp_path, data, hidden=16))
    with pytest.raises(TrainingSetupError, match="encoder_fc.weight' has shape"):
        Trainer(other, resume=True, progress=False, echo=False)
    assert path.read_bytes() == before


def test_diverging_loss_stops_without_overwriting_the_good_checkpoint(tmp_path):
    data = synthetic_series(tmp_path / "s.npy")
    Trainer(parse_config(dca_config(tmp_path, data)), max_steps=2, progress=False, echo=False).fit()
    path = checkpoint_path(parse_config(dca_config(tmp_path, data)))
    before = path.read_bytes()
    # Finite inputs whose squares overflow float32: the loss becomes inf at the next step.
    array = np.load(data) * np.float32(1e30)
    np.save(data, array)
    trainer = Trainer(parse_config(dca_config(tmp_path, data)), resume=True, max_steps=6,
                      progress=False, echo=False)
    with pytest.raises(TrainingDiverged, match="loss became (inf|nan) at step 2"):
        trainer.fit()
    assert path.read_bytes() == before
    _, metadata = load_checkpoint(path)
    assert metadata["step"] == 2


# ------------------------------------------------------------------------ 3D patches (MNI152)
def mni_config(tmp_path: Path, precision: str = "fp32", checkpointing: str = "none",
               compression: str = "none") -> str:
    return f"""
[model]
name = "naive_cnn3d"
input_shape = [16, 16, 16]

[data]
kind = "volume_patches"
source = "mni152"
cache_dir = "{tmp_path.parent / 'mni_cache'}"  # converted once per test session
patch_size = [16, 16, 16]
patches_per_volume = 32
held_out_fraction = 0.2

[train]
epochs = 2
batch_size = 4
lr = 1e-3
precision = "{precision}"
activation_checkpointing = "{checkpointing}"
log_every = 1

[train.compression]
kind = "{compression}"

[output]
dir = "{tmp_path / 'mni'}"
"""


def test_mni152_patches_are_read_from_zarr_in_disjoint_slabs_with_grey_matter_targets(tmp_path):
    import nibabel as nib

    from pybrain_mpi.data import Volume
    from pybrain_mpi.data.examples import mni152_paths
    from pybrain_mpi.trainer import build_data

    config = parse_config(mni_config(tmp_path))
    data = build_data(config.data, 0.1, rank=0, share=lambda value, timeout_s: value)
    assert isinstance(data.image_source.volume, Volume)  # patches come from the Zarr store
    assert data.input_shape == (16, 16, 16) and data.size("train") == 32
    train0, train1 = data.corners("train", 0), data.corners("train", 1)
    assert not np.array_equal(train0, train1)  # fresh patches every epoch
    assert np.array_equal(train0, data.corners("train", 0))  # ... and reproducible
    held = data.corners("held_out", 0)
    start, _ = data.regions["held_out"]
    assert held[:, 0].min() >= start and train0[:, 0].max() + 16 <= data.regions["train"][1]
    x, y = data.batch("train", 0, np.arange(4))
    assert x.shape == (4, 16, 16, 16) and y.shape == (4, 1)
    # Reference from the source NIfTI files: z-scored T1 over the brain, GM / max(GM).
    paths = mni152_paths()
    t1 = np.asarray(nib.load(str(paths["t1"])).dataobj, dtype=np.float64)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj, dtype=np.float64)
    inside = t1[t1 > 0]
    a, b, c = train0[2]
    patch = (t1[a:a + 16, b:b + 16, c:c + 16] - inside.mean()) / inside.std()
    np.testing.assert_allclose(x[2], patch, rtol=0, atol=1e-5)  # float32 arithmetic
    assert y[2, 0] == pytest.approx(gm[a:a + 16, b:b + 16, c:c + 16].mean() / gm.max(), rel=1e-6)
    assert np.all((y >= 0) & (y <= 1))


def test_cnn3d_trains_with_bf16_autocast_bf16_compression_and_activation_checkpointing(tmp_path):
    config = parse_config(mni_config(tmp_path, precision="bf16", checkpointing="sqrt",
                                     compression="bf16"))
    trainer = Trainer(config, max_steps=3, progress=False, echo=False)
    assert "features" in trainer.checkpointing
    summary = trainer.fit()
    assert summary["steps"] == 3 and math.isfinite(summary["final_train_loss"])
    assert math.isfinite(summary["held_out"]["mse"])
    _, metadata = load_checkpoint(checkpoint_path(config))
    assert metadata["precision"] == "bf16"


def test_early_stopping_after_patience_epochs_without_validation_improvement(tmp_path, monkeypatch):
    data = synthetic_series(tmp_path / "s.npy")
    config = parse_config(dca_config(tmp_path, data, extra_train="patience = 2").replace(
        "batch_size = 8", "batch_size = 64"))
    trainer = Trainer(config, progress=False, echo=False)
    assert trainer.sampler.steps_per_epoch == 1
    scripted = iter([1.0, 0.9, 0.95, 0.97, 0.5])
    real_evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda split: {"loss": next(scripted), "r2": 0.0}
                        if split == "val" else real_evaluate(split))
    summary = trainer.fit()
    # Best 0.9 at epoch 1; epochs 2 and 3 do not improve on it: stop after epoch 3 of 50.
    assert summary["stopped"] == "early stopping" and summary["epochs_completed"] == 4
    assert [h["val_loss"] for h in trainer.history] == [1.0, 0.9, 0.95, 0.97]
    assert len(summary["held_out_per_output"]["pearson_r"]) == 32


# ------------------------------------------------------------------------ encoding, per-ROI metrics
def per_roi_reference(pred: np.ndarray, target: np.ndarray, labels) -> dict:
    """Per-output R^2 and Pearson r in plain numpy float64, averaged within each ROI."""
    r2 = 1 - ((target - pred) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
    r = np.array([np.corrcoef(pred[:, k], target[:, k])[0, 1] for k in range(target.shape[1])])
    labels = np.asarray(labels)
    return {"r2": {str(roi): float(r2[labels == roi].mean()) for roi in np.unique(labels)},
            "pearson_r": {str(roi): float(r[labels == roi].mean()) for roi in np.unique(labels)}}


def test_encoding_reports_per_roi_metrics_equal_to_a_numpy_reference(tmp_path):
    rng = np.random.default_rng(7)
    features = rng.standard_normal((80, 5))
    targets = features @ rng.standard_normal((5, 4)) + 0.5 * rng.standard_normal((80, 4))
    labels = np.array(["V1", "V1", "MT", "FFA"])
    np.savez(tmp_path / "enc.npz", features=features, targets=targets, roi_labels=labels)
    config = parse_config(f"""
[model]
name = "encoding_mlp"
in_features = 5
hidden = [8, 8]
out_features = 4
batch_norm = false
[data]
kind = "encoding"
path = "{tmp_path / 'enc.npz'}"
held_out_fraction = 0.25
[train]
epochs = 3
batch_size = 8
lr = 1e-2
precision = "fp64"
[output]
dir = "{tmp_path / 'run'}"
""")
    trainer = Trainer(config, progress=False, echo=False)
    summary = trainer.fit()
    # Held-out rows are the last 20 samples (contiguous block): predict them independently.
    assert trainer.data.rows["held_out"].tolist() == list(range(60, 80))
    trainer.module.eval()
    with torch.no_grad():
        pred = trainer.module(torch.from_numpy(features[60:].astype(np.float32)).double()).numpy()
    expected = per_roi_reference(pred, targets[60:].astype(np.float32).astype(np.float64), labels)
    got = summary["held_out_per_roi"]
    assert set(got["r2"]) == {"V1", "MT", "FFA"}
    for metric in ("r2", "pearson_r"):
        for roi, value in expected[metric].items():
            assert got[metric][roi] == pytest.approx(value, rel=1e-10, abs=1e-12), (metric, roi)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["held_out_per_roi"] == got
    from pybrain_mpi.trainer.trainer import format_summary
    assert "ROI FFA" in format_summary(summary)


def test_encoding_from_nitime_rois_predicts_next_volume_from_lagged_signals():
    from pybrain_mpi.data.examples import load_nitime_roi_timeseries
    from pybrain_mpi.trainer.data import nitime_roi_encoding

    data = nitime_roi_encoding(lags=2, held_out_fraction=0.2, val_fraction=0.1)
    names, values = load_nitime_roi_timeseries()
    assert data.input_shape == (62,) and data.n_outputs == 28 and data.size("held_out") == 50
    assert len(set(data.roi_labels)) == 14 and data.roi_labels.count("AntPHG") == 2
    # Sample i: targets = ROI columns at volume i + 2; features = all signals at i + 1, then i,
    # z-scored with the training block's statistics (volumes 0 .. train_end + 1).
    train_end = data.size("train")
    fit = values[:train_end + 2]
    z = (values - fit.mean(0)) / fit.std(0)
    x, y = data.batch("held_out", 0, np.array([3]))
    i = data.rows["held_out"][3]
    roi = [k for k, n in enumerate(names) if n not in ("WM", "Vent", "Brain")]
    np.testing.assert_allclose(y[0], z[i + 2, roi], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x[0], np.concatenate([z[i + 1], z[i]]), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ example cache, ranks
def test_ranks_waiting_for_the_example_cache_stop_with_a_clear_message(tmp_path, monkeypatch):
    from pybrain_mpi.errors import CollectiveTimeout
    from pybrain_mpi.trainer import DataError, build_data

    config = parse_config(f"""
[model]
name = "dca"
input_length = 40
[data]
kind = "fmri_series"
source = "nitime_fmri"
cache_dir = "{tmp_path / 'cache'}"
[train]
epochs = 1
batch_size = 4
lr = 1e-3
""")

    def rank0_too_slow(value, timeout_s):
        raise CollectiveTimeout(f"barrier: ranks [0] missing after {timeout_s} s", [0])

    monkeypatch.setenv("PBM_CACHE_WAIT_S", "7")
    with pytest.raises(DataError, match=r"rank 1 waited 7 s for rank 0 to prepare the nitime fMRI "
                                        r"example in .*cache .*PBM_CACHE_WAIT_S"):
        build_data(config.data, 0.1, rank=1, share=rank0_too_slow)
    # Rank 0 failed to build it: the other ranks report rank 0's reason, not a missing cache.
    with pytest.raises(DataError, match="on rank 0 failed: cannot write"):
        build_data(config.data, 0.1, rank=1, share=lambda value, timeout_s: "cannot write ...")
    # Rank 0 cannot write the cache directory: its reason reaches every rank.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = parse_config(f"""
[model]
name = "dca"
input_length = 40
[data]
kind = "fmri_series"
source = "nitime_fmri"
cache_dir = "{blocker / 'cache'}"
[train]
epochs = 1
batch_size = 4
lr = 1e-3
""")
    shared = []
    with pytest.raises(DataError, match="on rank 0 failed: cannot write the example cache"):
        build_data(bad.data, 0.1, rank=0, share=lambda value, timeout_s: shared.append(value) or value)
    assert "PBM_CACHE_DIR" in shared[0]


def test_auto_compute_policy_is_what_pbm_compute_resolves_for_the_model(tmp_path):
    from pybrain_mpi import compute
    from pybrain_mpi.models import NaiveCNN3D

    config = parse_config(mni_config(tmp_path, precision="auto"))
    trainer = Trainer(config, max_steps=2, progress=False, echo=False)
    expected = compute.resolve(NaiveCNN3D(input_shape=(16, 16, 16)), device="cpu")
    assert (trainer.policy.precision, trainer.policy.memory_format) == \
        (expected.precision, expected.memory_format)
    conv = next(m for m in trainer.module.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert "compute: cpu" in trainer.describe(2)
    summary = trainer.fit()
    assert summary["precision"] == expected.precision and summary["memory_format"] == "channels_last"
    assert math.isfinite(summary["final_train_loss"])


def test_fp16_training_scales_the_loss_and_resumes_its_scale(tmp_path):
    data = synthetic_series(tmp_path / "s.npy")
    config = parse_config(dca_config(tmp_path, data, precision="fp16"))
    trainer = Trainer(config, max_steps=3, progress=False, echo=False)
    assert trainer.scaler is not None and trainer.policy.autocast_dtype == torch.float16
    summary = trainer.fit()
    assert summary["precision"] == "fp16" and math.isfinite(summary["final_train_loss"])
    tree, metadata = load_checkpoint(checkpoint_path(config))
    assert metadata["precision"] == "fp16" and tree["scaler"]["scale"] > 0
