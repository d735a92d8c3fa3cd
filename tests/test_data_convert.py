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


# ------------------------------------------------------------------ streaming, atomicity, formats
def _truncated_copy(src: str, name: str, keep_fraction: float) -> str:
    """A copy of ``src`` cut after ``keep_fraction`` of its bytes (an interrupted download)."""
    data = open(src, "rb").read()
    path = _tmp(name)
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep_fraction)])
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_one_error_naming_the_file_and_leaves_no_store(suffix):
    src = nilearn_mni("t1")
    if suffix == ".nii":  # the same real volume, uncompressed
        src = _tmp("t1_raw.nii")
        nib.save(nib.load(nilearn_mni("t1")), src)
    cut = _truncated_copy(src, f"cut{suffix}", 0.6)
    dst = _tmp(f"cut{suffix}.zarr")
    with pytest.raises(pbd.DataError, match=r"cut\.nii.*truncated|cut\.nii.*damaged"):
        pbd.convert(cut, dst, chunks=(32, 32, 32), progress=False)
    assert not os.path.exists(dst)
    assert not [n for n in os.listdir(scratch_dir()) if n.startswith(f".cut{suffix}.zarr.")]


def test_a_truncated_nifti_reports_how_much_voxel_data_it_still_holds():
    import re
    import zlib

    cut = _truncated_copy(nilearn_mni("t1"), "counted_cut.nii.gz", 0.6)
    with pytest.raises(pbd.DataError) as raised:
        pbd.convert(cut, _tmp("counted_cut.zarr"), chunks=(32, 32, 32), progress=False)
    found = re.search(r"announces ([\d,]+) bytes of voxel data but the file holds ([\d,]+) to "
                      r"([\d,]+) \(([\d,]+) missing at most\)", str(raised.value))
    assert found, raised.value
    expected, low, high, missing = (int(g.replace(",", "")) for g in found.groups())
    header = nib.load(nilearn_mni("t1")).dataobj.offset
    # What the cut stream really still decompresses to (zlib reads as far as the bytes go).
    really = len(zlib.decompressobj(31).decompress(open(cut, "rb").read())) - header
    assert expected == 197 * 233 * 189 and 0 < low <= really <= high < expected
    assert high - low <= 2**16 and missing == expected - low
    raw = _tmp("counted_cut_raw.nii")
    nib.save(nib.load(nilearn_mni("t1")), raw)
    cut_raw = _truncated_copy(raw, "counted_cut_raw_cut.nii", 0.5)
    with pytest.raises(pbd.DataError, match=rf"but the file holds {os.path.getsize(cut_raw) - header:,} "
                                            r"\([\d,]+ missing\)"):
        pbd.convert(cut_raw, _tmp("counted_cut_raw.zarr"), progress=False)


def test_a_failed_overwrite_keeps_the_previous_store_intact():
    dst = _tmp("kept.zarr")
    data = np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)
    np.save(_tmp("kept.npy"), data)
    pbd.convert(_tmp("kept.npy"), dst, chunks=(4, 4, 4), overwrite=True, progress=False)
    cut = _truncated_copy(nilearn_mni("gm"), "cut_gm.nii.gz", 0.5)
    with pytest.raises(pbd.DataError):
        pbd.convert(cut, dst, overwrite=True, progress=False)
    np.testing.assert_array_equal(pbd.Volume(dst).read(), data)


def test_convert_cli_prints_one_error_line_without_a_traceback(capsys):
    parser = argparse.ArgumentParser()
    add_convert_subcommand(parser.add_subparsers(dest="command"))
    cut = _truncated_copy(nilearn_mni("t1"), "cli_cut.nii.gz", 0.3)
    args = parser.parse_args(["convert", cut, _tmp("cli_cut.zarr"), "--quiet"])
    assert args.func(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pybrain-mpi convert: error: ") and "cli_cut.nii.gz" in err[0]
    assert "Traceback" not in err[0] and not os.path.exists(_tmp("cli_cut.zarr"))


def test_4d_gzip_in_several_slabs_is_decompressed_once_into_a_temporary_file_then_removed():
    dst = _tmp("fmri_slabs.zarr")
    # 3-voxel z slabs of every volume: scattered byte ranges, so the gzip stream is spooled.
    pbd.convert(nitime_fmri(), dst, chunks=(40, 5, 5, 3), max_slab_bytes=1, overwrite=True,
                progress=False)
    np.testing.assert_array_equal(pbd.Volume(dst).read(), np.moveaxis(load(nitime_fmri()), 3, 0))
    assert not [n for n in os.listdir(scratch_dir()) if n.endswith(".raw") or ".fmri_slabs" in n]


def test_scaled_nifti_streams_to_float32_like_nibabel():
    # Synthetic (exact control of the scaling): int16 voxels with slope and intercept.
    data = np.random.default_rng(7).integers(-500, 500, size=(12, 10, 9)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
    img.header.set_slope_inter(0.25, 10.0)
    nib.save(img, _tmp("scaled.nii.gz"))
    pbd.convert(_tmp("scaled.nii.gz"), _tmp("scaled.zarr"), chunks=(4, 4, 4), max_slab_bytes=1,
                overwrite=True, progress=False)
    vol = pbd.Volume(_tmp("scaled.zarr"))
    assert vol.dtype == np.float32
    expected = np.asarray(nib.load(_tmp("scaled.nii.gz")).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(vol.read(), expected)


def test_freesurfer_mgz_roundtrips_with_its_affine():
    # Synthetic MGH (nibabel writes it; no .mgz ships in the installed packages).
    t1 = load(nilearn_mni("t1"))[60:100, 80:120, 70:100].astype(np.float32)
    affine = nib.load(nilearn_mni("t1")).affine
    nib.save(nib.MGHImage(t1, affine), _tmp("t1.mgz"))
    pbd.convert(_tmp("t1.mgz"), _tmp("mgz.zarr"), chunks=(16, 16, 16), overwrite=True,
                progress=False)
    vol = pbd.Volume(_tmp("mgz.zarr"))
    np.testing.assert_array_equal(vol.read(), t1)
    np.testing.assert_allclose(vol.affine, nib.load(_tmp("t1.mgz")).affine)


def test_gifti_surface_series_is_stored_time_first_by_vertex():
    from nibabel.gifti import GiftiDataArray, GiftiImage

    from pybrain_mpi.data.examples import load_nitime_roi_timeseries

    # nitime's real ROI signals (250 time points x 31) as a 31-"vertex" surface series.
    _, values = load_nitime_roi_timeseries()
    series = values.astype(np.float32)
    img = GiftiImage(darrays=[GiftiDataArray(row, intent="NIFTI_INTENT_TIME_SERIES") for row in series])
    nib.save(img, _tmp("rois.func.gii"))
    pbd.convert(_tmp("rois.func.gii"), _tmp("rois.zarr"), overwrite=True, progress=False)
    vol = pbd.Volume(_tmp("rois.zarr"))
    assert vol.axes == ("t", "vertex") and vol.time_axis == 0 and vol.chunks[0] == 250
    np.testing.assert_array_equal(vol.read(), series)


def test_sharded_store_reads_only_the_inner_chunks_a_patch_touches():
    src = nilearn_mni("t1")
    dst = _tmp("t1_sharded.zarr")
    pbd.convert(src, dst, chunks=(16, 16, 16), shards=(64, 64, 64), overwrite=True, progress=False)
    shard_files = [f for r, _, fs in os.walk(os.path.join(dst, "0")) for f in fs if f != "zarr.json"]
    assert len(shard_files) == 4 * 4 * 3  # 197x233x189 in 64^3 shards (not 13x15x12 chunk files)
    vol = pbd.Volume(dst, threads=1)
    assert vol.chunks == (16, 16, 16) and vol._levels[0].fast
    np.testing.assert_array_equal(vol.read(), load(src))
    vol.clear_cache()
    vol.reset_counters()
    patch = vol.read_patch((70, 90, 60), (16, 16, 16))  # straddles 2 inner chunks per axis
    np.testing.assert_array_equal(patch, load(src)[70:86, 90:106, 60:76])
    assert vol.chunk_misses == 8 and vol.bytes_read == 8 * 16**3
    with pytest.raises(pbd.DataMismatch, match="multiples of the chunks"):
        pbd.convert(src, _tmp("bad_shard.zarr"), chunks=(16, 16, 16), shards=(40, 64, 64),
                    progress=False)


def test_zarr_store_converts_again_with_other_chunks_and_its_affine():
    first = converted(nilearn_mni("gm"), "gm.zarr", chunks=(32, 32, 32))
    pbd.convert(first, _tmp("gm_rechunked.zarr"), chunks=(48, 48, 48), codec="zstd",
                overwrite=True, progress=False)
    vol = pbd.Volume(_tmp("gm_rechunked.zarr"))
    assert vol.chunks == (48, 48, 48)
    np.testing.assert_array_equal(vol.read(), load(nilearn_mni("gm")))
    np.testing.assert_array_equal(vol.affine, nib.load(nilearn_mni("gm")).affine)


def test_an_ome_zarr_written_by_another_tool_gets_its_affine_from_ngff_scale_and_translation():
    path = _tmp("foreign.zarr")
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("0", data=np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6),
                       chunks=(2, 5, 6))
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 0.5, 0.5]},
            {"type": "translation", "translation": [-10.0, 3.0, 4.0]}]}]}]}
    vol = pbd.Volume(path)
    np.testing.assert_array_equal(vol.affine, [[2, 0, 0, -10], [0, 0.5, 0, 3], [0, 0, 0.5, 4],
                                               [0, 0, 0, 1]])
    assert vol.axes == ("z", "y", "x") and vol.voxel_size == (2.0, 0.5, 0.5)
