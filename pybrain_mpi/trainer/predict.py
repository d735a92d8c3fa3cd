"""``pybrain-mpi predict``: a trained model applied to new images, on every rank.

    pybrain-mpi predict CONFIG --checkpoint runs/x/checkpoints/checkpoint.pt \\
        --input img.nii.gz --output pred.nii.gz [--probabilities probs.nii.gz] [--png pred.png]

The input is one image (a model of one image channel) or a manifest (``.tsv``/``.csv``, the
training config's image columns; ``--output`` is then a directory). Inputs are converted
into the cache like training subjects (ranks in parallel) and scaled exactly as the training
images were (z-scored over the same region, see :mod:`pybrain_mpi.data.subjects`).

- **Segmentation**: grid patches over the whole volume shared across ranks and aggregated
  (:func:`~pybrain_mpi.trainer.inference.predict_region`, the trainer's own held-out
  evaluation); the most probable label per voxel is written, as NIfTI with the input's affine
  and header (``.nii``/``.nii.gz``) or OME-Zarr (``.zarr``); ``--probabilities`` also writes
  the class probabilities (4D, classes last in NIfTI, first in Zarr).
- **Regression** (per-subject targets): each subject's value (the mean over its evaluation
  patches, as in training's evaluation, or the whole-volume prediction) in a ``.tsv``.
- ``--png``: three orthogonal slices of the image with the prediction over it.

What training knew about its data (task, label values, patch size, image columns, target
scaling) travels in the checkpoint's metadata, so only the checkpoint and the config are
needed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.errors import DataError
from ..errors import PbmError

__all__ = ["predict", "PredictError"]

_IMAGE_OUTPUTS = (".nii.gz", ".nii", ".zarr")


class PredictError(PbmError):
    """Prediction cannot run (checkpoint, inputs or outputs); the message says why."""


def _say(rank: int, text: str) -> None:
    from .. import logs

    if rank == 0:
        logs.get_logger("predict").info(text)


def _load_model(checkpoint: Path, metadata: dict, tree: dict) -> torch.nn.Module:
    from ..models import build_model
    from .checkpoint import check_model_matches

    kwargs = metadata.get("model_kwargs")
    if kwargs is None:
        raise PredictError(f"{checkpoint} has no model arguments in its metadata (written before "
                           "`predict` existed); train again to write a checkpoint predict reads")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    torch.manual_seed(0)
    model = build_model(metadata["model"], **kwargs)
    check_model_matches(tree, model, checkpoint)
    model.load_state_dict(tree["model"]["state"])
    dtype = torch.float64 if metadata.get("precision") == "fp64" else torch.float32
    return model.to(dtype).eval()


def _input_cohort(inputs: str, info: dict, config: Config):
    from ..data.cohort import Cohort, Subject, read_manifest

    columns = info["image_columns"]
    mask = config.data.mask
    if inputs.lower().endswith((".tsv", ".csv")):
        return read_manifest(inputs, columns, None, mask, ()), True
    if len(columns) != 1:
        raise PredictError(f"the model takes {len(columns)} images per subject ({', '.join(columns)}); "
                           f"give --input a manifest with those columns")
    if mask is not None:
        raise PredictError(f"the model was trained with the mask column '{mask}' (the region "
                           "its images were scaled over); give --input a manifest with it")
    path = os.path.abspath(os.path.expanduser(inputs))
    if not os.path.exists(path):
        raise PredictError(f"--input {inputs} does not exist")
    name = Path(path).name
    for ending in (".nii.gz", ".nii", ".mgz", ".mgh", ".zarr", ".npy"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return Cohort((Subject(name, name, {columns[0]: path}, where=inputs),), inputs,
                  tuple(columns), None, None, ()), False


def _output_path(output: Path, subject_id: str, many: bool, ending: str) -> Path:
    return output / f"{subject_id}_pred{ending}" if many else output


def _ending(path: Path) -> str:
    text = str(path).lower()
    for ending in _IMAGE_OUTPUTS + (".tsv", ".csv", ".png"):
        if text.endswith(ending):
            return ending
    return ""


def _write_volume(path: Path, data: np.ndarray, source: str, affine: np.ndarray,
                  channels_first: bool = False) -> None:
    """``data`` as NIfTI (the source's header when it is NIfTI, its affine in any case) or
    OME-Zarr; written aside and renamed."""
    import nibabel as nib

    from ..data.convert import write_array

    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).lower().endswith(".zarr"):
        write_array(data, path, affine=affine, channel_axis=channels_first and data.ndim == 4)
        return
    array = np.moveaxis(data, 0, -1) if channels_first and data.ndim == 4 else data
    header = None
    if source.lower().endswith((".nii", ".nii.gz")):
        header = nib.load(source).header.copy()
    img = nib.Nifti1Image(array, affine, header=header)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if array.ndim == 3:
        img.header.set_intent("label" if np.issubdtype(array.dtype, np.integer) else "none")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" + (".nii.gz" if str(path).endswith(".gz") else ".nii"))
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _label_dtype(labels) -> np.dtype:
    low, high = min(labels), max(labels)
    return np.dtype(np.uint8) if 0 <= low and high < 256 else np.dtype(np.int16) \
        if -2**15 <= low and high < 2**15 else np.dtype(np.int32)


def _check_outputs(task: str, output: Path, many: bool, probabilities) -> None:
    """Refuses output paths the task cannot write, before any work is done."""
    ending = _ending(output)
    if task == "segmentation":
        if many and ending:
            raise PredictError(f"--input is a manifest: --output {output} must be a directory "
                               "(one prediction per subject)")
        if not many and ending not in _IMAGE_OUTPUTS:
            raise PredictError(f"--output {output}: write a segmentation as .nii, .nii.gz or .zarr")
        if probabilities is not None and not many and _ending(Path(probabilities)) not in _IMAGE_OUTPUTS:
            raise PredictError(f"--probabilities {probabilities}: write it as .nii, .nii.gz or .zarr")
    elif ending not in (".tsv", ".csv"):
        raise PredictError(f"--output {output}: regression writes one row per subject: give a "
                           ".tsv or .csv file")


@dataclasses.dataclass
class _Run:
    """What both tasks' prediction loops share: the model, the data and where outputs go."""

    config: Config
    info: dict
    model: torch.nn.Module
    cohort: object
    subjects: list
    many: bool
    output: Path
    inputs: str
    batch: int
    rank: int
    size: int
    probabilities: str | os.PathLike | None = None
    png: str | os.PathLike | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(x)).to(dtype)).float().numpy()


def _write_segmentation_extras(run: _Run, index: int, volumes, predicted, probs,
                               record: dict) -> None:
    """Rank 0's optional outputs of one subject: class probabilities and a picture."""
    from .plots import plot_overlay

    probabilities, png, labels = run.probabilities, run.png, np.asarray(run.info["labels"])
    subject = run.subjects[index]
    source = next(iter(run.cohort.subjects[index].images.values()))
    affine = np.asarray(subject.stats["affine"])
    if probabilities is not None:
        where = (Path(probabilities) / f"{subject.id}_probabilities.nii.gz" if run.many
                 else Path(probabilities))
        _write_volume(where, probs.astype(np.float32), source, affine, channels_first=True)
        record["probabilities"] = str(where)
    if png is not None:
        picture = Path(png) / f"{subject.id}.png" if run.many else Path(png)
        plot_overlay(picture, volumes.images[0].read(), predicted,
                     f"{subject.id}: predicted labels {labels[1:].tolist()} over "
                     f"{run.cohort.image_columns[0]}", voxel_size=subject.stats["voxel_size"])
        record["png"] = str(picture)


def _predict_segmentation(run: _Run) -> list[dict]:
    """Grid patches over every subject's whole volume, shared across ranks; labels written."""
    from .cohorts import _SubjectPool, _softmax
    from .inference import grid_overlap, predict_region

    patch = tuple(run.info["patch"])
    labels = np.asarray(run.info["labels"])
    pool = _SubjectPool(run.subjects, limit=2, cache_bytes=run.config.data.cache_mb * 2**20)
    overlap = grid_overlap(patch, run.info.get("grid_overlap", run.config.data.grid_overlap))
    records = []
    try:
        for index, subject in enumerate(run.subjects):
            volumes = pool.get(index)
            shape = tuple(subject.stats["shape"])
            if any(p > n for p, n in zip(patch, shape)):
                raise DataError(f"{subject.where}: the volume {list(shape)} is smaller than the "
                                f"model's patch {list(patch)}")
            probs = predict_region(lambda x: _softmax(run.forward(x)), volumes.read_input, (0, 0, 0),
                                   shape, patch, len(labels), overlap=overlap, batch_size=run.batch,
                                   rank=run.rank, world_size=run.size)
            predicted = labels[probs.argmax(axis=0)].astype(_label_dtype(labels.tolist()))
            target = _output_path(run.output, subject.id, run.many, ".nii.gz")
            record = {"subject": subject.id, "output": str(target),
                      "voxels_per_label": {str(v): int((predicted == v).sum()) for v in labels}}
            if run.rank == 0:
                source = next(iter(run.cohort.subjects[index].images.values()))
                _write_volume(target, predicted, source, np.asarray(subject.stats["affine"]))
                _write_segmentation_extras(run, index, volumes, predicted, probs, record)
                _say(run.rank, f"{subject.id}: wrote {target}")
            records.append(record)
    finally:
        pool.close()
    return records


def _regression_sums(run: _Run, names) -> np.ndarray:
    """Per subject: the sum of its predicted (scaled) values and the count of patches, summed
    over the ranks (each rank predicts every size-th evaluation patch)."""
    from ..communication import collectives
    from ..data.cohort import CohortSplit
    from .cohorts import _CohortPatches

    info, config = run.info, run.config
    patch = tuple(info["patch"])
    whole = info.get("regression_input") == "volume"
    data_config = dataclasses.replace(
        config.data, patch_size=patch, sampling=info.get("sampling", config.data.sampling),
        foreground_fraction=info.get("foreground_fraction", config.data.foreground_fraction),
        eval_patches=1 if whole else info["eval_patches"])
    everyone = tuple(range(len(run.subjects)))
    reader = _CohortPatches(run.subjects, CohortSplit((), (), everyone), data_config, run.inputs,
                            info.get("seed", 0), "", patch=patch, level=info.get("level", 0))
    try:
        items = [(i, (0, 0, 0)) for i in everyone] if whole else reader._eval_samples("held_out")
        sums = np.zeros((len(run.subjects), len(names) + 1), dtype=np.float64)
        mine = list(range(run.rank, len(items), run.size))
        for lo in range(0, len(mine), run.batch):
            chunk = [items[k] for k in mine[lo:lo + run.batch]]
            out = run.forward(reader.read_inputs(chunk)).reshape(len(chunk), len(names))
            for (subject, _), row in zip(chunk, out):
                sums[subject, :-1] += row
                sums[subject, -1] += 1
    finally:
        reader.close()
    if run.size > 1:
        sums = collectives.allreduce(torch.from_numpy(sums), op="sum",
                                     name="predicted values").numpy()
    return sums


def _predict_regression(run: _Run) -> list[dict]:
    """Every subject's value from its evaluation patches (or whole volume), in one table."""
    names = run.info["targets"]
    mean, std = np.asarray(run.info["target_mean"]), np.asarray(run.info["target_std"])
    sums = _regression_sums(run, names)
    values = sums[:, :-1] / np.maximum(sums[:, -1:], 1.0) * std + mean
    records = [{"subject": subject.id, **{n: float(v) for n, v in zip(names, row)}}
               for subject, row in zip(run.subjects, values)]
    if run.rank == 0:
        output = run.output
        delimiter = "," if _ending(output) == ".csv" else "\t"
        lines = [delimiter.join(["subject"] + [f"{n}_predicted" for n in names])]
        lines += [delimiter.join([r["subject"]] + [f"{r[n]:.6g}" for n in names]) for r in records]
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, output)
        _say(run.rank, f"wrote {len(records)} subject(s) to {output}")
        if run.png is not None:
            _say(run.rank, "--png: regression predicts one value per subject; no picture written")
    return records


def predict(config: Config, checkpoint: str | os.PathLike, inputs: str, output: str | os.PathLike,
            *, probabilities: str | os.PathLike | None = None, png: str | os.PathLike | None = None,
            batch_size: int | None = None) -> list[dict]:
    """Predict ``inputs`` with the checkpointed model (see the module docstring); returns one
    record per subject (``subject``, ``output`` and, for regression, the values). Collective
    over the ranks of the initialized world; rank 0 writes the outputs."""
    from ..data.ranks import world
    from ..data.subjects import prepare_cohort
    from .checkpoint import load_checkpoint
    from .data import _cache_wait_s

    rank, size = world()
    checkpoint = Path(checkpoint)
    tree, metadata = load_checkpoint(checkpoint)
    info = metadata.get("data") or {}
    task = info.get("task")
    if task not in ("segmentation", "regression"):
        raise PredictError(f"{checkpoint} is a model of {metadata.get('model')} trained on "
                           f"{task or 'data without prediction metadata'}; predict writes "
                           "segmentations and per-subject regression values of cohort models")
    model = _load_model(checkpoint, metadata, tree)
    output = Path(output)
    cohort, many = _input_cohort(str(inputs), info, config)
    _check_outputs(task, output, many, probabilities)
    subjects = prepare_cohort(cohort, kind="volume", cache_dir=config.data.cache_dir,
                              chunks=info.get("chunks", config.data.chunks),
                              levels=info.get("level", 0) + 1, timeout_s=_cache_wait_s())
    run = _Run(config, info, model, cohort, subjects, many, output, str(inputs),
               batch_size or max(1, config.train.batch_size * 2), rank, size, probabilities, png)
    if task == "segmentation":
        return _predict_segmentation(run)
    return _predict_regression(run)
