"""``pybrain-mpi train`` on 2 real MPI ranks with nitime's real fMRI: end to end, bitwise
resume in float64, and preemption by a signal that reaches one rank only."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_mpi
from train_fixtures import launch, step_lines, write_config
from pybrain_mpi.trainer.checkpoint import load_checkpoint


def curve(output: Path, rank: int) -> list[tuple]:
    """What must be identical between runs: step, global loss, this rank's loss, lr."""
    return [(r["step"], r["loss"], r["local_loss"], r["lr"]) for r in step_lines(output, rank)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One uninterrupted 8-step run (with a timeline), and 3 steps + resume to 8."""
    root = tmp_path_factory.mktemp("train_mpi")
    cache = root / "cache"
    whole, parts = root / "whole", root / "parts"
    cfg_whole = write_config(root / "whole.toml", whole, cache)
    cfg_parts = write_config(root / "parts.toml", parts, cache)
    trace = root / "trace.json"
    first = run_mpi(2, "train_cli.py", "train", str(cfg_whole), "--steps", "8", "--timeline",
                    str(trace), timeout_s=150)
    run_mpi(2, "train_cli.py", "train", str(cfg_parts), "--steps", "3", timeout_s=150)
    resumed = run_mpi(2, "train_cli.py", "train", str(cfg_parts), "--steps", "8", "--resume",
                      timeout_s=150)
    return {"whole": whole, "parts": parts, "trace": trace, "first": first, "resumed": resumed}


def test_two_rank_training_prints_summary_and_writes_logs_plot_and_timeline(runs):
    whole = runs["whole"]
    out = runs["first"].stdout
    for label in ("held-out R^2", "samples/s (all ranks)", "bytes communicated"):
        assert label in out, out
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 8
    assert summary["held_out"]["n_samples"] > 100 and -1.0 < summary["held_out"]["r2"] < 1.0
    assert summary["bytes_communicated"] > 0 and summary["samples_per_s"] > 0
    # The default allreduce ("auto") reduces gradient buckets through the node's shared memory:
    # 8 steps of this model move at least its gradient once through it.
    assert summary["bytes_shared_memory_this_run"] >= 8 * 4 * 1000, summary
    assert "via shared memory" in out, out
    assert (whole / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rank in (0, 1):
        lines = step_lines(whole, rank)
        assert [r["step"] for r in lines] == list(range(1, 9))
        for key in ("data_s", "forward_s", "backward_s", "comm_wait_s", "optimizer_s"):
            assert all(r[key] >= 0 for r in lines), key
    # The global loss is the same number on both ranks; each rank's own loss differs.
    assert [r["loss"] for r in step_lines(whole, 0)] == [r["loss"] for r in step_lines(whole, 1)]
    assert [r["local_loss"] for r in step_lines(whole, 0)] != [r["local_loss"] for r in step_lines(whole, 1)]
    events = json.loads(runs["trace"].read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    for rank in (0, 1):
        names = {e["name"] for e in complete if e["pid"] == rank}
        assert {"data", "forward", "backward", "optimizer"} <= names, names
        buckets = [e for e in complete if e["pid"] == rank and e["name"].startswith("allreduce bucket")]
        assert len(buckets) >= 8 and all(e["dur"] >= 0 and e["args"]["bytes"] > 0 for e in buckets)


def test_resumed_float64_run_matches_the_uninterrupted_loss_curve_bitwise(runs):
    whole, parts = runs["whole"], runs["parts"]
    assert "resumed from" in runs["resumed"].stdout and "at step 3" in runs["resumed"].stdout
    for rank in (0, 1):
        a, b = curve(whole, rank), curve(parts, rank)
        assert [s[0] for s in b] == list(range(1, 9))
        assert a == b, f"rank {rank}: loss curves differ\n{a}\n{b}"
    held_a = json.loads((whole / "summary.json").read_text())["held_out"]
    held_b = json.loads((parts / "summary.json").read_text())["held_out"]
    assert held_a == held_b


def test_sigusr1_to_one_rank_checkpoints_all_ranks_at_the_same_step_and_exits_0(tmp_path):
    output = tmp_path / "run"
    config = write_config(tmp_path / "cfg.toml", output, tmp_path / "cache", precision="fp32")
    process = launch(config, "--steps", "400", env={"PBM_TRAIN_STEP_DELAY_S": "0.2"})
    try:
        deadline = time.monotonic() + 120
        while len(step_lines(output, 1)) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "rank 1 never logged 2 steps"
            time.sleep(0.1)
        start = json.loads((output / "logs" / "rank1.jsonl").read_text().splitlines()[0])
        os.kill(start["pid"], signal.SIGUSR1)  # only rank 1 hears it
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stdout + stderr
    assert "rank 1 received SIGUSR1" in stderr, stderr
    assert "stop requested" in stdout and "--resume" in stdout, stdout
    last = [step_lines(output, rank)[-1]["step"] for rank in (0, 1)]
    assert last[0] == last[1] < 400, last
    _, metadata = load_checkpoint(output / "checkpoints" / "checkpoint.pt")
    assert metadata["reason"] == "preempted" and metadata["step"] == last[0]
    assert not (output / "summary.json").exists()  # preempted runs are not finished


def test_encoding_example_on_two_ranks_reports_per_roi_metrics_matching_numpy(tmp_path):
    import numpy as np
    import torch

    from pybrain_mpi.config import load_config
    from pybrain_mpi.models import build_model
    from pybrain_mpi.trainer.data import nitime_roi_encoding
    from test_trainer import per_roi_reference

    example = Path(__file__).resolve().parent.parent / "examples" / "encoding_fmri.toml"
    output = tmp_path / "enc"
    result = run_mpi(2, "train_cli.py", "train", str(example), "--steps", "12", "--no-progress",
                     "--set", f'output.dir="{output}"', "--set", 'train.precision="fp64"',
                     timeout_s=150)
    assert "held-out per ROI" in result.stdout and "ROI PCC" in result.stdout, result.stdout
    summary = json.loads((output / "summary.json").read_text())
    per_roi = summary["held_out_per_roi"]
    assert len(per_roi["r2"]) == len(per_roi["pearson_r"]) == 14
    assert all(np.isfinite(v) for metric in per_roi.values() for v in metric.values())
    # Reference: the checkpointed final model predicts the held-out block in this process;
    # per-ROI means of numpy's per-output R^2 / r must equal what the 2 ranks summed up.
    config = load_config(str(example))
    data = nitime_roi_encoding(config.data.lags, config.data.held_out_fraction,
                               config.train.val_fraction)
    x, y = data.batch("held_out", 0, np.arange(data.size("held_out")))
    tree, _ = load_checkpoint(output / "checkpoints" / "checkpoint.pt")
    model = build_model(config.model.name, **config.model.kwargs).double()
    model.load_state_dict(tree["model"]["state"])
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x).double()).numpy()
    expected = per_roi_reference(pred, y.astype(np.float64), data.roi_labels)
    for metric in ("r2", "pearson_r"):
        for roi, value in expected[metric].items():
            assert per_roi[metric][roi] == pytest.approx(value, rel=1e-9, abs=1e-12), (metric, roi)


# ------------------------------------------------------------------------ SIGKILL and resume
KILL_SEED = 20261122  # the kill steps below are drawn from this seed and printed


def rank_pids(output: Path) -> list[int]:
    """Process ids of the latest launch's ranks (from each rank's last "start" record)."""
    pids = []
    for rank in (0, 1):
        starts = [json.loads(line) for line in (output / "logs" / f"rank{rank}.jsonl").read_text()
                  .splitlines() if '"event": "start"' in line]
        pids.append(starts[-1]["pid"])
    return pids


def sigkill_all(process: subprocess.Popen, output: Path) -> None:
    """SIGKILL both ranks and the launcher (mpiexec and its proxies) at once."""
    for pid in rank_pids(output):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate(timeout=30)
    for pid in rank_pids(output):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"rank process {pid} survived SIGKILL")


def wait_until(condition, process: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before {what}:\n"
                        + "\n".join(process.communicate()))
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(process.communicate()))
        time.sleep(0.02)


def logged_steps(output: Path) -> int:
    """The step both ranks have logged."""
    return min((step_lines(output, rank) or [{"step": 0}])[-1]["step"] for rank in (0, 1))


def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_float64_curve_bitwise(
        runs, tmp_path):
    kill_step = random.Random(KILL_SEED).randint(2, 6)
    print(f"kill seed {KILL_SEED}: SIGKILL after step {kill_step} of 8")
    output = tmp_path / "killed"
    config = write_config(tmp_path / "k.toml", output, tmp_path / "cache",
                          extra_train="checkpoint_every = 1")
    process = launch(config, "--steps", "8", env={"PBM_TRAIN_STEP_DELAY_S": "0.3"})
    wait_until(lambda: logged_steps(output) >= kill_step, process, f"step {kill_step}")
    sigkill_all(process, output)
    checkpoint = output / "checkpoints" / "checkpoint.pt"
    _, metadata = load_checkpoint(checkpoint)  # whole: written by rename
    killed_at = metadata["step"]
    assert kill_step - 1 <= killed_at <= logged_steps(output) < 8, (kill_step, killed_at)
    resumed = run_mpi(2, "train_cli.py", "train", str(config), "--steps", "8", "--resume",
                      "--no-progress", timeout_s=150)
    assert f"at step {killed_at}" in resumed.stdout, resumed.stdout
    for rank in (0, 1):
        a, b = curve(runs["whole"], rank), curve(output, rank)
        assert [s[0] for s in b] == list(range(1, 9)), b
        assert a == b, f"rank {rank} (killed after step {kill_step}): curves differ\n{a}\n{b}"
    held_a = json.loads((runs["whole"] / "summary.json").read_text())["held_out"]
    assert json.loads((output / "summary.json").read_text())["held_out"] == held_a


def test_sigkill_during_checkpoint_writes_resumes_from_the_last_whole_one_float32_within_1e_6(
        tmp_path):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    run_mpi(2, "train_cli.py", "train",
            str(write_config(tmp_path / "r.toml", reference, cache, precision="fp32")),
            "--steps", "8", "--no-progress", timeout_s=150)
    output = tmp_path / "killed"
    config = write_config(tmp_path / "k.toml", output, cache, precision="fp32",
                          extra_train="checkpoint_every = 1")
    checkpoints = output / "checkpoints"
    # Every checkpoint write pauses 0.4 s half-way through its temporary file.
    env = {"PBM_CHECKPOINT_WRITE_DELAY_S": "0.4"}
    first, second = sorted(random.Random(KILL_SEED + 1).sample(range(2, 7), 2))
    print(f"kill seed {KILL_SEED + 1}: SIGKILL while writing the checkpoints of steps "
          f"{first} and {second}")
    resumed_at = 0
    for kill_step in (first, second):
        process = launch(config, "--steps", "8", *(["--resume"] if resumed_at else []), env=env)
        half_written = lambda: (logged_steps(output) >= kill_step  # noqa: E731
                                and any(checkpoints.glob(".checkpoint.pt.*.tmp")))
        wait_until(half_written, process, f"the checkpoint write of step {kill_step}")
        sigkill_all(process, output)
        leftovers = list(checkpoints.glob(".checkpoint.pt.*.tmp"))
        assert leftovers, "the kill did not land inside a checkpoint write"
        with pytest.raises(Exception):  # the temporary file is really half a checkpoint
            load_checkpoint(leftovers[0])
        _, metadata = load_checkpoint(checkpoints / "checkpoint.pt")
        assert metadata["step"] == kill_step - 1, (kill_step, metadata["step"])
        resumed_at = metadata["step"]
    finished = run_mpi(2, "train_cli.py", "train", str(config), "--steps", "8", "--resume",
                       "--no-progress", timeout_s=150)
    assert f"at step {second - 1}" in finished.stdout and "interrupted by a kill" in finished.stdout
    assert not list(checkpoints.glob(".checkpoint.pt.*.tmp*"))
    for rank in (0, 1):
        a, b = curve(reference, rank), curve(output, rank)
        assert [s[0] for s in a] == [s[0] for s in b] == list(range(1, 9)), b
        for (step, *xs), (_, *ys) in zip(a, b):
            for x, y in zip(xs[:2], ys[:2]):
                assert abs(x - y) <= 1e-6 * abs(x), (rank, step, x, y)
