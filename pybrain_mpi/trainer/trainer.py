"""The training loop behind ``pybrain-mpi train``.

One :class:`Trainer` per rank, built from a validated :class:`~pybrain_mpi.config.Config`:

1. **Set-up, checked together.** Output and checkpoint directories are probed for writing,
   the data is loaded and checked (missing files, NaN, shapes against the model), the
   checkpoint to resume from is checked against the model. Each phase ends with every rank
   learning whether any rank failed (an allgather of error messages), so all ranks stop with
   the same clear message before a single step is run, instead of some waiting forever.
2. **Steps.** Each rank takes its shard of a seeded per-epoch permutation
   (:class:`~pybrain_mpi.data.ShuffledSampler`); gradients are averaged by
   :class:`~pybrain_mpi.DistributedDataParallel` while backward runs. After the optimizer
   step one tiny float64 allreduce(sum) carries ``[loss * batch, batch, stop requested,
   time budget spent]``: the global loss for the log and the progress bar, and the stop
   decision, so every rank stops after the same step (preemption signals may reach one
   rank only; clocks differ).
3. **Epoch end.** Validation loss and metrics (summed statistics over ranks), early
   stopping with ``patience``.
4. **Checkpoints** every ``checkpoint_every`` steps, at the end and on preemption: rank 0
   writes model, optimizer, scaler and codec state, step/epoch, loss history and every rank's
   RNG state (gathered) atomically; a model with NaN/Inf weights is never written.
   ``--resume`` restores all of it, so the loss curve continues exactly (the sampler's state
   is the epoch and the steps done in it). On another number of ranks the rest of the
   interrupted epoch is re-dealt so no sample is skipped or used twice, RNG states are
   derived per rank and 3LC residuals folded (``_restore_schedule``, README "Resuming on
   another number of ranks").
5. **Finish.** Held-out metrics, a loss-curve PNG, ``summary.json`` and a printed summary.

``[train] parallel = "pipeline"`` / ``"hybrid"`` keeps this set-up and loop but splits the model
into stages over the ranks: steps, evaluation and checkpoints (per-stage shards) are
:mod:`.pipelined`'s. ``mode = "downpour"`` runs :mod:`.downpour`'s loop instead.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .. import compute, logs
from ..communication import collectives, context
from ..config import Config, config_to_dict
from ..engine import DistributedDataParallel
from ..errors import PbmError
from ..metrics import RegressionStats
from ..optim import LossScaler
from ..models import DCA, build_model, dca_loss, model_arguments, parameter_count
from .codecs import build_codec
from ..data.errors import DataError
from ..communication.objects import allgather_objects, gather_objects
from ..data.samplers import ShuffledSampler
from ..data.samplers.shuffled import EpochRemainder, pack_mask, unpack_mask
from .data import TrainingData, build_data
from .signals import StopRequest, process_identity
from .timeline import TENSORBOARD_MISSING, StepLog, TensorBoardScalars, Timeline

__all__ = ["Trainer", "TrainingSetupError", "TrainingDiverged", "train", "checkpoint_path"]

CHECKPOINT_NAME = "checkpoint.pt"
log = logs.get_logger("trainer")


class TrainingSetupError(PbmError):
    """Training cannot start (bad data, directory, checkpoint, ...); raised on every rank."""


class TrainingDiverged(PbmError):
    """The loss became NaN or infinite; no checkpoint was written for that state."""


def checkpoint_path(config: Config) -> Path:
    """Where a run with ``config`` keeps its checkpoint."""
    directory = config.train.checkpoint_dir or (config.output.dir / "checkpoints")
    return Path(directory) / CHECKPOINT_NAME


def _probe_writable(directory: Path, what: str, rank: int) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".pbm-write-test.{rank}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingSetupError(f"{what} {directory} is not writable ({exc.strerror or exc}); "
                                 f"choose another directory") from None


def _lr_at(config: Config, step: int, epoch: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    train, schedule = config.train, config.train.lr_schedule
    lr = train.lr
    if schedule.kind == "cosine":
        progress = min(1.0, step / max(1, total_steps))
        lr = schedule.min_lr + (train.lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule.kind == "step":
        lr = train.lr * schedule.gamma ** (epoch // schedule.step_epochs)
    if step < schedule.warmup_steps:
        lr *= (step + 1) / schedule.warmup_steps
    return lr


def _build_optimizer(config: Config, params, kind: str | None = None) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (default ``[train] optimizer``) over ``params`` with ``[train] lr``,
    ``weight_decay`` and (SGD) ``momentum``; downpour's servers build ``[train]
    server_optimizer`` with it, so one worker on one server steps exactly like ``mode = "sync"``
    on one rank."""
    train = config.train
    kind = train.optimizer if kind is None else kind
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
             "adagrad": torch.optim.Adagrad}
    kwargs: dict[str, Any] = {"lr": train.lr, "weight_decay": train.weight_decay}
    if kind == "sgd":
        kwargs["momentum"] = train.momentum
    params = list(params)
    # fused kernels run at memory bandwidth on CPU (docs/measurements.md); fall back where unsupported.
    try:
        return kinds[kind](params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return kinds[kind](params, **kwargs)


def _apply_activation_checkpointing(model: torch.nn.Module) -> str:
    """Recompute activations in backward instead of storing them; returns what was wrapped.

    Sequential stacks of blocks use ``checkpoint_sequential`` with about sqrt(n) segments; the
    DCA checkpoints its encoder and decoder halves. Patching ``forward`` of submodules keeps
    the state-dict names (checkpoints stay interchangeable with runs without it). Caveat:
    batch-norm layers inside a checkpointed segment update their running statistics twice
    per step (forward and recomputation), as with PyTorch's checkpoint utilities.
    """
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential

    if isinstance(model, DCA):
        encode, decode = model.encode, model.decode
        model.encode = lambda x: checkpoint(encode, x, use_reentrant=False)
        model.decode = lambda h, switches=None: checkpoint(decode, h, switches, use_reentrant=False)
        return "DCA encoder and decoder"
    wrapped = []
    for name, child in model.named_children():
        # Only stacks of blocks: a segment boundary between leaf layers may feed an in-place
        # activation, which corrupts the stored boundary tensor.
        if (isinstance(child, torch.nn.Sequential) and len(child) >= 2
                and all(len(list(block.children())) > 0 for block in child)):
            segments = max(1, round(math.sqrt(len(child))))

            def forward(x, _seq=child, _segments=segments):
                return checkpoint_sequential(_seq, _segments, x, use_reentrant=False)

            child.forward = forward
            wrapped.append(f"{name} ({len(child)} blocks, {segments} segments)")
    if not wrapped:
        raise TrainingSetupError(f"[train] activation_checkpointing = \"sqrt\": model "
                                 f"{type(model).__name__} has no sequential block stack to "
                                 "checkpoint; set it to \"none\"")
    return ", ".join(wrapped)


class Trainer:
    """Trains ``config``'s model on its data across all ranks (see the module docstring).

    Args:
        config: validated run configuration.
        resume: continue from the run's checkpoint when one exists (else start fresh).
        timeline_path: write a merged Chrome trace of all ranks there (rank 0).
        max_steps: stop after this many optimizer steps in total (counting resumed ones).
        progress: show the tqdm bar on rank 0.
        echo: print messages and the summary (rank 0).
    """

    def __init__(self, config: Config, resume: bool = False, timeline_path: str | Path | None = None,
                 max_steps: int | None = None, progress: bool = True, echo: bool = True):
        if not context.is_initialized():
            context.init()
        self.config = config
        self.rank, self.size = context.rank(), context.size()
        self.comm = context.comm()
        self.echo = echo and self.rank == 0
        self.progress = progress
        self.max_steps = max_steps
        self.resume_requested = resume
        self.timeline_path = Path(timeline_path) if timeline_path else None
        self.output_dir = Path(config.output.dir)
        self.checkpoint_file = checkpoint_path(config)
        self.started_at = time.perf_counter()
        # A preemption signal during set-up (loading data can take a while) must not kill the
        # rank: it is recorded now and honoured at the first step boundary.
        self.stop_request = StopRequest(self.rank).__enter__()
        try:
            # Every rank's process, so MPICH's SIGUSR1 about a dead rank is not read as a
            # preemption request (signals.py).
            self.stop_request.watch_peers(allgather_objects(
                process_identity(), name="process identities", timeout_s=self._setup_wait_s()))
            self._set_up(resume, max_steps)
        except BaseException:
            self.stop_request.__exit__(None, None, None)
            raise

    def _set_up(self, resume: bool, max_steps: int | None) -> None:
        config = self.config
        self._set_threads()

        train = config.train
        # The device and number format are resolved once the model exists (they depend on it);
        # until then the model is built and checked in float32 (fp64 runs: float64).
        self.dtype = torch.float64 if train.precision == "fp64" else torch.float32
        self.policy = compute.ComputePolicy("cpu", "fp64" if train.precision == "fp64" else "fp32",
                                            "contiguous")
        # Phase 1: everything that can be refused without reading data.
        self.codec = self._together("checking the configuration",
                                    lambda: build_codec(train.compression.kind, train.compression.sparsity,
                                                        train.compression.block))
        # Pipelined runs (pipelined.py): which stage of which replica this rank is; the
        # sampler deals each epoch over the replicas.
        self.pipe = None
        self.layout = None
        self.layout_text = ""
        if train.parallel != "data":
            from . import pipelined

            self.layout = self._together("laying out the pipeline",
                                         lambda: pipelined.plan(config, self.size, self.rank))
        replica, replicas = ((self.rank, self.size) if self.layout is None
                             else (self.layout.replica, self.layout.data_parallel))
        self._together("checking the output directories", self._check_directories)
        if train.mode == "downpour":
            from .downpour import check_layout

            self._together("checking the configuration", lambda: check_layout(config, self.size))
        # Phase 2: data, then the model against it.
        self.data: TrainingData = self._together(
            "loading the data", lambda: build_data(config.data, train.val_fraction, self.rank,
                                                   self._from_rank0, seed=train.seed,
                                                   world_size=self.size))
        self.module = self._together("building the model", self._build_model)
        self.policy = self._together("choosing device and precision", lambda: compute.resolve(
            self.module, train.device, train.precision, train.memory_format))
        self.module = self.policy.prepare(self.module)
        self.scaler = LossScaler() if self.policy.needs_loss_scaling else None
        self.sampler = self._together("sharding the data", lambda: ShuffledSampler(
            self.data.size("train"), train.batch_size, seed=train.seed, rank=replica,
            world_size=replicas))
        if self.layout is not None:
            self._together("checking the model for a pipeline", lambda: pipelined.check_supported(self))
        # Epoch schedule: ordinary epochs of this world start at global step epoch_anchor[0]
        # with epoch epoch_anchor[1]; a resume on another world size first runs the rest of
        # the interrupted epoch (self.remainder, from global step remainder_start).
        self.remainder: EpochRemainder | None = None
        self.remainder_start = 0
        self.remainder_epoch_began = 0
        self.epoch_anchor = (0, 0)
        self.total_steps = train.epochs * self.sampler.steps_per_epoch
        # Phase 3: the checkpoint to resume from, checked against this model and run.
        self.resumed_from: dict | None = None
        saved = self._together("reading the checkpoint", self._read_checkpoint) if resume else None
        if resume and saved is None:
            self._say(f"no checkpoint at {self.checkpoint_file}: starting fresh")

        self.checkpointing = (self._apply_checkpointing() if train.activation_checkpointing == "sqrt"
                              else "none")
        if self.layout is not None:
            # Each rank keeps its stage's layers; a hybrid run's stages average among replicas.
            self.pipe = pipelined.build(self, saved)
            if saved is not None:
                self._together("checking the checkpoint against the stage",
                               lambda: pipelined.check_resumed_model(self, saved))
            self.model = self.pipe
            self.optimizer = _build_optimizer(config, self.pipe.parameters())
        else:
            # Downpour exchanges gradients with parameter servers (downpour.py): no allreduce hooks.
            self.model = (self.module if train.mode == "downpour" else
                          DistributedDataParallel(self.module, compression=self.codec,
                                                  algorithm=train.allreduce))
            self.optimizer = _build_optimizer(config, self.module.parameters())

        # Training state (all of it is in the checkpoint).
        self.step = 0
        self.history: list[dict] = []
        self.step_losses: list[float] = []
        self.best_val = math.inf
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.bytes_before = 0
        self.finished: str | None = None
        if saved is not None:
            self._restore(saved)

        self.log = StepLog(self.output_dir / "logs", self.rank)
        self.timeline = Timeline(self.rank, self.timeline_path is not None)
        self.tensorboard = (self._together("opening TensorBoard", self._open_tensorboard)
                            if config.output.tensorboard else None)

    def _open_tensorboard(self) -> TensorBoardScalars | None:
        """Rank 0's TensorBoard writer (the other ranks write none); a missing package is
        refused on every rank, in one line naming the extra to install."""
        from importlib.util import find_spec

        if find_spec("tensorboard") is None:
            raise TrainingSetupError(TENSORBOARD_MISSING)
        return TensorBoardScalars(self.output_dir / "tensorboard") if self.rank == 0 else None

    # ------------------------------------------------------------------ set-up helpers
    def _say(self, message: str) -> None:
        """An INFO message (rank 0 prints it by default; see :mod:`pybrain_mpi.logs`)."""
        if self.echo:
            log.info(message)
        else:
            log.debug(message)

    def _set_threads(self) -> None:
        # OMP_NUM_THREADS, else Slurm's CPUs per task, else the node's cores over its ranks:
        # ranks sharing cores with several threads each are slower and erratic
        # (docs/measurements.md).
        self.threads, self.threads_from = compute.threads_per_rank(context.local_size())
        torch.set_num_threads(self.threads)

    def _together(self, what: str, action: Callable[[], Any], wait_s: float | None = None) -> Any:
        """Run ``action`` on every rank; if it fails anywhere, raise the same error everywhere.

        The wait for the other ranks is bounded by ``wait_s`` (default: the set-up wait)."""
        error = None
        result = None
        try:
            result = action()
        except (PbmError, ValueError, TypeError, OSError, KeyError, RuntimeError) as exc:
            error = str(exc) or type(exc).__name__
        errors = allgather_objects(error, name=f"agreeing on {what}",
                                   timeout_s=self._setup_wait_s() if wait_s is None else wait_s)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            messages = sorted({e for _, e in failed})
            if len(messages) == 1:
                where = ("on every rank" if len(failed) == self.size
                         else f"on rank{'s' if len(failed) > 1 else ''} "
                              f"{', '.join(str(r) for r, _ in failed)}")
                text = f"{what} failed {where}: {messages[0]}"
            else:
                text = f"{what} failed:\n" + "\n".join(f"  rank {r}: {e}" for r, e in failed)
            raise TrainingSetupError(f"{text}\nno training step was run")
        return result

    def _setup_wait_s(self) -> float:
        """Bound on the wait for the other ranks at the end of a set-up phase (one rank may
        still be converting data): ``PBM_TIMEOUT_S`` or the cache wait, whichever is longer."""
        from .data import _cache_wait_s

        return max(context.current().timeout_s, _cache_wait_s())

    def _from_rank0(self, value: Any, timeout_s: float) -> Any:
        """Rank 0's ``value`` on every rank; the wait is bounded by ``timeout_s``."""
        return allgather_objects(value, name="rank 0's data preparation", timeout_s=timeout_s)[0]

    def _check_directories(self) -> None:
        _probe_writable(self.output_dir, "[output] dir", self.rank)
        _probe_writable(self.output_dir / "logs", "log directory", self.rank)
        if self.rank == 0 or self.config.train.parallel != "data":  # pipelines: every stage writes
            _probe_writable(self.checkpoint_file.parent, "checkpoint directory", self.rank)
        if self.rank == 0:
            # A run killed while writing (SIGKILL, node failure) left a temporary file; the
            # checkpoint itself is whole (written by rename), the temporary is garbage.
            for leftover in ckpt.remove_stale_temporaries(self.checkpoint_file):
                self._say(f"removed {leftover.name}, a checkpoint write interrupted by a kill")
        if self.timeline_path is not None and self.rank == 0:
            _probe_writable(self.timeline_path.resolve().parent, "--timeline directory", self.rank)

    def _model_kwargs(self) -> dict:
        """The config's model arguments plus the sizes the data determines (``input_length``,
        ``in_channels``, ``out_channels``, ...) for arguments the model takes and the config
        leaves out."""
        name, given = self.config.model.name, dict(self.config.model.kwargs)
        accepted = model_arguments(name)
        filled = {k: (tuple(v) if isinstance(v, list) else v)
                  for k, v in getattr(self.data, "model_defaults", {}).items()
                  if k in accepted and k not in given}
        self.model_defaults_used = filled
        return {**filled, **given}

    def _build_model(self) -> torch.nn.Module:
        config = self.config
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.model_kwargs = self._model_kwargs()
        try:
            model = build_model(config.model.name, **self.model_kwargs)
        except (TypeError, ValueError) as exc:
            raise DataError(f"[model] {config.model.name} with {self.model_kwargs}: {exc}") from None
        self._check_shapes(model.to(self.dtype))
        return model

    def _check_shapes(self, model: torch.nn.Module) -> None:
        """The model against the data, before any step: known size attributes first, then a
        dry forward pass on two real training samples whose output must have the shape the
        task needs; every message names the model's and the data's shapes."""
        data_shape = tuple(self.data.input_shape)
        name = self.config.model.name
        if isinstance(model, DCA) and data_shape != (model.input_length,):
            raise DataError(f"the data's series have {data_shape[0]} time points but [model] "
                            f"input_length = {model.input_length} ({self.config.source}); set "
                            f"input_length = {data_shape[0]}")
        in_features = getattr(model, "in_features", None)
        if in_features is not None and data_shape != (in_features,):
            raise DataError(f"the data has {int(np.prod(data_shape))} features per sample but "
                            f"[model] in_features = {in_features}; set in_features = "
                            f"{int(np.prod(data_shape))}")
        expected = getattr(model, "input_shape", None)
        spatial = data_shape[1:] if self.data.task != "autoencoder" and len(data_shape) == 4 \
            else data_shape
        if expected is not None and tuple(expected) not in (data_shape, spatial):
            raise DataError(f"the data's patches are {list(spatial)} but model '{name}' takes "
                            f"input_shape = {list(expected)}; make [model] input_shape equal "
                            "[data] patch_size (or leave it out: it is taken from the data)")
        channels = getattr(model, "in_channels", None)
        if isinstance(channels, int) and len(data_shape) == 4 and channels != data_shape[0]:
            raise DataError(f"the data has {data_shape[0]} image channel(s) per sample "
                            f"({list(data_shape)}) but model '{name}' takes in_channels = "
                            f"{channels}; set in_channels = {data_shape[0]} (or leave it out)")
        # A dry forward pass on two real samples catches whatever the checks above cannot.
        x, y = self.data.batch("train", 0, np.arange(min(2, self.data.size("train"))))
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.from_numpy(np.ascontiguousarray(x)).to(self.dtype))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise DataError(f"model '{name}' cannot take the data's samples of shape "
                            f"{list(x.shape[1:])}: {exc}") from None
        finally:
            model.train()
        pred = out[0] if isinstance(out, tuple) else out
        if not isinstance(pred, torch.Tensor):
            raise DataError(f"model '{name}' returns {type(pred).__name__}, not a tensor")
        if self.data.task == "segmentation":
            classes = self.data.num_classes
            want = (len(x), classes) + tuple(y.shape[1:])
            if tuple(pred.shape) != want:
                raise DataError(f"model '{name}' outputs {list(pred.shape[1:])} per sample but "
                                f"segmentation of the data's {classes} classes (labels "
                                f"{self.data.labels}) on patches {list(y.shape[1:])} needs "
                                f"{list(want[1:])} (logits per class and voxel); set the model's "
                                f"number of output channels to {classes}")
        elif self.data.task == "autoencoder":
            if tuple(pred.shape[1:]) != tuple(x.shape[1:]) and \
                    tuple(pred.reshape(len(x), -1).shape) != tuple(x.reshape(len(x), -1).shape):
                raise DataError(f"model '{name}' reconstructs {list(pred.shape[1:])} per sample "
                                f"but the data's series are {list(x.shape[1:])}")
        elif tuple(pred.shape) != tuple(y.shape):
            raise DataError(f"model '{name}' predicts shape {list(pred.shape[1:])} per sample but "
                            f"the target has {list(y.shape[1:])}; set the model's output size"
                            + (" (out_features)" if "out_features" in model_arguments(name) else ""))

    def _apply_checkpointing(self) -> str:
        wrapped = self._together("enabling activation checkpointing",
                                 lambda: _apply_activation_checkpointing(self.module))
        self._say(f"activation checkpointing: {wrapped}")
        return wrapped

    def _read_checkpoint(self) -> dict | None:
        if self.layout is not None:
            from .pipelined import read_checkpoint

            return read_checkpoint(self)
        path = self.checkpoint_file
        if not path.exists():
            from .pipelined import find_shards

            if find_shards(path):
                raise ckpt.CheckpointMismatch(
                    f"{path.parent} holds per-stage checkpoint shards of a pipelined run "
                    f"({path.name}.stage*-of-*.step*); resume with the same [train] parallel, or "
                    "move them away to start fresh")
            return None
        tree, metadata = ckpt.load_checkpoint(path)
        ckpt.check_model_matches(tree, self.module, path)
        sampler = tree.get("sampler", {})
        ours = {"batch_size": self.sampler.batch_size, "seed": self.sampler.seed}
        if "n_samples" in sampler:
            ours["n_samples"] = self.sampler.global_length
        if sampler.get("ranks") == self.size or "n_samples" not in sampler:
            # Same world (or a checkpoint too old to say its data size): the same shards.
            ours.update(ranks=self.size, steps_per_epoch=self.sampler.steps_per_epoch)
        for key, value in ours.items():
            if sampler.get(key) != value:
                raise ckpt.CheckpointMismatch(
                    f"{path} was written by a run with {key} = {sampler.get(key)}, this run has "
                    f"{value}; resume with the same batch size, data and seed (and, for a "
                    "checkpoint written before resuming on another world size was possible, the "
                    "same ranks), or move the checkpoint away to start fresh")
        if metadata.get("precision") != self.policy.precision:
            raise ckpt.CheckpointMismatch(
                f"{path} was written in precision {metadata.get('precision')!r}, this run uses "
                f"{self.policy.precision!r} ([train] precision = "
                f"{self.config.train.precision!r}); resume with the same precision")
        return {"tree": tree, "metadata": metadata}

    def _restore(self, saved: dict) -> None:
        tree = saved["tree"]
        (self.module if self.pipe is None else self.pipe.stage_module).load_state_dict(tree["model"]["state"])
        self.optimizer.load_state_dict(tree["optimizer"])
        if self.scaler is not None and tree.get("scaler", {}).get("kind") != "none":
            self.scaler.load_state_dict(tree["scaler"])
        progress = tree["progress"]
        self.step = int(progress["step"])
        self.best_val = float(progress["best_val"])
        self.bad_epochs = int(progress["bad_epochs"])
        self.train_seconds = float(progress["train_seconds"])
        self.samples_seen = int(progress["samples_seen"])
        self.bytes_before = int(progress["bytes_sent"])
        self.finished = progress["finished"] or None
        self.history = [dict(h) for h in tree["history"]]
        self.step_losses = tree["step_losses"].tolist()
        sampler = tree["sampler"]
        old_ranks = int(sampler["ranks"])
        self._restore_schedule(sampler)
        if old_ranks == self.size:
            ckpt.set_rng_state(tree["rng"][self.rank])
            if self.pipe is None:
                self.model.load_compression_state_dict(tree.get("compression", {}).get(self.rank, {}))
        else:
            # Another world: no saved generator belongs to this rank, so each rank's is derived
            # from (seed, step, rank, world); the old ranks' 3LC residuals are folded into one
            # state every new rank carries (DistributedDataParallel.fold_compression_states).
            ckpt.derive_rng_state(self.config.train.seed, self.step, self.rank, self.size)
            states = tree.get("compression", {})
            folded, zeroed = DistributedDataParallel.fold_compression_states(
                [states.get(r, {}) for r in range(old_ranks)])
            if folded:
                self.model.load_compression_state_dict(folded)
            if zeroed:
                self._say(f"3LC residuals laid out by the old run's node placement start from zero: "
                          f"{', '.join(zeroed[:4])}{' ...' if len(zeroed) > 4 else ''}")
        self.resumed_from = saved["metadata"]
        epoch = self._position(self.step)[0]
        where = (f"; the rest of epoch {epoch} ({self.remainder.steps} steps, "
                 f"{len(self.remainder.pool)} samples) is dealt over {self.size} ranks"
                 if self._in_remainder(self.step) else "")
        self._say(f"resumed from {saved.get('path', self.checkpoint_file)} at step {self.step} "
                  f"(epoch {epoch}), written by {old_ranks} rank(s){where}")

    def _restore_schedule(self, sampler: dict) -> None:
        """The epoch schedule from a checkpoint's sampler state (see ``ShuffledSampler``):
        the same world continues its epoch; another world deals the rest of the interrupted
        epoch over its ranks, then runs ordinary epochs."""
        epoch, done = int(sampler["epoch"]), int(sampler["step_in_epoch"])
        n = self.sampler.global_length
        used = None
        if "used" in sampler:  # written inside a remainder: its used samples, bit per sample
            used = unpack_mask(sampler["used"].numpy(), n)
        elif int(sampler["ranks"]) != self.size and done > 0:
            used = self.sampler.used_mask(epoch, done, world_size=int(sampler["ranks"]))
        if used is None:
            self.epoch_anchor = (self.step - done, epoch)
        else:
            self.remainder = self.sampler.remainder(epoch, used)
            self.remainder_start = self.step
            self.remainder_epoch_began = int(sampler.get("epoch_first_step", self.step - done))
            self.epoch_anchor = (self.step + self.remainder.steps, epoch + 1)
        anchor_step, anchor_epoch = self.epoch_anchor
        self.total_steps = anchor_step + max(0, self.config.train.epochs - anchor_epoch) * \
            self.sampler.steps_per_epoch

    def _in_remainder(self, step: int) -> bool:
        return (self.remainder is not None
                and self.remainder_start <= step < self.remainder_start + self.remainder.steps)

    def _position(self, step: int) -> tuple[int, int, int, int]:
        """``(epoch, step within the epoch's plan, steps of that plan, global step where the
        epoch began)`` of global step ``step``."""
        if self._in_remainder(step):
            return (self.remainder.epoch, step - self.remainder_start, self.remainder.steps,
                    self.remainder_epoch_began)
        spe = self.sampler.steps_per_epoch
        anchor_step, anchor_epoch = self.epoch_anchor
        epoch, in_epoch = divmod(step - anchor_step, spe)
        return anchor_epoch + epoch, in_epoch, spe, step - in_epoch

    def _batch_for(self, epoch: int, in_epoch: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``(indices to read, indices used, loss weight)`` of this rank's next batch. In an
        ordinary epoch every rank's batch has the same size (weight 1); in the rest of an
        epoch dealt over another world they may differ by one, and the weight (this rank's
        share of the step's samples times the world size) makes the averaged gradient the
        mean over the step's samples. A rank with no sample left (fewer than ranks remain)
        runs one stand-in sample with weight 0, so it still takes part in the allreduce."""
        if not self._in_remainder(self.step):
            indices = self.sampler.batch_indices(epoch, in_epoch)
            return indices, indices, 1.0
        rest = self.remainder
        indices = rest.batch(in_epoch)
        weight = len(indices) * self.size / rest.step_samples(in_epoch)
        if len(indices) == 0:
            return rest.pool[:1], indices, 0.0
        return indices, indices, weight

    # ------------------------------------------------------------------ one step
    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return self.policy.input(torch.from_numpy(np.ascontiguousarray(array)))

    def _target(self, array: np.ndarray) -> torch.Tensor:
        """Targets as the loss takes them: class indices (int64) for segmentation."""
        if self.data.task == "segmentation":
            return self.policy.input(torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)))
        return self._tensor(array)

    def _loss(self, output, x: torch.Tensor, y: torch.Tensor):
        """``(loss, prediction)``; DCA outputs ``(x_hat, (z, z'))``."""
        kind = self.config.train.loss
        if isinstance(output, tuple):
            x_hat, (z, z_prime) = output
            x_hat, z, z_prime = x_hat.to(x.dtype), z.to(x.dtype), z_prime.to(x.dtype)
            if kind in ("auto", "dca"):
                return dca_loss(x, x_hat, z, z_prime, lam=self.config.train.dca_lambda), x_hat
            target, pred = x, x_hat
        elif self.data.task == "segmentation":
            logits = output.float()
            loss = F.cross_entropy(logits, y)
            if kind in ("auto", "dice_ce"):
                loss = loss + _soft_dice_loss(logits, y)
            return loss, logits
        else:
            target, pred = (x if self.data.autoencoder else y), output.to(y.dtype)
        if kind == "smooth_l1":
            return F.smooth_l1_loss(pred, target), pred
        return F.mse_loss(pred, target), pred

    def _forward(self, model, x, y):
        with self.policy.autocast():
            output = model(x)
        return self._loss(output, x, y)

    def _train_step(self, epoch: int, step_in_epoch: int, stop_flags: tuple[float, float]):
        if self.pipe is not None:
            from .pipelined import train_step

            return train_step(self, epoch, step_in_epoch, stop_flags)
        t0 = time.perf_counter()
        read, indices, weight = self._batch_for(epoch, step_in_epoch)
        x_np, y_np = self.data.batch("train", epoch, read)
        x, y = self._tensor(x_np), self._target(y_np)
        t1 = time.perf_counter()
        lr = _lr_at(self.config, self.step, epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=False)  # keep .grad as views into DDP's buckets
        loss, _ = self._forward(self.model, x, y)
        t2 = time.perf_counter()
        weighted = loss if weight == 1.0 else loss * weight
        (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
        t3 = time.perf_counter()
        backward_done = min(max(self.model.backward_finished_at, t2), t3)
        if self.scaler is not None:  # fp16: every rank skips an overflowing step together
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        t4 = time.perf_counter()
        local_loss = float(loss.detach()) if len(indices) else 0.0
        summed = collectives.allreduce(torch.tensor([local_loss * len(indices), len(indices),
                                                     *stop_flags], dtype=torch.float64),
                                       op="sum", name="step statistics", algorithm="auto")
        t5 = time.perf_counter()
        timings = {"data_s": t1 - t0, "forward_s": t2 - t1, "backward_s": backward_done - t2,
                   "comm_wait_s": (t3 - backward_done) + (t5 - t4), "optimizer_s": t4 - t3}
        if self.timeline.enabled:
            step = self.step
            self.timeline.add("data", t0, t1, step=step)
            self.timeline.add("forward", t1, t2, step=step)
            self.timeline.add("backward", t2, backward_done, step=step)
            self.timeline.add("wait for gradients", backward_done, t3, step=step)
            self.timeline.add("optimizer", t3, t4, step=step)
            self.timeline.add("agree (loss, stop)", t4, t5, tid=1, step=step)
            self.timeline.add_buckets(self.model.timeline, step)
        global_loss = float(summed[0] / summed[1])
        return global_loss, local_loss, int(summed[1]), summed[2] > 0, summed[3] > 0, lr, timings

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> dict | None:
        """Loss and regression metrics on ``split`` (``"val"``/``"held_out"``), summed over ranks.

        Each rank evaluates every ``size``-th sample; the wrapped module is used directly, so
        ranks with different sample counts run no collective but the final sum.
        """
        if self.pipe is not None:
            from .pipelined import evaluate

            return evaluate(self, split)
        n = self.data.size(split)
        if n == 0:
            return None
        # Every rank evaluates with rank 0's buffers (the model the checkpoint holds): the last
        # training forward updated each rank's batch-norm statistics from its own batch.
        if getattr(self.model, "broadcast_buffers", False):
            self.model.sync_buffers()
        if hasattr(self.data, "evaluate"):
            self.module.eval()
            try:
                return self.data.evaluate(split, self._evaluation_step, self.rank, self.size,
                                          max(1, self.config.train.batch_size * 2))
            finally:
                self.module.train()
        mine = np.arange(self.rank, n, self.size)
        stats, loss_sum = self.evaluate_samples(split, mine)
        outputs = int(np.prod(self.data.input_shape)) if self.data.autoencoder else 1
        stats = stats or RegressionStats(outputs)
        vector = torch.cat([torch.tensor([loss_sum], dtype=torch.float64), stats.as_tensor()])
        vector = collectives.allreduce(vector, op="sum", name=f"{split} metrics", algorithm="auto")
        total = RegressionStats.from_tensor(vector[1:], stats.n_outputs)
        report = total.compute(self.data.roi_labels)
        report["loss"] = float(vector[0]) / total.count
        return report

    def evaluate_samples(self, split: str, indices: np.ndarray) -> tuple[RegressionStats | None, float]:
        """``(regression statistics or None when ``indices`` is empty, loss summed over the
        samples)`` of ``split``'s samples ``indices`` on this rank alone (no collective; the module
        is put in eval mode meanwhile). :meth:`evaluate` sums them over ranks; downpour's rank 0
        evaluates every sample with it."""
        stats = None
        loss_sum = 0.0
        batch = max(1, self.config.train.batch_size * 4)
        self.module.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(indices), batch):
                    chunk = indices[start:start + batch]
                    x_np, y_np = self.data.batch(split, 0, chunk)
                    x, y = self._tensor(x_np), self._tensor(y_np)
                    loss, pred = self._forward(self.module, x, y)
                    target = x if self.data.autoencoder else y
                    p = pred.double().reshape(len(chunk), -1).numpy()
                    t = target.double().reshape(len(chunk), -1).numpy()
                    if stats is None:
                        stats = RegressionStats(p.shape[1])
                    stats.update(p, t)
                    loss_sum += float(loss) * len(chunk)
        finally:
            self.module.train()
        return stats, loss_sum

    def _evaluation_step(self, x_np: np.ndarray, y_np: np.ndarray | None):
        """``(loss summed over the batch or None, model output as float32 numpy)`` for the
        data adapters' own evaluation (no gradients; the module is in eval mode)."""
        with torch.no_grad():
            x = self._tensor(x_np)
            if y_np is None:
                with self.policy.autocast():
                    out = self.module(x)
                return None, out.float().numpy()
            y = self._target(y_np)
            loss, pred = self._forward(self.module, x, y)
            return float(loss) * len(x_np), pred.float().numpy()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, reason: str) -> Path | None:
        """Write the checkpoint (collective; rank 0 writes). Refuses non-finite weights."""
        if self.pipe is not None:  # one shard per stage (pipelined.py)
            from .pipelined import save_checkpoint

            return save_checkpoint(self, reason)
        # Bounded gathers (PBM_TIMEOUT_S): a rank that stopped answering is named in a
        # CollectiveTimeout instead of freezing rank 0 here.
        rng_states = gather_objects(ckpt.rng_state(), 0, name=f"RNG states for the checkpoint ({reason})")
        # 3LC error-feedback residuals differ per rank: gathered like the RNG states.
        residuals = gather_objects(self.model.compression_state_dict(), 0,
                                   name=f"3LC residuals for the checkpoint ({reason})")

        def write():
            if self.rank != 0:
                return None
            bad = ckpt.nonfinite_weights(self.module)
            if bad:
                raise TrainingDiverged(f"model weights {bad[:3]} contain NaN/Inf at step "
                                       f"{self.step}; not overwriting {self.checkpoint_file}")
            state = {
                "model": ckpt.model_entry(self.module),
                "optimizer": self.optimizer.state_dict(),
                # fp16 keeps its loss scale; bf16 autocast and fp32 need none.
                "scaler": (self.scaler.state_dict() if self.scaler is not None
                           else {"kind": "none"}),
                "compression": {r: s for r, s in enumerate(residuals)},
                "sampler": self._sampler_state(),
                "rng": {r: s for r, s in enumerate(rng_states)},
                "progress": self._progress_state(),
                "history": self.history,
                "step_losses": torch.tensor(self.step_losses, dtype=torch.float64),
            }
            metadata = {"step": self.step, "reason": reason, "precision": self.policy.precision,
                        "model": self.config.model.name, "config": config_to_dict(self.config),
                        "model_kwargs": _plain(self.model_kwargs),
                        "data": _plain(getattr(self.data, "prediction_info", lambda: {})()),
                        "time": time.time(), "host": socket.gethostname()}
            return ckpt.save_checkpoint(self.checkpoint_file, state, metadata)

        # PBM_TIMEOUT_S, not the set-up wait: the write must not hide a stopped rank for long.
        return self._together(f"writing the checkpoint ({reason})", write,
                              wait_s=context.current().timeout_s)

    def _progress_state(self) -> dict:
        """The checkpoint's progress entry (step, early stopping, counters), for every mode."""
        return {"step": self.step, "best_val": self.best_val, "bad_epochs": self.bad_epochs,
                "train_seconds": self.train_seconds, "samples_seen": self.samples_seen,
                "bytes_sent": self.bytes_before + self._bytes_now(), "finished": self.finished or ""}

    def _sampler_state(self) -> dict:
        """Where the run is in its epoch: enough for a resume on this or another world size."""
        epoch, in_epoch, _, first = self._position(self.step)
        state = {"ranks": self.size, "batch_size": self.sampler.batch_size,
                 "steps_per_epoch": self.sampler.steps_per_epoch, "seed": self.sampler.seed,
                 "n_samples": self.sampler.global_length, "epoch": epoch,
                 "step_in_epoch": self.step - first, "epoch_first_step": first}
        if self._in_remainder(self.step):
            used = self.remainder.used_after(in_epoch, self.sampler.global_length)
            state["used"] = torch.from_numpy(pack_mask(used))
        return state

    def _bytes_now(self) -> int:
        return int(context.bytes_sent()) - self._bytes_at_start

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train until done, early-stopped, out of time budget or preempted; return the summary."""
        train = self.config.train
        if train.mode == "downpour":  # asynchronous, on parameter-server ranks
            from .downpour import fit as fit_downpour

            with self.stop_request:
                return fit_downpour(self)
        stop_at = self.total_steps if self.max_steps is None else min(self.total_steps, self.max_steps)
        self._bytes_at_start = int(context.bytes_sent())
        self._shm_bytes_at_start = int(context.shm_bytes())
        self._train_seconds_at_start = self.train_seconds
        self.log.truncate_after(self.step)
        self.log.open(self.step, ranks=self.size, threads=self.threads)
        self._say(self.describe(stop_at))
        delay_s = float(os.environ.get("PBM_TRAIN_STEP_DELAY_S", "0"))  # exercising preemption
        bar = self._progress_bar(stop_at)
        loop_started = run_started = time.perf_counter()
        samples_this_run = 0
        stop_reason = self.finished
        if stop_reason is None and self.step >= stop_at:
            stop_reason = "steps" if stop_at < self.total_steps else "completed"
        with self.stop_request as stop:
            while stop_reason is None:
                stop.check_peers()  # MPICH announced a dead rank: stop, naming it
                epoch, in_epoch, plan_steps, epoch_began = self._position(self.step)
                elapsed = self.train_seconds + (time.perf_counter() - loop_started)
                over_budget = train.time_budget_s > 0 and elapsed >= train.time_budget_s
                loss, local_loss, samples, stop_now, budget_now, lr, timings = self._train_step(
                    epoch, in_epoch, (float(stop.requested > 0), float(over_budget)))
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"the training loss became {loss} at step {self.step} (epoch {epoch}); no "
                        f"checkpoint was written for this state (the last good one, if any, is "
                        f"{self.checkpoint_file}). Lower [train] lr or check the data")
                self.step += 1
                self.step_losses.append(loss)
                self.samples_seen += samples
                samples_this_run += samples
                if self.step % train.log_every == 0 or self.step == stop_at:
                    self.log.write({"step": self.step, "epoch": epoch, "loss": loss,
                                    "local_loss": local_loss, "lr": lr, "samples": samples,
                                    **timings})
                    if self.tensorboard is not None:
                        seconds = time.perf_counter() - run_started
                        self.tensorboard.step(self.step, loss, lr, samples_this_run / seconds
                                              if seconds > 0 else None)
                if bar is not None:
                    rate = samples_this_run / max(1e-9, time.perf_counter() - run_started)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", samples_s=f"{rate:.0f}", refresh=False)
                if in_epoch == plan_steps - 1:
                    stop_reason = self._end_epoch(epoch, epoch_began)
                if stop_reason is None and self.step >= stop_at:
                    stop_reason = "steps" if stop_at < self.total_steps else "completed"
                if stop_now:
                    stop_reason = "preempted"
                elif budget_now and stop_reason is None:
                    stop_reason = "time budget"
                if (stop_reason is None and train.checkpoint_every
                        and self.step % train.checkpoint_every == 0):
                    self.train_seconds += time.perf_counter() - loop_started
                    loop_started = time.perf_counter()
                    self.save_checkpoint("periodic")
                if delay_s:
                    time.sleep(delay_s)
            self.train_seconds += time.perf_counter() - loop_started
            if bar is not None:
                bar.close()
            if stop_reason in ("early stopping", "completed", "time budget"):
                self.finished = stop_reason
            path = self.save_checkpoint(stop_reason)
        self.log.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self._write_timeline()
        run_seconds = self._run_training_seconds
        if stop_reason == "preempted":
            self._say(f"stop requested (SIGTERM/SIGUSR1): checkpoint at step {self.step} written "
                      f"to {path or self.checkpoint_file}; run again with --resume to continue")
            return {"stopped": "preempted", "step": self.step, "checkpoint": str(self.checkpoint_file)}
        return self._finish(stop_reason, samples_this_run, run_seconds)

    @property
    def _run_training_seconds(self) -> float:
        return self.train_seconds - self._train_seconds_at_start

    def _end_epoch(self, epoch: int, began: int) -> str | None:
        val = self.evaluate("val")
        train_losses = self.step_losses[began:]
        record = {"epoch": epoch, "step": self.step, "train_loss": float(np.mean(train_losses)),
                  "val_loss": val["loss"] if val else None,
                  "val_r2": val.get("r2") if val else None}
        if val and "mean_dice" in val:
            record["val_mean_dice"] = val["mean_dice"]
        self.history.append(record)
        # Wall-clock time as in the start record: benchmarks read time to accuracy from it.
        self.log.write({"event": "epoch", **record, "time": time.time()})
        if self.tensorboard is not None:
            self.tensorboard.epoch(self.step, record)
        # The best validation loss is tracked whether or not early stopping is on (patience 0):
        # the summary reports it either way.
        if val is None or val.get("loss") is None:
            return None
        if val["loss"] < self.best_val:
            self.best_val, self.bad_epochs = val["loss"], 0
            return None
        self.bad_epochs += 1
        patience = self.config.train.patience
        return "early stopping" if patience and self.bad_epochs >= patience else None

    def _progress_bar(self, stop_at: int):
        if self.rank != 0 or not self.progress:
            return None
        from tqdm import tqdm

        import sys

        # In a batch log (not a terminal) every refresh is a line: refresh rarely there.
        interval = 0.5 if sys.stderr.isatty() else 30.0
        return tqdm(total=stop_at, initial=self.step, unit="step", mininterval=interval,
                    dynamic_ncols=True, desc="train")

    def _write_timeline(self) -> None:
        if self.timeline_path is None:
            return
        events = gather_objects(self.timeline.events, 0, name="timeline events")
        if self.rank == 0:
            count = Timeline.write_merged(self.timeline_path, events)
            self._say(f"timeline: {count} events of {self.size} rank(s) in {self.timeline_path}")

    # ------------------------------------------------------------------ summary
    def describe(self, stop_at: int) -> str:
        """One paragraph on what is about to run."""
        config = self.config
        per = "rank" if self.layout is None else "pipeline"
        return (f"{config.model.name} ({parameter_count(self.module):,} parameters) on "
                f"{self.data.description}\n  {self.size} rank(s) x {self.threads} thread(s), "
                f"batch {config.train.batch_size} per {per}, {self.sampler.steps_per_epoch} "
                f"steps/epoch, steps {self.step}..{stop_at} of {self.total_steps}, "
                f"compression {config.train.compression.kind}, output {self.output_dir}\n"
                f"  compute: {self.policy.describe()}; {self.threads} thread(s) per rank from "
                f"{self.threads_from}" + (f"\n{self.layout_text}" if self.layout_text else ""))

    def _parallel_summary(self) -> dict:
        """How the model was laid out: ``{"kind": "data"}`` or the pipeline's layout."""
        if self.pipe is None:
            return {"kind": "data", "ranks": self.size}
        from .pipelined import shard_path

        return {"kind": self.layout.parallel, "stages": self.layout.stages,
                "data_parallel": self.layout.data_parallel,
                "balance": [int(b) for b in self.pipe.balance], "balance_from": self.balance_from,
                "micro_batches": self.pipe.micro_batches, "schedule": self.pipe.schedule,
                "checkpoint_shards": str(shard_path(self.checkpoint_file, 0, self.layout.stages,
                                                    self.step)).replace(".stage0-", ".stage*-")}

    def _finish(self, stop_reason: str, samples_this_run: int, run_seconds: float) -> dict:
        held_out = self.evaluate("held_out")
        bytes_run = torch.tensor([float(self._bytes_now())], dtype=torch.float64)
        bytes_run = int(collectives.allreduce(bytes_run, op="sum", name="bytes sent", algorithm="auto")[0])
        shm_run = torch.tensor([float(int(context.shm_bytes()) - self._shm_bytes_at_start)],
                               dtype=torch.float64)
        shm_run = int(collectives.allreduce(shm_run, op="sum", name="shared-memory bytes", algorithm="auto")[0])
        peaks = allgather_objects(_peak_rss_mb(), name="peak memory per rank")
        held = held_out or {}
        summary = {
            "model": self.config.model.name, "task": self.data.task, "ranks": self.size,
            "threads_per_rank": self.threads,
            "precision": self.policy.precision, "device": self.policy.device,
            "memory_format": self.policy.memory_format, "threads_from": self.threads_from,
            "steps": self.step,
            "epochs_completed": len(self.history), "stopped": stop_reason,
            "final_train_loss": self.step_losses[-1] if self.step_losses else None,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "held_out": {k: v for k, v in held.items()
                         if k not in ("per_output", "per_roi", "per_subject", "per_target")},
            "held_out_per_output": ({k: v.tolist() for k, v in held["per_output"].items()}
                                    if "per_output" in held else None),
            # {"pearson_r": {roi: mean over its outputs}, "r2": {...}} for encoding data.
            "held_out_per_roi": ({metric: {str(roi): float(v) for roi, v in values.items()}
                                  for metric, values in held["per_roi"].items()}
                                 if "per_roi" in held else None),
            "held_out_per_target": held.get("per_target"),
            "held_out_per_subject": held.get("per_subject"),
            "samples_per_s": samples_this_run / run_seconds if run_seconds > 0 else None,
            "train_seconds": run_seconds, "samples_this_run": samples_this_run,
            "bytes_communicated": bytes_run,
            # Moved through the node's shared memory by algorithm shm/hierarchical/auto (this
            # run only): bytes stored into peers' buffers, which MPI never sees.
            "bytes_shared_memory_this_run": shm_run,
            "wall_seconds": time.perf_counter() - self.started_at,
            "checkpoint": (str(self.checkpoint_file) if self.pipe is None
                           else self._parallel_summary()["checkpoint_shards"]),
            "parallel": self._parallel_summary(),
            "data": self.data.description,
            "seed": self.config.train.seed, "split_seed": self.config.data.split_seed,
            "peak_rss_mb_per_rank": peaks,
            "versions": _versions(),
            **(_git_commits() if self.rank == 0 else {}),
            # The config as run: every key with its default filled in, and the model's
            # arguments including the sizes taken from the data.
            "config": {**config_to_dict(self.config),
                       "model": {"name": self.config.model.name,
                                 "kwargs": _plain(self.model_kwargs),
                                 "from_data": sorted(self.model_defaults_used)}},
        }
        summary = _json_safe(summary)
        if self.rank == 0:
            from .plots import plot_losses

            plot = plot_losses(self.output_dir / "loss_curve.png", self.step_losses, self.history,
                               f"{self.config.model.name}: {self.size} rank(s), "
                               f"{self.policy.precision}")
            summary["loss_curve"] = str(plot)
            path = self.output_dir / "summary.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
            os.replace(tmp, path)
            if self.echo:
                print(format_summary(summary), flush=True)
        return summary


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (1 and up) of a batch (smoothed by 1, so
    a class absent from the batch and predicted absent scores 1)."""
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    dims = (0,) + tuple(range(2, logits.dim()))
    overlap = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * overlap + 1.0) / (total + 1.0)
    return 1.0 - dice[1:].mean() if logits.shape[1] > 1 else 1.0 - dice.mean()


def _plain(value):
    """JSON-able copy: tuples as lists, numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (undefined metrics carry their
    reason under an ``undefined`` key; JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return _plain(value)


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB (getrusage: KiB on Linux)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def _git_commits() -> dict:
    """Git commits a result depends on, where known: ``git_commit``, the pybrain-mpi source
    the installed package was built from (recorded by the build; ``PBM_GIT_COMMIT``
    overrides), and ``run_git_commit``, the checkout the run's working directory is in (the
    user's experiment code); ``-dirty`` marks uncommitted changes to tracked files."""
    import subprocess

    from ..cli import build_info

    built = os.environ.get("PBM_GIT_COMMIT") or build_info().get("git_commit") or None
    here = None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            here = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": built, "run_git_commit": here}


def _versions() -> dict:
    """Versions of everything a result depends on."""
    import platform

    from .. import __version__

    versions = {"pybrain_mpi": __version__, "python": platform.python_version(),
                "torch": torch.__version__, "numpy": np.__version__}
    for name in ("mpi4py", "zarr", "numcodecs", "nibabel"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    try:
        from mpi4py import MPI

        versions["mpi"] = MPI.Get_library_version().strip().splitlines()[0]
    except (ImportError, AttributeError):
        pass
    return versions


def _shown(summary: dict, key: str, fmt: str) -> str:
    """A held-out metric, or "undefined (reason)" when it has none."""
    held = summary.get("held_out") or {}
    value = held.get(key)
    if isinstance(value, (int, float)):
        return format(value, fmt)
    reason = (held.get("undefined") or {}).get(key)
    return f"undefined ({reason})" if reason else "-"


def format_summary(summary: dict) -> str:
    """The summary table printed at the end of a run."""
    held = summary.get("held_out") or {}

    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) and value is not None else "-"

    task = summary.get("task", "regression")
    if task == "segmentation":
        metrics = [("held-out mean Dice", _shown(summary, "mean_dice", ".4f")),
                   ("held-out mean IoU", _shown(summary, "mean_iou", ".4f"))]
        metrics += [(f"  label {label}", f"Dice {num(dice, '.4f')}  IoU "
                     f"{num(held.get('iou', {}).get(label), '.4f')}"
                     + ("" if dice is not None else
                        f"  ({held.get('undefined', {}).get(f'dice[{label}]', 'undefined')})"))
                    for label, dice in (held.get("dice") or {}).items()]
        for subject in summary.get("held_out_per_subject") or []:
            reason = (subject.get("undefined") or {}).get("mean_dice")
            metrics.append((f"  subject {subject['subject']}", "mean Dice " + (
                f"undefined ({reason})" if subject.get("mean_dice") is None and reason
                else num(subject.get("mean_dice"), ".4f"))))
        metrics.append(("held-out subjects", str(held.get("n_samples", "-"))))
    else:
        metrics = [("held-out R^2", _shown(summary, "r2", ".4f")),
                   ("held-out Pearson r", _shown(summary, "pearson_r", ".4f")),
                   ("held-out MSE / MAE", f"{num(held.get('mse'), '.4g')} / {num(held.get('mae'), '.4g')}")]
        for target, values in (summary.get("held_out_per_target") or {}).items():
            metrics.append((f"  target {target}",
                            f"R^2 {num(values.get('r2'), '.4f')}  r {num(values.get('pearson_r'), '.4f')}"
                            f"  MAE {num(values.get('mae'), '.4g')}"))
        metrics.append(("held-out " + ("subjects" if summary.get("held_out_per_subject")
                                      else "samples"), str(held.get("n_samples", "-"))))
    rows = [
        ("model", f"{summary['model']} ({summary['precision']})"),
        ("ranks x threads", f"{summary['ranks']} x {summary['threads_per_rank']}"),
        ("steps / epochs", f"{summary['steps']} / {summary['epochs_completed']} ({summary['stopped']})"),
        ("final train loss", num(summary["final_train_loss"], ".5g")),
        ("best validation loss", num(summary["best_val_loss"], ".5g")),
        *metrics,
        ("samples/s (all ranks)", num(summary["samples_per_s"], ".1f")),
        ("bytes communicated", f"{summary['bytes_communicated'] / 1e6:.1f} MB (sum over ranks)"),
        ("  via shared memory", f"{summary.get('bytes_shared_memory_this_run', 0) / 1e6:.1f} MB this run "
                                "(node stage, not counted above)"),
        ("training / wall time", f"{summary['train_seconds']:.1f} s / {summary['wall_seconds']:.1f} s"),
        ("peak memory per rank", ", ".join(f"{v:.0f}" for v in summary.get("peak_rss_mb_per_rank") or [])
         + " MB"),
        ("loss curve", summary.get("loss_curve", "-")),
        ("checkpoint", summary["checkpoint"]),
    ]
    per_roi = summary.get("held_out_per_roi")
    if per_roi:
        at = [k for k, _ in rows].index("held-out samples") + 1
        rows[at:at] = [(f"  ROI {roi}", f"R^2 {num(per_roi['r2'][roi], '.4f')}  r "
                                        f"{num(per_roi['pearson_r'][roi], '.4f')}")
                       for roi in per_roi["r2"]]
        rows.insert(at, ("held-out per ROI", f"{len(per_roi['r2'])} ROIs (mean over outputs)"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join(["summary", line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def train(config: Config, **kwargs) -> dict:
    """Build a :class:`Trainer` for ``config`` and run it; returns the summary dict."""
    return Trainer(config, **kwargs).fit()
