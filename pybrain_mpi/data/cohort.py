"""Cohorts: which images, labels and targets belong to which subject, and who is held out.

A cohort comes from a **manifest** (``subjects.tsv`` or ``.csv``, one row per subject)::

    subject  t1                  mask                    age   split
    sub-01   sub-01/t1.nii.gz    sub-01/brainmask.nii.gz 9.8   train
    sub-02   sub-02/t1.nii.gz    sub-02/brainmask.nii.gz 10.1  test

- ``subject`` (or BIDS's ``participant_id``) names the subject; an optional ``session``
  column allows several rows per subject (they are always split together);
- image columns (named by ``[data] images``), the ``[data] label`` column (a voxel label map)
  and the ``[data] mask`` column hold paths **relative to the manifest's directory** (or
  absolute): NIfTI .nii/.nii.gz (3D or 4D), FreeSurfer .mgz, GIFTI .gii, HDF5
  ``file.h5:/dataset``, .npy, or OME-Zarr stores;
- ``[data] targets`` columns hold per-subject numbers (``n/a`` is refused: drop the row);
- an optional ``split`` column (``train``, ``val``, ``test``) fixes the split; otherwise
  :func:`split_subjects` draws a seeded split *of subjects*.

or from a **BIDS** dataset (:func:`read_bids`): ``sub-*/[ses-*/]anat|func/*_<suffix>.nii[.gz]``,
one row per matching file, the subject's other images and labels found by the same
entities with another suffix (in the same folder or a ``derivatives/*`` mirror of it),
targets from ``participants.tsv``.

Every problem names the file and line (``subjects.tsv:7``), the column and the path.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from .convert import is_zarr_store, source_kind
from .errors import DataError

__all__ = ["Subject", "Cohort", "CohortSplit", "read_manifest", "read_bids", "split_subjects",
           "SPLIT_NAMES"]

#: Values of a manifest's ``split`` column and the split each names.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validation": "val",
               "test": "held_out", "held_out": "held_out", "heldout": "held_out"}
_MISSING = {"", "n/a", "na", "nan"}


@dataclasses.dataclass(frozen=True)
class Subject:
    """One row of a cohort.

    ``id`` is unique in the cohort (``sub-01``, or ``sub-01_ses-2`` for sessions); ``group``
    is the subject the row belongs to (rows of one group are split together); ``images`` maps
    each image column to its path (in ``[data] images`` order); ``where`` locates the row in
    messages (``subjects.tsv:7``).
    """

    id: str
    group: str
    images: dict
    label: str | None = None
    mask: str | None = None
    targets: dict = dataclasses.field(default_factory=dict)
    split: str | None = None
    where: str = ""

    def files(self) -> list[str]:
        """Every image, label and mask path of the row."""
        return list(self.images.values()) + [p for p in (self.label, self.mask) if p]


@dataclasses.dataclass(frozen=True)
class Cohort:
    """Subjects and the columns they were read with; ``source`` is the manifest or BIDS root."""

    subjects: tuple
    source: str
    image_columns: tuple
    label_column: str | None = None
    mask_column: str | None = None
    target_columns: tuple = ()

    def __len__(self) -> int:
        return len(self.subjects)


@dataclasses.dataclass(frozen=True)
class CohortSplit:
    """Indices of the cohort's subjects per split.

    ``single_subject``: one subject, so train and held-out are regions of it (the trainer
    holds out a block). ``val_from_train``: too few subjects for a validation subject, so
    validation samples come from the training subjects (used for early stopping only).
    """

    train: tuple
    val: tuple
    held_out: tuple
    single_subject: bool = False
    val_from_train: bool = False
    fixed: bool = False  # from the manifest's split column

    def describe(self, cohort: Cohort) -> str:
        """``"4 train / 1 val / 1 held-out subjects"`` (and how the split was made)."""
        if self.single_subject:
            return f"1 subject ({cohort.subjects[0].id}): a held-out block of it"
        groups = lambda idx: len({cohort.subjects[i].group for i in idx})  # noqa: E731
        val = ("val from the training subjects" if self.val_from_train
               else f"{groups(self.val)} val")
        how = "split column" if self.fixed else "seeded split"
        return (f"subjects: {groups(self.train)} train / {val} / {groups(self.held_out)} "
                f"held out ({how})")


# ----------------------------------------------------------------------------- manifests
def _resolve(base: Path, value: str) -> str:
    """A manifest path relative to the manifest's directory (``~`` expanded); HDF5's
    ``file.h5:/dataset`` keeps its dataset part."""
    text = os.path.expanduser(value.strip())
    dataset = ""
    match = re.search(r"\.(h5|hdf5|hdf):", text, flags=re.IGNORECASE)
    if match:
        text, dataset = text[:match.end() - 1], text[match.end() - 1:]
    if "://" not in text and not os.path.isabs(text):
        text = os.path.normpath(os.path.join(base, text))
    return text + dataset


def _check_image(path: str, where: str, column: str) -> None:
    kind = source_kind(path)
    if kind is None:
        raise DataError(f"{where}: column '{column}': {path} is not an image pybrain-mpi reads "
                        "(.nii/.nii.gz, .mgz, .gii, .npy, file.h5:/dataset or an OME-Zarr store)")
    match = re.search(r"\.(h5|hdf5|hdf):", path, flags=re.IGNORECASE)
    file_part = path[:match.end() - 1] if match else path
    if "://" in file_part:
        return
    exists = is_zarr_store(file_part) if kind == "zarr" else os.path.isfile(file_part)
    if not exists:
        raise DataError(f"{where}: column '{column}': {file_part} does not exist"
                        + (" (paths are relative to the manifest's directory)" if column else ""))


def _number(text: str, where: str, column: str, subject: str) -> float:
    if text.strip().lower() in _MISSING:
        raise DataError(f"{where}: subject {subject} has no value in target column '{column}' "
                        f"({text.strip() or 'empty'}); remove the row or fill the value")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: target column '{column}' of subject {subject}: {text!r} is "
                        "not a number") from None
    if not np.isfinite(value):
        raise DataError(f"{where}: target column '{column}' of subject {subject} is {text!r}; "
                        "targets must be finite numbers")
    return value


def _split_value(text: str | None, where: str, subject: str) -> str | None:
    if text is None or not text.strip():
        return None
    value = SPLIT_NAMES.get(text.strip().lower())
    if value is None:
        raise DataError(f"{where}: split {text.strip()!r} of subject {subject}: expected one of "
                        "train, val, test")
    return value


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and ``(line number, row)`` pairs of a .tsv/.csv file (blank lines skipped)."""
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise DataError(f"{path} is empty; a manifest needs a header row and one row per subject")
    reader = csv.reader([line for _, line in numbered], delimiter=delimiter)
    rows = list(reader)
    header = [h.strip() for h in rows[0]]
    if delimiter == "\t" and len(header) == 1 and "," in numbered[0][1]:
        raise DataError(f"{path}: the header has no tab; a .tsv manifest is tab-separated "
                        "(name it .csv if it is comma-separated)")
    out = []
    for (number, _), row in zip(numbered[1:], rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}:{number}: {len(row)} fields, the header has {len(header)} "
                            f"({', '.join(header)})")
        out.append((number, {h: v.strip() for h, v in zip(header, row)}))
    return header, out


def read_manifest(path: str | os.PathLike, images, label: str | None = None,
                  mask: str | None = None, targets=()) -> Cohort:
    """The cohort listed in the manifest ``path`` (see the module docstring).

    ``images``: the image columns (at least one); ``label``/``mask``: the label-map and mask
    columns, or None; ``targets``: per-subject number columns.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"[data] manifest {path} does not exist; it must be a .tsv or .csv file "
                        "with a 'subject' column and one row per subject")
    images = tuple(images)
    if not images:
        raise DataError(f"[data] manifest {path}: name the image column(s) with [data] images = "
                        "[\"t1\", ...]")
    header, rows = _read_table(path)
    subject_column = "subject" if "subject" in header else \
        "participant_id" if "participant_id" in header else None
    if subject_column is None:
        raise DataError(f"{path}: no 'subject' column; its columns: {', '.join(header)}")
    wanted = [("image", c) for c in images] + [("label", label), ("mask", mask)] + \
        [("target", c) for c in targets]
    for what, column in wanted:
        if column is not None and column not in header:
            raise DataError(f"{path}: no {what} column '{column}' ([data] "
                            f"{'images' if what == 'image' else what + 's' if what == 'target' else what}); "
                            f"its columns: {', '.join(header)}")
    base = path.parent
    subjects, seen = [], {}
    for number, row in rows:
        where = f"{path}:{number}"
        group = row[subject_column]
        if not group:
            raise DataError(f"{where}: empty '{subject_column}'")
        session = row.get("session", "")
        sid = f"{group}_{session}" if session else group
        if sid in seen:
            raise DataError(f"{where}: subject {sid} is listed again (first at line {seen[sid]}); "
                            "add a 'session' column for several scans of one subject")
        seen[sid] = number
        paths = {}
        for column in images:
            if not row[column]:
                raise DataError(f"{where}: subject {sid} has no image in column '{column}'")
            paths[column] = _resolve(base, row[column])
            _check_image(paths[column], where, column)
        extra = {}
        for what, column in (("label", label), ("mask", mask)):
            if column is None:
                continue
            if not row[column]:
                raise DataError(f"{where}: subject {sid} has no {what} in column '{column}'")
            extra[what] = _resolve(base, row[column])
            _check_image(extra[what], where, column)
        values = {c: _number(row[c], where, c, sid) for c in targets}
        subjects.append(Subject(sid, group, paths, extra.get("label"), extra.get("mask"), values,
                                _split_value(row.get("split"), where, sid), where))
    if not subjects:
        raise DataError(f"{path}: the manifest lists no subjects")
    return Cohort(tuple(subjects), str(path), images, label, mask, tuple(targets))


# ----------------------------------------------------------------------------- BIDS
_IMAGE_ENDINGS = (".nii.gz", ".nii")


def _bids_match(folder: Path, prefix: str, suffix: str, root: Path) -> Path | None:
    """The file ``<prefix>[_<entities>]_<suffix>.nii[.gz]`` beside the row's image, or in the
    same folder of a derivatives pipeline (``derivatives/<pipeline>/sub-*/...``)."""
    relative = folder.relative_to(root)
    places = [folder] + sorted((root / "derivatives").glob(f"*/{relative}")) \
        if (root / "derivatives").is_dir() else [folder]
    for place in places:
        for ending in _IMAGE_ENDINGS:
            exact = place / f"{prefix}_{suffix}{ending}"
            if exact.is_file():
                return exact
            found = sorted(place.glob(f"{prefix}_*_{suffix}{ending}"))
            if found:
                return found[0]
    return None


def read_bids(root: str | os.PathLike, suffix: str, images=None, label: str | None = None,
              mask: str | None = None, targets=()) -> Cohort:
    """The cohort of a BIDS dataset: one row per ``sub-*/[ses-*/]anat|func/*_<suffix>.nii[.gz]``.

    ``images``: suffixes of the row's image channels (default ``[suffix]``); ``label`` and
    ``mask``: suffixes of its label map and mask (e.g. ``"dseg"``, ``"mask"``), found with the
    row's entities beside it or in ``derivatives/*``; ``targets``: ``participants.tsv``
    columns (its ``split`` column, if any, fixes the split).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"[data] bids {root} is not a directory")
    images = tuple(images) if images else (suffix,)
    participants: dict[str, tuple[str, dict]] = {}
    table = root / "participants.tsv"
    if table.is_file():
        header, rows = _read_table(table)
        if "participant_id" not in header:
            raise DataError(f"{table}: no participant_id column; its columns: {', '.join(header)}")
        for column in targets:
            if column not in header:
                raise DataError(f"{table}: no target column '{column}' ([data] targets); its "
                                f"columns: {', '.join(header)}")
        for number, row in rows:
            participants[row["participant_id"]] = (f"{table}:{number}", row)
    elif targets:
        raise DataError(f"[data] targets {list(targets)} come from {table}, which does not exist")
    files = []
    for sub in sorted(root.glob("sub-*")):
        if not sub.is_dir():
            continue
        for datatype in ("anat", "func"):
            for ending in _IMAGE_ENDINGS:
                files += sorted(sub.glob(f"{datatype}/*_{suffix}{ending}"))
                files += sorted(sub.glob(f"ses-*/{datatype}/*_{suffix}{ending}"))
    if not files:
        raise DataError(f"[data] bids {root}: no sub-*/[ses-*/]anat|func/*_{suffix}.nii[.gz] "
                        "files; set [data] bids_suffix to the images' suffix (e.g. T1w, bold)")
    subjects = []
    for path in files:
        stem = path.name[: -len(f"_{suffix}.nii.gz" if path.name.endswith(".gz") else f"_{suffix}.nii")]
        group = stem.split("_")[0]
        where = str(path)
        paths = {}
        for column in images:
            match = path if column == suffix else _bids_match(path.parent, stem, column, root)
            if match is None:
                raise DataError(f"{where}: no {stem}_{column}.nii[.gz] beside it or in "
                                f"derivatives/ ([data] images includes '{column}')")
            paths[column] = str(match)
        extra = {}
        for what, column in (("label", label), ("mask", mask)):
            if column is None:
                continue
            match = _bids_match(path.parent, stem, column, root)
            if match is None:
                raise DataError(f"{where}: no {what} {stem}[_*]_{column}.nii[.gz] beside it or "
                                "in derivatives/*/ (same sub-/ses-/datatype folders)")
            extra[what] = str(match)
        row_where, row = participants.get(group, (str(table), None))
        if targets and row is None:
            raise DataError(f"{table}: no row for {group} (needed for [data] targets)")
        values = {c: _number(row[c], row_where, c, group) for c in targets}
        split = _split_value(row.get("split"), row_where, group) if row else None
        subjects.append(Subject(stem, group, paths, extra.get("label"), extra.get("mask"),
                                values, split, where))
    return Cohort(tuple(subjects), str(root), images, label, mask, tuple(targets))


# ----------------------------------------------------------------------------- the split
def split_subjects(cohort: Cohort, held_out_fraction: float, val_fraction: float,
                   seed: int) -> CohortSplit:
    """Train / val / held-out subjects: the manifest's ``split`` column when every row has one,
    else a seeded permutation of the *groups* (all rows of one subject on one side):
    ``max(1, round(held_out_fraction * groups))`` held out (at least one left to train on),
    then ``round(val_fraction * rest)`` for validation when that leaves a training subject
    (else validation samples come from the training subjects). One subject: ``single_subject``.
    """
    subjects = cohort.subjects
    given = [s.split for s in subjects]
    if any(g is not None for g in given):
        if any(g is None for g in given):
            missing = next(s for s in subjects if s.split is None)
            raise DataError(f"{missing.where}: subject {missing.id} has no split while others do; "
                            "fill the split column for every row or leave it empty everywhere")
        by = {name: tuple(i for i, s in enumerate(subjects) if s.split == name)
              for name in ("train", "val", "held_out")}
        if not by["train"] or not by["held_out"]:
            raise DataError(f"{cohort.source}: the split column needs at least one 'train' and one "
                            f"'test' subject (it has {len(by['train'])} and {len(by['held_out'])})")
        return CohortSplit(by["train"], by["val"] or by["train"], by["held_out"],
                           val_from_train=not by["val"], fixed=True)
    groups = sorted({s.group for s in subjects})
    if len(groups) == 1:
        everyone = tuple(range(len(subjects)))
        return CohortSplit(everyone, everyone, everyone, single_subject=True, val_from_train=True)
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    held = min(len(groups) - 1, max(1, int(round(held_out_fraction * len(groups)))))
    rest = len(groups) - held
    val = int(round(val_fraction * rest)) if val_fraction > 0 else 0
    if rest - val < 1:
        val = 0
    side = {g: "held_out" for g in order[:held]}
    side.update({g: "val" for g in order[held:held + val]})
    pick = lambda name: tuple(i for i, s in enumerate(subjects)  # noqa: E731
                              if side.get(s.group, "train") == name)
    train = pick("train")
    return CohortSplit(train, pick("val") if val else train, pick("held_out"),
                       val_from_train=val == 0)
