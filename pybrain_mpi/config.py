"""Run configuration: TOML files validated against a schema, returned as typed dataclasses.

A config has four sections::

    [model]              name = "dca" plus the model's keyword arguments (checked against
                         the model's constructor: unknown names and wrong types are errors)
    [data]               what to train on (kind, source, path, patch size, ...)
    [train]              epochs, batch size, optimizer, schedule, precision, compression,
                         checkpointing, ... ([train.lr_schedule] and [train.compression]
                         are sub-sections)
    [output]             where results go

Every problem found is reported at once, each naming the file, the line, the key, what was
expected and what was found, e.g.::

    examples/dca.toml:12: [train] lr = -0.1: expected a float > 0, got -0.1

``tomllib`` does not report where keys are, so :func:`key_lines` finds them by scanning the
file's text (table headers, dotted keys, inline tables). Relative paths in a config are
relative to the current working directory; ``~`` is expanded.

Each key is declared once, as a field of its section's dataclass (:func:`key`: type, default,
range, choices, doc). :data:`SCHEMA` is read off those dataclasses, so validation, the typed
result and :func:`describe_schema` (every key with its type, range, choices and default)
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from .errors import PbmError

__all__ = ["ConfigError", "Field", "Section", "SCHEMA", "key", "subsection", "section_of", "Config", "ModelConfig", "DataConfig",
           "TrainConfig", "LRScheduleConfig", "CompressionConfig", "OutputConfig",
           "load_config", "parse_config", "key_lines", "describe_schema", "config_to_dict"]

_REQUIRED = object()


class ConfigError(PbmError, ValueError):
    """A config file is invalid. ``problems`` lists ``(line, key, message)`` for each issue."""

    def __init__(self, message: str, problems: list[tuple[int | None, str, str]] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


# ----------------------------------------------------------------------------- schema system

_TYPE_NAMES = {int: "an integer", float: "a float", str: "a string", bool: "a boolean",
               list: "a list", dict: "a table"}


def _toml_type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Field:
    """One key: its type, default (``required=True`` if none), range, choices and doc.

    ``type`` is int, float, str, bool or list; a float field accepts TOML integers; a list
    field checks ``item_type`` and ``length``. ``minimum``/``maximum`` bound numbers (and list
    items), exclusive when ``exclusive_minimum``/``exclusive_maximum``.
    """

    type: type
    default: Any = _REQUIRED
    doc: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple | None = None
    item_type: type | None = None
    length: int | None = None
    path: bool = False  # a file-system path: "~" expanded, returned as pathlib.Path
    also: tuple = ()  # values accepted as they are besides the type (a list field's "auto")

    @property
    def required(self) -> bool:
        """True when the key has no default."""
        return self.default is _REQUIRED

    def describe(self) -> str:
        """Expected value in words, e.g. ``a float > 0`` or ``one of "sgd", "adam"``."""
        if self.also:
            return " or ".join(_show(a) for a in self.also) + " or " + \
                dataclasses.replace(self, also=()).describe()
        if self.choices is not None:
            return "one of " + ", ".join(_show(c) for c in self.choices)
        if self.type is list:
            what = f"a list of {self.length} " if self.length else "a list of "
            what += {int: "integers", float: "floats", str: "strings"}.get(self.item_type,
                                                                             "values")
        else:
            what = _TYPE_NAMES[self.type]
        return what + self._range_words()

    def _range_words(self) -> str:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            left = "(" if self.exclusive_minimum else "["
            right = ")" if self.exclusive_maximum else "]"
            return f" in {left}{lo}, {hi}{right}"
        if lo is not None:
            return f" {'>' if self.exclusive_minimum else '>='} {lo}"
        if hi is not None:
            return f" {'<' if self.exclusive_maximum else '<='} {hi}"
        return ""

    def _in_range(self, x: float) -> bool:
        if self.minimum is not None and (x < self.minimum or
                                         (self.exclusive_minimum and x == self.minimum)):
            return False
        if self.maximum is not None and (x > self.maximum or
                                         (self.exclusive_maximum and x == self.maximum)):
            return False
        return True

    def convert(self, value: Any) -> Any:
        """Return the checked (and converted) value or raise ``ValueError`` with the reason."""
        if self.also and isinstance(value, str) and value in self.also:
            return value
        if self.type is list:
            if not isinstance(value, list):
                raise ValueError(f"got {_toml_type_name(value)} {_show(value)}")
            if self.length is not None and len(value) != self.length:
                raise ValueError(f"got {len(value)} values {_show(value)}")
            items = [_convert_scalar(self.item_type, v) for v in value] if self.item_type else value
            if self.minimum is not None or self.maximum is not None:
                for v in items:
                    if not self._in_range(v):
                        raise ValueError(f"got {_show(value)}")
            return tuple(items)
        converted = _convert_scalar(self.type, value)
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"got {_show(value)}")
        if isinstance(converted, (int, float)) and not isinstance(converted, bool):
            if isinstance(converted, float) and not math.isfinite(converted):
                raise ValueError(f"got {_show(value)}")
            if not self._in_range(converted):
                raise ValueError(f"got {_show(value)}")
        return converted


def _convert_scalar(kind: type, value: Any) -> Any:
    # TOML distinguishes integers, floats and booleans; Python's bool is an int, so check it
    # first. An integer is a fine float ("lr = 1" means 1.0); the reverse is not.
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"schema error: unsupported field type {kind}")
    raise ValueError(f"got {_toml_type_name(value)} {_show(value)}")


@dataclasses.dataclass(frozen=True)
class Section:
    """A table of fields and sub-sections, built into ``dataclass`` after validation.

    ``required=False`` sections may be left out (all their defaults apply). ``extra`` names
    a dataclass field that receives the keys not in the schema (``[model]``'s keyword
    arguments); without it, unknown keys are errors.
    """

    fields: dict
    dataclass: type
    doc: str = ""
    required: bool = False
    extra: str | None = None


# ----------------------------------------------------------------------------- the sections
#
# Each key is declared once, in its section's dataclass: type, default, range, choices and doc
# travel in the field's metadata (:func:`key`), and :data:`SCHEMA` is read off the dataclasses.
# The dataclasses have no defaults of their own: a Config is only ever built by validation,
# which fills every key.

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
TRAIN_MODES = ("sync", "downpour")
PARALLEL_KINDS = ("data", "pipeline", "hybrid")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
#: Keys that only a pipelined run (parallel = "pipeline" or "hybrid") reads.
PIPELINE_KEYS = ("pipeline_stages", "micro_batches", "schedule", "balance")
DOWNPOUR_KEYS = ("servers", "server_optimizer", "fetch_every", "push_every", "warm_start_steps",
                 "max_staleness")
PRECISIONS = ("auto", "fp32", "fp64", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
COMPRESSIONS = ("none", "fp16", "bf16", "3lc")
ALLREDUCE_ALGORITHMS = ("auto", "ring", "mpi", "shm", "hierarchical")
DATA_KINDS = ("fmri_series", "volume_patches", "encoding", "segmentation", "regression")
DATA_SOURCES = ("path", "nitime_fmri", "mni152", "nitime_rois", "mni152_cohort", "nitime_runs")
#: Sources that build a cohort (a manifest) from shipped data into the cache.
COHORT_SOURCES = ("mni152_cohort", "nitime_runs")
LOSSES = ("auto", "mse", "dca", "smooth_l1", "cross_entropy", "dice_ce")


def key(kind: type, default: Any = _REQUIRED, **rules: Any) -> Any:
    """A config key: a dataclass field whose metadata holds its :class:`Field` rules."""
    return dataclasses.field(metadata={"key": Field(kind, default, **rules)})


def subsection(dataclass: type, doc: str = "", required: bool = False) -> Any:
    """A sub-table (e.g. ``[train.lr_schedule]``) described by another section dataclass."""
    return dataclasses.field(metadata={"section": (dataclass, doc, required)})


def extra_keys() -> Any:
    """The field that receives the keys a section does not declare ([model]'s arguments)."""
    return dataclasses.field(metadata={"extra": True})


def section_of(dataclass: type, doc: str = "", required: bool = False) -> Section:
    """The :class:`Section` a section dataclass declares through its fields' metadata."""
    fields: dict[str, Any] = {}
    extra = None
    for f in dataclasses.fields(dataclass):
        if "key" in f.metadata:
            fields[f.name] = f.metadata["key"]
        elif "section" in f.metadata:
            fields[f.name] = section_of(*f.metadata["section"])
        elif f.metadata.get("extra"):
            extra = f.name
    return Section(fields=fields, dataclass=dataclass, doc=doc, required=required, extra=extra)


def _model_names() -> tuple:
    from .models import MODELS  # imports torch: only when a config is actually validated
    return tuple(MODELS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """[model]: registered model name and its constructor keyword arguments."""

    name: str = key(str, doc="a registered model (dca, naive_cnn3d, resnet50_3d, encoding_mlp, "
                             "unet3d) or your own: \"package.module:Class\" or "
                             "\"path/models.py:Class\"; its keyword arguments are the other keys "
                             "of [model] (sizes the data determines, e.g. input_length, "
                             "in_channels, out_channels, are filled in unless set)")
    kwargs: dict = extra_keys()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """[data]: the training data."""

    kind: str = key(str, choices=DATA_KINDS,
                    doc="fmri_series: one voxel (vertex) time series per sample; segmentation: "
                        "voxel labels from a cohort ([data] label), Dice/IoU; regression: "
                        "per-subject targets from a cohort ([data] targets), R^2/r/MAE; "
                        "volume_patches: 3D patches regressing grey matter (mni152, .npz); "
                        "encoding: feature vectors -> responses of outputs grouped into ROIs")
    source: str = key(str, "path", choices=DATA_SOURCES,
                      doc="'path': your data ([data] manifest, bids or path); nitime_fmri / mni152 "
                          "/ nitime_rois: the real data shipped in nitime / nilearn; "
                          "mni152_cohort: a small cohort made from nilearn's MNI152 (the real "
                          "template plus seeded synthetic warps of it) written as NIfTI files and "
                          "a manifest into the cache; nitime_runs: nitime's two 4D NIfTI runs "
                          "through a manifest")
    path: Path | None = key(str, None, path=True,
                            doc="one data file: .npy (voxels, time) for fmri_series, .npz for "
                                "volume_patches / encoding")
    manifest: Path | None = key(str, None, path=True,
                                doc="a cohort: .tsv/.csv with a 'subject' column, the image, label "
                                    "and target columns, optional 'split' (train/val/test); "
                                    "image paths relative to the manifest")
    bids: Path | None = key(str, None, path=True,
                            doc="a cohort from a BIDS dataset: sub-*/[ses-*/]anat|func/"
                                "*_<bids_suffix>.nii[.gz], targets from participants.tsv")
    bids_suffix: str = key(str, "T1w", doc="BIDS suffix of the rows' images (T1w, bold, ...)")
    images: tuple = key(list, (), item_type=str,
                        doc="image columns of the manifest (channels of the input, in order); "
                            "BIDS: suffixes (default [bids_suffix])")
    label: str | None = key(str, None, doc="label-map column (BIDS: suffix, e.g. dseg) for "
                                           "segmentation")
    mask: str | None = key(str, None, doc="mask column (BIDS: suffix): the foreground for "
                                          "sampling and z-scoring; fmri_series: the voxels used")
    targets: tuple = key(list, (), item_type=str,
                         doc="per-subject target columns for regression (BIDS: participants.tsv)")
    cache_dir: Path | None = key(str, None, path=True, doc="where converted data is cached "
                                                           "(default $PBM_CACHE_DIR or ~/.cache/pybrain-mpi)")
    verify_cache: bool = key(bool, False, doc="re-read every cached store of a cohort against its "
                                              "checksum at start-up")
    chunks: tuple = key(list, (32, 32, 32), item_type=int, length=3, minimum=1,
                        doc="chunk shape of a cohort's volumes in the cache")
    held_out_fraction: float = key(float, 0.2, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                                   exclusive_maximum=True,
                                   doc="fraction held out for the final test: of subjects for a "
                                       "cohort of several, else of voxels/volumes (one subject: "
                                       "a block of it)")
    split_seed: int = key(int, 0, minimum=0, doc="seed of the held-out split")
    patch_size: tuple = key(list, (64, 64, 64), item_type=int, length=3, minimum=1,
                            doc="patch size in voxels (volume_patches)")
    patches_per_volume: int = key(int, 16, minimum=1, doc="patches drawn per volume (per "
                                                          "training subject) per epoch")
    sampling: str = key(str, "foreground", choices=("foreground", "uniform"),
                        doc="cohort patches: 'foreground' centres foreground_fraction of them on "
                            "a foreground voxel (mask, label > 0, or above the image mean)")
    foreground_fraction: float = key(float, 0.5, minimum=0.0, maximum=1.0,
                                     doc="share of foreground-centred patches ('foreground'); "
                                         "the rest are uniform, so background is seen too")
    eval_patches: int = key(int, 8, minimum=1,
                            doc="fixed validation patches per subject (cohorts); regression from "
                                "patches: patches averaged per held-out subject")
    grid_overlap: float = key(float, 0.25, minimum=0.0, maximum=0.75,
                              doc="whole-volume segmentation and prediction: overlap of grid "
                                  "patches, as a fraction of the patch")
    regression_input: str = key(str, "patches", choices=("patches", "volume"),
                                doc="regression: random foreground patches (the subject's value "
                                    "is every patch's target) or the whole volume at [data] level")
    level: int = key(int, 2, minimum=0, maximum=6,
                     doc="regression_input = 'volume': resolution level (each halves the grid)")
    cohort_subjects: int = key(int, 6, minimum=2, maximum=64,
                               doc="mni152_cohort: subjects (the template and seeded warps of it)")
    cohort_voxel_mm: float = key(float, 2.0, minimum=1.0, maximum=4.0,
                                 doc="mni152_cohort: voxel size of the cohort's images in mm")
    open_subjects: int = key(int, 32, minimum=1,
                             doc="cohort subjects kept open per rank (their chunk caches share "
                                 "cache_mb)")
    cache_mb: int = key(int, 512, minimum=1,
                        doc="decoded-chunk cache per rank over the open subjects, MiB: the more "
                            "of the cohort it holds, the fewer chunks are decoded again "
                            "(benchmarks/cohort_patches.py)")
    target: str = key(str, "gm_mean", choices=("gm_mean", "gm_center"),
                      doc="regression target for mni152: mean or centre grey-matter probability")
    lags: int = key(int, 4, minimum=1, maximum=100,
                    doc="encoding from nitime_rois: past volumes used as features")
    num_workers: int = key(int, 0, minimum=0,
                           doc="threads reading a batch's patches per rank (cohorts; 0: the "
                               "training thread)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LRScheduleConfig:
    """[train.lr_schedule]: learning-rate schedule over optimizer steps."""

    kind: str = key(str, "constant", choices=("constant", "cosine", "step"))
    warmup_steps: int = key(int, 0, minimum=0, doc="linear warm-up steps")
    step_epochs: int = key(int, 10, minimum=1, doc="'step': epochs between decays")
    gamma: float = key(float, 0.1, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                       doc="'step': decay factor")
    min_lr: float = key(float, 0.0, minimum=0.0, doc="'cosine': final learning rate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """[train.compression]: gradient compression for the allreduce."""

    kind: str = key(str, "none", choices=COMPRESSIONS)
    sparsity: float = key(float, 1.0, minimum=1.0, maximum=2.0, exclusive_maximum=True,
                          doc="3LC sparsity multiplier s (larger: more zeros)")
    block: int = key(int, 0, minimum=0, maximum=2**32 - 1,
                     doc="3LC: one scale per block of this many elements (0: one per tensor; "
                         "README's 3LC table measures 32-256)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """[train]: optimisation, precision, compression and checkpointing."""

    epochs: int = key(int, minimum=1, doc="passes over the training data")
    batch_size: int = key(int, minimum=1, doc="samples per rank per step (parallel = \"pipeline\" "
                                              "or \"hybrid\": per pipeline, i.e. per data-parallel "
                                              "replica)")
    lr: float = key(float, minimum=0.0, exclusive_minimum=True, doc="learning rate")
    optimizer: str = key(str, "adam", choices=OPTIMIZERS)
    weight_decay: float = key(float, 0.0, minimum=0.0)
    momentum: float = key(float, 0.0, minimum=0.0, maximum=1.0, exclusive_maximum=True,
                          doc="SGD momentum")
    loss: str = key(str, "auto", choices=LOSSES,
                    doc="auto: dca_loss for the DCA model, dice_ce (cross-entropy + soft Dice) "
                        "for segmentation, MSE otherwise")
    dca_lambda: float = key(float, 0.006, minimum=0.0,
                            doc="weight of 0.5*||Z - Z'||^2 in the DCA loss")
    lr_schedule: LRScheduleConfig = subsection(LRScheduleConfig, doc="learning-rate schedule")
    val_fraction: float = key(float, 0.1, minimum=0.0, maximum=1.0, exclusive_maximum=True,
                              doc="fraction of the training data used for validation")
    patience: int = key(int, 0, minimum=0,
                        doc="early stopping after this many epochs without improvement (0: off)")
    seed: int = key(int, 0, minimum=0)
    device: str = key(str, "auto", choices=DEVICES,
                      doc="auto: a CUDA device per rank when one is visible, else the CPU "
                          "(pybrain_mpi.compute)")
    precision: str = key(str, "auto", choices=PRECISIONS,
                         doc="auto: bf16 autocast on CPUs with native bfloat16 (AVX512_BF16/AMX) "
                             "for models large enough to gain, else fp32; fp16 adds loss scaling")
    memory_format: str = key(str, "auto", choices=MEMORY_FORMATS,
                             doc="auto: channels_last_3d for models with 3D convolutions")
    compression: CompressionConfig = subsection(CompressionConfig, doc="gradient compression")
    allreduce: str = key(str, "auto", choices=ALLREDUCE_ALGORITHMS,
                         doc="gradient allreduce algorithm ('auto': shared memory within a node, "
                             "hierarchical across nodes; see pbm.allreduce)")
    activation_checkpointing: str = key(str, "none", choices=("none", "sqrt"),
                                        doc="recompute activations in backward ('sqrt': about "
                                            "sqrt(n) segments)")
    checkpoint_dir: Path | None = key(str, None, path=True, doc="default: <output dir>/checkpoints")
    checkpoint_every: int = key(int, 0, minimum=0,
                                doc="optimizer steps between checkpoints (0: end and preemption "
                                    "only)")
    time_budget_s: float = key(float, 0.0, minimum=0.0,
                               doc="stop after this many seconds of training (0: no limit)")
    log_every: int = key(int, 10, minimum=1, doc="steps between JSON log lines")
    mode: str = key(str, "sync", choices=TRAIN_MODES,
                    doc="sync: gradient allreduce every step; downpour: asynchronous, the first "
                        "[train] servers ranks hold the parameters (docs/parameter_server.md)")
    parallel: str = key(str, "data", choices=PARALLEL_KINDS,
                        doc="data: every rank holds the whole model; pipeline: the model's layers "
                            "split over all ranks (one stage each); hybrid: pipeline_stages "
                            "stages x (ranks / pipeline_stages) data-parallel pipelines")
    pipeline_stages: int | None = key(int, None, minimum=1,
                                      doc="pipeline/hybrid: stages per pipeline (pipeline: must "
                                          "equal the number of ranks, the default; hybrid: "
                                          "required, must divide it)")
    micro_batches: int = key(int, 1, minimum=1,
                             doc="pipeline/hybrid: micro-batches per step (at most batch_size; "
                                 "need not divide it)")
    schedule: str = key(str, "gpipe", choices=PIPELINE_SCHEDULES,
                        doc="pipeline/hybrid: gpipe (all forwards, then all backwards) or 1f1b "
                            "(at most S - s micro-batches' activations alive on stage s)")
    balance: Any = key(list, "auto", item_type=int, minimum=1, also=("auto",),
                       doc="pipeline/hybrid: layers per stage, or auto (measured on rank 0, "
                           "sent to all; a resume keeps the checkpoint's)")
    servers: int = key(int, 1, minimum=1, doc="downpour: parameter-server ranks (the others train)")
    server_optimizer: str = key(str, "adagrad", choices=OPTIMIZERS,
                                doc="downpour: the servers' optimizer (with [train] lr)")
    fetch_every: int = key(int, 1, minimum=1, doc="downpour: worker steps between parameter fetches")
    push_every: int = key(int, 1, minimum=1,
                          doc="downpour: worker steps between gradient pushes (summed in between)")
    warm_start_steps: int = key(int, 0, minimum=0,
                                doc="downpour: steps worker 0 trains alone before the others join")
    max_staleness: int | None = key(int, None, minimum=0,
                                    doc="downpour: bound on server versions between a worker's "
                                        "fetch and its push (default: unbounded)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """[output]: where logs, plots and summaries go."""

    dir: Path = key(str, "runs/pbm", path=True, doc="directory for logs, plots, summary")
    tensorboard: bool = key(bool, False,
                            doc="also write TensorBoard scalars (loss, lr, samples/s, validation) "
                                "to <dir>/tensorboard (rank 0; needs pybrain-mpi[tensorboard])")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A validated run configuration (``source`` is the file it came from)."""

    model: ModelConfig = subsection(ModelConfig, doc="model name plus its keyword arguments",
                                    required=True)
    data: DataConfig = subsection(DataConfig, doc="training data", required=True)
    train: TrainConfig = subsection(TrainConfig, doc="optimisation", required=True)
    output: OutputConfig = subsection(OutputConfig, doc="results")
    source: str = "<string>"


SCHEMA = section_of(Config, doc="a pybrain-mpi run", required=True)


# ----------------------------------------------------------------------------- line finder

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_KEY = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def _split_key(dotted: str) -> tuple[str, ...]:
    parts = re.findall(_KEY_PART, dotted)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path (and table header) in TOML ``text`` to its 1-based line number.

    Handles ``[table]`` headers, dotted keys and the keys of one-line inline tables; lines
    inside multi-line strings are skipped. The first occurrence wins.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _HEADER.match(line)
        if header:
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if not key:
            continue
        path = table + _split_key(key.group(1))
        lines.setdefault(path, number)
        rest = line[key.end():]
        for quote in ('"""', "'''"):
            if rest.count(quote) % 2 == 1:
                in_multiline = quote
        inline = rest.strip()
        if inline.startswith("{"):
            # Keys of an inline table: 'a = {kind = "3lc", sparsity = 1.5}'.
            for sub in re.finditer(rf"[{{,]\s*({_KEY_PART})\s*=", inline):
                lines.setdefault(path + _split_key(sub.group(1)), number)
    return lines


# ----------------------------------------------------------------------------- validation

class _Validator:
    def __init__(self, text: str, source: str):
        self.source = source
        self.lines = key_lines(text)
        self.problems: list[tuple[int | None, str, str]] = []

    def line_of(self, path: tuple[str, ...]) -> int | None:
        # A key inside an inline table or array may not be found: use its nearest ancestor.
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return None

    def problem(self, path: tuple[str, ...], message: str, line: int | None = None):
        line = line if line is not None else self.line_of(path)
        self.problems.append((line, ".".join(path), message))

    @staticmethod
    def label(path: tuple[str, ...]) -> str:
        if len(path) == 1:
            return f"[{path[0]}]"
        return f"[{'.'.join(path[:-1])}] {path[-1]}"

    def section(self, schema: Section, table: dict, path: tuple[str, ...]):
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in table.items():
            if key in schema.fields:
                continue
            if schema.extra is not None:
                extra[key] = value
                continue
            hint = difflib.get_close_matches(key, list(schema.fields), n=1)
            hint_text = f" (did you mean '{hint[0]}'?)" if hint else ""
            where = f"[{'.'.join(path)}]" if path else "the top level"
            self.problem(path + (key,), f"unknown key '{key}' in {where}{hint_text}; valid "
                         f"keys: {', '.join(schema.fields)}")
        for key, spec in schema.fields.items():
            key_path = path + (key,)
            if isinstance(spec, Section):
                sub = table.get(key, {} if not spec.required else None)
                if sub is None:
                    self.problem(key_path, f"missing required section [{'.'.join(key_path)}]",
                                 line=self.line_of(path) if path else None)
                    continue
                if not isinstance(sub, dict):
                    self.problem(key_path, f"{self.label(key_path)} must be a table "
                                 f"([{'.'.join(key_path)}]), got {_toml_type_name(sub)}")
                    continue
                values[key] = self.section(spec, sub, key_path)
                continue
            if key not in table:
                if spec.required:
                    self.problem(key_path, f"missing required key {self.label(key_path)}: "
                                 f"expected {spec.describe()}"
                                 + (f" ({spec.doc})" if spec.doc else ""),
                                 line=self.line_of(path) if path else None)
                    continue
                value = spec.default
            else:
                try:
                    value = spec.convert(table[key])
                except ValueError as exc:
                    self.problem(key_path, f"{self.label(key_path)} = {_show(table[key])}: "
                                 f"expected {spec.describe()}, {exc}")
                    continue
            if spec.path and value is not None:
                value = Path(value).expanduser()
            values[key] = value
        if schema.extra is not None:
            values[schema.extra] = extra
        if len(self.problems):
            return None
        return values

    def report(self):
        if not self.problems:
            return
        self.problems.sort(key=lambda p: (p[0] is None, p[0] or 0))
        lines = [f"{self.source}:{line if line is not None else '?'}: {message}"
                 for line, _, message in self.problems]
        count = len(lines)
        raise ConfigError(f"invalid config {self.source} ({count} problem"
                          f"{'s' if count > 1 else ''}):\n  " + "\n  ".join(lines),
                          self.problems)


def _check_model(v: _Validator, model: dict):
    from .models import ModelNotFound, is_model_spec, model_arguments, resolve_model

    name = model["name"]
    if is_model_spec(name):
        try:
            resolve_model(name)
        except ModelNotFound as exc:
            v.problem(("model", "name"), str(exc))
            return
    else:
        names = _model_names()
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            v.problem(("model", "name"), f'[model] name = "{name}": expected one of '
                      + ", ".join(f'"{n}"' for n in names)
                      + (f" (did you mean '{hint[0]}'?)" if hint else "")
                      + ', or your own model as "package.module:Class" or "file.py:Class"')
            return
    allowed = model_arguments(name)
    for key, value in model["kwargs"].items():
        path = ("model", key)
        if key not in allowed:
            if "**" in allowed:
                continue  # the constructor takes **kwargs: it checks them itself
            hint = difflib.get_close_matches(key, list(allowed), n=1)
            v.problem(path, f"[model] {key}: model '{name}' has no argument '{key}'"
                      + (f" (did you mean '{hint[0]}'?)" if hint else "")
                      + f"; its arguments: {', '.join(allowed)}")
            continue
        default = allowed[key]
        if default is None or default is inspect.Parameter.empty:
            continue  # no default to infer the type from: the model checks it
        kind = list if isinstance(default, (tuple, list)) else type(default)
        if kind not in _TYPE_NAMES:
            continue  # a default of another type (an enum, a class): the model checks it
        try:
            if kind is list:
                if not isinstance(value, list):
                    raise ValueError(f"got {_toml_type_name(value)} {_show(value)}")
            else:
                model["kwargs"][key] = _convert_scalar(kind, value)
        except (ValueError, TypeError) as exc:
            v.problem(path, f"[model] {key} = {_show(value)}: model '{name}' expects "
                      f"{_TYPE_NAMES.get(kind, kind.__name__)} (default {_show(default)}), {exc}")


NITIME_SERIES_LENGTH = 40
NITIME_ROI_SIGNALS, NITIME_ROI_OUTPUTS = 31, 28  # fmri_timeseries.csv: all columns, ROIs


def _check_model_matches_data(v: _Validator, model: dict, data: dict):
    # Shape mismatches we can see from the config alone are reported now, before any data
    # is read or any step is run; the trainer checks the rest against the real data.
    # Only sizes the config sets: those left out are taken from the data by the trainer.
    args = model["kwargs"]
    if "input_shape" in args and data["kind"] == "volume_patches":
        shape = tuple(args["input_shape"]) if isinstance(args["input_shape"], (list, tuple)) \
            else args["input_shape"]
        if shape != tuple(data["patch_size"]):
            v.problem(("model", "input_shape"), f"[model] input_shape = {list(shape)} does not "
                      f"match [data] patch_size = {list(data['patch_size'])} (line "
                      f"{v.line_of(('data', 'patch_size')) or 'default'}); make them equal")
    if "input_length" in args and data["source"] == "nitime_fmri" \
            and args["input_length"] != NITIME_SERIES_LENGTH:
        v.problem(("model", "input_length"), f"[model] input_length = {args['input_length']}: "
                  f"nitime's fMRI series have {NITIME_SERIES_LENGTH} time points; set "
                  f"input_length = {NITIME_SERIES_LENGTH}")
    if data["source"] == "nitime_rois" and "in_features" in args and "out_features" in args:
        features = NITIME_ROI_SIGNALS * data["lags"]
        if args["in_features"] != features:
            v.problem(("model", "in_features"), f"[model] in_features = {args['in_features']}: "
                      f"nitime_rois gives {NITIME_ROI_SIGNALS} signals x [data] lags = "
                      f"{data['lags']} = {features} features; set in_features = {features}")
        if args["out_features"] != NITIME_ROI_OUTPUTS:
            v.problem(("model", "out_features"), f"[model] out_features = "
                      f"{args['out_features']}: nitime_rois predicts {NITIME_ROI_OUTPUTS} ROI "
                      f"signals; set out_features = {NITIME_ROI_OUTPUTS}")


def _check_mode(v: _Validator, train: dict) -> None:
    """[train] mode and the downpour keys: given only with mode = "downpour", and what that mode
    does not do yet refused by name."""
    _check_parallel(v, train)
    compression = train["compression"]
    if compression["block"] and compression["kind"] != "3lc":
        v.problem(("train", "compression", "block"), f"[train.compression] block = "
                  f'{compression["block"]} applies to kind = "3lc" only (this run is kind = '
                  f'"{compression["kind"]}"); remove it or set kind = "3lc"')
    if train["mode"] != "downpour":
        for name in DOWNPOUR_KEYS:
            if ("train", name) in v.lines:
                v.problem(("train", name), f'[train] {name} applies to mode = "downpour" only '
                          f'(this run is mode = "{train["mode"]}"); remove it or set mode = "downpour"')
        return
    if train["compression"]["kind"] != "none":
        v.problem(("train", "compression", "kind"), f'[train.compression] kind = '
                  f'"{train["compression"]["kind"]}": downpour pushes uncompressed gradients; set '
                  'kind = "none"')
    if train["activation_checkpointing"] != "none":
        v.problem(("train", "activation_checkpointing"), '[train] activation_checkpointing is not '
                  'supported with mode = "downpour"; set it to "none"')


def _check_parallel(v: _Validator, train: dict) -> None:
    """[train] parallel and the pipeline keys: given only with a pipelined run, and the
    combinations a pipelined run does not support refused by name. What needs the number of
    ranks (pipeline_stages against the world) is checked when training starts."""
    parallel = train["parallel"]
    if parallel == "data":
        for name in PIPELINE_KEYS:
            if ("train", name) in v.lines:
                v.problem(("train", name), f'[train] {name} applies to parallel = "pipeline" or '
                          '"hybrid" only (this run is parallel = "data"); remove it or set parallel')
        return
    refuse = f'with [train] parallel = "{parallel}"'
    if train["mode"] != "sync":
        v.problem(("train", "mode"), f'[train] mode = "{train["mode"]}" cannot run {refuse}; set '
                  'mode = "sync" or parallel = "data"')
    if parallel == "hybrid" and train["pipeline_stages"] is None:
        v.problem(("train", "parallel"), '[train] parallel = "hybrid" needs [train] '
                  "pipeline_stages, the stages per pipeline (the ranks are split into "
                  "pipelines of that many consecutive ranks)")
    if train["micro_batches"] > train["batch_size"]:
        v.problem(("train", "micro_batches"), f"[train] micro_batches = {train['micro_batches']} "
                  f"exceeds batch_size = {train['batch_size']} (every micro-batch needs a sample "
                  "of the pipeline's batch)")
    balance = train["balance"]
    stages = train["pipeline_stages"]
    if not isinstance(balance, str) and stages is not None and len(balance) != stages:
        v.problem(("train", "balance"), f"[train] balance = {list(balance)} gives "
                  f"{len(balance)} stages but pipeline_stages = {stages}")
    if train["compression"]["kind"] != "none":
        v.problem(("train", "compression", "kind"), f'[train.compression] kind = '
                  f'"{train["compression"]["kind"]}" is not supported {refuse}; set kind = "none"')
    if train["activation_checkpointing"] != "none":
        v.problem(("train", "activation_checkpointing"), "[train] activation_checkpointing is "
                  f'not supported {refuse}; set it to "none"')
    if train["precision"] == "fp16":
        v.problem(("train", "precision"), f'[train] precision = "fp16" (loss scaling) is not '
                  f'supported {refuse}; use "fp32", "bf16" or "fp64"')


def _check_pipeline_model(v: _Validator, model: dict, train: dict) -> None:
    """A pipelined run splits the model into consecutive layers: an ``nn.Sequential`` or a
    model with ``pipeline_layers()``."""
    if train["parallel"] == "data":
        return
    from torch import nn

    from .models import ModelNotFound, resolve_model

    try:
        cls = resolve_model(model["name"])
    except ModelNotFound:
        return  # reported by _check_model
    if not (issubclass(cls, nn.Sequential) or hasattr(cls, "pipeline_layers")):
        v.problem(("train", "parallel"), f'[train] parallel = "{train["parallel"]}" splits the '
                  f"model into stages of consecutive layers, but [model] {model['name']} "
                  f"({cls.__name__}) is neither an nn.Sequential nor has pipeline_layers(); use "
                  'such a model or parallel = "data"')


def _check_data(v: _Validator, data: dict, train: dict) -> None:
    """Combinations of [data] keys that cannot work, reported before anything is read."""
    given = [k for k in ("path", "manifest", "bids") if data[k] is not None]
    kind, source = data["kind"], data["source"]
    if source == "path":
        if not given:
            v.problem(("data", "source"), "[data] source = \"path\" needs [data] path (one "
                      "file), manifest (a .tsv/.csv of subjects) or bids (a BIDS directory); or "
                      "use source = \"nitime_fmri\" / \"mni152\" / \"mni152_cohort\" for the "
                      "built-in example data")
        elif len(given) > 1:
            v.problem(("data", given[1]), f"[data] {' and '.join(given)}: give only one of path, "
                      "manifest and bids")
    elif given:
        v.problem(("data", given[0]), f"[data] {given[0]}: source = \"{source}\" brings its own "
                  "data; leave it out or set source = \"path\"")
    provides = {"nitime_fmri": ("fmri_series",), "mni152": ("volume_patches",),
                "nitime_rois": ("encoding",), "nitime_runs": ("fmri_series",),
                "mni152_cohort": ("segmentation", "regression")}
    if source in provides and kind not in provides[source]:
        v.problem(("data", "kind"), f'[data] kind = "{kind}": source "{source}" provides '
                  + " or ".join(f'"{k}"' for k in provides[source]) + " data")
    cohort = source in COHORT_SOURCES or data["manifest"] is not None or data["bids"] is not None
    if kind in ("segmentation", "regression") and source == "path" and data["path"] is not None:
        v.problem(("data", "path"), f'[data] kind = "{kind}" trains on a cohort: give [data] '
                  "manifest (or bids) instead of path")
    if cohort and kind in ("volume_patches", "encoding"):
        v.problem(("data", "kind"), f'[data] kind = "{kind}" reads [data] path; a cohort trains '
                  'kind = "segmentation", "regression" or "fmri_series"')
    if data["manifest"] is not None and not data["images"]:
        v.problem(("data", "images"), "[data] manifest needs [data] images, the image column(s), "
                  'e.g. images = ["t1"]', line=v.line_of(("data", "manifest")))
    if kind == "segmentation" and source == "path" and cohort and data["label"] is None:
        v.problem(("data", "label"), "[data] kind = \"segmentation\" needs [data] label, the "
                  "label-map column", line=v.line_of(("data", "kind")))
    if kind == "regression" and source == "path" and cohort and not data["targets"]:
        v.problem(("data", "targets"), "[data] kind = \"regression\" needs [data] targets, the "
                  "per-subject target columns", line=v.line_of(("data", "kind")))
    _check_mode(v, train)
    loss = train["loss"]
    if kind == "segmentation" and loss not in ("auto", "cross_entropy", "dice_ce"):
        v.problem(("train", "loss"), f'[train] loss = "{loss}": segmentation trains with '
                  '"cross_entropy" or "dice_ce" (the default)')
    if kind != "segmentation" and loss in ("cross_entropy", "dice_ce"):
        v.problem(("train", "loss"), f'[train] loss = "{loss}" is for kind = "segmentation"')


def _build(schema: Section, values: dict):
    kwargs = {}
    for key, spec in schema.fields.items():
        kwargs[key] = _build(spec, values[key]) if isinstance(spec, Section) else values[key]
    if schema.extra is not None:
        kwargs[schema.extra] = {k: tuple(v) if isinstance(v, list) else v
                                for k, v in values[schema.extra].items()}
    return schema.dataclass(**kwargs)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate TOML ``text`` (``source`` names it in errors) and return a :class:`Config`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)": keep it, prefix the file.
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        raise ConfigError(f"{source}:{line if line else '?'}: not valid TOML: {exc}",
                          [(line, "", str(exc))]) from None
    v = _Validator(text, source)
    values = v.section(SCHEMA, raw, ())
    v.report()
    _check_model(v, values["model"])
    data = values["data"]
    _check_data(v, data, values["train"])
    _check_model_matches_data(v, values["model"], data)
    _check_pipeline_model(v, values["model"], values["train"])
    v.report()
    config = _build(SCHEMA, values)
    return dataclasses.replace(config, source=source)


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML config at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return parse_config(text, str(path))


def config_to_dict(config: Config) -> dict:
    """Plain JSON-able dict of a config (paths as strings, tuples as lists)."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def describe_schema(section: Section = SCHEMA, path: tuple[str, ...] = ()) -> str:
    """Every key of the schema with type, range/choices, default and doc, one per line."""
    out = []
    for key, spec in section.fields.items():
        if isinstance(spec, Section):
            out.append(f"[{'.'.join(path + (key,))}]" + (f"  # {spec.doc}" if spec.doc else ""))
            out.append(describe_schema(spec, path + (key,)))
            continue
        default = "required" if spec.required else f"default {_show(spec.default)}"
        out.append(f"  {key}: {spec.describe()}; {default}" + (f" -- {spec.doc}" if spec.doc else ""))
    if section.extra:
        out.append("  (other keys: the model's keyword arguments)")
    return "\n".join(out)
