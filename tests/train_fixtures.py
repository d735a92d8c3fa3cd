"""A tiny real training config and log readers shared by the trainer and Slurm tests."""

from __future__ import annotations

import json
from pathlib import Path


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
