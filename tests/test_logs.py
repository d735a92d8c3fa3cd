"""Observability: rank-prefixed stdlib logging on real MPI ranks (-v/-q levels, which ranks
print), TensorBoard scalars beside the JSON lines (and the one-line refusal without the
package), and summary.json's provenance (git commit, versions, seed, config, peak memory)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_mpi
from pybrain_mpi.cli import main


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[rank ")]


@pytest.mark.parametrize("verbosity", [-2, -1, 0, 1, 2])
def test_rank_prefixed_levels_per_verbosity_on_three_ranks(verbosity):
    result = run_mpi(3, "log_worker.py", str(verbosity), timeout_s=120)
    out, err = _lines(result.stdout), _lines(result.stderr)
    # INFO/DEBUG on stdout, WARNING and up on stderr; every line carries "[rank R/3] ".
    assert all(re.match(r"^\[rank [0-2]/3\] ", line) for line in out + err)
    assert not [line for line in out if "warning" in line or "error" in line]

    def has(lines, rank, text):
        return any(line.startswith(f"[rank {rank}/3] ") and text in line for line in lines)

    for rank in range(3):
        # Errors: every rank, at every verbosity (each rank's own problem is in the log).
        assert has(err, rank, f"pybrain-mpi: error: error from {rank}"), result.stderr
        shows_warnings = verbosity >= -1
        assert has(err, rank, f"warning: warning from {rank}") == shows_warnings, result.stderr
        # Python warnings go through the same handler (one line, prefixed).
        assert has(err, rank, f"python warning from {rank}") == shows_warnings, result.stderr
        info_here = verbosity >= 0 if rank == 0 else verbosity >= 2
        assert has(out, rank, f"info from {rank}") == info_here, result.stdout
        assert has(out, rank, f"second line from {rank}") == info_here, result.stdout
        debug_here = verbosity >= 1 if rank == 0 else verbosity >= 2
        assert has(out, rank, f"debug from {rank}") == debug_here, result.stdout
    # -v adds the time to each message (continuation lines carry the rank only).
    messages = [line for line in out + err if "pybrain-mpi: " in line]
    timed = [line for line in messages if re.match(r"^\[rank \d/3\] \d\d:\d\d:\d\d pybrain-mpi: ", line)]
    assert len(timed) == (len(messages) if verbosity >= 1 else 0), messages


def _config(tmp_path: Path, tensorboard: bool) -> Path:
    np.save(tmp_path / "series.npy",
            np.random.default_rng(0).standard_normal((60, 24)).astype(np.float32))
    path = tmp_path / "run.toml"
    path.write_text(f"""
[model]
name = "dca"
hidden_size = 8

[data]
kind = "fmri_series"
path = "{tmp_path / 'series.npy'}"

[train]
epochs = 2
batch_size = 8
lr = 1e-3
precision = "fp32"
log_every = 1

[output]
dir = "{tmp_path / 'out'}"
tensorboard = {str(tensorboard).lower()}
""")
    return path


def test_tensorboard_scalars_match_the_json_step_log(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, tensorboard=True)
    assert main(["train", str(config), "--no-progress"]) == 0
    steps = [json.loads(line) for line in (tmp_path / "out" / "logs" / "rank0.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step" in r and "event" not in r]
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in steps] and len(steps) >= 10
    np.testing.assert_allclose([e.value for e in losses], [r["loss"] for r in steps],
                               rtol=np.finfo(np.float32).eps * 4)
    np.testing.assert_allclose([e.value for e in events.Scalars("train/lr")],
                               [r["lr"] for r in steps], rtol=np.finfo(np.float32).eps * 4)
    assert len(events.Scalars("epoch/val_loss")) == 2 and len(events.Scalars("epoch/train_loss")) == 2


def test_tensorboard_without_the_package_is_refused_in_one_line_naming_the_extra(tmp_path, capsys,
                                                                             monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    config = _config(tmp_path, tensorboard=True)
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in err if line.startswith("pybrain-mpi train: error:")]
    assert len(ours) == 1 and "pip install 'pybrain-mpi[tensorboard]'" in ours[0], err
    assert not (tmp_path / "out" / "tensorboard").exists()
    assert not (tmp_path / "out" / "summary.json").exists()


def test_summary_records_git_commit_versions_seed_config_and_memory(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@e", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("x")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.chdir(repo)  # the run's working directory is a checkout; the package is not
    monkeypatch.delenv("PBM_GIT_COMMIT", raising=False)
    monkeypatch.delenv("GIT_DIR", raising=False)
    config = _config(tmp_path, tensorboard=False)
    assert main(["train", str(config), "--no-progress", "--steps", "2"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run_git_commit"] == head, summary.get("run_git_commit")
    # The commit the installed package was built from, as its build recorded it.
    from pybrain_mpi.cli import build_info

    assert summary["git_commit"] == (build_info().get("git_commit") or None)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", summary["git_commit"] or "0" * 40)
    assert {"pybrain_mpi", "torch", "numpy", "python"} <= set(summary["versions"])
    assert summary["seed"] == 0 and summary["config"]["train"]["batch_size"] == 8
    assert len(summary["peak_rss_mb_per_rank"]) == 1 and summary["peak_rss_mb_per_rank"][0] > 10
    # A change to a tracked file marks the commit dirty.
    (repo / "f").write_text("y")
    assert main(["train", str(config), "--no-progress", "--steps", "4", "--resume"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["run_git_commit"] == head + "-dirty"


def test_epoch_records_carry_wall_time_that_time_to_accuracy_reads(tmp_path):
    """benchmarks/cluster_training.py reads validation R^2 against wall time from the step log."""
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cluster_training import read_run, time_to

    config = _config(tmp_path, tensorboard=False)
    before = time.time()
    assert main(["train", str(config), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "logs" / "rank0.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    epochs = [r for r in records if r.get("event") == "epoch"]
    assert len(epochs) == 2
    assert before <= start["time"] <= epochs[0]["time"] <= epochs[1]["time"] <= time.time()
    run = read_run(tmp_path / "out")
    assert [e["epoch"] for e in run["epochs"]] == [r["epoch"] for r in epochs]
    assert [e["seconds"] for e in run["epochs"]] == [r["time"] - start["time"] for r in epochs]
    assert run["held_out_r2"] is not None and run["steps"] > 0
    # The first epoch whose R^2 reaches the target; None when none does.
    curve = [{"val_r2": 0.2, "seconds": 1.0}, {"val_r2": None, "seconds": 2.0},
             {"val_r2": 0.5, "seconds": 3.0}, {"val_r2": 0.4, "seconds": 4.0}]
    assert time_to(curve, 0.45) == 3.0 and time_to(curve, 0.2) == 1.0
    assert time_to(curve, 0.6) is None and time_to(curve, None) is None
