"""The ``pybrain-mpi`` command line: help everywhere, --set overrides, info, bench, train errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import run_mpi
from pybrain_mpi.cli import apply_overrides, build_parser, main
from pybrain_mpi.config import parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dca_fmri.toml"


@pytest.mark.parametrize("argv, expected", [
    (["--help"], ["train", "bench", "info"]),
    (["train", "--help"], ["--resume", "--timeline", "--steps", "--set"]),
    (["bench", "--help"], ["--ranks", "NAME"]),
    (["info", "--help"], ["thread level"]),
])
def test_every_command_has_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text, text


def test_set_overrides_replace_insert_and_create_keys_that_the_schema_then_checks():
    text = EXAMPLE.read_text()
    changed = apply_overrides(text, ["train.epochs=2", "model.hidden_size=8",
                                     "train.lr_schedule.kind=cosine", "train.lr_schedule.min_lr=1e-5",
                                     "output.dir=/tmp/x y", "data.split_seed=3"])
    config = parse_config(changed, "example")
    assert config.train.epochs == 2 and config.model.kwargs["hidden_size"] == 8
    assert config.train.lr_schedule.kind == "cosine" and config.train.lr_schedule.min_lr == 1e-5
    assert str(config.output.dir) == "/tmp/x y" and config.data.split_seed == 3
    # Everything not overridden is as in the file.
    original = tomllib.loads(text)
    assert config.train.batch_size == original["train"]["batch_size"]
    assert config.train.time_budget_s == original["train"]["time_budget_s"]


def test_set_override_of_a_new_section_and_a_wrong_type_is_reported_with_the_key():
    text = "[model]\nname = \"dca\"\ninput_length = 40\n[data]\nkind = \"fmri_series\"\n" \
           "source = \"nitime_fmri\"\n[train]\nepochs = 1\nbatch_size = 1\nlr = 0.1\n"
    config = parse_config(apply_overrides(text, ["train.compression.kind=bf16"]))
    assert config.train.compression.kind == "bf16"
    with pytest.raises(ValueError, match=r"\[train\] epochs = \"two\": expected an integer"):
        parse_config(apply_overrides(text, ["train.epochs=two"]))
    with pytest.raises(ValueError, match="expected section.key=value"):
        apply_overrides(text, ["train.epochs"])


def test_train_with_invalid_config_exits_2_naming_file_and_line(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(EXAMPLE.read_text().replace("lr = 1e-3", "lr = -1.0"))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    line = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if text.startswith("lr ="))
    assert f"bad.toml:{line}: [train] lr = -1.0: expected a float > 0" in err, err


def test_train_with_missing_data_exits_2_before_any_step(tmp_path, capsys):
    config = tmp_path / "missing.toml"
    config.write_text(EXAMPLE.read_text())
    code = main(["train", str(config), "--set", "data.source=path", "--set",
                 f"data.path={tmp_path / 'absent.npy'}", "--set", f"output.dir={tmp_path / 'out'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "absent.npy does not exist" in err and "no training step was run" in err, err
    assert not (tmp_path / "out" / "logs" / "rank0.jsonl").exists()


def test_bench_lists_the_benchmarks_with_their_descriptions(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "allreduce" in out and "bandwidth" in out.lower(), out


def test_bench_with_unknown_name_fails_listing_the_available_ones(capsys):
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "allreduce" in capsys.readouterr().err


def test_info_under_mpiexec_reports_thread_level_and_topology():
    result = run_mpi(2, "train_cli.py", "info", timeout_s=90)
    out = result.stdout
    assert "MPI thread level: MULTIPLE" in out, out
    assert "topology: 2 rank(s) on 1 node(s)" in out and "ranks 0-1" in out, out
    assert out.count("pybrain-mpi 0.") == 1, "only rank 0 prints"


def test_parser_offers_the_documented_subcommands():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no API
    assert {"train", "bench", "info"} <= set(choices)


def test_convert_subcommand_writes_a_zarr_volume_with_the_affine(tmp_path):
    import nibabel as nib
    import numpy as np

    from pybrain_mpi.cli import main

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    volume = np.arange(20 * 18 * 9, dtype=np.float32).reshape(20, 18, 9)
    source = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), source)
    assert main(["convert", str(source), str(tmp_path / "v.zarr"), "--chunks", "8,8,8", "--quiet"]) == 0
    import pybrain_mpi as pbm

    opened = pbm.data.Volume(tmp_path / "v.zarr")
    assert opened.shape == volume.shape
    np.testing.assert_array_equal(opened.affine, affine)
    np.testing.assert_array_equal(opened.read_patch((3, 4, 1), (10, 9, 8)), volume[3:13, 4:13, 1:9])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where no CUDA device is visible")
def test_train_on_cuda_without_a_device_is_refused_in_one_line(tmp_path, capsys):
    code = main(["train", str(EXAMPLE), "--set", "train.device=cuda",
                 "--set", f"output.dir={tmp_path / 'out'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device is visible" in err, err
    assert not (tmp_path / "out" / "logs").exists()
