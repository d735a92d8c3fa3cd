"""Volume.read_patch: exact patches, edges and padding, chunk cache, counters, broken chunks."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from data_fixtures import converted, load, nilearn_mni, scratch_dir

import pybrain_mpi.data as pbd


@pytest.fixture(scope="module")
def t1():
    return converted(nilearn_mni("t1"), "t1.zarr", chunks=(32, 32, 32))


def _slice(ref, start, size):
    return ref[tuple(slice(s, s + n) for s, n in zip(start, size))]


@pytest.mark.parametrize("threads", [1, 3])
def test_random_patches_equal_numpy_slicing_including_edges(t1, threads):
    ref = load(nilearn_mni("t1"))
    rng = np.random.default_rng(threads)
    with pbd.Volume(t1, threads=threads, cache_bytes=2**20) as vol:
        for _ in range(40):
            size = tuple(int(rng.integers(1, 70)) for _ in range(3))
            start = tuple(int(rng.integers(0, d - n + 1)) for d, n in zip(ref.shape, size))
            np.testing.assert_array_equal(vol.read_patch(start, size), _slice(ref, start, size))
        # Patches flush against every corner of the volume.
        for corner in np.ndindex(2, 2, 2):
            start = tuple(0 if c == 0 else d - 45 for c, d in zip(corner, ref.shape))
            np.testing.assert_array_equal(vol.read_patch(start, (45, 45, 45)),
                                          _slice(ref, start, (45, 45, 45)))


def test_patch_outside_volume_raises_by_default_and_zero_pads_on_request(t1):
    ref = load(nilearn_mni("t1"))
    vol = pbd.Volume(t1)
    with pytest.raises(pbd.PatchOutOfBounds, match=r"start=\(180, 0, 0\).*padding='constant'"):
        vol.read_patch((180, 0, 0), (32, 32, 32))
    padded = pbd.Volume(t1, padding="constant", pad_value=0)
    start, size = (-5, 220, 170), (40, 40, 40)
    expect = np.pad(ref, 64)[tuple(slice(s + 64, s + 64 + n) for s, n in zip(start, size))]
    np.testing.assert_array_equal(padded.read_patch(start, size), expect)
    assert not padded.read_patch((300, 0, 0), (4, 4, 4)).any()


def test_read_amplification_counts_decoded_chunk_bytes_cold_and_warm(t1):
    vol = pbd.Volume(t1, threads=1)
    vol.read_patch((16, 16, 16), (32, 32, 32))  # straddles 2 chunks per axis: 8 chunks of 32 KiB
    assert vol.chunk_misses == 8 and vol.bytes_read == 8 * 32**3 and vol.bytes_returned == 32**3
    assert vol.read_amplification == 8.0
    assert 0 < vol.bytes_fetched < vol.bytes_read  # stored compressed
    vol.read_patch((20, 20, 20), (32, 32, 32))  # same chunks: all hits
    assert vol.chunk_hits == 8 and vol.bytes_read == 8 * 32**3
    assert vol.read_amplification == 4.0


def test_chunk_cache_stays_within_its_byte_budget_and_evicts_least_recent(t1):
    vol = pbd.Volume(t1, cache_bytes=3 * 32**3, threads=1)
    for x in (0, 32, 64, 96):  # four distinct chunks (inside the head) into a three-chunk cache
        vol.read_patch((x, 96, 64), (32, 32, 32))
        assert vol.cache_used_bytes <= 3 * 32**3
    vol.reset_counters()
    vol.read_patch((96, 96, 64), (32, 32, 32))
    assert vol.chunk_hits == 1
    vol.read_patch((0, 96, 64), (32, 32, 32))  # evicted first
    assert vol.chunk_misses == 1


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_constant_chunks_are_cached_without_chunk_sized_memory_and_read_back_exactly(dtype):
    # Background chunks (one repeated value) are held as one element: a 2-chunk cache keeps
    # every constant chunk of the volume beside 2 real ones; -0.0 comes back as -0.0.
    rng = np.random.default_rng(7)
    data = np.zeros((64, 64, 96), dtype=dtype)
    data[:32, :32, :32] = rng.integers(-50, 50, size=(32,) * 3)
    data[32:, 32:, 64:] = rng.integers(-50, 50, size=(32,) * 3)
    data[32:, :32, 32:64] = -0.0 if dtype == np.float32 else 5
    src = os.path.join(scratch_dir(), f"const_{np.dtype(dtype).name}.npy")
    np.save(src, data)
    path = pbd.convert(src, src.replace(".npy", ".zarr"), chunks=(32, 32, 32), progress=False, overwrite=True)
    chunk = 32**3 * np.dtype(dtype).itemsize
    with pbd.Volume(path, cache_bytes=2 * chunk + 4096, threads=1) as vol:
        np.testing.assert_array_equal(vol.read(), data)
        assert vol.chunk_misses == 12
        assert vol.cache_used_bytes < 2 * chunk + 4096
        vol.reset_counters()
        whole = vol.read()
        assert vol.chunk_misses == 0 and vol.chunk_hits == 12  # every chunk stayed cached
        assert whole.tobytes() == data.tobytes()  # bit for bit (signed zeros included)


def test_levels_read_like_level_zero(t1):
    path = converted(nilearn_mni("gm"), "gm_levels.zarr", chunks=(32, 32, 32), levels=2)
    vol = pbd.Volume(path)
    full = vol.read(level=1)
    np.testing.assert_array_equal(vol.read_patch((3, 40, 7), (20, 30, 11), level=1),
                                  full[3:23, 40:70, 7:18])
    with pytest.raises(IndexError, match="2 level"):
        vol.read_patch((0, 0, 0), (2, 2, 2), level=2)


def _copy_of(path, name):
    dst = os.path.join(scratch_dir(), name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(path, dst)
    return dst


def test_missing_chunk_error_names_store_and_chunk_key(t1):
    broken = _copy_of(t1, "missing.zarr")
    os.remove(os.path.join(broken, "0", "c", "1", "2", "0"))
    vol = pbd.Volume(broken)
    vol.read_patch((0, 0, 0), (32, 32, 32))  # other chunks still read
    with pytest.raises(pbd.ChunkError, match=r"chunk 0/c/1/2/0 is missing from store .*missing.zarr") as err:
        vol.read_patch((40, 70, 10), (8, 8, 8))
    assert err.value.key == "0/c/1/2/0" and err.value.store.endswith("missing.zarr")


def test_corrupt_chunk_error_names_store_and_chunk_key(t1):
    broken = _copy_of(t1, "corrupt.zarr")
    chunk = os.path.join(broken, "0", "c", "2", "2", "2")
    with open(chunk, "r+b") as f:
        f.seek(16)
        f.write(b"\xff" * 64)
        f.truncate(200)
    vol = pbd.Volume(broken)
    with pytest.raises(pbd.ChunkError, match=r"chunk 0/c/2/2/2 of store .*corrupt.zarr is corrupt"):
        vol.read_patch((70, 70, 70), (4, 4, 4))


def test_wrong_patch_rank_and_missing_store_are_clear_errors(t1):
    vol = pbd.Volume(t1)
    with pytest.raises(ValueError, match="3 entries"):
        vol.read_patch((0, 0), (4, 4))
    with pytest.raises(FileNotFoundError, match="pybrain-mpi convert"):
        pbd.Volume(os.path.join(scratch_dir(), "nowhere.zarr"))
