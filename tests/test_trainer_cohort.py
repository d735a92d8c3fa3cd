"""Training on your own data from a manifest, on 2 real MPI ranks: unet3d brain-mask
segmentation with Dice on held-out subjects and ``predict`` writing a NIfTI on the input's
grid; per-subject regression from the same cohort; DCA on a 4D NIfTI with no numpy script.
In-process: the single-subject held-out block, your own model, shape messages.

The cohort is nilearn's real MNI152 (T1, brain mask, GM map) plus subjects made from it by
seeded affine warps and intensity changes: those are synthetic (``synthetic`` column of the
manifest, :func:`pybrain_mpi.data.examples.build_mni152_cohort`). 4 mm voxels keep it small."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pybrain_mpi as pbm
from conftest import run_mpi
from pybrain_mpi.config import parse_config
from pybrain_mpi.data.examples import build_mni152_cohort, nitime_fmri_paths


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    return build_mni152_cohort(root / "data", subjects=5, seed=11, voxel_mm=4.0)


def seg_config(path: Path, manifest: Path, output: Path, cache: Path, patch: int = 32) -> Path:
    """unet3d on patches of ``patch``^3 (32^3 at 4 mm: the context a brain mask needs), without
    normalisation layers: no batch statistics to settle in a 12-step run."""
    path.write_text(textwrap.dedent(f"""
        [model]
        name = "unet3d"
        depth = {3 if patch >= 32 else 2}
        width = 8
        norm = "none"

        [data]
        kind = "segmentation"
        manifest = "{manifest}"
        images = ["t1"]
        label = "brain_mask"
        patch_size = [{patch}, {patch}, {patch}]
        patches_per_volume = 8
        held_out_fraction = 0.4
        cache_dir = "{cache}"

        [train]
        epochs = 4
        batch_size = 4
        lr = 0.003
        log_every = 1

        [output]
        dir = "{output}"
        """))
    return path


@pytest.fixture(scope="module")
def segmentation(cohort, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("seg")
    config = seg_config(root / "seg.toml", cohort, root / "run", root / "cache")
    trained = run_mpi(2, "train_cli.py", "train", str(config), "--no-progress", timeout_s=240)
    image = cohort.parent / "synth-02" / "t1.nii.gz"
    predicted = run_mpi(2, "train_cli.py", "predict", str(config), "--checkpoint",
                        str(root / "run" / "checkpoints" / "checkpoint.pt"), "--input", str(image),
                        "--output", str(root / "pred" / "brain.nii.gz"), "--png",
                        str(root / "pred" / "brain.png"), timeout_s=120)
    return {"root": root, "trained": trained, "predicted": predicted, "image": image}


def test_unet3d_segments_the_brain_of_held_out_subjects_on_two_ranks(segmentation):
    out = segmentation["trained"].stdout
    assert "held-out mean Dice" in out and "subject" in out, out
    summary = json.loads((segmentation["root"] / "run" / "summary.json").read_text())
    held = summary["held_out"]
    assert summary["task"] == "segmentation" and summary["ranks"] == 2
    # 2 of 5 subjects held out, their whole volumes evaluated; the brain is found.
    assert held["n_samples"] == 2 and len(summary["held_out_per_subject"]) == 2
    assert held["mean_dice"] > 0.85, held
    assert set(held["dice"]) == {"0", "1"} and held["undefined"] == {}
    # The summary records the config as run (sizes taken from the data), versions, seed and
    # each rank's peak memory.
    model = summary["config"]["model"]
    assert model["kwargs"]["in_channels"] == 1 and model["kwargs"]["out_channels"] == 2
    assert sorted(model["from_data"]) == ["in_channels", "out_channels"]
    assert summary["config"]["data"]["patch_size"] == [32, 32, 32] and summary["seed"] == 0
    assert {"pybrain_mpi", "torch", "numpy", "mpi"} <= set(summary["versions"])
    assert len(summary["peak_rss_mb_per_rank"]) == 2 and min(summary["peak_rss_mb_per_rank"]) > 50
    # The best validation loss is reported without early stopping too (patience 0 here).
    epochs = [json.loads(line) for line in (segmentation["root"] / "run" / "logs" / "rank0.jsonl")
              .read_text().splitlines() if '"event": "epoch"' in line]
    assert len(epochs) == 4 and summary["best_val_loss"] == min(e["val_loss"] for e in epochs)


def test_predict_writes_labels_on_the_input_grid_and_a_picture(segmentation):
    written = nib.load(segmentation["root"] / "pred" / "brain.nii.gz")
    source = nib.load(segmentation["image"])
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    labels = np.asarray(written.dataobj)
    truth = np.asarray(nib.load(segmentation["image"].parent / "brain_mask.nii.gz").dataobj) > 0
    assert set(np.unique(labels)) <= {0, 1}
    dice = 2 * (labels.astype(bool) & truth).sum() / (labels.astype(bool).sum() + truth.sum())
    assert dice > 0.85, dice
    assert (segmentation["root"] / "pred" / "brain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_cohort_trains_a_per_subject_regression(cohort, tmp_path):
    config = tmp_path / "reg.toml"
    config.write_text(textwrap.dedent(f"""
        [model]
        name = "naive_cnn3d"
        dropout = 0.0

        [data]
        kind = "regression"
        manifest = "{cohort}"
        images = ["t1"]
        targets = ["gm_volume_ml", "brain_volume_ml"]
        patch_size = [16, 16, 16]
        patches_per_volume = 8
        eval_patches = 4
        held_out_fraction = 0.4
        cache_dir = "{tmp_path / 'cache'}"

        [train]
        epochs = 2
        batch_size = 4
        lr = 1e-3
        precision = "fp32"   # predict runs in fp32: the same arithmetic as this run's evaluation

        [output]
        dir = "{tmp_path / 'run'}"
        """))
    result = run_mpi(2, "train_cli.py", "train", str(config), "--no-progress", timeout_s=180)
    assert "target gm_volume_ml" in result.stdout and "target brain_volume_ml" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    held = summary["held_out"]
    assert summary["task"] == "regression" and held["n_samples"] == 2  # subjects, not patches
    assert set(summary["held_out_per_target"]) == {"gm_volume_ml", "brain_volume_ml"}
    assert all(np.isfinite(t["mae"]) for t in summary["held_out_per_target"].values())
    # Two held-out subjects: a correlation is +-1 by construction, so it is undefined, with why.
    assert held["pearson_r"] is None and "2 samples" in held["undefined"]["pearson_r"]
    assert re.search(r"held-out Pearson r +undefined \(2 samples", result.stdout), result.stdout
    assert all(t["pearson_r"] is None for t in summary["held_out_per_target"].values())
    assert summary["config"]["model"]["kwargs"]["out_features"] == 2
    assert len(summary["held_out_per_subject"]) == 2
    # predict on the whole manifest writes one row per subject; the held-out subjects get the
    # values the training run's own evaluation reported (same evaluation patches and model).
    table = tmp_path / "pred" / "values.tsv"
    run_mpi(2, "train_cli.py", "predict", str(config), "--checkpoint",
            str(tmp_path / "run" / "checkpoints" / "checkpoint.pt"), "--input", str(cohort),
            "--output", str(table), timeout_s=120)
    header, *rows = [line.split("\t") for line in table.read_text().splitlines()]
    assert header == ["subject", "gm_volume_ml_predicted", "brain_volume_ml_predicted"]
    predicted = {row[0]: [float(v) for v in row[1:]] for row in rows}
    manifest_ids = [line.split("\t")[0] for line in cohort.read_text().splitlines()[1:]]
    assert sorted(predicted) == sorted(manifest_ids)
    for subject in summary["held_out_per_subject"]:
        expected = [subject["gm_volume_ml_predicted"], subject["brain_volume_ml_predicted"]]
        np.testing.assert_allclose(predicted[subject["subject"]], expected, rtol=2e-5)  # %.6g


def test_dca_trains_on_4d_nifti_runs_from_a_manifest(tmp_path):
    manifest = tmp_path / "runs.tsv"
    first, second = nitime_fmri_paths()
    manifest.write_text(f"subject\tbold\nrun-1\t{first}\nrun-2\t{second}\n")
    config = tmp_path / "dca.toml"
    config.write_text(textwrap.dedent(f"""
        [model]
        name = "dca"
        hidden_size = 16

        [data]
        kind = "fmri_series"
        manifest = "{manifest}"
        images = ["bold"]
        cache_dir = "{tmp_path / 'cache'}"

        [train]
        epochs = 1
        batch_size = 32
        lr = 1e-3

        [output]
        dir = "{tmp_path / 'run'}"
        """))
    result = run_mpi(2, "train_cli.py", "train", str(config), "--no-progress", "--steps", "6",
                     timeout_s=150)
    assert "0 constant series of 3600 dropped" in result.stdout, result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # input_length was not set: it came from the runs (40 volumes); run-2 is held out whole.
    assert summary["config"]["model"]["kwargs"]["input_length"] == 40
    assert summary["held_out"]["n_samples"] == 1800 and -1 < summary["held_out"]["r2"] < 1


# ----------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def world():
    pbm.init()
    yield
    pbm.shutdown()


def _data(text: str):
    from pybrain_mpi.trainer.data import build_data

    config = parse_config(text)
    return config, build_data(config.data, config.train.val_fraction, 0,
                              lambda value, timeout: value, seed=config.train.seed)


def test_one_subject_holds_out_a_block_with_foreground_that_no_training_patch_touches(
        world, cohort, tmp_path):
    one = tmp_path / "one.tsv"
    lines = cohort.read_text().splitlines()
    one.write_text(lines[0] + "\n" + lines[2].replace("synth-01/", f"{cohort.parent}/synth-01/") + "\n")
    _, data = _data(seg_config(tmp_path / "s.toml", one, tmp_path / "run", tmp_path / "cache",
                               patch=16).read_text())
    start, size = data.block
    mask = np.asarray(nib.load(cohort.parent / "synth-01" / "brain_mask.nii.gz").dataobj)
    inside = mask[tuple(slice(s, s + n) for s, n in zip(start, size))]
    assert inside.sum() > 0, "the held-out block must contain foreground"
    for index in range(data.size("train")):
        _, corner = data.train_sample(0, index)
        assert not all(c < s + n and s < c + 16 for c, s, n in zip(corner, start, size))
    assert "held-out block" in data.description
    data.close()


def test_foreground_sampling_centres_patches_on_the_brain(world, cohort, tmp_path):
    text = seg_config(tmp_path / "s.toml", cohort, tmp_path / "run", tmp_path / "cache",
                      patch=16).read_text()
    shares = {}
    for sampling in ("uniform", "foreground"):
        _, data = _data(text.replace('kind = "segmentation"',
                                     f'kind = "segmentation"\nsampling = "{sampling}"\n'
                                     'foreground_fraction = 1.0'))
        _, y = data.batch("train", 0, np.arange(48))
        shares[sampling] = float((y > 0).mean())
        data.close()
    assert shares["foreground"] > shares["uniform"] + 0.1, shares


def test_own_model_from_a_file_is_built_with_its_arguments_and_checked_against_the_data(
        world, cohort, tmp_path):
    from pybrain_mpi.config import ConfigError
    from pybrain_mpi.trainer import Trainer, TrainingSetupError

    models = tmp_path / "my_models.py"
    models.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class TinySeg(nn.Module):
            def __init__(self, in_channels=1, out_channels=2, hidden=4):
                super().__init__()
                self.net = nn.Sequential(nn.Conv3d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                                         nn.Conv3d(hidden, out_channels, 1))

            def forward(self, x):
                return self.net(x)
        """))
    name = f'name = "{models}:TinySeg"'
    text = seg_config(tmp_path / "s.toml", cohort, tmp_path / "run", tmp_path / "cache",
                      patch=16).read_text()
    text = text.replace('name = "unet3d"\ndepth = 2\nwidth = 8\nnorm = "none"', name + "\nhidden = 3")
    trainer = Trainer(parse_config(text, "own.toml"), max_steps=2, progress=False, echo=False)
    assert type(trainer.module).__name__ == "TinySeg" and trainer.model_kwargs["hidden"] == 3
    summary = trainer.fit()
    assert summary["held_out"]["n_samples"] == 2
    with pytest.raises(ConfigError, match="has no argument 'width'.*in_channels, out_channels, hidden"):
        parse_config(text.replace("hidden = 3", "width = 3"), "own.toml")
    # An output of the wrong size is refused before any step, naming both shapes.
    with pytest.raises(TrainingSetupError, match=r"outputs \[3, 16, 16, 16\] per sample but "
                                                  r"segmentation of the data's 2 classes .* needs "
                                                  r"\[2, 16, 16, 16\]"):
        Trainer(parse_config(text.replace("hidden = 3", "hidden = 3\nout_channels = 3"),
                             "own.toml"), progress=False, echo=False)
    with pytest.raises(ConfigError, match=r"own.toml:\d+: \[model\] name = .*no_such_module:Net.*cannot import"):
        parse_config(text.replace(name, 'name = "no_such_module:Net"'), "own.toml")


def test_a_bids_dataset_named_in_the_config_trains_with_its_participants_split(
        world, cohort, tmp_path):
    """``[data] bids``: T1w images, brain masks from a derivatives pipeline, the split from
    participants.tsv; the held-out subjects are the ones it names."""
    import shutil

    from pybrain_mpi.trainer import Trainer

    bids = tmp_path / "bids"
    header, *rows = cohort.read_text().splitlines()
    columns = header.split("\t")
    participants = ["participant_id\tsplit"]
    for number, row in enumerate(rows, start=1):
        cells = dict(zip(columns, row.split("\t")))
        sub = f"sub-{number:02d}"
        anat = bids / sub / "anat"
        derived = bids / "derivatives" / "masks" / sub / "anat"
        anat.mkdir(parents=True)
        derived.mkdir(parents=True)
        shutil.copy(cohort.parent / cells["t1"], anat / f"{sub}_T1w.nii.gz")
        shutil.copy(cohort.parent / cells["brain_mask"], derived / f"{sub}_desc-brain_mask.nii.gz")
        participants.append(f"{sub}\t{'test' if number >= 4 else 'train'}")
    (bids / "participants.tsv").write_text("\n".join(participants) + "\n")
    text = seg_config(tmp_path / "s.toml", cohort, tmp_path / "run", tmp_path / "cache",
                      patch=16).read_text()
    text = text.replace(f'manifest = "{cohort}"\nimages = ["t1"]\nlabel = "brain_mask"',
                        f'bids = "{bids}"\nbids_suffix = "T1w"\nlabel = "mask"')
    assert f'bids = "{bids}"' in text
    summary = Trainer(parse_config(text, "bids.toml"), max_steps=2, progress=False,
                      echo=False).fit()
    assert [s["subject"] for s in summary["held_out_per_subject"]] == ["sub-04", "sub-05"]
    assert summary["config"]["data"]["bids"] == str(bids) and summary["held_out"]["n_samples"] == 2
    assert summary["held_out"]["dice"]["1"] is not None  # the derivatives' masks were read


def test_a_label_absent_from_a_held_out_subject_is_undefined_there_with_the_reason(
        world, cohort, tmp_path, capsys):
    """A held-out subject without the label (an empty label map: synthetic, as for a lesion
    absent from a healthy subject) and a model that predicts background everywhere: that
    subject's Dice is undefined, with the reason in summary.json and the printed table, never
    a bare nan; the other held-out subject's Dice is a defined 0."""
    from pybrain_mpi.trainer import Trainer

    (tmp_path / "background.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Background(nn.Module):
            def __init__(self, in_channels=1, out_channels=2):
                super().__init__()
                self.conv = nn.Conv3d(in_channels, out_channels, 1)

            def forward(self, x):
                logits = torch.zeros(x.shape[0], self.conv.out_channels, *x.shape[2:])
                logits[:, 0] = 10.0
                return logits + 0.0 * self.conv(x)  # a parameter to train, no effect
        """))
    mask = nib.load(cohort.parent / "synth-03" / "brain_mask.nii.gz")
    empty = tmp_path / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine), empty)
    header, *rows = cohort.read_text().splitlines()
    columns = header.split("\t")
    lines = [header + "\tsplit"]
    for row in rows:
        cells = row.split("\t")
        cells = [c if not c.endswith(".nii.gz") else str(cohort.parent / c) for c in cells]
        subject = cells[columns.index("subject")]
        if subject == "synth-03":
            cells[columns.index("brain_mask")] = str(empty)
        lines.append("\t".join(cells) + ("\ttest" if subject in ("synth-03", "synth-04") else "\ttrain"))
    manifest = tmp_path / "absent.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    text = seg_config(tmp_path / "s.toml", manifest, tmp_path / "run", tmp_path / "cache",
                      patch=16).read_text()
    text = text.replace('name = "unet3d"\ndepth = 2\nwidth = 8\nnorm = "none"',
                        f'name = "{tmp_path / "background.py"}:Background"')
    capsys.readouterr()
    Trainer(parse_config(text, "absent.toml"), max_steps=1, progress=False).fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    per_subject = {s["subject"]: s for s in summary["held_out_per_subject"]}
    absent = per_subject["synth-03"]
    assert absent["mean_dice"] is None and absent["dice"]["1"] is None
    assert absent["undefined"]["dice[1]"] == "label 1 is in neither the target nor the prediction"
    assert "no foreground label" in absent["undefined"]["mean_dice"]
    assert per_subject["synth-04"]["mean_dice"] == 0.0 and "undefined" not in per_subject["synth-04"]
    assert summary["held_out"]["mean_dice"] == 0.0  # synth-04's brain, all missed
    printed = capsys.readouterr().out
    assert re.search(r"subject synth-03 +mean Dice undefined \(no foreground label is in the "
                     r"target or the prediction\)", printed), printed
    assert "nan" not in printed.lower() and "NaN" not in (tmp_path / "run" / "summary.json").read_text()


def test_predict_writes_zarr_labels_and_class_probabilities_on_request(segmentation, world):
    """One rank, the 2-rank run's checkpoint: labels as OME-Zarr with the input's affine,
    probabilities as NIfTI (classes last) and as Zarr (classes first), all one prediction."""
    from pybrain_mpi.config import load_config
    from pybrain_mpi.trainer.predict import PredictError, predict

    root, image = segmentation["root"], segmentation["image"]
    config = load_config(root / "seg.toml")
    checkpoint = root / "run" / "checkpoints" / "checkpoint.pt"
    out = root / "pred1"
    records = predict(config, checkpoint, str(image), out / "brain.zarr",
                      probabilities=out / "probs.nii.gz")
    predict(config, checkpoint, str(image), out / "again.nii.gz", probabilities=out / "probs.zarr")
    source = nib.load(image)
    with pbm.data.Volume(str(out / "brain.zarr")) as stored:
        labels = stored.read()
        np.testing.assert_allclose(stored.affine, source.affine)
    assert labels.shape == source.shape and records[0]["probabilities"] == str(out / "probs.nii.gz")
    probs = np.asarray(nib.load(out / "probs.nii.gz").dataobj)
    assert probs.shape == (*source.shape, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=-1), labels)
    import zarr

    first = np.asarray(zarr.open_group(str(out / "probs.zarr"), mode="r")["0"])
    np.testing.assert_allclose(np.moveaxis(first, 0, -1), probs, atol=1e-6)
    # One rank predicts what the two ranks of the CLI run predicted (grid shared, aggregated).
    two_ranks = np.asarray(nib.load(root / "pred" / "brain.nii.gz").dataobj)
    assert (two_ranks == labels).mean() > 0.999
    with pytest.raises(PredictError, match=r"--probabilities p.png: write it as .nii, .nii.gz or .zarr"):
        predict(config, checkpoint, str(image), out / "x.zarr", probabilities="p.png")


def test_config_keys_lists_every_key_with_its_type_default_and_meaning(capsys):
    from pybrain_mpi.cli import main
    from pybrain_mpi.config import SCHEMA, Section

    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out

    def keys(section, path=()):
        for name, spec in section.fields.items():
            if isinstance(spec, Section):
                yield from keys(spec, path + (name,))
            else:
                yield path, name
    for path, name in keys(SCHEMA):
        assert f"\n  {name}: " in out, (path, name)
    assert "manifest: a string; default None -- a cohort" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "config keys" in capsys.readouterr().out.replace("\n", " ")
