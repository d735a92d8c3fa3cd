"""Example data from packages: nitime fMRI voxel series and nilearn MNI152 paths."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

from pybrain_mpi.data import examples as ed


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


def test_dca_example_is_converted_to_zarr_once_and_reads_the_same_series(tmp_path, series):
    example = ed.prepare_dca_example(tmp_path, held_out_fraction=0.25, seed=1)
    assert example.root == tmp_path / "nitime_fmri"
    assert sorted(p.name for p in example.root.iterdir()) == [
        "fmri1.zarr", "fmri2.zarr", ed.STAMP_NAME]
    stamp = json.loads((example.root / ed.STAMP_NAME).read_text())
    assert stamp["version"] == ed.CACHE_VERSION and set(stamp["stores"]) == {"fmri1.zarr", "fmri2.zarr"}
    assert example.n_train + example.n_held_out == len(series) and example.series_length == 40
    # Read back from the Zarr stores on demand: bitwise the series computed from the NIfTI.
    train, held = example.load()
    ref_train, ref_held = ed.split_by_voxel(series, 0.25, seed=1)
    assert np.array_equal(train, ref_train) and np.array_equal(held, ref_held)
    runs = example.open()
    rows = np.array([5, 0, len(series) - 1])
    assert np.array_equal(runs.series(rows), series[rows])
    runs.close()
    built = (example.root / ed.STAMP_NAME).stat().st_mtime_ns
    ed.prepare_dca_example(tmp_path, held_out_fraction=0.25, seed=1)
    assert (example.root / ed.STAMP_NAME).stat().st_mtime_ns == built  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == ["nitime_fmri"]  # no temporary left


def _stamp(root):
    return json.loads((root / ed.STAMP_NAME).read_text())


def test_an_older_cache_version_is_detected_by_its_stamp_and_rebuilt(tmp_path, capfd):
    # Version 1 kept .npy files in the cache root; a future layout may also sit here.
    legacy = tmp_path / "nitime_fmri_s0_h0.200_train.npy"
    np.save(legacy, np.zeros((3, 40), np.float32))
    root = ed.prepare_dca_example(tmp_path).root
    stamp = _stamp(root)
    stamp["version"] = 1
    (root / ed.STAMP_NAME).write_text(json.dumps(stamp))
    example = ed.prepare_dca_example(tmp_path)
    assert "written by cache version 1, this is 2" in capfd.readouterr().err
    assert _stamp(example.root)["version"] == ed.CACHE_VERSION
    assert not legacy.exists()
    assert example.load()[0].shape == (example.n_train, 40)


def test_a_partial_or_damaged_cache_is_rebuilt_and_never_read_without_its_stamp(tmp_path, capfd):
    root = ed.prepare_dca_example(tmp_path).root
    reference = ed.prepare_dca_example(tmp_path).load()
    # Damaged: a chunk file overwritten with garbage (the checksum or the decoder notices).
    chunk = next(p for p in (root / "fmri2.zarr").rglob("*") if p.is_file() and "c" in p.parts)
    chunk.write_bytes(b"\x00garbage" * 10)
    example = ed.prepare_dca_example(tmp_path)
    assert "store fmri2.zarr" in capfd.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip(example.load(), reference))
    # Partial (e.g. an interrupted copy): no stamp. Readers refuse it; the builder rebuilds it.
    (root / ed.STAMP_NAME).unlink()
    with pytest.raises(ed.ExampleCacheError, match="not there .*every node shares"):
        ed.prepare_dca_example(tmp_path, build=False)
    example = ed.prepare_dca_example(tmp_path)
    assert "has no readable" in capfd.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip(example.load(), reference))


def test_mni152_example_is_converted_with_brain_statistics(tmp_path):
    from pybrain_mpi.data import Volume

    example = ed.prepare_mni152_example(tmp_path)
    paths = ed.mni152_paths()
    t1 = np.asarray(nib.load(str(paths["t1"])).dataobj, dtype=np.float64)
    gm = np.asarray(nib.load(str(paths["gm"])).dataobj)
    with Volume(example.t1) as v1, Volume(example.gm) as v2:
        assert v1.chunks == (32, 32, 32) and np.array_equal(v1.read(), t1.astype(np.uint8))
        assert np.array_equal(v2.read(), gm)
    brain = np.argwhere(t1 > 0)
    assert example.stats["brain_lo"] == brain.min(0).tolist()
    assert example.stats["brain_hi"] == (brain.max(0) + 1).tolist()
    assert example.stats["t1_mean"] == pytest.approx(t1[t1 > 0].mean(), rel=1e-12)
    assert example.stats["t1_std"] == pytest.approx(t1[t1 > 0].std(), rel=1e-12)


def test_nitime_roi_timeseries_has_named_columns():
    names, values = ed.load_nitime_roi_timeseries()
    assert values.shape == (250, 31) and names[:3] == ["WM", "Vent", "Brain"]
    assert "LCau" in names and "RPCC" in names and np.isfinite(values).all()


def test_mni152_templates_are_found_offline_on_one_grid():
    paths = ed.mni152_paths()
    shapes = {k: nib.load(str(p)).shape for k, p in paths.items()}
    assert shapes == {"t1": (197, 233, 189), "gm": (197, 233, 189), "wm": (197, 233, 189)}


def test_missing_package_error_says_what_to_install():
    with pytest.raises(FileNotFoundError, match="pip install no_such_pkg_pbm"):
        ed.package_data_path("no_such_pkg_pbm", "x")
