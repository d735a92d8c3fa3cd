"""Training data from a cohort (a manifest, a BIDS dataset, or a cohort made from shipped data).

What ``[data] manifest`` / ``bids`` / ``source = "mni152_cohort"`` / ``"nitime_runs"`` turn
into (:func:`build_cohort_data`): the cohort is read (:mod:`pybrain_mpi.data.cohort`),
every image converted once into the cache by the ranks in parallel
(:func:`pybrain_mpi.data.subjects.prepare_cohort`), the subjects split (held-out subjects
never contribute a training sample), and one of these adapters reads patches on demand:

- :class:`SegmentationData` (``kind = "segmentation"``): ``(C, *patch)`` z-scored images and
  the label map's classes per voxel. Validation: fixed patches, Dice/IoU from voxel counts
  summed over ranks. Held-out: **whole volumes**, through grid patches shared across ranks
  and aggregated (:func:`~pybrain_mpi.trainer.inference.predict_region`): Dice and IoU per
  label, pooled over the held-out subjects and per subject.
- :class:`SubjectRegression` (``kind = "regression"``): per-subject targets (standardised with
  the training subjects' mean and standard deviation) from random patches (each patch
  carries its subject's value; a subject's prediction is the mean over fixed patches) or from
  the whole volume at a coarser level. Metrics per target over held-out *subjects*, in the
  targets' units: R^2, Pearson r, MAE.
- ``kind = "fmri_series"``: :class:`~pybrain_mpi.trainer.data.FMRISeries` over every usable
  voxel series of the subjects (:class:`~pybrain_mpi.data.subjects.SeriesReader`: z-scored
  per series, constant ones dropped and counted), held-out subjects apart.

**Where patches come from.** ``sampling = "foreground"`` (default) centres
``foreground_fraction`` of the patches on a foreground voxel drawn uniformly from the
subject's foreground map (:class:`~pybrain_mpi.data.WeightedSampler`), the rest uniformly, so
patches are not mostly background. Each training sample is a function of (seed, epoch,
index) only, so every rank draws its own samples and a resumed run draws the same ones.

**One subject.** With a single subject the held-out set is a block of it: its size is
``held_out_fraction`` of the foreground's bounding box (by volume; at least one patch), its
centre a seeded foreground voxel, so it always holds foreground. No training or validation
patch overlaps it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import COHORT_SOURCES, DataConfig
from ..data.errors import DataError
from .data import FMRISeries, TrainingData, _cache_wait_s, _from_rank0_cache
from .inference import grid_overlap, predict_region

__all__ = ["SegmentationData", "SubjectRegression", "build_cohort_data", "cohort_of",
           "is_cohort"]


def is_cohort(config: DataConfig) -> bool:
    """True when ``[data]`` names a cohort (manifest, BIDS or a cohort source)."""
    return (config.source in COHORT_SOURCES or config.manifest is not None
            or config.bids is not None)


def _overlaps(start, size, block_start, block_size) -> bool:
    return all(s < b + bn and b < s + n for s, n, b, bn in zip(start, size, block_start, block_size))


class _SubjectPool:
    """At most ``limit`` subjects' volumes open per rank (least recently used closed first);
    their chunk caches share ``cache_bytes``. Thread-safe."""

    def __init__(self, subjects, *, limit: int, cache_bytes: int, classes=None, level: int = 0):
        self.subjects = subjects
        self.limit = max(1, int(limit))
        self.classes = classes
        self.level = level
        volumes = 1 + len(subjects[0].images) + (1 if subjects[0].label else 0)
        self.cache_bytes = max(2**20, int(cache_bytes) // (self.limit * volumes))
        self._open: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, index: int):
        from ..data.subjects import SubjectVolumes

        with self._lock:
            volumes = self._open.get(index)
            if volumes is not None:
                self._open.move_to_end(index)
                return volumes
        volumes = SubjectVolumes(self.subjects[index], classes=self.classes,
                                 cache_bytes=self.cache_bytes, level=self.level)
        with self._lock:
            self._open[index] = volumes
            while len(self._open) > self.limit:
                _, old = self._open.popitem(last=False)
                old.close()
        return volumes

    def close(self) -> None:
        with self._lock:
            for volumes in self._open.values():
                volumes.close()
            self._open.clear()


class _Reader:
    """Runs per-sample reads in ``threads`` threads (0: in the caller)."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pbm-cohort") if threads > 0 else None

    def map(self, fn: Callable, items) -> list:
        if self.pool is None:
            return [fn(item) for item in items]
        return list(self.pool.map(fn, items))


class _CohortPatches(TrainingData):
    """What segmentation and regression from patches share: subjects, split, foreground-aware
    patch draws (module docstring), fixed evaluation patches, threaded reads."""

    def __init__(self, subjects, split, config: DataConfig, where: str, seed: int,
                 split_text: str, patch=None, classes=None, level: int = 0):
        self.subjects = subjects
        self.split = split
        self.split_text = split_text
        self.seed = int(seed)
        self.where = where
        self.config = config
        self.level = level
        self.patch = tuple(int(p) for p in (patch if patch is not None else config.patch_size))
        self.pool = _SubjectPool(subjects, limit=config.open_subjects,
                                 cache_bytes=config.cache_mb * 2**20, classes=classes, level=level)
        self.reader = _Reader(config.num_workers)
        self.channels = len(subjects[0].images)
        for s in subjects:
            if len(s.images) != self.channels:
                raise DataError(f"{s.where}: subject {s.id} has {len(s.images)} images, the first "
                                f"subject {self.channels}")
            shape = self._shape(s)
            if any(p > n for p, n in zip(self.patch, shape)):
                raise DataError(f"{s.where}: subject {s.id}: [data] patch_size {list(self.patch)} "
                                f"is larger than its volume {list(shape)}; use a smaller patch")
        self._drawers: dict = {}
        self._drawers_lock = threading.Lock()
        self.block = None
        if split.single_subject:
            self.block = self._held_out_block(config.held_out_fraction)

    def _shape(self, subject) -> tuple[int, ...]:
        return tuple(subject.stats["levels"][self.level] if self.level else subject.stats["shape"])

    # ---------------------------------------------------------------- patch positions
    def _drawer(self, index: int):
        """(foreground sampler or None, volume shape) of a subject, built on first use."""
        from ..data import WeightedSampler

        with self._drawers_lock:
            hit = self._drawers.get(index)
        if hit is not None:
            return hit
        subject = self.subjects[index]
        shape = self._shape(subject)
        sampler = None
        if (self.config.sampling == "foreground" and subject.stats["foreground"]["count"] > 0
                and self.level == 0):
            volumes = self.pool.get(index)
            sampler = WeightedSampler(shape, volumes.foreground, self.patch, 1, rank=0,
                                      world_size=1, inner_cache_bytes=2 * 2**20)
        hit = (sampler, shape)
        with self._drawers_lock:
            self._drawers[index] = hit
        return hit

    def _draw(self, index: int, rng: np.random.Generator) -> tuple[int, ...]:
        """A patch start in subject ``index`` (never overlapping a held-out block)."""
        sampler, shape = self._drawer(index)
        fraction = self.config.foreground_fraction if sampler is not None else 0.0
        for _ in range(100):
            if fraction > 0 and rng.random() < fraction:
                start = sampler.draw_start(rng)
            else:
                start = tuple(int(rng.integers(0, n - p + 1)) for n, p in zip(shape, self.patch))
            if self.block is None or not _overlaps(start, self.patch, *self.block):
                return start
        raise DataError(f"{self.where}: 100 patch draws in a row overlapped the held-out block "
                        f"{self.block}; lower [data] held_out_fraction or the patch size")

    def _held_out_block(self, fraction: float):
        """(start, size) of the single subject's held-out block (module docstring)."""
        from ..data import WeightedSampler

        subject = self.subjects[0]
        shape = self._shape(subject)
        fg = subject.stats["foreground"]
        extent = [h - lw for lw, h in zip(fg["lo"], fg["hi"])] if fg["count"] else list(shape)
        side = fraction ** (1.0 / 3.0)
        size = tuple(min(n, max(p, int(round(e * side)))) for n, p, e in zip(shape, self.patch, extent))
        rng = np.random.default_rng([self.seed, 2**32 - 1])
        if fg["count"]:
            sampler = WeightedSampler(shape, self.pool.get(0).foreground, size, 1, rank=0,
                                      world_size=1, inner_cache_bytes=2 * 2**20)
            start = sampler.draw_start(rng)
        else:
            start = tuple(int(rng.integers(0, n - b + 1)) for n, b in zip(shape, size))
        # Room for training patches beside it along at least one axis.
        if all(s < p and n - (s + b) < p for s, b, n, p in zip(start, size, shape, self.patch)):
            raise DataError(f"{self.where}: a held-out block of {list(size)} voxels leaves no "
                            f"room for training patches of {list(self.patch)} in "
                            f"{list(shape)}; lower [data] held_out_fraction")
        return tuple(int(s) for s in start), tuple(int(b) for b in size)

    def train_sample(self, epoch: int, index: int) -> tuple[int, tuple[int, ...]]:
        """(subject index, patch start) of training sample ``index`` of ``epoch``."""
        train = self.split.train
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        subject = train[int(index) % len(train)]
        return subject, self._draw(subject, rng)

    def _eval_samples(self, split: str) -> list[tuple[int, tuple[int, ...]]]:
        """Fixed (subject, start) patches of a split: ``eval_patches`` per subject."""
        subjects = self.split.val if split == "val" else self.split.held_out
        tag = 1 if split == "val" else 2
        out = []
        for index in subjects:
            rng = np.random.default_rng([self.seed, 2**31 + tag, index])
            out += [(index, self._draw(index, rng)) for _ in range(self.config.eval_patches)]
        return out

    def prediction_info(self) -> dict:
        """What ``pybrain-mpi predict`` needs to treat new images as training treated these
        (kept in the checkpoint's metadata)."""
        return {"task": self.task, "channels": self.channels, "patch": list(self.patch),
                "image_columns": list(self.subjects[0].images), "level": self.level,
                "chunks": list(self.config.chunks), "sampling": self.config.sampling,
                "foreground_fraction": self.config.foreground_fraction,
                "eval_patches": self.config.eval_patches, "seed": self.seed}

    def read_inputs(self, items) -> np.ndarray:
        """``(B, C, *patch)`` float32 inputs of (subject, start) items."""
        x = np.empty((len(items), self.channels) + self.patch, dtype=np.float32)

        def read(k):
            subject, start = items[k]
            self.pool.get(subject).read_input(start, self.patch, out=x[k])
        self.reader.map(read, range(len(items)))
        return x

    def close(self) -> None:
        self.pool.close()


# ----------------------------------------------------------------------------- segmentation
class SegmentationData(_CohortPatches):
    """Voxel segmentation from a cohort (see the module docstring)."""

    task = "segmentation"

    def __init__(self, subjects, split, config: DataConfig, where: str, seed: int,
                 split_text: str, overlap: float):
        values = sorted({v for i in split.train for v in subjects[i].stats["label_values"]})
        if len(values) < 2:
            raise DataError(f"{where}: the training subjects' label maps hold only the value(s) "
                            f"{values}; segmentation needs a background and at least one label")
        self.labels = values
        self.num_classes = len(values)
        classes = {v: k for k, v in enumerate(values)}
        super().__init__(subjects, split, config, where, seed, split_text, classes=classes)
        self.overlap = grid_overlap(self.patch, overlap)
        self.input_shape = (self.channels,) + self.patch
        self.model_defaults = {"in_channels": self.channels, "out_channels": self.num_classes}
        self.output_channels = self.num_classes
        self.fixed = {"val": self._eval_samples("val")}
        held = (f"a held-out block {list(self.block[1])} at {list(self.block[0])}"
                if self.block else f"{len(split.held_out)} held-out subject(s), whole volumes")
        self.description = (f"{where}: segmentation of labels {values} from "
                            f"{self.channels} image(s); {split_text}; "
                            f"{config.patches_per_volume} patches of {list(self.patch)} per "
                            f"training subject per epoch ({config.sampling} sampling), "
                            f"{len(self.fixed['val'])} val patches; held out: {held}")

    def prediction_info(self) -> dict:
        return {**super().prediction_info(), "labels": self.labels,
                "grid_overlap": self.config.grid_overlap}

    def size(self, split: str) -> int:
        if split == "train":
            return self.config.patches_per_volume * len(self.split.train)
        if split == "val":
            return len(self.fixed["val"])
        return len(self.split.held_out)

    def _labels(self, items) -> np.ndarray:
        y = np.empty((len(items),) + self.patch, dtype=np.int64)

        def read(k):
            subject, start = items[k]
            y[k] = self.pool.get(subject).read_label(start, self.patch)
        self.reader.map(read, range(len(items)))
        return y

    def _items(self, split: str, epoch: int, indices) -> list:
        if split == "train":
            return [self.train_sample(epoch, int(i)) for i in indices]
        if split != "val":
            raise DataError("held-out subjects are evaluated on whole volumes (evaluate), not "
                            "in batches of patches")
        return [self.fixed["val"][int(i)] for i in indices]

    def batch(self, split, epoch, indices):
        items = self._items(split, epoch, indices)
        return self.read_inputs(items), self._labels(items)

    def evaluate(self, split: str, step: Callable, rank: int, size: int, batch_size: int) -> dict:
        """Val: fixed patches; held-out: whole volumes (or the block). See the module docstring."""
        from ..communication import collectives
        from ..metrics import SegmentationStats

        import torch

        stats = SegmentationStats(self.num_classes)
        if split == "val":
            mine = np.arange(rank, self.size("val"), size)
            loss_sum = 0.0
            for lo in range(0, len(mine), batch_size):
                x, y = self.batch("val", 0, mine[lo:lo + batch_size])
                loss, logits = step(x, y)
                loss_sum += loss
                stats.update(logits.argmax(axis=1), y)
            vector = torch.cat([torch.tensor([loss_sum, float(len(mine))], dtype=torch.float64),
                                stats.as_tensor()])
            if size > 1:
                vector = collectives.allreduce(vector, op="sum", name="val segmentation metrics", algorithm="auto")
            total = SegmentationStats.from_tensor(vector[2:], self.num_classes)
            report = total.compute(self.labels)
            report["loss"] = float(vector[0]) / max(1.0, float(vector[1]))
            report["n_samples"] = int(vector[1])
            return report
        per_subject = []
        for index in (self.split.held_out if self.block is None else (0,)):
            volumes = self.pool.get(index)
            origin, extent = self.block if self.block else ((0, 0, 0), self._shape(self.subjects[index]))
            probabilities = predict_region(
                lambda x: _softmax(step(x, None)[1]), volumes.read_input, origin, extent,
                self.patch, self.num_classes, overlap=self.overlap, batch_size=batch_size,
                rank=rank, world_size=size)
            predicted = probabilities.argmax(axis=0)
            truth = volumes.read_label(origin, extent)
            one = SegmentationStats(self.num_classes)
            one.update(predicted, truth)
            stats.merge(one)
            # A subject's undefined values keep their reasons (a label absent from it).
            per_subject.append({"subject": self.subjects[index].id, **{
                k: v for k, v in one.compute(self.labels).items()
                if k in ("mean_dice", "dice") or (k == "undefined" and v)}})
        report = stats.compute(self.labels)
        report["per_subject"] = per_subject
        report["n_samples"] = len(per_subject)
        report["loss"] = None
        defined = [s["mean_dice"] for s in per_subject if s["mean_dice"] is not None]
        report["subject_mean_dice"] = float(np.mean(defined)) if defined else None
        return report


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- regression
class SubjectRegression(_CohortPatches):
    """Per-subject regression targets from patches or whole volumes (module docstring)."""

    task = "regression"

    def __init__(self, subjects, split, config: DataConfig, where: str, seed: int,
                 split_text: str, target_names):
        if split.single_subject or len({s.group for s in subjects}) < 3:
            raise DataError(f"{where}: regression of per-subject targets needs at least 3 "
                            f"subjects (train, validation/held out); the cohort has "
                            f"{len({s.group for s in subjects})}")
        self.target_names = list(target_names)
        self.volume_input = config.regression_input == "volume"
        level = config.level if self.volume_input else 0
        if self.volume_input:
            levels = len(subjects[0].stats["levels"])
            if level >= levels:
                raise DataError(f"{where}: [data] level = {level} but the cache holds {levels} "
                                "level(s)")
            shapes = {tuple(s.stats["levels"][level]) for s in subjects}
            if len(shapes) != 1:
                raise DataError(f"{where}: regression_input = \"volume\" needs one grid for every "
                                f"subject; level {level} shapes differ: {sorted(shapes)[:4]} "
                                "(resample the cohort to one grid, or train from patches)")
            patch = shapes.pop()
        else:
            patch = config.patch_size
        super().__init__(subjects, split, config, where, seed, split_text, patch=patch,
                         level=level)
        values = np.array([[s.targets[name] for name in self.target_names] for s in subjects],
                          dtype=np.float64)
        train = values[list(split.train)]
        self.target_mean = train.mean(axis=0)
        std = train.std(axis=0)
        self.constant_targets = [n for n, v in zip(self.target_names, std) if v == 0]
        self.target_std = np.where(std > 0, std, 1.0)
        self.values = values
        self.standardised = ((values - self.target_mean) / self.target_std).astype(np.float32)
        self.input_shape = (self.channels,) + self.patch
        self.model_defaults = {"in_channels": self.channels, "out_features": len(self.target_names),
                               "input_shape": list(self.patch)}
        per = 1 if self.volume_input else config.eval_patches
        self.fixed = {name: self._items_of(name) for name in ("val", "held_out")}
        what = (f"whole volumes at level {level} {list(self.patch)}" if self.volume_input else
                f"{config.patches_per_volume} patches of {list(self.patch)} per training subject "
                f"per epoch ({config.sampling} sampling), {per} per evaluated subject")
        note = (f"; constant over the training subjects: {self.constant_targets}"
                if self.constant_targets else "")
        self.description = (f"{where}: regression of {self.target_names} from {self.channels} "
                            f"image(s); {split_text}; {what}{note}")

    def prediction_info(self) -> dict:
        return {**super().prediction_info(), "targets": self.target_names,
                "target_mean": self.target_mean.tolist(), "target_std": self.target_std.tolist(),
                "regression_input": "volume" if self.volume_input else "patches"}

    def _items_of(self, split: str) -> list:
        if self.volume_input:
            subjects = self.split.val if split == "val" else self.split.held_out
            return [(i, (0, 0, 0)) for i in subjects]
        return self._eval_samples(split)

    def size(self, split: str) -> int:
        if split == "train":
            return (len(self.split.train) if self.volume_input
                    else self.config.patches_per_volume * len(self.split.train))
        return len(self.fixed[split])

    def _items(self, split, epoch, indices) -> list:
        if split != "train":
            return [self.fixed[split][int(i)] for i in indices]
        if self.volume_input:
            return [(self.split.train[int(i)], (0, 0, 0)) for i in indices]
        return [self.train_sample(epoch, int(i)) for i in indices]

    def batch(self, split, epoch, indices):
        items = self._items(split, epoch, indices)
        return self.read_inputs(items), self.standardised[[s for s, _ in items]]

    def evaluate(self, split: str, step: Callable, rank: int, size: int, batch_size: int) -> dict:
        """Predictions per subject (mean over its patches), metrics over subjects in the
        targets' units."""
        from ..communication import collectives
        from ..metrics import RegressionStats

        import torch

        items = self.fixed[split]
        subjects = sorted({s for s, _ in items})
        slot = {s: k for k, s in enumerate(subjects)}
        k = len(self.target_names)
        sums = np.zeros((len(subjects), k + 1), dtype=np.float64)  # predictions, count
        loss_sum = 0.0
        mine = np.arange(rank, len(items), size)
        for lo in range(0, len(mine), batch_size):
            indices = mine[lo:lo + batch_size]
            x, y = self.batch(split, 0, indices)
            loss, out = step(x, y)
            loss_sum += loss
            for row, index in zip(np.asarray(out, dtype=np.float64).reshape(len(indices), k), indices):
                s = slot[items[int(index)][0]]
                sums[s, :k] += row
                sums[s, k] += 1
        vector = torch.from_numpy(np.concatenate([[loss_sum], sums.reshape(-1)]))
        if size > 1:
            vector = collectives.allreduce(vector, op="sum", name=f"{split} regression metrics", algorithm="auto")
        vector = vector.numpy()
        sums = vector[1:].reshape(len(subjects), k + 1)
        predicted = sums[:, :k] / np.maximum(sums[:, k:], 1.0) * self.target_std + self.target_mean
        truth = self.values[subjects]
        stats = RegressionStats(k)
        stats.update(predicted, truth)
        report = stats.compute()
        report["loss"] = float(vector[0]) / max(1, len(items))
        report["per_target"] = {name: {metric: _finite(report["per_output"][metric][j])
                                       for metric in ("r2", "pearson_r", "mae")}
                                for j, name in enumerate(self.target_names)}
        report["per_subject"] = [{"subject": self.subjects[s].id,
                                  **{f"{name}": float(truth[j, t]) for t, name in enumerate(self.target_names)},
                                  **{f"{name}_predicted": float(predicted[j, t])
                                     for t, name in enumerate(self.target_names)}}
                                 for j, s in enumerate(subjects)]
        return report


def _finite(value) -> float | None:
    return float(value) if np.isfinite(value) else None


# ----------------------------------------------------------------------------- building
def cohort_of(config: DataConfig, rank: int, share: Callable):
    """The :class:`~pybrain_mpi.data.cohort.Cohort` a ``[data]`` section names (a cohort
    source is first written into the cache by rank 0)."""
    from ..data.cohort import read_bids, read_manifest
    from ..data.examples import prepare_mni152_cohort, prepare_nitime_runs

    images, label, targets, mask = config.images, config.label, config.targets, config.mask
    if config.source == "mni152_cohort":
        manifest = _from_rank0_cache(
            "MNI152 cohort", config.cache_dir, rank, share,
            lambda build, wait_s=0.0: prepare_mni152_cohort(
                config.cache_dir, config.cohort_subjects, config.split_seed,
                config.cohort_voxel_mm, build=build, wait_s=wait_s))
        images = images or ("t1",)
        label = label or ("brain_mask" if config.kind == "segmentation" else None)
        targets = targets or (("gm_volume_ml",) if config.kind == "regression" else ())
        return read_manifest(manifest, images, label, mask, targets)
    if config.source == "nitime_runs":
        manifest = _from_rank0_cache(
            "nitime runs manifest", config.cache_dir, rank, share,
            lambda build, wait_s=0.0: prepare_nitime_runs(config.cache_dir, build=build,
                                                          wait_s=wait_s))
        return read_manifest(manifest, images or ("bold",), None, mask, ())
    if config.bids is not None:
        return read_bids(config.bids, config.bids_suffix, images or None, label, mask, targets)
    return read_manifest(config.manifest, images, label, mask, targets)


def build_cohort_data(config: DataConfig, val_fraction: float, seed: int, rank: int, size: int,
                      share: Callable) -> TrainingData:
    """The adapter for a cohort ``[data]`` section (see the module docstring). Collective."""
    from ..data.cohort import split_subjects
    from ..data.subjects import SeriesReader, prepare_cohort
    from ..data.examples import split_by_voxel

    cohort = cohort_of(config, rank, share)
    series = config.kind == "fmri_series"
    levels = config.level + 1 if config.kind == "regression" and \
        config.regression_input == "volume" else 1
    from .. import logs

    echo = logs.get_logger("data").info
    subjects = prepare_cohort(cohort, kind="series" if series else "volume",
                              cache_dir=config.cache_dir, chunks=config.chunks, levels=levels,
                              verify=config.verify_cache, timeout_s=_cache_wait_s(), echo=echo)
    # fmri_series validates on a seeded share of the training subjects' series (FMRISeries),
    # so no subject is set aside for validation there.
    split = split_subjects(cohort, config.held_out_fraction, 0.0 if series else val_fraction,
                           config.split_seed)
    split_text = split.describe(cohort)
    where = f"{Path(cohort.source).name} ({len(cohort)} subjects)"
    if series:
        reader = SeriesReader(subjects)
        if split.single_subject:
            train_rows, held_rows = split_by_voxel(np.arange(len(reader)), config.held_out_fraction,
                                                   config.split_seed)
        else:
            train_rows = reader.rows_of(split.train)
            held_rows = reader.rows_of(split.held_out)
        data = FMRISeries(train_rows, held_rows, val_fraction, config.split_seed + 1, where,
                          reader=reader)
        constant = sum(s.stats["constant"] for s in subjects)
        outside = sum(s.stats["outside_mask"] for s in subjects)
        total = sum(s.stats["series"] for s in subjects)
        data.description += (f"; {split_text}; {constant} constant series of "
                             f"{total} dropped" + (f", {outside} outside the mask" if outside else "")
                             + "; each series z-scored")
        data.dropped_constant_series = constant
        data.model_defaults = {"input_length": reader.series_length}
        return data
    if config.kind == "segmentation":
        return SegmentationData(subjects, split, config, where, seed, split_text,
                                config.grid_overlap)
    return SubjectRegression(subjects, split, config, where, seed, split_text,
                             cohort.target_columns)

