"""``pybrain-mpi train`` with ``[train] parallel = "pipeline"`` / ``"hybrid"`` on real MPI ranks.

The reference is the ordinary data-parallel trainer with the same global batch in float64: one
rank for a single pipeline, two ranks for two data-parallel pipelines. A pipelined step sums the
micro-batches' gradients in another order, so weights and losses agree to a tolerance derived
from float64's epsilon, not bitwise; a resumed pipelined run must match its uninterrupted twin
bitwise.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_mpi
from train_fixtures import step_lines
from pybrain_mpi.config import ConfigError, parse_config
from pybrain_mpi.trainer.checkpoint import load_checkpoint

MODELS = Path(__file__).resolve().parent / "pipeline_models.py"
STEPS = 5
BATCH = 8
EPS = torch.finfo(torch.float64).eps
# SGD on a 5-layer Tanh network: each step's gradient is a sum over 8 samples regrouped by the
# micro-batching (and over 2 replicas), a relative error of a few eps per step (measured: 1 ulp
# of the weights and losses after 5 steps); 100 eps per step of the weights' scale bounds it
# with a wide margin while a wrong gradient (a micro-batch weighted wrongly, a stage not
# averaged) is off by orders of magnitude more.
TOLERANCE = 100 * EPS * STEPS


def write(path: Path, output: Path, cache: Path, train: str, model: str = "SequentialAutoencoder") -> Path:
    path.write_text(f"""
[model]
name = "{MODELS}:{model}"

[data]
kind = "fmri_series"
source = "nitime_fmri"
cache_dir = "{cache}"

[train]
epochs = 100
batch_size = {BATCH}
lr = 0.05
optimizer = "sgd"
momentum = 0.5
precision = "fp64"
log_every = 1
{train}

[output]
dir = "{output}"
""")
    return path


def train(ranks: int, root: Path, name: str, train_keys: str, *args: str, check: bool = True):
    output = root / name
    config = write(root / f"{name}.toml", output, root / "cache", train_keys)
    result = run_mpi(ranks, "train_cli.py", "train", str(config), "--no-progress", *args,
                     timeout_s=240, check=check)
    return output, result


def full_weights(output: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights: the data-parallel checkpoint, or the newest complete set of
    stage shards renamed to the full model's layer indices."""
    checkpoints = output / "checkpoints"
    plain = checkpoints / "checkpoint.pt"
    if plain.exists():
        return load_checkpoint(plain)[0]["model"]["state"]
    shards = sorted(checkpoints.glob("checkpoint.pt.stage*-of-*.step*"))
    assert shards, f"no checkpoint in {checkpoints}"
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        tree, _ = load_checkpoint(shard)
        first = tree["layout"]["layer_range"][0]
        for key, value in tree["model"]["state"].items():
            index, _, rest = key.partition(".")
            weights[f"{int(index) + first}.{rest}"] = value
    return weights


def losses(output: Path, rank: int = 0) -> list[float]:
    return [r["loss"] for r in step_lines(output, rank)]


def assert_close_weights(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), (what, sorted(a), sorted(b))
    for key in a:
        scale = max(1.0, float(b[key].abs().max()))
        error = float((a[key] - b[key]).abs().max())
        assert error <= TOLERANCE * scale, f"{what}: {key} differs by {error:.3g} (> {TOLERANCE:.3g})"
    # The comparison can fail: the weights did move away from their initial values.
    assert any(float((a[k]).abs().max()) > 0 for k in a)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipetrain")


@pytest.fixture(scope="module")
def reference_1(root) -> Path:
    """Data parallelism on one rank: the single pipeline's reference (same global batch)."""
    return train(1, root, "data1", "", "--steps", str(STEPS))[0]


@pytest.fixture(scope="module")
def pipeline_2(root) -> tuple:
    """Two stages, auto balance, 3 micro-batches that do not divide the batch of 8."""
    return train(2, root, "pipe2", 'parallel = "pipeline"\nmicro_batches = 3\nschedule = "gpipe"',
                 "--steps", str(STEPS))


def test_two_stage_pipeline_with_uneven_micro_batches_matches_one_rank_data_parallel(
        reference_1, pipeline_2):
    output, result = pipeline_2
    assert "pipeline: 1 pipeline(s) x 2 stage(s), 3 micro-batch(es)" in result.stdout, result.stdout
    assert "auto, measured on rank 0" in result.stdout
    assert re.search(r"stage 0 on rank\(s\) \[0\]: layers 0\.\.\d", result.stdout), result.stdout
    assert re.search(r"stage 1 on rank\(s\) \[1\]: layers \d\.\.4", result.stdout), result.stdout
    ref = losses(reference_1)
    assert len(ref) == STEPS and ref[0] != ref[-1]
    for rank in (0, 1):  # the same global loss on every stage
        assert losses(output, rank) == pytest.approx(ref, rel=TOLERANCE, abs=0)
    assert_close_weights(full_weights(output), full_weights(reference_1), "2 stages")
    held = json.loads((output / "summary.json").read_text())["held_out"]
    held_ref = json.loads((reference_1 / "summary.json").read_text())["held_out"]
    assert held["n_samples"] == held_ref["n_samples"] == 720
    for key in ("mse", "mae", "r2", "pearson_r"):
        assert held[key] == pytest.approx(held_ref[key], rel=TOLERANCE, abs=TOLERANCE), key
    summary = json.loads((output / "summary.json").read_text())
    assert summary["parallel"]["kind"] == "pipeline" and summary["parallel"]["stages"] == 2


def test_three_stage_1f1b_pipeline_with_explicit_balance_matches_one_rank(root, reference_1):
    output, result = train(3, root, "pipe3", 'parallel = "pipeline"\nmicro_batches = 4\n'
                           'schedule = "1f1b"\nbalance = [2, 2, 1]', "--steps", str(STEPS))
    assert "balance [2, 2, 1] ([train] balance)" in result.stdout, result.stdout
    assert "stage 2 on rank(s) [2]: layers 4..4 (Linear)" in result.stdout, result.stdout
    for rank in (0, 1, 2):
        assert losses(output, rank) == pytest.approx(losses(reference_1), rel=TOLERANCE, abs=0)
    assert_close_weights(full_weights(output), full_weights(reference_1), "3 stages")


HYBRID = 'parallel = "hybrid"\npipeline_stages = 2\nmicro_batches = 2\nschedule = "1f1b"\nbalance = [3, 2]'


@pytest.fixture(scope="module")
def hybrid_4(root) -> tuple:
    """Two pipelines of two stages on 4 ranks, 5 uninterrupted steps."""
    return train(4, root, "hybrid4", HYBRID, "--steps", str(STEPS))


def test_hybrid_two_stages_by_two_replicas_matches_two_rank_data_parallel(root, hybrid_4):
    reference = train(2, root, "data2", "", "--steps", str(STEPS))[0]
    output, result = hybrid_4
    assert "hybrid: 2 pipeline(s) x 2 stage(s)" in result.stdout, result.stdout
    assert "stage 0 on rank(s) [0, 2]: layers 0..2" in result.stdout, result.stdout
    assert "stage 1 on rank(s) [1, 3]: layers 3..4" in result.stdout, result.stdout
    ref = losses(reference)
    for rank in range(4):  # the global loss: the mean over both replicas' batches
        assert losses(output, rank) == pytest.approx(ref, rel=TOLERANCE, abs=0)
    # Each replica trains on its own half of the global batch: their own losses differ.
    assert [r["local_loss"] for r in step_lines(output, 0)] != [r["local_loss"] for r in step_lines(output, 2)]
    assert_close_weights(full_weights(output), full_weights(reference), "2x2 hybrid")
    summary = json.loads((output / "summary.json").read_text())
    assert summary["samples_this_run"] == STEPS * 2 * BATCH
    held_ref = json.loads((reference / "summary.json").read_text())["held_out"]
    for key in ("mse", "r2"):
        assert summary["held_out"][key] == pytest.approx(held_ref[key], rel=TOLERANCE), key


def test_resumed_pipeline_matches_the_uninterrupted_run_bitwise_and_checks_the_layout(root):
    keys = 'parallel = "pipeline"\nmicro_batches = 2\nschedule = "1f1b"\nbalance = [2, 3]'
    whole, _ = train(2, root, "whole", keys, "--steps", str(STEPS))
    parts, _ = train(2, root, "parts", keys, "--steps", "2")
    checkpoints = parts / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint.pt.*")) == [
        "checkpoint.pt.stage0-of-2.step2", "checkpoint.pt.stage1-of-2.step2"]
    # A newer set with a shard missing (a kill between two stages' writes) is passed over.
    shutil.copy(checkpoints / "checkpoint.pt.stage0-of-2.step2", checkpoints / "checkpoint.pt.stage0-of-2.step9")
    _, resumed = train(2, root, "parts", keys + "\ncheckpoint_every = 1", "--steps", str(STEPS),
                       "--resume")
    assert "at step 2" in resumed.stdout, resumed.stdout
    for rank in (0, 1):
        a = [(r["step"], r["loss"], r["local_loss"], r["lr"]) for r in step_lines(whole, rank)]
        b = [(r["step"], r["loss"], r["local_loss"], r["lr"]) for r in step_lines(parts, rank)]
        assert [s[0] for s in b] == list(range(1, STEPS + 1)), b
        assert a == b, f"rank {rank}: loss curves differ\n{a}\n{b}"
    wa, wb = full_weights(whole), full_weights(parts)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Only the newest step's shards are kept.
    assert sorted(p.name for p in checkpoints.glob("checkpoint.pt.*")) == [
        f"checkpoint.pt.stage0-of-2.step{STEPS}", f"checkpoint.pt.stage1-of-2.step{STEPS}"]
    held_a = json.loads((whole / "summary.json").read_text())["held_out"]
    assert json.loads((parts / "summary.json").read_text())["held_out"] == held_a
    # Another stage count or another balance is refused, naming what differs.
    _, three = train(3, root, "parts", 'parallel = "pipeline"\nmicro_batches = 2',
                     "--steps", str(STEPS + 1), "--resume", check=False)
    assert three.returncode != 0
    assert "pipeline of 2 stages; this run has 3" in three.stdout + three.stderr, three.stderr
    _, other = train(2, root, "parts", 'parallel = "pipeline"\nmicro_batches = 2\nbalance = [3, 2]',
                     "--steps", str(STEPS + 1), "--resume", check=False)
    assert other.returncode != 0
    assert "written with balance [2, 3], this run has [train] balance = [3, 2]" in \
        other.stdout + other.stderr, other.stderr
    _, data = train(1, root, "parts", "", "--steps", str(STEPS + 1), "--resume", check=False)
    assert data.returncode != 0
    assert "holds per-stage checkpoint shards of a pipelined run" in data.stdout + data.stderr, data.stderr


def test_resumed_hybrid_run_matches_the_uninterrupted_one_bitwise(root, hybrid_4):
    parts, _ = train(4, root, "hybrid_parts", HYBRID, "--steps", "3")
    _, resumed = train(4, root, "hybrid_parts", HYBRID, "--steps", str(STEPS), "--resume")
    assert "at step 3" in resumed.stdout, resumed.stdout
    whole = hybrid_4[0]
    for rank in range(4):  # replica 1 resumed from replica 0's shards and its own RNG state
        a = [(r["step"], r["loss"], r["local_loss"]) for r in step_lines(whole, rank)]
        b = [(r["step"], r["loss"], r["local_loss"]) for r in step_lines(parts, rank)]
        assert a == b, f"rank {rank}: loss curves differ\n{a}\n{b}"
    wa, wb = full_weights(whole), full_weights(parts)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_layouts_the_world_cannot_hold_are_refused_naming_the_numbers(root):
    _, hybrid = train(3, root, "bad_hybrid", 'parallel = "hybrid"\npipeline_stages = 2',
                      "--steps", "1", check=False)
    text = hybrid.stdout + hybrid.stderr
    assert hybrid.returncode != 0 and "pipeline_stages = 2: the 3 rank(s)" in text, text
    assert "3 % 2 = 1" in text
    _, pipe = train(2, root, "bad_pipe", 'parallel = "pipeline"\npipeline_stages = 3',
                    "--steps", "1", check=False)
    text = pipe.stdout + pipe.stderr
    assert pipe.returncode != 0 and "pipeline_stages = 3 and this run has 2 rank(s)" in text, text
    assert not list((root / "bad_pipe").glob("checkpoints/checkpoint.pt*"))


# ------------------------------------------------------------------------ config errors
def _errors(tmp_path: Path, train_keys: str, model: str = "SequentialAutoencoder") -> str:
    text = write(tmp_path / "c.toml", tmp_path / "o", tmp_path / "cache", train_keys, model).read_text()
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "c.toml")
    return str(raised.value)


@pytest.mark.parametrize("keys, expected", [
    ('parallel = "pipeline"\nmode = "downpour"',
     '[train] mode = "downpour" cannot run with [train] parallel = "pipeline"'),
    ('parallel = "pipeline"\nmicro_batches = 0', "[train] micro_batches = 0: expected an integer >= 1"),
    ('parallel = "pipeline"\nmicro_batches = 9', "[train] micro_batches = 9 exceeds batch_size = 8"),
    ('parallel = "pipeline"\nschedule = "zero_bubble"',
     '[train] schedule = "zero_bubble": expected one of "gpipe", "1f1b"'),
    ('parallel = "pipeline"\nbalance = "even"',
     '[train] balance = "even": expected "auto" or a list of integers >= 1'),
    ('parallel = "pipeline"\nbalance = [2, 0, 3]', "[train] balance = [2, 0, 3]: expected"),
    ('parallel = "hybrid"', '[train] parallel = "hybrid" needs [train] pipeline_stages'),
    ('parallel = "hybrid"\npipeline_stages = 2\nbalance = [1, 1, 3]',
     "[train] balance = [1, 1, 3] gives 3 stages but pipeline_stages = 2"),
    ('parallel = "tensor"', '[train] parallel = "tensor": expected one of "data", "pipeline", "hybrid"'),
    ("micro_batches = 2", '[train] micro_batches applies to parallel = "pipeline" or "hybrid" only'),
    ('parallel = "pipeline"\n[train.compression]\nkind = "3lc"',
     '[train.compression] kind = "3lc" is not supported with [train] parallel = "pipeline"'),
])
def test_invalid_pipeline_keys_are_config_errors_naming_the_key(tmp_path, keys, expected):
    assert expected in _errors(tmp_path, keys)


def test_a_model_without_stages_is_a_config_error(tmp_path):
    message = _errors(tmp_path, 'parallel = "pipeline"', model="NotSequential")
    assert "[train] parallel = \"pipeline\" splits the model" in message
    assert "NotSequential" in message and "nn.Sequential" in message


def test_valid_pipeline_keys_are_accepted(tmp_path):
    config = parse_config(write(tmp_path / "c.toml", tmp_path / "o", tmp_path / "cache",
                                'parallel = "hybrid"\npipeline_stages = 2\nmicro_batches = 8\n'
                                'schedule = "1f1b"\nbalance = [4, 1]').read_text())
    train_config = config.train
    assert (train_config.parallel, train_config.pipeline_stages, train_config.micro_batches,
            train_config.schedule, train_config.balance) == ("hybrid", 2, 8, "1f1b", (4, 1))
    assert parse_config(write(tmp_path / "d.toml", tmp_path / "o", tmp_path / "cache", "")
                        .read_text()).train.balance == "auto"


def test_the_readme_example_of_the_pipeline_keys_is_a_valid_config(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Pipeline and hybrid training"):]
    block = re.search(r"```toml\n\[train\]\n(.*?)```", section, re.S).group(1)
    keys = "\n".join(line for line in block.splitlines() if not line.startswith("batch_size"))
    config = parse_config(write(tmp_path / "c.toml", tmp_path / "o", tmp_path / "cache", keys).read_text())
    assert (config.train.parallel, config.train.pipeline_stages, config.train.micro_batches) == \
        ("hybrid", 2, 4)


def test_naive_cnn3d_trains_as_a_two_stage_pipeline_through_its_pipeline_layers(root):
    """A registered model with ``pipeline_layers()`` (and ``pipeline_input`` adding the channel
    axis) on MNI152 patches, through an epoch end (validation): finite losses on both stages,
    the same validation record on both."""
    example = Path(__file__).resolve().parent.parent / "examples" / "cnn3d_mni.toml"
    output = root / "cnn"
    result = run_mpi(2, "train_cli.py", "train", str(example), "--steps", "3", "--no-progress",
                     "--set", f'output.dir="{output}"', "--set", 'train.parallel="pipeline"',
                     "--set", "train.micro_batches=2", "--set", "data.patches_per_volume=16",
                     "--set", 'train.schedule="1f1b"', env={"PBM_CACHE_DIR": str(root / "cache")},
                     timeout_s=240)
    assert "pipeline: 1 pipeline(s) x 2 stage(s)" in result.stdout, result.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["held_out"]["n_samples"] == 64
    assert all(torch.isfinite(torch.tensor(losses(output, rank))).all() for rank in (0, 1))
    epochs = [[{k: v for k, v in json.loads(line).items() if k != "time"}  # wall clock: per rank
               for line in (output / "logs" / f"rank{rank}.jsonl").read_text().splitlines()
               if '"event": "epoch"' in line] for rank in (0, 1)]
    assert epochs[0] and epochs[0][0]["val_loss"] is not None
    assert epochs[0] == epochs[1], epochs  # every rank reports the same figures
