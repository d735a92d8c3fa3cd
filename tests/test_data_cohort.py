"""Cohorts: manifests and BIDS read with errors naming file, line and column; subject-level
splits; each subject converted once into the cache with its statistics; grids checked.

The cohort is nilearn's real MNI152 (T1, brain mask, GM map) plus subjects made from it by
seeded affine warps and intensity changes; those are synthetic and marked so in the
manifest's ``synthetic`` column (``build_mni152_cohort``)."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from pybrain_mpi.data import DataError, DataMismatch, Volume
from pybrain_mpi.data.cohort import read_bids, read_manifest, split_subjects
from pybrain_mpi.data.examples import build_mni152_cohort, nitime_fmri_paths
from pybrain_mpi.data.subjects import SeriesReader, SubjectVolumes, prepare_cohort


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    build_mni152_cohort(root, subjects=4, seed=3, voxel_mm=4.0)
    return root


def _manifest(cohort_dir, name="subjects.tsv", edit=None):
    text = (cohort_dir / "subjects.tsv").read_text()
    if edit:
        text = edit(text)
    path = cohort_dir / name
    path.write_text(text)
    return path


def test_manifest_rows_resolve_paths_relative_to_the_manifest_with_targets(cohort_dir):
    cohort = read_manifest(cohort_dir / "subjects.tsv", ["t1"], label="brain_mask",
                           targets=["gm_volume_ml"])
    assert [s.id for s in cohort.subjects] == ["mni152", "synth-01", "synth-02", "synth-03"]
    first = cohort.subjects[0]
    assert first.images == {"t1": str(cohort_dir / "mni152" / "t1.nii.gz")}
    assert first.label == str(cohort_dir / "mni152" / "brain_mask.nii.gz")
    assert first.targets["gm_volume_ml"] > 500 and first.where.endswith("subjects.tsv:2")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("gm_volume_ml", "gm_ml"), r"bad.tsv: no target column 'gm_volume_ml'.*columns: subject"),
    (lambda t: t.replace("synth-02/t1.nii.gz", "synth-02/t1_missing.nii.gz"),
     r"bad.tsv:4: column 't1': .*synth-02/t1_missing.nii.gz does not exist"),
    (lambda t: t.replace("synth-01/t1.nii.gz", "synth-01/t1.tif"), r"bad.tsv:3: column 't1': .*not an image"),
])
def test_manifest_problems_name_the_file_line_column_and_path(cohort_dir, edit, message):
    path = _manifest(cohort_dir, "bad.tsv", edit)
    with pytest.raises(DataError, match=message):
        read_manifest(path, ["t1"], label="brain_mask", targets=["gm_volume_ml"])


def test_manifest_refuses_missing_targets_duplicates_and_unknown_splits(cohort_dir):
    lines = (cohort_dir / "subjects.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    at = header.index("gm_volume_ml")
    row = lines[2].split("\t")
    row[at] = "n/a"
    path = cohort_dir / "na.tsv"
    path.write_text("\n".join([lines[0], lines[1], "\t".join(row)]) + "\n")
    with pytest.raises(DataError, match=r"na.tsv:3: subject synth-01 has no value in target column 'gm_volume_ml'"):
        read_manifest(path, ["t1"], targets=["gm_volume_ml"])
    path.write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    with pytest.raises(DataError, match=r"na.tsv:3: subject mni152 is listed again \(first at line 2\)"):
        read_manifest(path, ["t1"])
    path.write_text("\n".join([lines[0] + "\tsplit", lines[1] + "\ttrainee"]) + "\n")
    with pytest.raises(DataError, match="split 'trainee' of subject mni152: expected one of train, val, test"):
        read_manifest(path, ["t1"])


def test_csv_manifest_with_sessions_keeps_a_subjects_rows_on_one_side_of_the_split(cohort_dir):
    rows = ["subject,session,t1"]
    for sub in range(6):
        for ses in (1, 2):
            rows.append(f"sub-{sub},{ses},mni152/t1.nii.gz")
    path = cohort_dir / "sessions.csv"
    path.write_text("\n".join(rows) + "\n")
    cohort = read_manifest(path, ["t1"])
    assert len(cohort) == 12 and cohort.subjects[1].id == "sub-0_2"
    split = split_subjects(cohort, 0.34, 0.25, seed=1)
    groups = {name: {cohort.subjects[i].group for i in getattr(split, name)}
              for name in ("train", "val", "held_out")}
    assert len(groups["held_out"]) == 2 and len(groups["val"]) == 1 and len(groups["train"]) == 3
    assert not (groups["train"] & groups["held_out"]) and not (groups["val"] & groups["held_out"])
    assert split == split_subjects(cohort, 0.34, 0.25, seed=1)
    assert split != split_subjects(cohort, 0.34, 0.25, seed=2)


def test_split_column_fixes_the_split_and_one_subject_is_held_out_as_a_block(cohort_dir):
    lines = (cohort_dir / "subjects.tsv").read_text().splitlines()
    sides = ["train", "test", "val", "train"]
    path = cohort_dir / "split.tsv"
    path.write_text("\n".join([lines[0] + "\tsplit"] + [f"{l}\t{s}" for l, s in zip(lines[1:], sides)]) + "\n")
    split = split_subjects(read_manifest(path, ["t1"]), 0.5, 0.5, seed=0)
    assert split.fixed and split.train == (0, 3) and split.held_out == (1,) and split.val == (2,)
    one = _manifest(cohort_dir, "one.tsv", lambda t: "\n".join(t.splitlines()[:2]) + "\n")
    single = split_subjects(read_manifest(one, ["t1"]), 0.2, 0.1, seed=0)
    assert single.single_subject and single.val_from_train


def test_bids_dataset_becomes_the_same_table_with_participants_targets(tmp_path, cohort_dir):
    bids = tmp_path / "bids"
    for i, sub in enumerate(("01", "02")):
        anat = bids / f"sub-{sub}" / "ses-1" / "anat"
        anat.mkdir(parents=True)
        source = cohort_dir / ("mni152" if i == 0 else "synth-01")
        shutil.copy(source / "t1.nii.gz", anat / f"sub-{sub}_ses-1_T1w.nii.gz")
        derivatives = bids / "derivatives" / "masks" / f"sub-{sub}" / "ses-1" / "anat"
        derivatives.mkdir(parents=True)
        shutil.copy(source / "brain_mask.nii.gz", derivatives / f"sub-{sub}_ses-1_desc-brain_mask.nii.gz")
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t9.5\nsub-02\t10.25\n")
    cohort = read_bids(bids, "T1w", label="mask", targets=["age"])
    assert [s.id for s in cohort.subjects] == ["sub-01_ses-1", "sub-02_ses-1"]
    assert [s.group for s in cohort.subjects] == ["sub-01", "sub-02"]
    assert cohort.subjects[1].label.endswith("derivatives/masks/sub-02/ses-1/anat/sub-02_ses-1_desc-brain_mask.nii.gz")
    assert [s.targets["age"] for s in cohort.subjects] == [9.5, 10.25]
    with pytest.raises(DataError, match=r"no sub-\*/\[ses-\*/\]anat\|func/\*_bold.nii"):
        read_bids(bids, "bold")


def test_each_subject_is_converted_once_with_foreground_statistics(tmp_path, cohort_dir):
    cohort = read_manifest(cohort_dir / "subjects.tsv", ["t1"], label="brain_mask")
    first = prepare_cohort(cohort, kind="volume", cache_dir=tmp_path, chunks=(16, 16, 16))
    subject = first[1]
    t1 = np.asarray(nib.load(cohort.subjects[1].images["t1"]).dataobj)
    mask = np.asarray(nib.load(cohort.subjects[1].label).dataobj) > 0
    with Volume(subject.images["t1"]) as stored:
        np.testing.assert_array_equal(stored.read(), t1)
        np.testing.assert_allclose(stored.affine, nib.load(cohort.subjects[1].images["t1"]).affine)
    stats = subject.stats
    # Patches are drawn around the label; intensities are z-scored over the T1 above its mean.
    assert stats["foreground"]["count"] == int(mask.sum()) and stats["foreground"]["how"] == "label > 0"
    region = t1 > t1.mean()
    assert stats["channels"]["t1"]["mean"] == pytest.approx(t1[region].mean(), rel=1e-9)
    assert stats["channels"]["t1"]["std"] == pytest.approx(t1[region].std(), rel=1e-6)
    assert stats["label_values"] == [0, 1]
    with Volume(subject.foreground) as fg:
        np.testing.assert_array_equal(fg.read() > 0, mask)
    reader = SubjectVolumes(subject, classes={0: 0, 1: 1})
    patch = reader.read_input((2, 3, 4), (8, 8, 8))
    expected = (t1[2:10, 3:11, 4:12] - stats["channels"]["t1"]["mean"]) / stats["channels"]["t1"]["std"]
    np.testing.assert_allclose(patch[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(reader.read_label((2, 3, 4), (8, 8, 8)), mask[2:10, 3:11, 4:12])
    reader.close()
    stamp = subject.root / "pybrain-mpi-cache.json"
    built = stamp.stat().st_mtime_ns
    again = prepare_cohort(cohort, kind="volume", cache_dir=tmp_path, chunks=(16, 16, 16))
    assert again[1].root == subject.root and stamp.stat().st_mtime_ns == built  # not converted again


def test_images_of_one_subject_on_different_grids_are_refused_naming_both(tmp_path, cohort_dir):
    moved = tmp_path / "moved_mask.nii.gz"
    img = nib.load(cohort_dir / "synth-01" / "brain_mask.nii.gz")
    affine = img.affine.copy()
    affine[0, 3] += 4.0  # one voxel along x
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), moved)
    manifest = tmp_path / "grid.tsv"
    manifest.write_text(f"subject\tt1\tmask\nsynth-01\t{cohort_dir / 'synth-01' / 't1.nii.gz'}\t{moved}\n")
    cohort = read_manifest(manifest, ["t1"], label="mask")
    with pytest.raises(DataError, match=r"grid.tsv:2: subject synth-01: .t1. .*synth-01/t1.nii.gz\) and .label. "
                                        r".*moved_mask.nii.gz\) are not on one voxel grid: shapes "
                                        r"\[50, 59, 48\] vs \[50, 59, 48\], affines .* vs .*"):
        prepare_cohort(cohort, kind="volume", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "subjects").glob("synth-01*"))  # nothing half-built


def test_fmri_series_drop_constant_voxels_count_them_and_zscore_the_rest(tmp_path):
    # nitime's real run with 7 voxels made constant (synthetic edit, for exact control).
    run = nib.load(str(nitime_fmri_paths()[0]))
    data = np.asarray(run.dataobj).copy()
    flat = data.reshape(-1, data.shape[-1])
    flat[:7] = 123
    edited = tmp_path / "run.nii.gz"
    nib.save(nib.Nifti1Image(data, run.affine, run.header), edited)
    manifest = tmp_path / "runs.tsv"
    manifest.write_text(f"subject\tbold\nedited\t{edited}\nrun-2\t{nitime_fmri_paths()[1]}\n")
    subjects = prepare_cohort(read_manifest(manifest, ["bold"]), kind="series", cache_dir=tmp_path)
    assert subjects[0].stats["constant"] == 7 and subjects[0].stats["usable"] == 1800 - 7
    reader = SeriesReader(subjects)
    assert len(reader) == 2 * 1800 - 7 and reader.series_length == 40
    series = reader.series([0, len(reader) - 1]).astype(np.float64)
    raw = flat[7].astype(np.float64)
    np.testing.assert_allclose(series[0], (raw - raw.mean()) / raw.std(), rtol=1e-5, atol=1e-5)
    assert abs(series[1].mean()) < 1e-5 and series[1].std() == pytest.approx(1.0, rel=1e-5)
    reader.close()


def test_conversion_failures_name_every_failing_subject(tmp_path, cohort_dir):
    cut = tmp_path / "cut.nii.gz"
    data = (cohort_dir / "synth-02" / "t1.nii.gz").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    manifest = tmp_path / "cut.tsv"
    manifest.write_text(f"subject\tt1\nfine\t{cohort_dir / 'mni152' / 't1.nii.gz'}\nbroken\t{cut}\n")
    with pytest.raises(DataError, match=r"1 of 2 subject\(s\) .* could not be prepared:\n  subject "
                                        r"broken: .*cut.nii.gz is truncated"):
        prepare_cohort(read_manifest(manifest, ["t1"]), kind="volume", cache_dir=tmp_path / "c")


def test_a_modified_source_file_rebuilds_that_subject(tmp_path, cohort_dir):
    copy = tmp_path / "t1.nii.gz"
    shutil.copy(cohort_dir / "mni152" / "t1.nii.gz", copy)
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"subject\tt1\ns\t{copy}\n")
    cohort = read_manifest(manifest, ["t1"])
    first = prepare_cohort(cohort, kind="volume", cache_dir=tmp_path / "c")[0]
    img = nib.load(copy)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine, img.header), copy)
    os.utime(copy, ns=(first.root.stat().st_mtime_ns + 10**9,) * 2)
    second = prepare_cohort(cohort, kind="volume", cache_dir=tmp_path / "c")[0]
    with Volume(second.images["t1"]) as stored:
        np.testing.assert_array_equal(stored.read(), np.asarray(nib.load(copy).dataobj))
    assert json.loads((second.root / "pybrain-mpi-cache.json").read_text())["sources"][0]["mtime_ns"] \
        == copy.stat().st_mtime_ns


def test_gifti_surface_series_in_a_manifest_are_read_per_vertex(tmp_path):
    from nibabel.gifti import GiftiDataArray, GiftiImage

    from pybrain_mpi.data.examples import load_nitime_roi_timeseries

    # nitime's real ROI signals (250 time points x 31) stored as a 31-"vertex" surface series.
    _, values = load_nitime_roi_timeseries()
    img = GiftiImage(darrays=[GiftiDataArray(row.astype(np.float32), intent="NIFTI_INTENT_TIME_SERIES")
                              for row in values])
    nib.save(img, tmp_path / "lh.func.gii")
    (tmp_path / "surf.tsv").write_text("subject\tseries\nsub-01\tlh.func.gii\n")
    subjects = prepare_cohort(read_manifest(tmp_path / "surf.tsv", ["series"]), kind="series",
                              cache_dir=tmp_path / "cache")
    reader = SeriesReader(subjects)
    assert len(reader) == 31 and reader.series_length == 250
    raw = values[:, 4].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(reader.series([4])[0], (raw - raw.mean()) / raw.std(), rtol=1e-5,
                               atol=1e-5)
    reader.close()
