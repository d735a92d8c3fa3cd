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

The schema is data (:data:`SCHEMA`, built from :class:`Field` and :class:`Section`), so
:func:`describe_schema` can print every key with its type, range, choices and default.
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

__all__ = ["ConfigError", "Field", "Section", "SCHEMA", "Config", "ModelConfig", "DataConfig",
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

    @property
    def required(self) -> bool:
        """True when the key has no default."""
        return self.default is _REQUIRED

    def describe(self) -> str:
        """Expected value in words, e.g. ``a float > 0`` or ``one of "sgd", "adam"``."""
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


# ----------------------------------------------------------------------------- dataclasses

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """[model]: registered model name and its constructor keyword arguments."""

    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """[data]: the training data."""

    kind: str
    source: str = "path"
    path: Path | None = None
    cache_dir: Path | None = None
    held_out_fraction: float = 0.2
    split_seed: int = 0
    patch_size: tuple = (64, 64, 64)
    patches_per_volume: int = 16
    target: str = "gm_mean"
    lags: int = 4
    num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class LRScheduleConfig:
    """[train.lr_schedule]: learning-rate schedule over optimizer steps."""

    kind: str = "constant"
    warmup_steps: int = 0
    step_epochs: int = 10
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """[train.compression]: gradient compression for the allreduce."""

    kind: str = "none"
    sparsity: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """[train]: optimisation, precision, compression and checkpointing."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.0
    loss: str = "auto"
    dca_lambda: float = 0.006
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    val_fraction: float = 0.1
    patience: int = 0
    seed: int = 0
    precision: str = "fp32"
    compression: CompressionConfig = CompressionConfig()
    allreduce: str = "auto"
    activation_checkpointing: str = "none"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    time_budget_s: float = 0.0
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """[output]: where logs, plots and summaries go."""

    dir: Path = Path("runs/pbm")


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated run configuration (``source`` is the file it came from)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    output: OutputConfig
    source: str = "<string>"


# ----------------------------------------------------------------------------- the schema

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
PRECISIONS = ("fp32", "fp64", "bf16")
COMPRESSIONS = ("none", "fp16", "bf16", "3lc")
ALLREDUCE_ALGORITHMS = ("auto", "ring", "mpi", "shm", "hierarchical")
DATA_KINDS = ("fmri_series", "volume_patches", "encoding")
DATA_SOURCES = ("path", "nitime_fmri", "mni152", "nitime_rois")


def _model_names() -> tuple:
    from .models import MODELS  # imports torch: only when a config is actually validated
    return tuple(MODELS)


SCHEMA = Section(doc="a pybrain-mpi run", dataclass=Config, required=True, fields={
    "model": Section(dataclass=ModelConfig, required=True, extra="kwargs",
                     doc="model name plus its keyword arguments", fields={
        "name": Field(str, doc="registered model (pybrain_mpi.models.MODELS)"),
    }),
    "data": Section(dataclass=DataConfig, required=True, doc="training data", fields={
        "kind": Field(str, choices=DATA_KINDS,
                      doc="fmri_series: one voxel time series per sample; "
                          "volume_patches: 3D patches from volumes; encoding: feature vectors "
                          "-> responses of outputs grouped into ROIs (per-ROI metrics)"),
        "source": Field(str, "path", choices=DATA_SOURCES,
                        doc="'path' reads [data] path; nitime_fmri / mni152 / nitime_rois use "
                            "the real data shipped in the nitime / nilearn packages"),
        "path": Field(str, None, doc="data file or directory (required when source = 'path')"),
        "cache_dir": Field(str, None, doc="where converted data is cached "
                                          "(default $PBM_CACHE_DIR or ~/.cache/pybrain-mpi)"),
        "held_out_fraction": Field(float, 0.2, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                                   exclusive_maximum=True,
                                   doc="fraction of voxels/volumes held out for the final test"),
        "split_seed": Field(int, 0, minimum=0, doc="seed of the held-out split"),
        "patch_size": Field(list, (64, 64, 64), item_type=int, length=3, minimum=1,
                            doc="patch size in voxels (volume_patches)"),
        "patches_per_volume": Field(int, 16, minimum=1, doc="patches drawn per volume per epoch"),
        "target": Field(str, "gm_mean", choices=("gm_mean", "gm_center"),
                        doc="regression target for mni152: mean or centre grey-matter probability"),
        "lags": Field(int, 4, minimum=1, maximum=100,
                      doc="encoding from nitime_rois: past volumes used as features"),
        "num_workers": Field(int, 0, minimum=0, doc="background reader threads per rank"),
    }),
    "train": Section(dataclass=TrainConfig, required=True, doc="optimisation", fields={
        "epochs": Field(int, minimum=1, doc="passes over the training data"),
        "batch_size": Field(int, minimum=1, doc="samples per rank per step"),
        "lr": Field(float, minimum=0.0, exclusive_minimum=True, doc="learning rate"),
        "optimizer": Field(str, "adam", choices=OPTIMIZERS),
        "weight_decay": Field(float, 0.0, minimum=0.0),
        "momentum": Field(float, 0.0, minimum=0.0, maximum=1.0, exclusive_maximum=True,
                          doc="SGD momentum"),
        "loss": Field(str, "auto", choices=("auto", "mse", "dca", "smooth_l1"),
                      doc="auto: dca_loss for the DCA model, MSE otherwise"),
        "dca_lambda": Field(float, 0.006, minimum=0.0,
                            doc="weight of 0.5*||Z - Z'||^2 in the DCA loss"),
        "lr_schedule": Section(dataclass=LRScheduleConfig, doc="learning-rate schedule", fields={
            "kind": Field(str, "constant", choices=("constant", "cosine", "step")),
            "warmup_steps": Field(int, 0, minimum=0, doc="linear warm-up steps"),
            "step_epochs": Field(int, 10, minimum=1, doc="'step': epochs between decays"),
            "gamma": Field(float, 0.1, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                           doc="'step': decay factor"),
            "min_lr": Field(float, 0.0, minimum=0.0, doc="'cosine': final learning rate"),
        }),
        "val_fraction": Field(float, 0.1, minimum=0.0, maximum=1.0, exclusive_maximum=True,
                              doc="fraction of the training data used for validation"),
        "patience": Field(int, 0, minimum=0,
                          doc="early stopping after this many epochs without improvement (0: off)"),
        "seed": Field(int, 0, minimum=0),
        "precision": Field(str, "fp32", choices=PRECISIONS),
        "compression": Section(dataclass=CompressionConfig, doc="gradient compression", fields={
            "kind": Field(str, "none", choices=COMPRESSIONS),
            "sparsity": Field(float, 1.0, minimum=1.0, maximum=2.0, exclusive_maximum=True,
                              doc="3LC sparsity multiplier s (larger: more zeros)"),
        }),
        "allreduce": Field(str, "auto", choices=ALLREDUCE_ALGORITHMS,
                           doc="gradient allreduce algorithm ('auto': shared memory within a "
                               "node, hierarchical across nodes; see pbm.allreduce)"),
        "activation_checkpointing": Field(str, "none", choices=("none", "sqrt"),
                                          doc="recompute activations in backward ('sqrt': "
                                              "about sqrt(n) segments)"),
        "checkpoint_dir": Field(str, None, doc="default: <output dir>/checkpoints"),
        "checkpoint_every": Field(int, 0, minimum=0,
                                  doc="optimizer steps between checkpoints (0: end and "
                                      "preemption only)"),
        "time_budget_s": Field(float, 0.0, minimum=0.0,
                               doc="stop after this many seconds of training (0: no limit)"),
        "log_every": Field(int, 10, minimum=1, doc="steps between JSON log lines"),
    }),
    "output": Section(dataclass=OutputConfig, doc="results", fields={
        "dir": Field(str, "runs/pbm", doc="directory for logs, plots, summary"),
    }),
})

_PATH_FIELDS = {("data", "path"), ("data", "cache_dir"), ("train", "checkpoint_dir"),
                ("output", "dir")}


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
            if key_path in _PATH_FIELDS and value is not None:
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
    from .models import model_arguments

    names = _model_names()
    name = model["name"]
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        v.problem(("model", "name"), f'[model] name = "{name}": expected one of '
                  + ", ".join(f'"{n}"' for n in names)
                  + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        return
    allowed = model_arguments(name)
    for key, value in model["kwargs"].items():
        path = ("model", key)
        if key not in allowed:
            hint = difflib.get_close_matches(key, list(allowed), n=1)
            v.problem(path, f"[model] {key}: model '{name}' has no argument '{key}'"
                      + (f" (did you mean '{hint[0]}'?)" if hint else "")
                      + f"; its arguments: {', '.join(allowed)}")
            continue
        default = allowed[key]
        if default is None or default is inspect.Parameter.empty:
            continue  # no default to infer the type from: the model checks it
        kind = list if isinstance(default, (tuple, list)) else type(default)
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
    from .models import model_arguments

    if model["name"] not in _model_names():
        return
    args = {**model_arguments(model["name"]), **model["kwargs"]}
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
    if data["source"] == "path" and data["path"] is None:
        v.problem(("data", "source"), "[data] source = \"path\" needs [data] path (a file or "
                  "directory); or use source = \"nitime_fmri\" / \"mni152\" for the built-in "
                  "example data")
    for field, kind in (("nitime_fmri", "fmri_series"), ("mni152", "volume_patches"),
                        ("nitime_rois", "encoding")):
        if data["source"] == field and data["kind"] != kind:
            v.problem(("data", "kind"), f'[data] kind = "{data["kind"]}": source "{field}" '
                      f'provides "{kind}" data')
    _check_model_matches_data(v, values["model"], data)
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
