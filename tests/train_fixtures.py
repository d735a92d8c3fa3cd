"""A tiny real training config and log readers shared by the trainer and Slurm tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import WORKERS, mpiexec_path


def write_config(path: Path, output: Path, cache: Path, precision: str = "fp64",
                 extra_train: str = "") -> Path:
    path.write_text(f"""
[model]
name = "dca"
input_length = 40
hidden_size = 16

[data]
kind = "fmri_series"
source = "nitime_fmri"
cache_dir = "{cache}"

[train]
epochs = 100
batch_size = 16
lr = 1e-3
precision = "{precision}"
log_every = 1
{extra_train}

[output]
dir = "{output}"
""")
    return path


def launch(config: Path, *args: str, env: dict | None = None, ranks: int = 2,
           mpiexec_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """``pybrain-mpi train config --no-progress *args`` on ``ranks`` ranks in its own session
    (so the whole launch can be killed at once); ``env`` adds to or overrides the test defaults."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PBM_TIMEOUT_S": "60"})
    full_env.update(env or {})
    command = [mpiexec_path(), *mpiexec_args, "-n", str(ranks), sys.executable, str(WORKERS / "train_cli.py"),
               "train", str(config), "--no-progress", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)


def step_lines(output: Path, rank: int) -> list[dict]:
    path = output / "logs" / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "step" in record and "event" not in record:
            records.append(record)
    return records
