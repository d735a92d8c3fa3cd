"""``[train] mode = "downpour"``: the trainer's loop on parameter-server ranks (Downpour SGD).

The set-up is the ordinary trainer's (data, model, checks together on every rank); then ranks
``0 .. servers-1`` serve their shard of the parameters (:class:`~pybrain_mpi.parallel.
ParameterServer`, optimizer ``[train] server_optimizer`` at ``[train] lr``) and the other ranks
train, each on its own shard of every epoch (a :class:`~pybrain_mpi.data.ShuffledSampler` over
the workers only), fetching and pushing as ``fetch_every`` / ``push_every`` say.

After training nothing is collective over the world: a lost worker (dead or stopped, noticed by
the servers' deadline) must not stop the others from finishing. Every server sends its final
shard and its report to rank 0 (server 0), every worker that finished its statistics; rank 0
assembles the model, evaluates the held-out split alone and writes ``summary.json``
(``downpour``: per-server staleness, pushes applied and dropped, lost workers; per-worker
steps and staleness) and ``final_model.pt``.

Checkpoints (``<checkpoint dir>``, default ``<output dir>/checkpoints``): each server writes its
shard, optimizer state and version to ``ps_shard<s>.pt`` every ``checkpoint_every`` versions and
at the end; each worker writes its state (``ParameterServer.worker_state_dict``: the parameters it
computes on, its unpushed gradient sum, step count, fetched versions; its RNG states and loss
curve) to ``ps_worker<w>.pt`` after a push that reaches a multiple of ``checkpoint_every`` and
when it stops; rank 0 writes ``ps_layout.json`` (servers, workers, ranks). Every file is written
atomically (temporary file, fsync, rename). A worker stopped by ``--steps`` or a preemption signal
(SIGTERM/SIGUSR1 to that worker) keeps its partial gradient sum in its state instead of pushing
it. ``--resume`` checks the layout first (the same ``[train] servers`` and rank count, else every
rank refuses naming both), then restores the servers and the workers: with one worker (a
deterministic run) the resumed run equals the uninterrupted one bit for bit. With several
workers the order in which pushes arrive is not reproducible, so neither is a resume. Not done in
this mode: validation and early stopping, learning-rate schedules, compression of pushes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.samplers import ShuffledSampler
from ..parallel.parameter_server import ParameterServer
from . import checkpoint as ckpt

if TYPE_CHECKING:
    from .trainer import Trainer

_TAG_FINAL_SHARD = 20
_TAG_REPORT = 21


def _optimizer_factory(config):
    """``f(params)`` building ``[train] server_optimizer`` with the run's lr, weight decay and
    momentum, exactly as ``mode = "sync"`` builds ``[train] optimizer``."""
    from .trainer import _build_optimizer

    def build(params):
        return _build_optimizer(config, params, kind=config.train.server_optimizer)

    return build


def checkpoint_directory(trainer: "Trainer") -> Path:
    """Where this run's downpour checkpoints go (``[train] checkpoint_dir`` or
    ``<output dir>/checkpoints``)."""
    return Path(trainer.config.train.checkpoint_dir or trainer.output_dir / "checkpoints")


def check_layout(config, size: int) -> None:
    """Refuses, naming the key, a ``[train] servers`` that leaves no worker on ``size`` ranks."""
    from .trainer import TrainingSetupError

    servers = config.train.servers
    if size < servers + 1:
        raise TrainingSetupError(f'[train] servers = {servers} with mode = "downpour" needs at least '
                                 f"{servers + 1} ranks (servers plus one worker); this run has {size}: "
                                 f"set [train] servers to at most {size - 1} or launch more ranks")


def _layout(trainer: "Trainer") -> dict:
    servers = trainer.config.train.servers
    return {"servers": servers, "workers": trainer.size - servers, "ranks": trainer.size}


def _check_resume_layout(trainer: "Trainer", directory: Path) -> bool:
    """With ``--resume``: True when ``directory`` holds downpour checkpoints of this layout,
    False when it holds none; raises naming both layouts when they differ."""
    from .trainer import TrainingSetupError

    path = directory / "ps_layout.json"
    if not path.exists():
        if any(directory.glob("ps_shard*.pt")) or any(directory.glob("ps_worker*.pt")):
            raise TrainingSetupError(f"--resume: {directory} holds parameter-server checkpoints but no "
                                     "ps_layout.json saying which layout wrote them; start fresh without "
                                     "--resume or restore that file")
        return False
    saved = json.loads(path.read_text())
    mine = _layout(trainer)
    if {k: saved.get(k) for k in mine} != mine:
        raise TrainingSetupError(
            f"--resume: the checkpoints in {directory} were written by [train] servers = "
            f"{saved.get('servers')} on {saved.get('ranks')} ranks ({saved.get('workers')} worker(s)); this "
            f"run has servers = {mine['servers']} on {mine['ranks']} ranks ({mine['workers']} worker(s)). "
            "Resume with the same [train] servers and number of ranks, or start fresh without --resume")
    missing = [f"ps_shard{s}.pt" for s in range(mine["servers"]) if not (directory / f"ps_shard{s}.pt").exists()]
    if missing:
        raise TrainingSetupError(f"--resume: {directory} lacks {', '.join(missing)} of the "
                                 f"{mine['servers']} server shard(s); start fresh without --resume")
    return True


def _write_json_atomically(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(value, indent=2, allow_nan=False))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _send_json(ps: ParameterServer, value: dict, dest: int) -> None:
    payload = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8).astype(np.int32)
    ps.channel.isend(torch.from_numpy(payload), dest, _TAG_REPORT, "downpour report").wait()


def _recv_json(ps: ParameterServer, source: int) -> dict:
    tensor = ps.channel.recv(source, _TAG_REPORT, "downpour report")
    return json.loads(tensor.numpy().astype(np.uint8).tobytes().decode())


def _step_delay_s(rank: int) -> float:
    """Injected per-step delay of this rank (``PBM_DOWNPOUR_STEP_DELAY="rank:seconds,..."``, for
    the straggler benchmark)."""
    text = os.environ.get("PBM_DOWNPOUR_STEP_DELAY", "")
    for item in filter(None, (part.strip() for part in text.split(","))):
        who, _, seconds = item.partition(":")
        if int(who) == rank:
            return float(seconds)
    return 0.0


def fit(trainer: "Trainer") -> dict:
    """Runs ``trainer``'s configuration in downpour mode; returns the summary on rank 0 (and this
    rank's own figures elsewhere)."""
    from .trainer import TrainingSetupError

    config, train = trainer.config, trainer.config.train
    check_layout(config, trainer.size)  # also checked at set-up (Trainer, phase 1)
    if hasattr(trainer.data, "evaluate"):
        raise TrainingSetupError(f'[train] mode = "downpour" does not train {trainer.data.description} yet '
                       "(cohort data evaluates collectively); use mode = \"sync\"")
    started = time.perf_counter()
    directory = checkpoint_directory(trainer)
    resuming = (trainer._together("checking the parameter-server checkpoints",
                                  lambda: _check_resume_layout(trainer, directory))
                if getattr(trainer, "resume_requested", False) else False)
    ps = ParameterServer(trainer.module, _optimizer_factory(config), servers=train.servers,
                         fetch_every=train.fetch_every, push_every=train.push_every,
                         warm_start_steps=train.warm_start_steps, max_staleness=train.max_staleness)
    if ps.is_server:
        if resuming:
            ps.load(directory)
        if ps.rank == 0:
            _write_json_atomically(directory / "ps_layout.json", _layout(trainer))
        report = ps.serve(checkpoint_dir=directory, checkpoint_every=train.checkpoint_every)
        if ps.rank != 0:
            _send_json(ps, {"report": report.as_dict(), "resumed": resuming}, 0)
            ps.channel.isend(ps.state_dict()["shard"], 0, _TAG_FINAL_SHARD, "final shard").wait()
            return {"rank": trainer.rank, "role": "server", "report": report.as_dict()}
        return _finish_rank0(trainer, ps, report, resuming, started)
    stats = _work(trainer, ps, directory, resuming)
    _send_json(ps, {"stats": stats}, 0)
    return {"rank": trainer.rank, "role": "worker", "stats": stats}


def _worker_path(directory: Path, worker: int) -> Path:
    return directory / f"ps_worker{worker}.pt"


def _save_worker(trainer: "Trainer", ps: ParameterServer, directory: Path, losses: list[float],
                 reason: str) -> None:
    """Writes this worker's state atomically (checkpoint.save_checkpoint: temporary file, fsync,
    rename, checksum)."""
    state = {"ps": ps.worker_state_dict(), "rng": ckpt.rng_state(),
             "losses": torch.tensor(losses, dtype=torch.float64),
             "model": ckpt.model_entry(trainer.module)}
    metadata = {"reason": reason, "step": ps.local_steps, "worker": ps.worker, **_layout(trainer)}
    ckpt.save_checkpoint(_worker_path(directory, ps.worker), state, metadata, keep_previous=False)


def _load_worker(trainer: "Trainer", ps: ParameterServer, directory: Path) -> list[float] | None:
    """Restores this worker's saved state; None (start at step 0 with a fetch) when it has none."""
    path = _worker_path(directory, ps.worker)
    if not path.exists():
        return None
    tree, _ = ckpt.load_checkpoint(path, trainer.module)
    trainer.module.load_state_dict(tree["model"]["state"])
    ps.load_worker_state_dict(tree["ps"])
    ckpt.set_rng_state(tree["rng"])
    return [float(v) for v in tree["losses"].tolist()]


def _work(trainer: "Trainer", ps: ParameterServer, directory: Path, resuming: bool) -> dict:
    """A worker's loop: its shard of each epoch, until the epochs, ``--steps``, the time budget or
    a stop request are spent; its state is saved for ``--resume`` (module docstring)."""
    train = trainer.config.train
    sampler = ShuffledSampler(trainer.data.size("train"), train.batch_size, seed=train.seed,
                              rank=ps.worker, world_size=ps.workers)
    total = train.epochs * sampler.steps_per_epoch
    stop_at = total if trainer.max_steps is None else min(total, trainer.max_steps)
    delay_s = _step_delay_s(trainer.rank)
    losses = (_load_worker(trainer, ps, directory) if resuming else None) or []
    resumed_at = ps.local_steps
    began = time.perf_counter()
    stopped = "completed" if stop_at == total else "steps"
    for step in range(ps.local_steps, stop_at):
        if trainer.stop_request.requested:
            stopped = "preempted"
            break
        if train.time_budget_s > 0 and time.perf_counter() - began >= train.time_budget_s:
            stopped = "time budget"
            break
        epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
        indices = sampler.batch_indices(epoch, in_epoch)
        x_np, y_np = trainer.data.batch("train", epoch, indices)
        x, y = trainer._tensor(x_np), trainer._target(y_np)
        ps.begin_step()
        loss, _ = trainer._forward(trainer.module, x, y)
        loss.backward()
        ps.step()
        losses.append(float(loss.detach()))
        if (train.checkpoint_every and ps.pending_grads == 0
                and ps.known_versions[0] % train.checkpoint_every == 0):
            _save_worker(trainer, ps, directory, losses, "periodic")
        if delay_s:
            time.sleep(delay_s)
    # Stopped to be resumed: the partial gradient sum stays in the saved state (an exact resume).
    resumable = stopped in ("steps", "preempted")
    if resumable:
        _save_worker(trainer, ps, directory, losses, stopped)
    ps.finish(final_fetch=False, push_pending=not resumable)
    if not resumable:
        _save_worker(trainer, ps, directory, losses, stopped)
    stats = ps.stats()
    stats.update(stopped=stopped, train_seconds=time.perf_counter() - began, resumed_at_step=resumed_at,
                 samples=(ps.local_steps - resumed_at) * train.batch_size,
                 final_loss=losses[-1] if losses else None,
                 losses=losses if ps.worker == 0 else None, step_delay_s=delay_s)
    return stats


def _evaluate_alone(trainer: "Trainer", split: str) -> dict | None:
    """Held-out loss and R^2 computed by this rank alone (no collective: lost ranks must not
    matter)."""
    n = trainer.data.size(split)
    if n == 0:
        return None
    stats, loss_sum = trainer.evaluate_samples(split, np.arange(n))
    report = stats.compute(trainer.data.roi_labels)
    report["loss"] = loss_sum / stats.count
    return report


def _finish_rank0(trainer: "Trainer", ps: ParameterServer, report, resumed: bool, started: float) -> dict:
    reports = [{"report": report.as_dict(), "resumed": resumed}]
    for server in range(1, ps.servers):
        reports.append(_recv_json(ps, server))
    shards = [ps.state_dict()["shard"]]
    for server in range(1, ps.servers):
        shards.append(ps.channel.irecv((ps.shard_sizes[server],), ps.dtype, server, _TAG_FINAL_SHARD,
                                       "final shard").wait())
    for server, shard in enumerate(shards):
        ps._scatter(server, shard, ps.params)
    done = sorted(set(report.done_workers))
    workers = [_recv_json(ps, ps.channel.world_ranks.index(r))["stats"] for r in done]
    lost = sorted({r for rep in reports for r in rep["report"]["lost_workers"]})
    held = _evaluate_alone(trainer, "held_out") or {}
    first = next((w for w in workers if w["worker"] == 0), None)
    losses = (first or {}).get("losses") or []
    for w in workers:
        w.pop("losses", None)
    histogram: dict[str, int] = {}
    for rep in reports:
        for k, v in rep["report"]["staleness_histogram"].items():
            histogram[k] = histogram.get(k, 0) + v
    applied = sum(histogram.values())
    train = trainer.config.train
    summary = {
        "model": trainer.config.model.name, "task": trainer.data.task, "ranks": trainer.size,
        "mode": "downpour", "precision": trainer.policy.precision, "device": trainer.policy.device,
        "steps": sum(w["steps"] for w in workers), "steps_worker0": len(losses),
        "final_train_loss": losses[-1] if losses else None, "train_losses_worker0": losses,
        "stopped": sorted({w["stopped"] for w in workers}),
        "held_out": {k: v for k, v in held.items() if k not in ("per_output", "per_roi", "per_subject",
                                                                "per_target")},
        "train_seconds": max((w["train_seconds"] for w in workers), default=0.0),
        "wall_seconds": time.perf_counter() - trainer.started_at,
        "bytes_communicated": sum(rep["report"]["bytes_sent"] for rep in reports)
        + sum(w["bytes_sent"] for w in workers),
        "downpour": {
            "servers": ps.servers, "workers": ps.workers, "fetch_every": train.fetch_every,
            "push_every": train.push_every, "warm_start_steps": train.warm_start_steps,
            "max_staleness_bound": train.max_staleness, "server_optimizer": train.server_optimizer,
            "lost_workers": lost, "done_workers": done,
            "staleness": {"max": max((int(k) for k in histogram), default=0),
                          "mean": (sum(int(k) * v for k, v in histogram.items()) / applied) if applied else 0.0,
                          "histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0])))},
            "pushes_applied": sum(rep["report"]["pushes_applied"] for rep in reports),
            "pushes_dropped_stale": sum(rep["report"]["pushes_dropped_stale"] for rep in reports),
            "resumed_from_shards": all(rep["resumed"] for rep in reports),
            "per_server": [rep["report"] for rep in reports], "per_worker": workers,
            "checkpoint_dir": str(checkpoint_directory(trainer)),
        },
        "seed": train.seed, "data": trainer.data.description,
    }
    out = trainer.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "final_model.pt"
    temporary = model_path.with_suffix(".tmp")
    torch.save(trainer.module.state_dict(), temporary)
    os.replace(temporary, model_path)
    path = out / "summary.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(summary, indent=2, allow_nan=False))
    os.replace(temporary, path)
    if trainer.echo:
        r2 = summary["held_out"].get("r2")
        print(f"downpour: {ps.servers} server(s) + {ps.workers} worker(s), {summary['steps']} worker steps, "
              f"held-out R^2 {r2 if r2 is None else f'{r2:.4f}'}, staleness max "
              f"{summary['downpour']['staleness']['max']} mean {summary['downpour']['staleness']['mean']:.2f}, "
              f"lost workers {lost or 'none'}; summary {path}", flush=True)
    return summary
