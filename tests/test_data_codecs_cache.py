"""Compressor choice in conversion (exact round trip, stored codec), automatic chunk-cache
sizing from the patch size, and a data path that never imports torch."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from data_fixtures import converted, load, nilearn_mni, scratch_dir, warm_amplification

import pybrain_mpi.data as pbd
from pybrain_mpi.data import volume as pvol


def _npy(name: str, arr: np.ndarray) -> str:
    path = os.path.join(scratch_dir(), name)
    np.save(path, arr)
    return path


@pytest.mark.parametrize("codec", sorted(pbd.CODECS))
def test_every_codec_roundtrips_float32_and_int16_exactly(codec):
    rng = np.random.default_rng(4)
    # float32 with NaN, inf, denormals and -0.0: an exact codec keeps every bit.
    f = rng.normal(0, 1e3, size=(37, 41, 29)).astype(np.float32)
    f.flat[:5] = [np.nan, np.inf, -np.inf, np.float32(1e-42), -0.0]
    i = rng.integers(-32768, 32767, size=(37, 41, 29), dtype=np.int16)
    for name, arr in (("f", f), ("i", i)):
        dst = os.path.join(scratch_dir(), f"codec_{codec}_{name}.zarr")
        pbd.convert(_npy(f"codec_{codec}_{name}.npy", arr), dst, chunks=(16, 16, 16), codec=codec,
                    overwrite=True, progress=False)
        vol = pbd.Volume(dst, threads=2)
        got = vol.read()
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got.view(np.uint8), arr.view(np.uint8))
        # An unaligned patch across chunk edges, and the same voxels through zarr's own reader.
        np.testing.assert_array_equal(vol.read_patch((5, 9, 13), (20, 17, 15)), arr[5:25, 9:26, 13:28])
        assert vol._levels[0].fast, "convert's codecs must take Volume's direct-decode path"
        stored = zarr.open_group(dst, mode="r")["0"]
        np.testing.assert_array_equal(np.asarray(stored[:]).view(np.uint8), arr.view(np.uint8))
        assert zarr.open_group(dst, mode="r").attrs["pybrain_mpi"]["codec"] == codec


def test_codecs_store_what_they_name_and_compressors_shrink_a_real_volume():
    sizes = {}
    for codec in ("blosc-zstd", "blosc-lz4", "zstd", "none"):
        dst = converted(nilearn_mni("t1"), f"t1_{codec}.zarr", chunks=(32, 32, 32), codec=codec)
        comp = zarr.open_group(dst, mode="r")["0"].compressors
        names = [type(c).__name__ for c in comp]
        expect = {"blosc-zstd": ["BloscCodec"], "blosc-lz4": ["BloscCodec"], "zstd": ["ZstdCodec"], "none": []}
        assert names == expect[codec]
        if codec.startswith("blosc"):
            assert comp[0].cname.value == codec.split("-")[1]
        sizes[codec] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(dst, "0"))
                           for f in fs if f != "zarr.json")
        np.testing.assert_array_equal(pbd.Volume(dst).read(), load(nilearn_mni("t1")))
    raw = int(np.prod(load(nilearn_mni("t1")).shape))
    assert sizes["none"] >= raw  # whole chunks, edges padded
    for codec in ("blosc-zstd", "blosc-lz4", "zstd"):
        assert sizes[codec] < sizes["none"] / 2, sizes


def test_unknown_codec_is_refused_before_writing_anything():
    dst = os.path.join(scratch_dir(), "never.zarr")
    with pytest.raises(ValueError, match="unknown codec 'lz5'.*blosc-lz4"):
        pbd.convert(nilearn_mni("t1"), dst, codec="lz5", progress=False)
    assert not os.path.exists(dst)


def test_chunks_touched_is_the_worst_case_over_every_patch_position():
    for size, chunk, dim in itertools.product((1, 5, 16, 17, 32, 33, 64), (8, 16, 32), (40, 70)):
        if size > dim:
            continue
        worst = max(len(range(s // chunk, (s + size - 1) // chunk + 1)) for s in range(0, dim - size + 1))
        assert pvol.chunks_touched((size,), (chunk,), (dim,)) == worst, (size, chunk, dim)
    assert pvol.chunks_touched((64, 64, 64), (32, 32, 32), (197, 233, 189)) == 27
    assert pvol.chunks_touched((128,) * 3, (32,) * 3, (197, 233, 189)) == 125


def test_auto_cache_holds_a_few_patches_capped_by_budget_and_level():
    mib = 2**20
    big = (1000, 1000, 1000)
    # 27 chunks of 128 KiB per 64^3 patch, 8 patches by default.
    assert pvol.AUTO_CACHE_PATCHES == 8
    assert pvol.auto_cache_bytes((64,) * 3, (32,) * 3, big, 4) == 8 * 27 * 32**3 * 4
    assert pvol.auto_cache_bytes((128,) * 3, (32,) * 3, big, 4) == 8 * 125 * 32**3 * 4
    assert pvol.auto_cache_bytes((128,) * 3, (32,) * 3, big, 4, patches=2) == 2 * 125 * 32**3 * 4
    # Budget caps it; a tiny patch still gets the floor; a small level caps everything.
    assert pvol.auto_cache_bytes((256,) * 3, (64,) * 3, big, 4, budget=100 * mib) == 100 * mib
    assert pvol.auto_cache_bytes((2, 2, 2), (32,) * 3, big, 4) == pvol.AUTO_CACHE_FLOOR
    assert pvol.auto_cache_bytes((64,) * 3, (32,) * 3, (64, 64, 64), 4) == 8 * 32**3 * 4


def test_volume_cache_grows_with_the_patch_size_and_a_fixed_cache_does_not(t1_f32):
    vol = pbd.Volume(t1_f32, threads=1)
    level_bytes = int(np.prod(vol.shape)) * 4
    assert vol.auto_cache and vol.cache_capacity_bytes == pvol.AUTO_CACHE_FLOOR
    vol.read_patch((0, 0, 0), (32, 32, 32))
    assert vol.cache_capacity_bytes == 8 * 8 * 32**3 * 4
    vol.read_patch((0, 0, 0), (16, 16, 16))  # smaller patches never shrink it
    assert vol.cache_capacity_bytes == 8 * 8 * 32**3 * 4
    vol.read_patch((0, 0, 0), (64, 64, 64))
    assert vol.cache_capacity_bytes == 8 * 27 * 32**3 * 4
    vol.read_patch((0, 0, 0), (128, 128, 128))
    grid_bytes = int(np.prod([-(-n // 32) for n in vol.shape])) * 32**3 * 4
    assert vol.cache_capacity_bytes == min(8 * 125 * 32**3 * 4, grid_bytes) and grid_bytes > level_bytes
    fixed = pbd.Volume(t1_f32, cache_bytes=2**20, threads=1)
    fixed.read_patch((0, 0, 0), (128, 128, 128))
    assert not fixed.auto_cache and fixed.cache_capacity_bytes == 2**20


def test_default_auto_cache_keeps_warm_amplification_of_random_64_cubed_patches_under_1_5(t1_f32):
    # Single decode thread: the LRU order, hence the counters, are deterministic.
    default = pbd.Volume(t1_f32, threads=1)
    assert default.size_cache_for((64,) * 3) < int(np.prod(default.shape)) * 4  # smaller than the volume
    assert warm_amplification(default, (64,) * 3, 120) <= 1.5
    # A cache at its 8 MiB floor (room for 2 patches) re-reads more than it returns, half again.
    assert warm_amplification(pbd.Volume(t1_f32, threads=1, cache_patches=2), (64,) * 3, 120) > 1.3


def test_auto_cache_keeps_128_cubed_patches_from_thrashing(t1_f32):
    ref = load(nilearn_mni("t1")).astype(np.float32)
    rng = np.random.default_rng(7)
    starts = [tuple(int(rng.integers(0, d - 128 + 1)) for d in ref.shape) for _ in range(4)]
    for cache_bytes, expect_hits in ((None, True), (4 * 2**20, False)):
        vol = pbd.Volume(t1_f32, cache_bytes=cache_bytes, threads=2)
        for s in starts:  # fill
            vol.read_patch(s, (128,) * 3)
        vol.reset_counters()
        for s in starts:  # the same 4 patches again
            got = vol.read_patch(s, (128,) * 3)
            np.testing.assert_array_equal(got, ref[s[0]:s[0] + 128, s[1]:s[1] + 128, s[2]:s[2] + 128])
        if expect_hits:
            assert vol.chunk_misses == 0 and vol.read_amplification == 0.0
        else:  # 4 MiB holds 32 of the >= 64 chunks one patch needs: every pass re-reads
            assert vol.chunk_misses > 0 and vol.read_amplification > 1.0


def test_data_path_with_numpy_output_never_imports_torch(t1_f32):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import pybrain_mpi.data as pbd
        vol = pbd.Volume({t1_f32!r})
        sampler = pbd.UniformSampler(vol, (24, 24, 24), 6, seed=0, rank=0, world_size=1)
        batches = list(pbd.PatchLoader(vol, sampler, 4, threads=2, output="numpy"))
        assert [type(b["image"]) for b in batches] == [np.ndarray] * 2, batches
        assert batches[0]["image"].shape == (4, 1, 24, 24, 24) and batches[1]["start"].dtype == np.int64
        bad = [m for m in ("torch", "numba", "zarr") if m in sys.modules]
        assert not bad, f"the numpy data path imported {{bad}}"
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=scratch_dir(), timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_numpy_and_torch_outputs_hold_the_same_batches(t1_f32):
    vol = pbd.Volume(t1_f32)
    runs = {}
    for output in ("numpy", "torch"):
        sampler = pbd.UniformSampler(vol, (16, 20, 24), 5, seed=3, rank=0, world_size=1)
        runs[output] = list(pbd.PatchLoader(vol, sampler, 2, threads=2, output=output))
    for a, b in zip(runs["numpy"], runs["torch"]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key].numpy())
    with pytest.raises(ValueError, match="output must be 'torch' or 'numpy'"):
        pbd.PatchLoader(vol, sampler, 2, output="jax")


def test_metadata_read_without_zarr_matches_zarr_own_reading(t1_f32):
    levels_path = converted(nilearn_mni("t1"), "t1_f32_levels.zarr", chunks=(32, 32, 32), dtype="float32",
                            levels=2, codec="zstd")
    for path in (t1_f32, levels_path):
        direct = pbd.Volume(path, threads=1)
        via_zarr = pbd.Volume(zarr.open_group(path, mode="r"), threads=1)
        assert all(lv.array is None for lv in direct._levels)
        assert all(lv.array is not None for lv in via_zarr._levels)
        assert direct.levels == via_zarr.levels and direct.dtype == via_zarr.dtype
        assert direct.chunks == via_zarr.chunks
        np.testing.assert_array_equal(direct.affine, via_zarr.affine)
        for level in range(len(direct.levels)):
            a, b = direct._levels[level], via_zarr._levels[level]
            assert a.fill_value == b.fill_value and a.byte_dtype == b.byte_dtype
            for coords in ((0, 0, 0), (1, 2, 3)):
                assert direct.chunk_key(coords, level) == via_zarr.chunk_key(coords, level)
            np.testing.assert_array_equal(direct.read_patch((5, 17, 30), (40, 33, 21), level=level),
                                          via_zarr.read_patch((5, 17, 30), (40, 33, 21), level=level))


def test_layouts_the_direct_reader_does_not_decode_fall_back_to_zarr():
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 1000, size=(20, 30, 40), dtype=np.int32)
    dst = os.path.join(scratch_dir(), "gzip_image.zarr")
    group = zarr.open_group(dst, mode="w", zarr_format=3)
    group.create_array("0", shape=arr.shape, chunks=(8, 8, 8), dtype=arr.dtype,
                       compressors=zarr.codecs.GzipCodec(level=1))[...] = arr
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}
    vol = pbd.Volume(dst)
    assert vol._levels[0].array is not None and not vol._levels[0].fast
    np.testing.assert_array_equal(vol.read_patch((3, 5, 7), (15, 20, 30)), arr[3:18, 5:25, 7:37])


@pytest.fixture(scope="module")
def t1_f32():
    return converted(nilearn_mni("t1"), "t1_f32.zarr", chunks=(32, 32, 32), dtype="float32")


def test_cli_codec_option_writes_that_codec():
    import argparse

    from data_fixtures import nitime_fmri

    from pybrain_mpi.data.cli import add_convert_subcommand

    parser = argparse.ArgumentParser()
    add_convert_subcommand(parser.add_subparsers(dest="command"))
    dst = os.path.join(scratch_dir(), "cli_lz4.zarr")
    args = parser.parse_args(["convert", nitime_fmri(), dst, "--codec", "blosc-lz4", "--overwrite", "--quiet"])
    assert args.func(args) == 0
    comp = zarr.open_group(dst, mode="r")["0"].compressors
    assert [type(c).__name__ for c in comp] == ["BloscCodec"] and comp[0].cname.value == "lz4"
    np.testing.assert_array_equal(pbd.Volume(dst).read(), np.moveaxis(load(nitime_fmri()), 3, 0))
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", nitime_fmri(), dst, "--codec", "lz5"])
