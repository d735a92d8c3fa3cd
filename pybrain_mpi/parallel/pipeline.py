"""Pipeline parallelism: a sequence of layers split over consecutive ranks, micro-batched.

``Pipeline(module, balance, micro_batches, schedule)`` keeps on each rank of its pipeline
communicator only the layers of its stage. :meth:`Pipeline.step` runs one training step over a
batch: stage 0 splits the inputs into ``micro_batches`` micro-batches (the last ones one sample
smaller when the count does not divide the batch), each stage receives its input activation from
the previous stage, runs its layers and sends the result on; the last stage computes the loss of
each micro-batch, weighted by its share of the batch, so the gradients accumulated over the step
equal those of the unsplit model over the whole batch. Gradients of the activations travel back
the same way. Every message is point-to-point through the native core (:mod:`.p2p`):
non-blocking sends, gradient receives posted as soon as the activation leaves, each wait bounded
by ``PBM_TIMEOUT_S`` with the rank at fault named.

Schedules (``micro_batches = M``, ``S`` stages):

- ``"gpipe"``: all M forwards, then all M backwards. Activations of all M micro-batches are
  alive at once; the idle fraction is ``(S-1)/(M+S-1)`` at best.
- ``"1f1b"``: stage ``s`` runs ``S-s-1`` warm-up forwards, then alternates one forward and one
  backward, then drains the remaining backwards: the same bubble, but at most ``S-s``
  micro-batches' activations alive per stage.

After :meth:`step` the parameters' ``.grad`` hold the stage's gradients; any optimizer over
:meth:`parameters` (which are this stage's only) then steps as in data parallelism.

A model too large to build whole on one rank comes as :class:`~.staged.StagedLayers`: each rank
builds only its stage's layers, each under its own seed (the unsplit model's weights). A stage
may span several ranks (``stage_ranks``, e.g. ``[1, 3]``): its ranks form a
:class:`~pybrain_mpi.parallel.Group` handed to the layer builders, which may tensor-split a
layer over it (NaiveCNN3D's first FC layer as a ``ColumnParallelLinear``); every rank of the
stage receives the stage's input activation and output gradient from the first rank (the lead)
of the neighbouring stage, runs the same schedule (its tensor-split layers' collectives match),
and only the lead sends on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..communication import context
from ..errors import PbmError
from .p2p import Channel, Message
from .staged import StagedLayers

__all__ = ["Pipeline", "pipeline_layers", "partition_balanced", "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b")
_TAG_ACTIVATION, _TAG_GRADIENT, _TAG_LOSS, _TAG_BALANCE = 1, 2, 3, 4


def pipeline_layers(module: Any) -> list[nn.Module]:
    """The ordered layers of a model: an ``nn.Sequential``'s children, a list of modules, or
    what the model's ``pipeline_layers()`` returns (e.g. ``NaiveCNN3D``)."""
    if hasattr(module, "pipeline_layers"):
        layers = list(module.pipeline_layers())
    elif isinstance(module, nn.Sequential):
        layers = list(module.children())
    elif isinstance(module, (list, tuple, nn.ModuleList)):
        layers = list(module)
    else:
        raise TypeError(f"Pipeline: cannot split a {type(module).__name__}: give an nn.Sequential, a list of "
                        "modules or a model with pipeline_layers()")
    if not layers or not all(isinstance(layer, nn.Module) for layer in layers):
        raise TypeError("Pipeline: the model must consist of at least one nn.Module layer")
    return layers


def partition_balanced(costs: Sequence[float], stages: int) -> list[int]:
    """Splits consecutive layer costs into ``stages`` non-empty groups minimising the largest
    group's sum (exact dynamic programme); returns the layer count of each group."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest max-sum splitting the first i layers into k groups; cut[k][i] the last cut.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def _first_leaf(layer: nn.Module) -> nn.Module:
    while True:
        children = list(layer.children())
        if not children:
            return layer
        layer = children[0]


def _entry(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` for ``layer``; a copy when the layer starts in place (``ReLU(inplace=True)``) and ``x``
    is a leaf that requires grad (autograd refuses in-place writes to those)."""
    if x.requires_grad and x.is_leaf and getattr(_first_leaf(layer), "inplace", False):
        return x.clone()
    return x


def _profile_layers(layers: list[nn.Module], sample: torch.Tensor, repeats: int = 2) -> tuple[list, list]:
    """Per-layer (forward+backward seconds, bytes of parameters + output activation)."""
    times, memory = [0.0] * len(layers), [0] * len(layers)
    for _ in range(repeats):
        x = sample.detach()
        for index, layer in enumerate(layers):
            x = x.detach().requires_grad_(x.is_floating_point())
            started = time.perf_counter()
            y = layer(_entry(layer, x))
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            times[index] += time.perf_counter() - started
            memory[index] = (sum(p.numel() * p.element_size() for p in layer.parameters())
                             + y.numel() * y.element_size())
            x = y
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return times, memory


@dataclass
class StepStats:
    """Timings of the last :meth:`Pipeline.step` on this rank."""

    wall_s: float = 0.0
    compute_s: float = 0.0  # forward and backward of this stage's layers
    micro_batches: int = 0
    events: list = field(default_factory=list)  # (kind, micro-batch, start, end) in perf_counter s

    @property
    def idle_fraction(self) -> float:
        """Share of the step this stage did not compute (bubble plus communication)."""
        return 1.0 - self.compute_s / self.wall_s if self.wall_s > 0 else 0.0


class Pipeline(nn.Module):
    """Splits a model over the ranks of ``comm`` (consecutive layers per rank) and trains it with
    micro-batches.

    Args:
        module: an ``nn.Sequential``, a list of layers, or a model with ``pipeline_layers()``;
            built identically on every rank (each keeps only its stage's layers); or
            :class:`~.staged.StagedLayers`, of which each rank builds only its stage's layers
            (``balance`` must then be a list).
        balance: layers per stage (a list of ``comm.size`` positive counts summing to the
            number of layers), or ``"auto"``: split by each layer's measured forward+backward
            time and its parameter+activation memory on ``sample`` (profiled by stage 0, sent to
            the others).
        micro_batches: micro-batches per step (at most the batch size; need not divide it).
        schedule: ``"gpipe"`` or ``"1f1b"`` (module docstring).
        loss_fn: ``loss_fn(output, target)`` of the last stage, returning the mean over the
            micro-batch (``loss_reduction="mean"``, torch's default) or the sum (``"sum"``).
        comm: mpi4py communicator of the pipeline's ranks, in stage order (default: the world;
            :class:`~pybrain_mpi.parallel.Grid` gives one per data-parallel replica).
        sample: an input batch for ``balance="auto"`` (needed on stage 0 only).
        timeout_s: deadline of every wait (default ``PBM_TIMEOUT_S``).
        data_group: the :class:`~pybrain_mpi.parallel.Group` of the ranks holding this stage in
            the other replicas (``Grid.data_group``): the stage is wrapped in
            :class:`~pybrain_mpi.DistributedDataParallel` over it, whose buckets average the
            gradients during the last micro-batch's backward (the others accumulate locally).
        ddp_options: further keyword arguments of that DDP (``bucket_bytes``, ``compression``...).
        stage_ranks: ranks per stage, consecutive in ``comm`` (default one each; their sum is
            ``comm.size``). A stage of several ranks gets ``tensor_group`` (a Group over them),
            passed to the builders of a StagedLayers (module docstring).
    """

    def __init__(self, module: Any, balance: Sequence[int] | str = "auto", micro_batches: int = 1,
                 schedule: str = "gpipe", loss_fn: Callable | None = None, *, comm: Any = None,
                 sample: torch.Tensor | None = None, loss_reduction: str = "mean",
                 timeout_s: float | None = None, data_group: Any = None, ddp_options: dict | None = None,
                 stage_ranks: Sequence[int] | None = None):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"Pipeline: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Pipeline: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if int(micro_batches) < 1:
            raise ValueError(f"Pipeline: micro_batches must be at least 1, got {micro_batches}")
        staged = isinstance(module, StagedLayers)
        if staged and isinstance(balance, str):
            raise ValueError("Pipeline: StagedLayers need an explicit balance (a list of layer counts): "
                             "'auto' would build every layer on stage 0")
        layers = module if staged else pipeline_layers(module)
        self.channel = Channel(comm, timeout_s)
        self.members = self._stage_members(stage_ranks)  # channel ranks of each stage
        self.stages = len(self.members)
        self.stage = next(s for s, ranks in enumerate(self.members) if self.channel.rank in ranks)
        self.is_lead = self.channel.rank == self.members[self.stage][0]
        self.micro_batches = int(micro_batches)
        self.schedule = schedule
        self.loss_fn = loss_fn if loss_fn is not None else nn.MSELoss()
        self.loss_reduction = loss_reduction
        self.world_ranks = self.channel.world_ranks  # world rank of each rank of comm
        self.balance = self._resolve_balance(layers, balance, sample)
        start = sum(self.balance[:self.stage])
        self.layer_range = (start, start + self.balance[self.stage])
        if data_group is not None and len(self.members) != self.channel.size:
            raise ValueError(f"rank {context.rank()}: Pipeline: a data group with stages of several ranks "
                             f"(stage_ranks {[len(r) for r in self.members]}) is not supported")
        self.tensor_group = self._tensor_group()
        kept = (module.build_range(*self.layer_range, self.tensor_group) if staged
                else layers[start:start + self.balance[self.stage]])
        self.stage_module = nn.Sequential(*kept)
        # Not a registered submodule: the stage's parameters and state_dict keys stay its own.
        object.__setattr__(self, "ddp", None)
        if data_group is not None and data_group.size > 1 and any(
                p.requires_grad for p in self.stage_module.parameters()):
            from ..engine.ddp import DistributedDataParallel

            object.__setattr__(self, "ddp", DistributedDataParallel(self.stage_module, group=data_group,
                                                                    **(ddp_options or {})))
        self.stats = StepStats()
        self._step = 0

    # -- layout -------------------------------------------------------------------------
    def _stage_members(self, stage_ranks: Sequence[int] | None) -> list[list[int]]:
        size = self.channel.size
        counts = [1] * size if stage_ranks is None else [int(c) for c in stage_ranks]
        if not counts or min(counts) < 1 or sum(counts) != size:
            raise ValueError(f"rank {context.rank()}: Pipeline stage_ranks {counts} must be positive rank "
                             f"counts summing to the {size} ranks of the pipeline")
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]

    def _tensor_group(self) -> Any:
        """A Group over this stage's ranks when there are several (collective over the pipeline)."""
        if all(len(ranks) == 1 for ranks in self.members):
            return None
        from .grid import Group

        sub = self.channel.comm.Split(color=self.stage, key=self.channel.rank)
        if len(self.members[self.stage]) == 1:
            sub.Free()
            return None
        return Group(sub, self.channel.timeout_s)

    def _lead(self, stage: int) -> int:
        return self.members[stage][0]

    def _resolve_balance(self, layers: list[nn.Module], balance: Any, sample: Any) -> list[int]:
        n = len(layers)
        if isinstance(balance, str):
            if balance != "auto":
                raise ValueError(f"Pipeline: balance must be a list of layer counts or 'auto', got {balance!r}")
            if self.channel.rank == 0:
                if sample is None:
                    raise PbmError(f"rank {context.rank()}: Pipeline(balance='auto') needs sample= on stage 0")
                times, memory = _profile_layers(layers, sample)
                total_t, total_m = sum(times) or 1.0, sum(memory) or 1
                costs = [t / total_t + m / total_m for t, m in zip(times, memory)]
                chosen = torch.tensor(partition_balanced(costs, self.stages), dtype=torch.int64)
                sends = [self.channel.isend(chosen, r, _TAG_BALANCE, "balance") for r in range(1, self.channel.size)]
                for message in sends:
                    message.wait()
            else:
                chosen = self.channel.recv(0, _TAG_BALANCE, "balance")
            sizes = [int(v) for v in chosen.tolist()]
        else:
            sizes = [int(v) for v in balance]
        if len(sizes) != self.stages or min(sizes) < 1 or sum(sizes) != n:
            raise ValueError(f"rank {context.rank()}: Pipeline balance {sizes} must give each of the "
                             f"{self.stages} stages at least one layer and cover all {n} layers")
        return sizes

    def describe(self) -> str:
        """One line per stage: world rank, layer range and parameter count of this stage (the
        line of the other stages is theirs to tell)."""
        first, end = self.layer_range
        params = sum(p.numel() for p in self.stage_module.parameters())
        shared = len(self.members[self.stage])
        split = (f", tensor-split over world ranks {[self.world_ranks[r] for r in self.members[self.stage]]}"
                 if shared > 1 else "")
        return (f"stage {self.stage}/{self.stages} on rank {self.world_ranks[self.channel.rank]}: layers "
                f"{first}..{end - 1} ({params:,} parameters{split})")

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - see step()
        raise PbmError("Pipeline: call step(inputs, targets) (forward and backward are interleaved), "
                       "or predict(inputs) for inference")

    # -- one step -----------------------------------------------------------------------
    def _schedule(self) -> list[tuple[str, int]]:
        m, s, n = self.micro_batches, self.stage, self.stages
        if self.schedule == "gpipe":
            return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        warmup = min(n - s - 1, m)
        order = [("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [("F", warmup + i), ("B", i)]
        order += [("B", i) for i in range(m - warmup, m)]
        return order

    def _split(self, batch: Any, what: str) -> list[torch.Tensor]:
        if not isinstance(batch, torch.Tensor):
            raise PbmError(f"rank {context.rank()}: Pipeline stage {self.stage} needs the {what} "
                           f"(a tensor), got {type(batch).__name__}")
        if batch.dim() == 0 or batch.shape[0] < self.micro_batches:
            raise PbmError(f"rank {context.rank()}: a batch of {batch.shape[0] if batch.dim() else 0} "
                           f"{what} cannot make {self.micro_batches} micro-batches")
        return list(torch.tensor_split(batch, self.micro_batches, dim=0))

    @property
    def _run(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.stage_module

    def _local(self, local: bool) -> Any:
        """DDP's no_sync() for all but the synchronising pass (a no-op without DDP)."""
        import contextlib

        return self.ddp.no_sync() if (self.ddp is not None and local) else contextlib.nullcontext()

    def _name(self, what: str, micro: int, src: int, dst: int) -> str:
        return f"{what} step {self._step} mb {micro} stage {src}->{dst}"

    def step(self, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """One forward+backward pass over a batch; returns the batch loss on every stage.

        ``inputs`` are needed on stage 0, ``targets`` on the last stage (other ranks may pass
        them or None). Gradients accumulate into the stage's parameters' ``.grad`` (zero them
        between steps as usual).
        """
        first, last = self.stage == 0, self.stage == self.stages - 1
        chunks = self._split(inputs, "inputs") if first else None
        target_chunks = self._split(targets, "targets") if last else None
        batch = targets.shape[0] if last else 0
        stored: dict[int, dict] = {}
        pending: list[Message] = []
        total = torch.zeros((), dtype=torch.float64)
        stats = StepStats(micro_batches=self.micro_batches)
        step_started = time.perf_counter()

        def progress() -> None:
            pending[:] = [m for m in pending if not m.done()]

        for kind, i in self._schedule():
            if kind == "F":
                if first:
                    x = chunks[i]
                else:
                    x = self.channel.recv(self._lead(self.stage - 1), _TAG_ACTIVATION,
                                          self._name("activation", i, self.stage - 1, self.stage))
                    if x.is_floating_point():
                        x.requires_grad_(True)
                started = time.perf_counter()
                with self._local(i != 0):
                    y = self._run(_entry(self.stage_module, x))
                entry = {"x": x}
                if last:
                    target = target_chunks[i]
                    if y.shape[0] != target.shape[0]:
                        raise PbmError(f"rank {context.rank()}: micro-batch {i} has {y.shape[0]} samples "
                                       f"but {target.shape[0]} targets (stage 0 and the last stage were "
                                       "given batches of different sizes)")
                    loss = self.loss_fn(y, target)
                    if self.loss_reduction == "mean":
                        loss = loss * (target.shape[0] / batch)
                    entry["loss"] = loss
                    total += loss.detach().to(torch.float64)
                stats.compute_s += time.perf_counter() - started
                stats.events.append(("F", i, started, time.perf_counter()))
                if not last:
                    if self.is_lead:
                        pending += [self.channel.isend(y, r, _TAG_ACTIVATION,
                                                       self._name("activation", i, self.stage, self.stage + 1))
                                    for r in self.members[self.stage + 1]]
                    entry["y"] = y
                    if y.is_floating_point():
                        entry["grad"] = self.channel.irecv(
                            y.shape, y.dtype, self._lead(self.stage + 1), _TAG_GRADIENT,
                            self._name("gradient", i, self.stage + 1, self.stage))
                stored[i] = entry
            else:
                entry = stored.pop(i)
                x = entry["x"]
                if last:
                    started = time.perf_counter()
                    with self._local(i != self.micro_batches - 1):
                        entry["loss"].backward()
                else:
                    grad_message = entry.get("grad")
                    grad = grad_message.wait() if grad_message is not None else None
                    started = time.perf_counter()
                    if grad is not None and entry["y"].requires_grad:
                        with self._local(i != self.micro_batches - 1):
                            entry["y"].backward(grad)
                stats.compute_s += time.perf_counter() - started
                stats.events.append(("B", i, started, time.perf_counter()))
                if not first and self.is_lead and x.is_floating_point():
                    grad_x = x.grad if x.grad is not None else torch.zeros_like(x)
                    pending += [self.channel.isend(grad_x, r, _TAG_GRADIENT,
                                                   self._name("gradient", i, self.stage, self.stage - 1))
                                for r in self.members[self.stage - 1]]
            progress()
        for message in pending:
            message.wait()
        loss = self._share_loss(total)
        stats.wall_s = time.perf_counter() - step_started
        self.stats = stats
        self._step += 1
        return loss

    def _share_loss(self, total: torch.Tensor) -> torch.Tensor:
        """The last stage's batch loss (every rank of it has it), sent to every other stage."""
        last = self.stages - 1
        if self.stage == last:
            if self.is_lead:
                sends = [self.channel.isend(total, r, _TAG_LOSS, f"loss step {self._step}")
                         for r in range(self.members[last][0])]
                for message in sends:
                    message.wait()
            return total
        return self.channel.recv(self._lead(last), _TAG_LOSS, f"loss step {self._step}")

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward only (no micro-batching): the output on the last stage, None elsewhere."""
        first, last = self.stage == 0, self.stage == self.stages - 1
        if first:
            if not isinstance(inputs, torch.Tensor):
                raise PbmError(f"rank {context.rank()}: Pipeline.predict needs the inputs on stage 0")
            x = inputs
        else:
            x = self.channel.recv(self._lead(self.stage - 1), _TAG_ACTIVATION,
                                  f"predict activation stage {self.stage - 1}")
        y = self.stage_module(x)
        if last:
            return y
        if self.is_lead:
            sends = [self.channel.isend(y, r, _TAG_ACTIVATION, f"predict activation stage {self.stage}")
                     for r in self.members[self.stage + 1]]
            for message in sends:
                message.wait()
        return None
