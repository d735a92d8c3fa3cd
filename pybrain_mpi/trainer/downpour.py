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

Checkpoints: each server writes its shard, optimizer state and version to
``<checkpoint dir>/ps_shard<s>.pt`` atomically every ``checkpoint_every`` versions and at the
end; ``--resume`` restores the servers from them and the workers start with a fetch. Not
restored (so a resume is not exact): the workers' positions in their epochs, their local
gradient sums and RNG states. Not done in this mode: validation and early stopping, learning-
rate schedules, compression of pushes.
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
from ..metrics import RegressionStats
from ..parallel.parameter_server import ParameterServer

if TYPE_CHECKING:
    from .trainer import Trainer

_TAG_FINAL_SHARD = 20
_TAG_REPORT = 21


def _optimizer_factory(config):
    """``f(params)`` building ``[train] server_optimizer`` with the run's lr and weight decay."""
    train = config.train
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
             "adagrad": torch.optim.Adagrad}
    kwargs = {"lr": train.lr, "weight_decay": train.weight_decay}
    if train.server_optimizer == "sgd":
        kwargs["momentum"] = train.momentum

    def build(params):
        return kinds[train.server_optimizer](list(params), **kwargs)

    return build


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
    if trainer.size < train.servers + 1:
        raise TrainingSetupError(f'[train] mode = "downpour" with servers = {train.servers} needs at least '
                       f"{train.servers + 1} ranks (servers plus one worker); this run has {trainer.size}")
    if hasattr(trainer.data, "evaluate"):
        raise TrainingSetupError(f'[train] mode = "downpour" does not train {trainer.data.description} yet '
                       "(cohort data evaluates collectively); use mode = \"sync\"")
    started = time.perf_counter()
    ps = ParameterServer(trainer.module, _optimizer_factory(config), servers=train.servers,
                         fetch_every=train.fetch_every, push_every=train.push_every,
                         warm_start_steps=train.warm_start_steps, max_staleness=train.max_staleness)
    directory = Path(train.checkpoint_dir or trainer.output_dir / "checkpoints")
    if ps.is_server:
        resumed = False
        if getattr(trainer, "resume_requested", False) and (directory / f"ps_shard{ps.rank}.pt").exists():
            ps.load(directory)
            resumed = True
        report = ps.serve(checkpoint_dir=directory, checkpoint_every=train.checkpoint_every)
        if ps.rank != 0:
            _send_json(ps, {"report": report.as_dict(), "resumed": resumed}, 0)
            ps.channel.isend(ps.state_dict()["shard"], 0, _TAG_FINAL_SHARD, "final shard").wait()
            return {"rank": trainer.rank, "role": "server", "report": report.as_dict()}
        return _finish_rank0(trainer, ps, report, resumed, started)
    stats = _work(trainer, ps)
    _send_json(ps, {"stats": stats}, 0)
    return {"rank": trainer.rank, "role": "worker", "stats": stats}


def _work(trainer: "Trainer", ps: ParameterServer) -> dict:
    """A worker's loop: its shard of each epoch, until the epochs, ``--steps`` or the time budget
    are spent."""
    train = trainer.config.train
    sampler = ShuffledSampler(trainer.data.size("train"), train.batch_size, seed=train.seed,
                              rank=ps.worker, world_size=ps.workers)
    total = train.epochs * sampler.steps_per_epoch
    stop_at = total if trainer.max_steps is None else min(total, trainer.max_steps)
    delay_s = _step_delay_s(trainer.rank)
    losses: list[float] = []
    began = time.perf_counter()
    stopped = "completed" if stop_at == total else "steps"
    timeline: list[tuple[float, float]] = []  # (seconds since start, loss) for the benchmark
    for step in range(stop_at):
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
        timeline.append((time.perf_counter() - began, losses[-1]))
        if delay_s:
            time.sleep(delay_s)
    ps.finish(final_fetch=ps.worker == 0)
    stats = ps.stats()
    stats.update(stopped=stopped, train_seconds=time.perf_counter() - began,
                 samples=len(losses) * train.batch_size, final_loss=losses[-1] if losses else None,
                 losses=losses if ps.worker == 0 else None, step_delay_s=delay_s)
    return stats


def _evaluate_alone(trainer: "Trainer", split: str) -> dict | None:
    """Held-out loss and R^2 computed by this rank alone (no collective: lost ranks must not
    matter)."""
    n = trainer.data.size(split)
    if n == 0:
        return None
    batch = max(1, trainer.config.train.batch_size * 4)
    stats, loss_sum = None, 0.0
    trainer.module.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch):
                indices = np.arange(start, min(n, start + batch))
                x_np, y_np = trainer.data.batch(split, 0, indices)
                x, y = trainer._tensor(x_np), trainer._tensor(y_np)
                loss, pred = trainer._forward(trainer.module, x, y)
                target = x if trainer.data.autoencoder else y
                p = pred.double().reshape(len(indices), -1).numpy()
                t = target.double().reshape(len(indices), -1).numpy()
                if stats is None:
                    stats = RegressionStats(p.shape[1])
                stats.update(p, t)
                loss_sum += float(loss) * len(indices)
    finally:
        trainer.module.train()
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
        "final_train_loss": losses[-1] if losses else None,
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
            "checkpoint_dir": str(Path(train.checkpoint_dir or trainer.output_dir / "checkpoints")),
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
