"""Resuming a checkpoint on another world size, with real MPI ranks: the interrupted epoch
finishes with every training sample used exactly once (4 -> 2 ranks; 3 -> 2 -> 3 with sizes
that do not divide, the second resume from a checkpoint written inside the re-dealt rest), and
later epochs are ordinary epochs of the new world; 3LC residuals are folded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_mpi
from pybrain_mpi.data.samplers.shuffled import EpochRemainder, ShuffledSampler
from pybrain_mpi.engine import DistributedDataParallel
from pybrain_mpi.trainer.checkpoint import load_checkpoint


def _config(root: Path, name: str, batch: int, epochs: int, extra: str = "") -> Path:
    output = root / name
    path = root / f"{name}.toml"
    path.write_text(f"""
[model]
name = "dca"
hidden_size = 8

[data]
kind = "fmri_series"
path = "{root / 'series.npy'}"
held_out_fraction = 0.2

[train]
epochs = {epochs}
batch_size = {batch}
lr = 1e-3
precision = "fp32"
val_fraction = 0.1
log_every = 1
{extra}

[output]
dir = "{output}"
""")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resize")
    rng = np.random.default_rng(7)
    # 80 voxel series: 58 for training after the held-out and validation splits (checked below).
    np.save(root / "series.npy", rng.standard_normal((80, 24)).astype(np.float32))
    return root


def _records(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.glob("rank*.jsonl")):
        rank, run = path.name.split(".")[:2]
        for line in path.read_text().splitlines():
            out.append({**json.loads(line), "rank": int(rank[4:]), "run": run})
    return out


def _n_samples(config_dir: Path) -> int:
    tree, _ = load_checkpoint(config_dir / "checkpoints" / "checkpoint.pt")
    return int(tree["sampler"]["n_samples"])


def test_four_rank_checkpoint_resumes_on_two_ranks_each_sample_once(root):
    records = root / "rec42"
    records.mkdir()
    config = _config(root, "r42", batch=4, epochs=2)
    run_mpi(4, "resize_resume.py", str(config), str(records), "a", "--steps", "2",
                    timeout_s=240)
    second = run_mpi(2, "resize_resume.py", str(config), str(records), "b", "--resume",
                     timeout_s=240)
    n = _n_samples(root / "r42")
    assert n % 4 != 0, n  # the 4-rank epoch leaves samples out: the resumed rest covers them
    seen = [r for r in _records(records) if r["epoch"] == 0]
    counts = Counter(i for r in seen for i in r["indices"])
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}, counts
    assert "written by 4 rank(s)" in second.stdout and "dealt over 2 ranks" in second.stdout, \
        second.stdout
    assert {r["run"] for r in seen} == {"a", "b"}
    # Epoch 1 is an ordinary 2-rank epoch: n // 2 distinct samples, half on each rank.
    later = [r for r in _records(records) if r["epoch"] == 1]
    later_counts = Counter(i for r in later for i in r["indices"])
    assert len(later_counts) == 2 * (n // 2) and set(later_counts.values()) == {1}
    assert all(r["weight"] == 1.0 for r in later)
    summary = json.loads((root / "r42" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["epochs_completed"] == 2, summary


def test_three_two_three_with_uneven_sizes_each_sample_once(root):
    records = root / "rec323"
    records.mkdir()
    config = _config(root, "r323", batch=3, epochs=1, extra='allreduce = "ring"\n'
                     '[train.compression]\nkind = "3lc"')
    run_mpi(3, "resize_resume.py", str(config), str(records), "a", "--steps", "2", timeout_s=240)
    run_mpi(2, "resize_resume.py", str(config), str(records), "b", "--resume", "--steps", "4",
            timeout_s=240)
    tree, _ = load_checkpoint(root / "r323" / "checkpoints" / "checkpoint.pt")
    assert tree["sampler"]["ranks"] == 2 and "used" in tree["sampler"]  # inside the rest
    third = run_mpi(3, "resize_resume.py", str(config), str(records), "c", "--resume",
                    timeout_s=240)
    assert "written by 2 rank(s)" in third.stdout, third.stdout
    n = int(tree["sampler"]["n_samples"])
    assert n % 3 != 0, n  # the 3-rank epoch leaves samples out: the rests cover them
    seen = _records(records)
    counts = Counter(i for r in seen for i in r["indices"])
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}, counts
    # Uneven steps: each rank's loss weight is proportional to its batch and the weights
    # average to 1 (the averaged gradient is the mean over the step's samples); some step
    # really was uneven.
    by_step = {}
    for r in seen:
        by_step.setdefault((r["run"], r["step"]), []).append(r)
    for (run, step), rows in by_step.items():
        sizes = [len(r["indices"]) for r in rows]
        assert max(sizes) - min(sizes) <= 1, (run, step, sizes)
        assert abs(np.mean([r["weight"] for r in rows]) - 1.0) < 1e-12, (run, step, rows)
        per_sample = [r["weight"] / len(r["indices"]) for r in rows]
        assert max(per_sample) - min(per_sample) < 1e-12, (run, step, rows)
    assert any(len({len(r["indices"]) for r in rows}) > 1 for rows in by_step.values())
    summary = json.loads((root / "r323" / "summary.json").read_text())
    assert summary["ranks"] == 3 and summary["epochs_completed"] == 1, summary


def test_remainder_deals_every_unused_sample_once_for_any_world():
    """Single-process check of the dealing rule over many (N, M, n, batch, steps) cases,
    including fewer samples left than ranks (then some ranks hold none)."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        n, batch = int(rng.integers(4, 80)), int(rng.integers(1, 7))
        old, new = int(rng.integers(1, min(n, 6) + 1)), int(rng.integers(1, min(n, 6) + 1))
        sampler = ShuffledSampler(n, batch, seed=5, rank=0, world_size=old)
        done = int(rng.integers(0, sampler.steps_per_epoch + 1))
        used = sampler.used_mask(2, done)
        rest = [ShuffledSampler(n, batch, seed=5, rank=r, world_size=new).remainder(2, used)
                for r in range(new)]
        dealt = [i for k in range(rest[0].steps) for r in range(new) for i in rest[r].batch(k)]
        assert sorted(dealt + list(np.flatnonzero(used))) == list(range(n))
        for k in range(rest[0].steps):
            sizes = [len(rest[r].batch(k)) for r in range(new)]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == rest[0].step_samples(k)
            assert max(sizes) <= batch + 1 and (min(sizes) > 0 or rest[0].steps == 1)
        # Re-derived from inside the rest (a checkpoint there), it continues identically.
        if rest[0].steps > 1:
            again = EpochRemainder(2, rest[0].pool, batch, 0, new)
            mid = again.used_after(1, n)
            cont = ShuffledSampler(n, batch, seed=5, rank=0, world_size=new).remainder(2, mid)
            assert [list(cont.batch(k)) for k in range(cont.steps)] == \
                [list(rest[0].batch(k)) for k in range(1, rest[0].steps)]


def test_folded_3lc_residuals_deliver_what_the_old_world_owed():
    """Old world of 3 ranks, uneven tensor (10 elements): the average the new world delivers
    from the folded residuals (every new rank carries the same) equals the old world's
    untransmitted mean first-stage residual plus its owners' second-stage residuals."""
    rng = np.random.default_rng(1)
    count, world = 10, 3
    firsts = [torch.from_numpy(rng.standard_normal(count).astype(np.float32)) for _ in range(world)]
    owners = [torch.from_numpy(rng.standard_normal(length).astype(np.float32))
              for length in (4, 3, 3)]  # pbm's even partition: the first count % world longer
    states = [{"bucket0.residual": f, "bucket0.owner_residual": o,
               "bucket0.hierarchical_residual": torch.zeros(2)} for f, o in zip(firsts, owners)]
    folded, zeroed = DistributedDataParallel.fold_compression_states(states)
    owed = np.mean([f.double().numpy() for f in firsts], axis=0) + \
        np.concatenate([o.double().numpy() for o in owners])
    for new_world in (2, 4):
        delivered = np.mean([folded["bucket0.residual"].double().numpy()] * new_world, axis=0)
        np.testing.assert_allclose(delivered, owed, rtol=4 * np.finfo(np.float32).eps, atol=1e-6)
    assert zeroed == ["bucket0.hierarchical_residual"]
