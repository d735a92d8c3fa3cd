"""``pybrain-mpi train`` with ``[train] mode = "downpour"`` on real MPI ranks and nitime's real fMRI
(the trainer's parameter-server mode, pybrain_mpi/trainer/downpour.py).

- 1 server + 1 worker with fetch_every = push_every = 1 and SGD is synchronous training on one
  rank, step for step: the server applies the worker's gradient with the same optimizer
  (``_build_optimizer``) that sync mode uses, element-wise on its flat shard, and the worker
  computes its next gradient on exactly those values. No sum is reordered, so the float64 runs
  agree bit for bit (the tolerance a float64 reference allows here is zero).
- 3 and 4 ranks (1 or 2 servers, 2 workers): the model learns and the figures every rank sent
  rank 0 add up (steps, pushes, versions, the final model equals the servers' saved shards).
- Resume: a 1-worker run stopped by ``--steps`` mid push interval and resumed equals the
  uninterrupted run bit for bit; a resume on another layout is refused naming both.
  So does a run whose worker was preempted (SIGUSR1 to that rank only).
- Configuration errors name the key.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_mpi
from train_fixtures import launch, step_lines, write_config
from pybrain_mpi.config import ConfigError, parse_config
from pybrain_mpi.parallel.parameter_server import shard_ranges

SGD = 'optimizer = "sgd"\nmomentum = 0.9\nweight_decay = 1e-3\n'


def _summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())


def _train(ranks: int, config: Path, *args: str, timeout_s: float = 150, check: bool = True):
    return run_mpi(ranks, "train_cli.py", "train", str(config), "--no-progress", *args,
                   timeout_s=timeout_s, check=check)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory) -> dict:
    """Sync on 1 rank vs downpour 1 server + 1 worker (SGD, 8 steps); and a downpour run with
    Adagrad, push_every = 2, fetch_every = 3 for 9 steps, whole and as 3 steps + resume."""
    root = tmp_path_factory.mktemp("downpour1")
    cache = root / "cache"
    runs = {name: root / name for name in ("sync", "downpour", "whole", "parts")}
    write_config(root / "sync.toml", runs["sync"], cache, extra_train=SGD)
    write_config(root / "downpour.toml", runs["downpour"], cache,
                 extra_train=SGD + 'mode = "downpour"\nserver_optimizer = "sgd"\n')
    cadence = 'mode = "downpour"\nserver_optimizer = "adagrad"\npush_every = 2\nfetch_every = 3\ncheckpoint_every = 2\n'
    write_config(root / "whole.toml", runs["whole"], cache, extra_train=cadence)
    write_config(root / "parts.toml", runs["parts"], cache, extra_train=cadence)
    _train(1, root / "sync.toml", "--steps", "8")
    runs["downpour_out"] = _train(2, root / "downpour.toml", "--steps", "8").stdout
    _train(2, root / "whole.toml", "--steps", "9")
    _train(2, root / "parts.toml", "--steps", "3")  # stops with one step's gradient unpushed
    runs["resumed_out"] = _train(2, root / "parts.toml", "--steps", "9", "--resume").stdout
    runs["root"] = root
    return runs


def test_one_worker_with_sgd_equals_single_rank_synchronous_training_bitwise(one_worker):
    sync, downpour = _summary(one_worker["sync"]), _summary(one_worker["downpour"])
    sync_losses = [r["local_loss"] for r in step_lines(one_worker["sync"], 0)]
    assert len(sync_losses) == 8 and len(set(sync_losses)) == 8  # the weights moved every step
    assert downpour["mode"] == "downpour" and downpour["steps"] == 8
    assert downpour["train_losses_worker0"] == sync_losses
    assert downpour["held_out"] == {k: v for k, v in sync["held_out"].items() if k in downpour["held_out"]}
    sync_model = torch.load(one_worker["sync"] / "checkpoints" / "checkpoint.pt", weights_only=True)["model"]["state"]
    downpour_model = torch.load(one_worker["downpour"] / "final_model.pt", weights_only=True)
    assert sync_model.keys() == downpour_model.keys()
    for name, value in downpour_model.items():
        assert value.dtype == torch.float64 and torch.equal(value, sync_model[name]), name
    d = downpour["downpour"]
    assert d["servers"] == 1 and d["workers"] == 1 and d["pushes_applied"] == 8
    assert d["staleness"]["max"] == 0 and d["lost_workers"] == [] and d["done_workers"] == [1]
    assert f"held-out R^2 {downpour['held_out']['r2']:.4f}" in one_worker["downpour_out"]


def test_resumed_one_worker_run_equals_the_uninterrupted_one_bitwise(one_worker):
    whole, parts = _summary(one_worker["whole"]), _summary(one_worker["parts"])
    assert parts["downpour"]["resumed_from_shards"] and not whole["downpour"]["resumed_from_shards"]
    assert len(whole["train_losses_worker0"]) == 9
    assert parts["train_losses_worker0"] == whole["train_losses_worker0"]
    assert parts["held_out"] == whole["held_out"]
    a = torch.load(one_worker["whole"] / "final_model.pt", weights_only=True)
    b = torch.load(one_worker["parts"] / "final_model.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The server's version (and Adagrad's sums) came back too: 9 steps / push_every 2 = 4 pushes;
    # step 9's gradient stays in the worker's state (a --steps stop can be resumed).
    assert parts["downpour"]["per_server"][0]["version"] == whole["downpour"]["per_server"][0]["version"] == 4
    assert parts["downpour"]["per_worker"][0]["resumed_at_step"] == 3
    checkpoints = one_worker["parts"] / "checkpoints"
    assert json.loads((checkpoints / "ps_layout.json").read_text()) == {"servers": 1, "workers": 1, "ranks": 2}
    assert (checkpoints / "ps_shard0.pt").exists() and (checkpoints / "ps_worker0.pt").exists()
    assert not list(checkpoints.glob("*.tmp")) and not list(checkpoints.glob(".*tmp"))


def _rank_pid(config: Path, rank: int, launcher: int) -> int | None:
    """The pid of MPI rank ``rank`` among the processes running ``config`` (not mpiexec)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == launcher:
            continue
        try:
            if str(config).encode() not in (entry / "cmdline").read_bytes():
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_worker_preempted_by_a_signal_resumes_to_the_uninterrupted_run_bitwise(one_worker):
    root = one_worker["root"]
    output = root / "preempted"
    config = write_config(root / "preempted.toml", output, root / "cache", extra_train=(
        'mode = "downpour"\nserver_optimizer = "adagrad"\npush_every = 2\nfetch_every = 3\n'
        "checkpoint_every = 2\n"))
    process = launch(config, "--steps", "300", env={"PBM_DOWNPOUR_STEP_DELAY": "1:0.3"})
    try:
        deadline = time.monotonic() + 120
        state = output / "checkpoints" / "ps_worker0.pt"
        while not state.exists():  # the worker's first periodic state: it is training
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the worker never saved its state"
            time.sleep(0.05)
        pid = _rank_pid(config, 1, process.pid)
        assert pid is not None
        os.kill(pid, signal.SIGUSR1)  # the worker only
        stdout, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stdout + stderr
    assert "rank 1 received SIGUSR1" in stderr, stderr
    stopped = _summary(output)
    assert stopped["stopped"] == ["preempted"], stopped["stopped"]
    at = stopped["downpour"]["per_worker"][0]["steps"]
    assert 4 <= at < 9, at
    _train(2, config, "--steps", "9", "--resume")
    resumed, whole = _summary(output), _summary(one_worker["whole"])
    assert resumed["downpour"]["per_worker"][0]["resumed_at_step"] == at
    assert resumed["train_losses_worker0"] == whole["train_losses_worker0"]
    a = torch.load(one_worker["whole"] / "final_model.pt", weights_only=True)
    b = torch.load(output / "final_model.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_on_another_layout_is_refused_naming_both_layouts(one_worker):
    root = one_worker["root"]
    copy = root / "relayout"
    shutil.copytree(one_worker["parts"], copy)
    config = write_config(root / "relayout.toml", copy, root / "cache",
                          extra_train='mode = "downpour"\nserver_optimizer = "adagrad"\n')
    result = _train(3, config, "--steps", "9", "--resume", check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "servers = 1 on 2 ranks (1 worker(s))" in text and "servers = 1 on 3 ranks (2 worker(s))" in text, text
    assert "no training step was run" in text, text
    assert not (copy / "checkpoints" / "ps_worker1.pt").exists()


@pytest.mark.parametrize("ranks, servers, extra", [
    (3, 1, "warm_start_steps = 4\n"),
    (4, 2, "push_every = 2\nfetch_every = 2\nmax_staleness = 3\n"),
])
def test_several_workers_learn_and_every_rank_reports_consistent_figures(tmp_path, ranks, servers, extra):
    output = tmp_path / "run"
    config = write_config(tmp_path / "cfg.toml", output, tmp_path / "cache",
                          extra_train=f'mode = "downpour"\nservers = {servers}\n{extra}')
    config.write_text(config.read_text().replace("lr = 1e-3", "lr = 5e-3"))  # Adagrad's scale
    steps, workers = 30, ranks - servers
    result = _train(ranks, config, "--steps", str(steps), timeout_s=240)
    summary = _summary(output)
    d = summary["downpour"]
    assert summary["ranks"] == ranks and d["servers"] == servers and d["workers"] == workers
    assert d["done_workers"] == list(range(servers, ranks)) and d["lost_workers"] == []
    assert [w["rank"] for w in d["per_worker"]] == list(range(servers, ranks))
    assert all(w["steps"] == steps and w["stopped"] == "steps" for w in d["per_worker"]), d["per_worker"]
    assert summary["steps"] == steps * workers
    push_every = 2 if "push_every" in extra else 1
    for server in d["per_server"]:
        # Every push goes to every server; each applied one is a version.
        assert server["pushes_applied"] + server["pushes_dropped_stale"] == workers * steps // push_every, server
        assert server["version"] == server["pushes_applied"] and sorted(server["done_workers"]) == d["done_workers"]
    assert sum(w["pushes"] for w in d["per_worker"]) == d["pushes_applied"] == sum(
        s["pushes_applied"] for s in d["per_server"])
    if "max_staleness" in extra:
        assert d["staleness"]["max"] <= 3, d["staleness"]
    # Learning: the untrained model's held-out R^2 is about -0.01 on this data (0.3 to 0.5 after
    # these 30 steps when measured; the order of pushes, so the figure, varies from run to run).
    losses = summary["train_losses_worker0"]
    assert len(losses) == steps and np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert summary["held_out"]["r2"] > 0.05, (summary["held_out"], losses)
    assert f"held-out R^2 {summary['held_out']['r2']:.4f}" in result.stdout
    # The model rank 0 evaluated and saved is the servers' final shards, assembled.
    model = torch.load(output / "final_model.pt", weights_only=True)
    names = list(model)  # DCA: every state entry is a trainable parameter, in order
    shards = [torch.load(output / "checkpoints" / f"ps_shard{s}.pt", weights_only=True) for s in range(servers)]
    ranges = shard_ranges([model[n].numel() for n in names], servers, model[names[0]].element_size())
    for s, (pieces, shard) in enumerate(zip(ranges, shards)):
        assert shard["version"] == d["per_server"][s]["version"]
        flat = torch.cat([model[names[i]].reshape(-1)[a:b] for i, a, b in pieces])
        assert torch.equal(flat, shard["shard"]), f"server {s}"


def test_servers_leaving_no_worker_are_refused_naming_the_key(tmp_path):
    config = write_config(tmp_path / "cfg.toml", tmp_path / "run", tmp_path / "cache",
                          extra_train='mode = "downpour"\nservers = 2\n')
    result = _train(2, config, "--steps", "2", check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "[train] servers = 2" in text and "needs at least 3 ranks" in text and "this run has 2" in text, text
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("line, message", [
    ('server_optimizer = "lbfgs"', '[train] server_optimizer = "lbfgs": expected one of'),
    ("servers = 0", "[train] servers = 0: expected an integer >= 1"),
    ("fetch_every = 0", "[train] fetch_every = 0: expected an integer >= 1"),
    ("push_every = -1", "[train] push_every = -1: expected an integer >= 1"),
    ("warm_start_steps = -2", "[train] warm_start_steps = -2: expected an integer >= 0"),
    ("max_staleness = -1", "[train] max_staleness = -1: expected an integer >= 0"),
])
def test_bad_downpour_keys_are_refused_naming_the_key_and_line(tmp_path, line, message):
    config = write_config(tmp_path / "cfg.toml", tmp_path / "run", tmp_path / "cache",
                          extra_train=f'mode = "downpour"\n{line}\n')
    text = config.read_text()
    number = text.splitlines().index(line) + 1
    with pytest.raises(ConfigError) as info:
        parse_config(text, "run.toml")
    assert f"run.toml:{number}: {message}" in str(info.value), str(info.value)
