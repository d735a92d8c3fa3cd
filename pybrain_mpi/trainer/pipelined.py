"""``[train] parallel = "pipeline"`` / ``"hybrid"``: the trainer's step, evaluation and
checkpoints on a :class:`~pybrain_mpi.parallel.Pipeline`.

Layout. ``"pipeline"`` makes every rank one stage of a single pipeline (``S`` = the number of
ranks; ``[train] pipeline_stages``, when given, must equal it). ``"hybrid"`` arranges the world's
``W`` ranks as a :class:`~pybrain_mpi.parallel.Grid`: ``W / S`` data-parallel replicas of an
``S``-stage pipeline over consecutive ranks (world rank ``r`` is stage ``r % S`` of replica
``r // S``); each stage's gradients are averaged among the ranks holding it in the other
replicas by the DDP buckets (``Pipeline(data_group=...)``). ``[train] batch_size`` is per
replica, so a hybrid run of ``D`` replicas takes the same global batch as a data-parallel run
on ``D`` ranks, and its steps match that run's up to summation order. ``balance = "auto"`` is
measured on world rank 0 and sent to every rank, so all replicas split the model alike.

Steps. All stages of a replica compute the same batch indices (the sampler deals the epoch over
the replicas); stage 0 reads the inputs, the last stage the targets. The trainer's loss function
runs on the last stage, per micro-batch, weighted by the micro-batch's share of the batch. The
step statistics allreduce over the world (as in data parallelism) counts the loss of each
replica's last stage only and carries the stop flags, so every rank stops after the same step.

Evaluation. Each replica evaluates every ``D``-th sample through :meth:`Pipeline.predict`; the
last stages compute the loss and regression statistics, which are summed over the world, so
every rank reports the same figures.

Checkpoints. The ranks of replica 0 each write their stage's shard
``<checkpoint>.stage<s>-of-<S>.step<N>`` (atomically, like the data-parallel checkpoint): the
stage's weights and optimizer state, the layout (stages, balance, layer range, world, replicas),
the sampler position, progress, history and every rank's RNG state. Once every shard of step
``N`` is written (the ranks agree on it), older shards are removed; a resume takes the newest
step whose ``S`` shards are all there, refuses another stage count, another explicit balance or
another number of replicas by name, and continues exactly (same weights, optimizer state, RNG
streams and epoch position). Not supported in these modes (refused by the config): gradient
compression, activation checkpointing, fp16 loss scaling, ``mode = "downpour"``; data adapters
that evaluate collectively (cohorts) are refused at set-up.
"""

from __future__ import annotations

import math
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import checkpoint as ckpt
from ..communication import collectives, context
from ..communication.objects import allgather_objects
from ..config import config_to_dict
from ..metrics import RegressionStats
from ..parallel.pipeline import _profile_layers, partition_balanced, pipeline_layers

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Layout", "plan", "shard_path", "find_shards", "build", "read_checkpoint",
           "save_checkpoint", "train_step", "evaluate"]


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: ``stages`` per pipeline, ``data_parallel`` replicas; this rank is
    stage ``stage`` of replica ``replica``."""

    parallel: str
    stages: int
    data_parallel: int
    stage: int
    replica: int

    def ranks_of_stage(self, stage: int) -> list[int]:
        """World ranks holding ``stage`` (one per replica)."""
        return [d * self.stages + stage for d in range(self.data_parallel)]


def plan(config, world: int, rank: int) -> Layout:
    """The layout ``config`` asks for on ``world`` ranks; raises naming the key and the numbers
    when it cannot be laid out."""
    from .trainer import TrainingSetupError

    train = config.train
    if train.parallel == "pipeline":
        if train.pipeline_stages is not None and train.pipeline_stages != world:
            raise TrainingSetupError(
                f'[train] parallel = "pipeline" runs one stage per rank, but pipeline_stages = '
                f"{train.pipeline_stages} and this run has {world} rank(s); launch "
                f"{train.pipeline_stages} ranks, leave pipeline_stages out, or use parallel = "
                '"hybrid" for several pipelines')
        stages = world
    else:
        stages = int(train.pipeline_stages)
        if world % stages:
            raise TrainingSetupError(
                f'[train] parallel = "hybrid" with pipeline_stages = {stages}: the {world} rank(s) '
                f"of this run do not split into whole pipelines ({world} % {stages} = "
                f"{world % stages}); launch a multiple of {stages} ranks or change pipeline_stages")
    if not isinstance(train.balance, str) and len(train.balance) != stages:
        raise TrainingSetupError(f"[train] balance = {list(train.balance)} gives {len(train.balance)} "
                                 f"stages but this run has {stages} stage(s) per pipeline")
    return Layout(train.parallel, stages, world // stages, rank % stages, rank // stages)


# ---------------------------------------------------------------------------------- shards
def shard_path(base: Path, stage: int, stages: int, step: int) -> Path:
    """The file of stage ``stage``'s shard of the checkpoint of step ``step``."""
    return base.with_name(f"{base.name}.stage{stage}-of-{stages}.step{step}")


def find_shards(base: Path) -> dict[tuple[int, int], set[int]]:
    """``{(stages, step): {stages present}}`` of the shards beside ``base``."""
    pattern = re.compile(re.escape(base.name) + r"\.stage(\d+)-of-(\d+)\.step(\d+)")
    found: dict[tuple[int, int], set[int]] = {}
    if not base.parent.is_dir():
        return found
    for path in base.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            stage, stages, step = map(int, match.groups())
            found.setdefault((stages, step), set()).add(stage)
    return found


# ---------------------------------------------------------------------------------- set-up
def check_supported(trainer: "Trainer") -> None:
    """What a pipelined run cannot train yet, refused by name (every rank alike)."""
    from .trainer import TrainingSetupError

    parallel = trainer.config.train.parallel
    if hasattr(trainer.data, "evaluate"):
        raise TrainingSetupError(f'[train] parallel = "{parallel}" does not train '
                                 f"{trainer.data.description} yet (cohort data evaluates "
                                 'collectively); use parallel = "data"')
    if trainer.policy.device != "cpu":
        raise TrainingSetupError(f'[train] parallel = "{parallel}" runs on the CPU only; set '
                                 '[train] device = "cpu"')
    layers = pipeline_layers(trainer.module)
    stages = trainer.layout.stages
    if len(layers) < stages:
        raise TrainingSetupError(f"[train] parallel = \"{parallel}\": the model has {len(layers)} "
                                 f"layer(s), fewer than the {stages} stages (one layer each at "
                                 "least); use fewer stages")
    balance = trainer.config.train.balance
    if not isinstance(balance, str) and sum(balance) != len(layers):
        raise TrainingSetupError(f"[train] balance = {list(balance)} covers {sum(balance)} layers "
                                 f"but the model has {len(layers)}")


def stage_input(trainer: "Trainer", x_np: np.ndarray) -> torch.Tensor:
    """Stage 0's input tensor: the batch as the model's first layer takes it (a model whose
    ``forward`` reshapes its input, e.g. inserting a channel axis, says how in
    ``pipeline_input(x)``)."""
    x = trainer._tensor(x_np)
    adapt = getattr(trainer.module, "pipeline_input", None)
    return adapt(x) if callable(adapt) else x


def _auto_balance(trainer: "Trainer") -> list[int]:
    """Rank 0 profiles the layers on a training batch and splits them; every rank gets its
    choice, or its error (one bounded allgather, so a failure on rank 0 stops every rank)."""
    from .trainer import TrainingSetupError

    chosen, error = None, None
    if trainer.rank == 0:
        try:
            n = min(trainer.config.train.batch_size, trainer.data.size("train"))
            x_np, _ = trainer.data.batch("train", 0, np.arange(n))
            times, memory = _profile_layers(pipeline_layers(trainer.module), stage_input(trainer, x_np))
            total_t, total_m = sum(times) or 1.0, sum(memory) or 1
            costs = [t / total_t + m / total_m for t, m in zip(times, memory)]
            chosen = partition_balanced(costs, trainer.layout.stages)
        except (RuntimeError, ValueError, TypeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    chosen, error = allgather_objects((chosen, error), name="pipeline balance (rank 0's)")[0]
    if error is not None:
        raise TrainingSetupError(f'[train] balance = "auto": profiling the layers on rank 0 failed '
                                 f"({error}); give the layers per stage as a list\nno training "
                                 "step was run")
    return chosen


def build(trainer: "Trainer", saved: dict | None) -> Any:
    """The :class:`Pipeline` of this rank (collective over the world): the balance from the
    checkpoint being resumed, the config's list, or rank 0's measurement."""
    from ..parallel import Grid, Pipeline

    train = trainer.config.train
    if saved is not None:
        balance, how = list(saved["balance"]), "from the checkpoint"
    elif isinstance(train.balance, str):
        balance = _auto_balance(trainer)
        how = "auto, measured on rank 0"
    else:
        balance, how = list(train.balance), "[train] balance"
    grid = Grid(trainer.layout.stages)
    trainer.grid = grid

    def loss_fn(output, target):
        return trainer._loss(output, target, target)[0]

    pipe = Pipeline(trainer.module, balance=balance, micro_batches=train.micro_batches,
                    schedule=train.schedule, loss_fn=loss_fn, comm=grid.pipeline_comm,
                    data_group=grid.data_group, ddp_options={"algorithm": train.allreduce})
    trainer.balance_from = how
    # The width of the targets, for the zero statistics of the stages that compute none.
    x_np, y_np = trainer.data.batch("train", 0, np.arange(1))
    target = x_np if trainer.data.autoencoder else y_np
    trainer.pipeline_outputs = int(np.prod(np.asarray(target).shape[1:])) or 1
    trainer.layout_text = _describe_layout(trainer, pipe)
    return pipe


def _describe_layout(trainer: "Trainer", pipe) -> str:
    """The run header's layout paragraph: which ranks hold which layers, parameters and weight
    memory per rank (gathered from every rank)."""
    layout = trainer.layout
    params = sum(p.numel() for p in pipe.stage_module.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in pipe.stage_module.parameters())
    names = [type(layer).__name__ for layer in pipe.stage_module]
    rows = allgather_objects((layout.stage, pipe.layer_range, params, weight_bytes, names),
                             name="pipeline layout")
    train = trainer.config.train
    lines = [f"  {layout.parallel}: {layout.data_parallel} pipeline(s) x {layout.stages} stage(s), "
             f"{train.micro_batches} micro-batch(es) of the batch of {train.batch_size} per "
             f"pipeline, schedule {train.schedule}, balance {list(pipe.balance)} "
             f"({trainer.balance_from})"]
    for stage in range(layout.stages):
        _, (first, end), count, nbytes, kinds = rows[stage]
        shown = ", ".join(kinds) if len(kinds) <= 6 else ", ".join(kinds[:5]) + ", ..."
        lines.append(f"    stage {stage} on rank(s) {layout.ranks_of_stage(stage)}: layers "
                     f"{first}..{end - 1} ({shown}), {count:,} parameters, "
                     f"{_size(nbytes)} of weights per rank")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    """Bytes in the unit that shows them best (B, KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


# ---------------------------------------------------------------------------------- steps
def train_step(trainer: "Trainer", epoch: int, step_in_epoch: int, stop_flags: tuple[float, float]):
    """One pipelined optimizer step; returns what ``Trainer._train_step`` returns."""
    from .trainer import _lr_at

    pipe = trainer.pipe
    first, last = pipe.stage == 0, pipe.stage == pipe.stages - 1
    t0 = time.perf_counter()
    read, indices, _ = trainer._batch_for(epoch, step_in_epoch)
    x = y = None
    if first or last:
        x_np, y_np = trainer.data.batch("train", epoch, read)
        if first:
            x = stage_input(trainer, x_np)
        if last:
            y = trainer._tensor(x_np) if trainer.data.autoencoder else trainer._target(y_np)
    t1 = time.perf_counter()
    lr = _lr_at(trainer.config, trainer.step, epoch, trainer.total_steps)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    trainer.optimizer.zero_grad(set_to_none=False)  # DDP's buckets keep .grad as views
    with trainer.policy.autocast():
        loss = pipe.step(x, y)
    t2 = time.perf_counter()
    trainer.optimizer.step()
    t3 = time.perf_counter()
    local_loss = float(loss)
    counted = len(indices) if last else 0
    summed = collectives.allreduce(torch.tensor([local_loss * counted, counted, *stop_flags],
                                                dtype=torch.float64),
                                   op="sum", name="step statistics", algorithm="auto")
    t4 = time.perf_counter()
    stats = pipe.stats
    timings = {"data_s": t1 - t0, "pipeline_s": t2 - t1, "compute_s": stats.compute_s,
               "idle_fraction": stats.idle_fraction, "comm_wait_s": t4 - t3, "optimizer_s": t3 - t2}
    if trainer.timeline.enabled:
        step = trainer.step
        trainer.timeline.add("data", t0, t1, step=step)
        for kind, micro, start, end in stats.events:
            trainer.timeline.add(f"{'forward' if kind == 'F' else 'backward'} mb {micro}", start, end,
                                 step=step)
        trainer.timeline.add("optimizer", t2, t3, step=step)
        trainer.timeline.add("agree (loss, stop)", t3, t4, tid=1, step=step)
    global_loss = float(summed[0] / summed[1])
    return global_loss, local_loss, int(summed[1]), summed[2] > 0, summed[3] > 0, lr, timings


def evaluate(trainer: "Trainer", split: str) -> dict | None:
    """Loss and regression metrics on ``split`` through the pipeline, the same on every rank."""
    n = trainer.data.size(split)
    if n == 0:
        return None
    pipe, layout = trainer.pipe, trainer.layout
    first, last = pipe.stage == 0, pipe.stage == pipe.stages - 1
    mine = np.arange(layout.replica, n, layout.data_parallel)
    chunk = max(1, trainer.config.train.batch_size * 4)
    stats = RegressionStats(trainer.pipeline_outputs)
    loss_sum = 0.0
    pipe.stage_module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(mine), chunk):
                indices = mine[start:start + chunk]
                x_np = y_np = None
                if first or last:
                    x_np, y_np = trainer.data.batch(split, 0, indices)
                with trainer.policy.autocast():
                    out = pipe.predict(stage_input(trainer, x_np) if first else None)
                if last:
                    target = trainer._tensor(x_np if trainer.data.autoencoder else y_np)
                    loss, pred = trainer._loss(out, target, target)
                    stats.update(pred.double().reshape(len(indices), -1).numpy(),
                                 target.double().reshape(len(indices), -1).numpy())
                    loss_sum += float(loss) * len(indices)
    finally:
        pipe.stage_module.train()
    vector = torch.cat([torch.tensor([loss_sum], dtype=torch.float64), stats.as_tensor()])
    vector = collectives.allreduce(vector, op="sum", name=f"{split} metrics", algorithm="auto")
    total = RegressionStats.from_tensor(vector[1:], stats.n_outputs)
    report = total.compute(trainer.data.roi_labels)
    report["loss"] = float(vector[0]) / total.count
    return report


# ---------------------------------------------------------------------------------- checkpoints
def _layout_state(trainer: "Trainer") -> dict:
    pipe, layout = trainer.pipe, trainer.layout
    return {"parallel": layout.parallel, "stages": layout.stages, "stage": pipe.stage,
            "balance": [int(b) for b in pipe.balance], "layer_range": list(pipe.layer_range),
            "world": trainer.size, "data_parallel": layout.data_parallel}


def save_checkpoint(trainer: "Trainer", reason: str) -> Path | None:
    """Every rank of replica 0 writes its stage's shard (collective; refuses non-finite weights);
    older steps' shards go once all of this step's are written. Returns this rank's shard (None
    on the other replicas)."""
    from .trainer import TrainingDiverged, _plain

    pipe, layout = trainer.pipe, trainer.layout
    rng_states = allgather_objects(ckpt.rng_state(), name=f"RNG states for the checkpoint ({reason})",
                                   timeout_s=context.current().timeout_s)
    writer = layout.replica == 0
    path = shard_path(trainer.checkpoint_file, pipe.stage, layout.stages, trainer.step)

    def write():
        if not writer:
            return None
        bad = ckpt.nonfinite_weights(pipe.stage_module)
        if bad:
            raise TrainingDiverged(f"stage {pipe.stage} weights {bad[:3]} contain NaN/Inf at step "
                                   f"{trainer.step}; not writing {path.name}")
        state = {
            "model": ckpt.model_entry(pipe.stage_module),
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": {"kind": "none"},
            "layout": _layout_state(trainer),
            "sampler": trainer._sampler_state(),
            "rng": {r: s for r, s in enumerate(rng_states)},
            "progress": trainer._progress_state(),
            "history": trainer.history,
            "step_losses": torch.tensor(trainer.step_losses, dtype=torch.float64),
        }
        metadata = {"step": trainer.step, "reason": reason, "precision": trainer.policy.precision,
                    "model": trainer.config.model.name, "config": config_to_dict(trainer.config),
                    "model_kwargs": _plain(trainer.model_kwargs), "pipeline": _layout_state(trainer),
                    "time": time.time(), "host": socket.gethostname()}
        return ckpt.save_checkpoint(path, state, metadata, keep_previous=False)

    written = trainer._together(f"writing the checkpoint shards ({reason})", write,
                                wait_s=context.current().timeout_s)
    if writer:  # every shard of this step is whole (the ranks agreed): the older ones go
        base = trainer.checkpoint_file
        for (stages, step), present in find_shards(base).items():
            if pipe.stage in present and (stages, step) != (layout.stages, trainer.step):
                shard_path(base, pipe.stage, stages, step).unlink(missing_ok=True)
    return written


def read_checkpoint(trainer: "Trainer") -> dict | None:
    """This stage's shard of the newest complete checkpoint, checked against this run's layout,
    batch, data, seed and precision; None when there is none."""
    base, layout, train = trainer.checkpoint_file, trainer.layout, trainer.config.train
    sets = find_shards(base)
    if not sets:
        if base.exists():
            raise ckpt.CheckpointMismatch(
                f"{base} was written by a data-parallel run ([train] parallel = \"data\"); this "
                f'run is parallel = "{layout.parallel}" and resumes from per-stage shards; resume '
                "with parallel = \"data\" or move the checkpoint away to start fresh")
        return None
    complete = sorted(((step, stages) for (stages, step), present in sets.items()
                       if present == set(range(stages))), reverse=True)
    if not complete:
        listed = ", ".join(f"step {step}: stages {sorted(p)} of {stages}"
                           for (stages, step), p in sorted(sets.items()))
        raise ckpt.CheckpointMismatch(f"{base.parent} holds no complete set of pipeline checkpoint "
                                      f"shards ({listed}); move them away to start fresh")
    step, stages = complete[0]
    if stages != layout.stages:
        raise ckpt.CheckpointMismatch(
            f"{base.name}.stage*-of-{stages}.step{step} in {base.parent} was written by a pipeline of "
            f"{stages} stages; this run has {layout.stages} ([train] pipeline_stages / the number of "
            f"ranks); resume with {stages} stages per pipeline, or move the shards away to start fresh")
    path = shard_path(base, layout.stage, stages, step)
    tree, metadata = ckpt.load_checkpoint(path)
    saved = tree.get("layout", {})
    if not isinstance(train.balance, str) and list(train.balance) != list(saved.get("balance", [])):
        raise ckpt.CheckpointMismatch(
            f"{path} was written with balance {saved.get('balance')}, this run has [train] balance = "
            f"{list(train.balance)}; resume with the same balance (or balance = \"auto\", which keeps "
            "the checkpoint's), or move the shards away to start fresh")
    if saved.get("data_parallel") != layout.data_parallel or saved.get("world") != trainer.size:
        raise ckpt.CheckpointMismatch(
            f"{path} was written by {saved.get('data_parallel')} pipeline(s) on {saved.get('world')} "
            f"rank(s), this run has {layout.data_parallel} on {trainer.size}; a pipelined run resumes "
            "on the same layout")
    sampler = tree.get("sampler", {})
    ours = {"batch_size": trainer.sampler.batch_size, "seed": trainer.sampler.seed,
            "n_samples": trainer.sampler.global_length,
            "steps_per_epoch": trainer.sampler.steps_per_epoch}
    for key, value in ours.items():
        if sampler.get(key) != value:
            raise ckpt.CheckpointMismatch(f"{path} was written by a run with {key} = "
                                          f"{sampler.get(key)}, this run has {value}; resume with "
                                          "the same batch size, data and seed")
    if metadata.get("precision") != trainer.policy.precision:
        raise ckpt.CheckpointMismatch(
            f"{path} was written in precision {metadata.get('precision')!r}, this run uses "
            f"{trainer.policy.precision!r}; resume with the same precision")
    return {"tree": tree, "metadata": metadata, "balance": saved["balance"], "path": path}


def check_resumed_model(trainer: "Trainer", saved: dict) -> None:
    """The shard's weights fit this rank's stage exactly (names and shapes)."""
    ckpt.check_model_matches(saved["tree"], trainer.pipe.stage_module, saved["path"])

