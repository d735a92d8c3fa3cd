"""Config schema: valid files load as typed dataclasses; every kind of error names key and line."""

from pathlib import Path

import pytest

from pybrain_mpi.config import (Config, ConfigError, TrainConfig, key_lines, load_config,
                                parse_config)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

VALID = """\
# a small valid config
[model]
name = "dca"
input_length = 40
hidden_size = 32

[data]
kind = "fmri_series"
source = "nitime_fmri"

[train]
epochs = 3
batch_size = 16
lr = 1          # an integer is a valid float
optimizer = "adagrad"
compression = { kind = "3lc", sparsity = 1.5 }

[train.lr_schedule]
kind = "cosine"
warmup_steps = 5

[output]
dir = "~/runs/x"
"""


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "run.toml")
    return info.value


def _replace_line(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_valid_config_becomes_typed_dataclasses_with_defaults():
    config = parse_config(VALID, "run.toml")
    assert isinstance(config, Config) and isinstance(config.train, TrainConfig)
    assert config.model.kwargs == {"input_length": 40, "hidden_size": 32}
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.compression.kind == "3lc" and config.train.compression.sparsity == 1.5
    assert config.train.lr_schedule.kind == "cosine" and config.train.lr_schedule.gamma == 0.1
    assert config.train.precision == "auto" and config.train.patience == 0
    assert config.output.dir == Path("~/runs/x").expanduser()
    assert config.source == "run.toml"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_shipped_example_configs_are_valid(name):
    config = load_config(EXAMPLES / name)
    assert config.source.endswith(name)


def test_wrong_type_names_key_expected_type_and_line():
    err = _error(_replace_line(VALID, "batch_size = 16", 'batch_size = "16"'))
    assert "run.toml:13:" in str(err)
    assert '[train] batch_size = "16": expected an integer >= 1, got string "16"' in str(err)
    assert err.problems[0][:2] == (13, "train.batch_size")


def test_out_of_range_value_names_the_range():
    err = _error(_replace_line(VALID, "lr = 1  ", "lr = -0.5  "))
    assert "run.toml:14: [train] lr = -0.5: expected a float > 0.0" in str(err)


def test_exclusive_upper_bound_of_3lc_sparsity_inside_inline_table():
    err = _error(_replace_line(VALID, "sparsity = 1.5", "sparsity = 2.0"))
    assert "run.toml:16: [train.compression] sparsity = 2.0: expected a float in [1.0, 2.0)" \
        in str(err)


def test_3lc_block_size_is_read_and_refused_without_3lc():
    config = parse_config(_replace_line(VALID, "sparsity = 1.5 }", "sparsity = 1.5, block = 64 }"), "run.toml")
    assert config.train.compression.block == 64
    assert parse_config(VALID, "run.toml").train.compression.block == 0
    err = _error(_replace_line(VALID, 'kind = "3lc", sparsity = 1.5 }', 'kind = "bf16", block = 64 }'))
    assert 'run.toml:16: [train.compression] block = 64 applies to kind = "3lc" only' in str(err)
    err = _error(_replace_line(VALID, "sparsity = 1.5 }", "sparsity = 1.5, block = -1 }"))
    assert "[train.compression] block = -1" in str(err)


def test_bad_choice_lists_the_valid_choices():
    err = _error(_replace_line(VALID, '"adagrad"', '"rmsprop"'))
    assert 'run.toml:15: [train] optimizer = "rmsprop": expected one of "sgd", "adam", ' \
           '"adamw", "adagrad"' in str(err)


def test_missing_required_key_points_at_its_section_header():
    err = _error(_replace_line(VALID, "epochs = 3\n", ""))
    assert "run.toml:11: missing required key [train] epochs: expected an integer >= 1" \
        in str(err)


def test_missing_required_section_is_reported():
    text = VALID.split("[train]")[0]
    err = _error(text)
    assert "missing required section [train]" in str(err)


def test_unknown_key_suggests_the_closest_valid_key():
    err = _error(_replace_line(VALID, "warmup_steps = 5", "warmup_step = 5"))
    assert "run.toml:20: unknown key 'warmup_step' in [train.lr_schedule] " \
           "(did you mean 'warmup_steps'?)" in str(err)


def test_list_of_wrong_length_is_rejected():
    text = _replace_line(VALID, 'source = "nitime_fmri"', 'source = "nitime_fmri"\npatch_size = [32, 32]')
    err = _error(text)
    assert "run.toml:10: [data] patch_size = [32, 32]: expected a list of 3 integers >= 1, " \
           "got 2 values" in str(err)


def test_all_problems_are_reported_at_once_in_line_order():
    text = _replace_line(VALID, "epochs = 3", "epochs = 0")
    text = _replace_line(text, 'kind = "fmri_series"', 'kind = "fmri"')
    err = _error(text)
    assert [p[0] for p in err.problems] == [8, 12]
    assert "(2 problems)" in str(err)


def test_unknown_model_argument_lists_the_models_arguments():
    err = _error(_replace_line(VALID, "hidden_size = 32", "hidden = 32"))
    assert "run.toml:5: [model] hidden: model 'dca' has no argument 'hidden'" in str(err)
    assert "input_length, hidden_size" in str(err)


def test_model_argument_of_wrong_type_is_rejected():
    err = _error(_replace_line(VALID, "hidden_size = 32", "hidden_size = 3.5"))
    assert "run.toml:5: [model] hidden_size = 3.5: model 'dca' expects an integer" in str(err)


def test_unknown_model_name_suggests_a_registered_one():
    err = _error(_replace_line(VALID, 'name = "dca"', 'name = "dca2"'))
    assert "run.toml:3:" in str(err) and "did you mean 'dca'?" in str(err)


def test_path_source_without_path_and_series_length_mismatch_are_caught_before_training():
    text = _replace_line(VALID, 'source = "nitime_fmri"', 'source = "path"')
    assert "needs [data] path" in str(_error(text))
    text = _replace_line(VALID, "input_length = 40", "input_length = 284")
    assert "run.toml:4: [model] input_length = 284: nitime's fMRI series have 40" \
        in str(_error(text))


def test_model_input_shape_must_match_patch_size():
    text = (EXAMPLES / "cnn3d_mni.toml").read_text()
    text = _replace_line(text, "input_shape = [32, 32, 32]", "input_shape = [64, 64, 64]")
    err = _error(text)
    assert "[model] input_shape = [64, 64, 64] does not match [data] patch_size = [32, 32, 32]" \
        in str(err)


def test_toml_syntax_error_names_file_and_line():
    err = _error(VALID.replace("epochs = 3", "epochs = = 3"))
    assert str(err).startswith("run.toml:12: not valid TOML")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_key_lines_handles_dotted_keys_inline_tables_and_multiline_strings():
    text = ('a = """\nfake = 1\n"""\n[t]\nb.c = 1\nd = { e = 2, "f" = 3 }\n'
            '[t.u]\ng = 4\n')
    lines = key_lines(text)
    assert ("fake",) not in lines
    assert lines[("t", "b", "c")] == 5
    assert lines[("t", "d", "e")] == 6 and lines[("t", "d", "f")] == 6
    assert lines[("t", "u")] == 7 and lines[("t", "u", "g")] == 8


def test_model_float_argument_accepts_an_integer_and_lists_become_tuples():
    text = (EXAMPLES / "cnn3d_mni.toml").read_text()
    config = parse_config(_replace_line(text, "dropout = 0.1", "dropout = 0"), "run.toml")
    assert config.model.kwargs["dropout"] == 0.0 and isinstance(config.model.kwargs["dropout"], float)
    assert config.model.kwargs["input_shape"] == (32, 32, 32)
