"""Where and in which number format a model runs: one policy for the trainer and for users.

    policy = pbm.compute.resolve(model, device="auto", precision="auto", memory_format="auto")
    model = policy.prepare(model)          # moved to the device, channels_last_3d where chosen
    with policy.autocast():                # bf16/fp16 autocast where chosen, else a no-op
        loss = loss_fn(model(policy.input(x)), policy.input(y))
    print(policy.describe())               # one line for the run header

"auto" decides from what the machine and the model are, and measures nothing:

- **device**: ``"cpu"``. The collectives and DistributedDataParallel take CPU tensors only
  so far (CUDA ranks, with gradient buckets staged through pinned shared memory, are not
  built yet): ``"auto"`` stays on the CPU with a note where a GPU is visible, and ``"cuda"``
  is refused in one line, naming why. The device a CUDA rank would take is
  ``local_rank % device_count`` (:func:`cuda_device_for`), so ``CUDA_VISIBLE_DEVICES`` and
  Slurm's ``--gpus-per-task`` are respected once it is.
- **precision** on CPU: bf16 autocast only where the CPU computes bfloat16 natively
  (``avx512_bf16`` or AMX in ``/proc/cpuinfo``); elsewhere fp32, with a note, because CPU
  autocast without those instructions emulates bfloat16 and runs several times slower. And
  only for models with enough arithmetic per operation to repay autocast's casts: any
  convolution, or a linear layer of at least 2^20 weights (a 31-64-64-28 MLP steps 1.4x
  slower under bf16 autocast, a 3D CNN 1.8x faster). On CUDA: bf16 where the device supports
  it, else fp16 (with loss scaling, see :class:`pybrain_mpi.optim.LossScaler`).
- **memory_format**: ``channels_last_3d`` for models with 3D convolutions (oneDNN's and
  cuDNN's fast layout for them), contiguous otherwise.

The speed-ups behind these choices are measured, with plain torch in the same run, by
``benchmarks/compute_policy.py``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import PbmError

__all__ = ["ComputePolicy", "ComputeError", "resolve", "check_device", "cuda_device_for", "cpu_features", "threads_per_rank", "DEVICES",
           "PRECISIONS", "MEMORY_FORMATS"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp64", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


class ComputeError(PbmError, ValueError):
    """The requested device or precision is not available here."""


@lru_cache(maxsize=1)
def cpu_features() -> frozenset:
    """Instruction-set flags of this CPU (``/proc/cpuinfo`` on Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(features: frozenset | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16, or AMX with bf16 tiles)."""
    features = cpu_features() if features is None else features
    return "avx512_bf16" in features or "amx_bf16" in features


def threads_per_rank(local_ranks: int) -> tuple[int, str]:
    """Compute threads for one rank and where the number came from.

    ``OMP_NUM_THREADS`` if set; else Slurm's ``SLURM_CPUS_PER_TASK``; else the cores this
    process may run on divided by the ranks of its node (at least one). Ranks that share cores
    with several threads each run slower and erratically (docs/measurements.md).
    """
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        raw = os.environ.get(name, "")
        if raw.strip().isdigit() and int(raw) > 0:
            return int(raw), name
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks)), f"{cores} cores / {max(1, local_ranks)} ranks"


def _has_conv3d(model: Any) -> bool:
    import torch

    return any(isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) for m in model.modules())


#: A linear layer with at least this many weights does enough work per call for bf16 autocast
#: to pay off on CPU (benchmarks/compute_policy.py).
BF16_MIN_LINEAR_WEIGHTS = 1 << 20


def _worth_autocast(model: Any) -> bool:
    """Whether a model's operations are large enough that 16-bit autocast speeds it up."""
    import torch

    if model is None:
        return True
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return True
        if isinstance(m, torch.nn.Linear) and m.weight.numel() >= BF16_MIN_LINEAR_WEIGHTS:
            return True
    return False


@dataclass(frozen=True)
class ComputePolicy:
    """A resolved choice: ``device`` ("cpu"/"cuda:N"), ``precision`` ("fp32", "fp64", "bf16",
    "fp16"), ``memory_format`` ("contiguous"/"channels_last") and the reasons for each."""

    device: str
    precision: str
    memory_format: str
    notes: tuple = ()

    @property
    def param_dtype(self):
        """dtype of the parameters (fp64 runs in float64; every other choice keeps float32
        master weights and autocasts)."""
        import torch

        return torch.float64 if self.precision == "fp64" else torch.float32

    @property
    def autocast_dtype(self):
        """The dtype autocast computes in, or None when no autocast is used."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 underflows small gradients without a loss scale; bf16 has fp32's range."""
        return self.precision == "fp16"

    def _torch_memory_format(self, ndim: int):
        import torch

        if self.memory_format != "channels_last":
            return torch.contiguous_format
        return {5: torch.channels_last_3d, 4: torch.channels_last}.get(ndim, torch.contiguous_format)

    def prepare(self, model):
        """The model moved to the device and dtype, in the chosen memory format (in place, as
        ``Module.to`` does; returned for chaining)."""
        model = model.to(device=self.device, dtype=self.param_dtype)
        if self.memory_format == "channels_last":
            import torch

            model = model.to(memory_format=torch.channels_last_3d)
        return model

    def input(self, x):
        """A batch on the device, dtype and memory format the model expects (5D/4D image
        batches get channels_last; other tensors are only moved)."""
        import torch

        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        dtype = self.param_dtype if x.is_floating_point() else x.dtype
        non_blocking = self.device.startswith("cuda") and x.device.type == "cpu" and x.is_pinned()
        x = x.to(device=self.device, dtype=dtype, non_blocking=non_blocking)
        if x.dim() in (4, 5) and self.memory_format == "channels_last":
            x = x.contiguous(memory_format=self._torch_memory_format(x.dim()))
        return x

    def autocast(self):
        """A context manager: torch autocast in the chosen 16-bit type, or nothing."""
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.autocast_dtype)

    def describe(self) -> str:
        """One line for a run header, e.g. ``cpu, bf16 autocast, channels_last_3d (...)``."""
        precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + loss scaling"}.get(
            self.precision, self.precision)
        layout = "channels_last_3d" if self.memory_format == "channels_last" else "contiguous"
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.device}, {precision}, {layout}{notes}"


#: Whether pybrain-mpi's collectives and DDP take CUDA tensors (not yet).
CUDA_RANKS_SUPPORTED = False


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def check_device(device: str) -> None:
    """Raises :class:`ComputeError` in one line when ``device`` cannot be used here: an
    unknown name, or ``"cuda"`` (no CUDA device visible, or CUDA ranks not supported yet)."""
    import torch

    if device not in DEVICES:
        raise ComputeError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not _cuda_visible():
        why = "no CUDA device is visible " + (
            "(this torch build has no CUDA support)" if torch.version.cuda is None
            else f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        raise ComputeError(f"device = \"cuda\" was asked for but {why}; use device = \"cpu\" "
                           "or \"auto\"")
    if device == "cuda" and not CUDA_RANKS_SUPPORTED:
        raise ComputeError("device = \"cuda\": pybrain-mpi's collectives and "
                           "DistributedDataParallel take CPU tensors only so far; use device = "
                           "\"cpu\" (or \"auto\")")


def cuda_device_for(local_rank: int) -> str:
    """The CUDA device rank ``local_rank`` of a node takes: ``cuda:<local_rank % visible>``."""
    import torch

    return f"cuda:{local_rank % torch.cuda.device_count()}"


def resolve(model: Any = None, device: str = "auto", precision: str = "auto",
            memory_format: str = "auto", *, local_rank: int | None = None,
            features: frozenset | None = None) -> ComputePolicy:
    """Resolves "auto" choices for ``model`` on this machine (see the module docstring).

    ``local_rank`` picks the CUDA device (default: pybrain-mpi's local rank when initialized,
    else 0). ``features`` overrides the CPU flags (tests). Raises :class:`ComputeError` with a
    one-line reason when ``device="cuda"`` is asked for and no CUDA device is visible, or a
    choice is unknown.
    """
    import torch

    for value, allowed, what in ((device, DEVICES, "device"), (precision, PRECISIONS, "precision"),
                                 (memory_format, MEMORY_FORMATS, "memory_format")):
        if value not in allowed:
            raise ComputeError(f"{what} {value!r}: expected one of {', '.join(allowed)}")
    notes: list[str] = []
    check_device(device)
    cuda_visible = _cuda_visible()
    if local_rank is None:
        from .communication import context

        local_rank = context.local_rank() if context.is_initialized() else 0
    on_cuda = device == "cuda" or (device == "auto" and cuda_visible and CUDA_RANKS_SUPPORTED)
    if device == "auto" and cuda_visible and not CUDA_RANKS_SUPPORTED:
        notes.append("cpu: a GPU is visible but CUDA ranks are not supported yet")
    where = cuda_device_for(local_rank) if on_cuda else "cpu"

    if precision == "auto":
        if on_cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif cpu_has_native_bf16(features) and _worth_autocast(model):
            precision = "bf16"
            notes.append("bf16: the CPU has native bfloat16")
        elif cpu_has_native_bf16(features):
            precision = "fp32"
            notes.append("fp32: the model's layers are too small for bf16 autocast to pay off")
        else:
            precision = "fp32"
            notes.append("fp32: the CPU lacks AVX512_BF16/AMX, where bf16 autocast is emulated "
                         "and several times slower")
    if memory_format == "auto":
        conv3d = model is not None and _has_conv3d(model)
        memory_format = "channels_last" if conv3d else "contiguous"
        if conv3d:
            notes.append("channels_last_3d: the model has 3D convolutions")
    return ComputePolicy(where, precision, memory_format, tuple(notes))
