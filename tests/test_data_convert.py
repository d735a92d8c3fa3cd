"""Conversion of NIfTI / HDF5 / .npy into OME-Zarr: data, affine, metadata, levels, bad input."""

from __future__ import annotations

import argparse
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
import zarr
from data_fixtures import converted, load, nilearn_mni, nitime_fmri, scratch_dir

import pybrain_mpi.data as pbd
from pybrain_mpi.data.cli import add_convert_subcommand


def _tmp(name: str) -> str:
    return os.path.join(scratch_dir(), name)


def test_nifti_3d_roundtrips_voxels_affine_and_voxel_size():
    path = converted(nilearn_mni("t1"), "t1.zarr", chunks=(32, 32, 32))
    vol = pbd.Volume(path)
    img = nib.load(nilearn_mni("t1"))
    assert vol.shape == img.shape and vol.dtype == np.uint8 and vol.chunks == (32, 32, 32)
    np.testing.assert_array_equal(vol.read(), load(nilearn_mni("t1")))
    np.testing.assert_array_equal(vol.affine, img.affine)
    assert vol.voxel_size == pytest.approx(img.header.get_zooms()[:3])


def test_nifti_4d_is_stored_time_first_with_whole_series_chunks():
    path = converted(nitime_fmri(), "fmri1.zarr")
    vol = pbd.Volume(path)
    ref = load(nitime_fmri())  # (x, y, z, t)
    assert vol.axes == ("t", "x", "y", "z") and vol.time_axis == 0
    assert vol.chunks[0] == ref.shape[3], "one voxel's series must be one chunk read"
    np.testing.assert_array_equal(vol.read(), np.moveaxis(ref, 3, 0))
    assert vol.time_step_s == pytest.approx(1.35, abs=1e-6)
    np.testing.assert_array_equal(vol.affine, nib.load(nitime_fmri()).affine)


def test_hdf5_dataset_converts_in_bounded_slabs_with_affine_attribute():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(37, 20, 23)).astype(np.float32)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [-10, 4, 7]
    src = _tmp("vol.h5")
    with h5py.File(src, "w") as f:
        f.create_dataset("/scans/t2", data=data).attrs["affine"] = affine
    # Slabs of one chunk row (8 x 20 x 23 float32 < 16 KiB): many slabs, same result.
    pbd.convert(src + ":/scans/t2", _tmp("h5.zarr"), chunks=(8, 8, 8), max_slab_bytes=16_384,
                overwrite=True, progress=False)
    vol = pbd.Volume(_tmp("h5.zarr"))
    np.testing.assert_array_equal(vol.read(), data)
    np.testing.assert_array_equal(vol.affine, affine)
    assert vol.voxel_size == pytest.approx((0.5, 0.5, 2.0))


def test_fortran_ordered_npy_converts_slab_by_slab():
    data = np.asfortranarray(np.random.default_rng(6).normal(size=(19, 13, 22)))
    np.save(_tmp("fortran.npy"), data)
    pbd.convert(_tmp("fortran.npy"), _tmp("fortran.zarr"), chunks=(8, 8, 4), max_slab_bytes=4096,
                overwrite=True, progress=False)
    np.testing.assert_array_equal(pbd.Volume(_tmp("fortran.zarr")).read(), data)


def test_npy_converts_slab_by_slab_with_given_affine():
    data = np.arange(30 * 17 * 9, dtype=np.int16).reshape(30, 17, 9)
    np.save(_tmp("vol.npy"), data)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    pbd.convert(_tmp("vol.npy"), _tmp("npy.zarr"), chunks=(7, 5, 4), affine=affine, overwrite=True,
                progress=False)
    vol = pbd.Volume(_tmp("npy.zarr"))
    np.testing.assert_array_equal(vol.read(), data)
    np.testing.assert_array_equal(vol.affine, affine)


def test_levels_are_block_means_with_ngff_05_metadata():
    rng = np.random.default_rng(4)
    data = rng.normal(size=(21, 16, 10))  # odd first axis: last block averages one voxel
    np.save(_tmp("lv.npy"), data)
    pbd.convert(_tmp("lv.npy"), _tmp("lv.zarr"), chunks=(8, 8, 8), levels=3, overwrite=True,
                progress=False)
    vol = pbd.Volume(_tmp("lv.zarr"))
    assert vol.levels == [(21, 16, 10), (11, 8, 5), (6, 4, 3)]

    def mean2(x):
        out = np.empty(tuple((n + 1) // 2 for n in x.shape))
        for idx in np.ndindex(*out.shape):
            out[idx] = x[tuple(slice(2 * i, 2 * i + 2) for i in idx)].mean()
        return out

    np.testing.assert_allclose(vol.read(level=1), mean2(data), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vol.read(level=2), mean2(mean2(data)), rtol=1e-12, atol=1e-12)
    ome = dict(zarr.open_group(_tmp("lv.zarr"), mode="r").attrs)["ome"]
    assert ome["version"] == "0.5"
    datasets = ome["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == \
        [[1.0] * 3, [2.0] * 3, [4.0] * 3]
    assert [a["type"] for a in ome["multiscales"][0]["axes"]] == ["space"] * 3


def test_label_maps_downsample_by_nearest_keeping_label_values():
    labels = np.random.default_rng(5).integers(0, 4, size=(16, 12, 10)).astype(np.uint8)
    np.save(_tmp("lab.npy"), labels)
    pbd.convert(_tmp("lab.npy"), _tmp("lab.zarr"), levels=2, downsample="nearest", overwrite=True,
                progress=False)
    np.testing.assert_array_equal(pbd.Volume(_tmp("lab.zarr")).read(level=1), labels[::2, ::2, ::2])


def test_cli_subcommand_converts_with_chunks_option():
    parser = argparse.ArgumentParser()
    add_convert_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", nitime_fmri(), _tmp("cli.zarr"), "--chunks", "40,5,5,9",
                              "--overwrite", "--quiet"])
    assert args.func(args) == 0
    vol = pbd.Volume(_tmp("cli.zarr"))
    assert vol.chunks == (40, 5, 5, 9)
    np.testing.assert_array_equal(vol.read(), np.moveaxis(load(nitime_fmri()), 3, 0))


def test_bad_inputs_get_errors_that_say_what_to_do():
    with pytest.raises(pbd.DataMismatch, match="unknown input format"):
        pbd.convert(_tmp("x.tif"), _tmp("bad.zarr"), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pbd.convert(_tmp("absent.nii.gz"), _tmp("bad.zarr"), progress=False)
    with h5py.File(_tmp("two.h5"), "w") as f:
        f.create_dataset("a/img", data=np.zeros((4, 4, 4)))
    with pytest.raises(pbd.DataMismatch, match=r"\['a/img'\]. Name one as .*two.h5:/path/to/dataset"):
        pbd.convert(_tmp("two.h5"), _tmp("bad.zarr"), progress=False)
    with pytest.raises(pbd.DataMismatch, match="a/img"):
        pbd.convert(_tmp("two.h5") + ":/nope", _tmp("bad.zarr"), progress=False)
    with pytest.raises(pbd.DataMismatch, match="chunks"):
        pbd.convert(_tmp("two.h5") + ":/a/img", _tmp("bad.zarr"), chunks=(2, 2), progress=False)
    os.makedirs(_tmp("exists.zarr"), exist_ok=True)
    with pytest.raises(FileExistsError, match="overwrite"):
        pbd.convert(_tmp("two.h5") + ":/a/img", _tmp("exists.zarr"), progress=False)
