"""Example data from packages: nitime fMRI voxel series and nilearn MNI152 paths."""

import math

import nibabel as nib
import numpy as np
import pytest

from pybrain_mpi import examples_data as ed


@pytest.fixture(scope="module")
def series():
    return ed.load_nitime_fmri_series()


def test_nitime_series_are_every_nonconstant_voxel_zscored(series):
    raw = [np.asarray(nib.load(str(p)).dataobj) for p in ed.nitime_fmri_paths()]
    n_brain = sum(int((r.reshape(-1, r.shape[-1]).std(axis=1) > 0).sum()) for r in raw)
    assert series.dtype == np.float32 and series.shape == (n_brain, 40)
    # Reference z-score of run 1's first non-constant voxel, in plain Python float64.
    flat = raw[0].reshape(-1, 40)
    first = next(row for row in flat if row.std() > 0)
    values = [float(v) for v in first]
    mean = sum(values) / 40
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 40)
    expected = [(v - mean) / std for v in values]
    # Stored as float32: rounding of values up to |z| ~ 6 costs at most 6 * eps32 / 2.
    np.testing.assert_allclose(series[0], expected, rtol=0, atol=8 * np.finfo(np.float32).eps)
    assert np.all(series.std(axis=1) > 0.99)


def test_split_by_voxel_is_seeded_disjoint_and_complete():
    data = np.arange(100, dtype=np.float32).reshape(50, 2)
    train, held = ed.split_by_voxel(data, 0.2, seed=3)
    again = ed.split_by_voxel(data, 0.2, seed=3)
    other = ed.split_by_voxel(data, 0.2, seed=4)
    assert len(held) == 10 and len(train) == 40
    assert np.array_equal(train, again[0]) and not np.array_equal(held, other[1])
    assert sorted(np.concatenate([train, held])[:, 0].tolist()) == data[:, 0].tolist()


def test_prepare_dca_example_caches_and_reuses_npy_files(tmp_path, series):
    example = ed.prepare_dca_example(tmp_path, held_out_fraction=0.25, seed=1)
    assert example.n_train + example.n_held_out == len(series)
    assert example.series_length == 40
    stamp = example.train_path.stat().st_mtime_ns
    again = ed.prepare_dca_example(tmp_path, held_out_fraction=0.25, seed=1)
    assert again.train_path.stat().st_mtime_ns == stamp
    train, held = again.load()
    assert train.dtype == np.float32 and held.shape == (example.n_held_out, 40)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_mni152_templates_are_found_offline_on_one_grid():
    paths = ed.mni152_paths()
    shapes = {k: nib.load(str(p)).shape for k, p in paths.items()}
    assert shapes == {"t1": (197, 233, 189), "gm": (197, 233, 189), "wm": (197, 233, 189)}


def test_missing_package_error_says_what_to_install():
    with pytest.raises(FileNotFoundError, match="pip install no_such_pkg_pbm"):
        ed.package_data_path("no_such_pkg_pbm", "x")
