"""PatchLoader and augmentations: exact batches, determinism across threads, resume, errors,
shutdown; numba kernels against numpy references."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
import torch
from data_fixtures import converted, load, nilearn_mni, nitime_fmri, scratch_dir

import pybrain_mpi.data as pbd
from pybrain_mpi.data import augment as aug

F32_TOL = dict(rtol=1e-5, atol=1e-5)  # float32 kernels vs float64 numpy references


@pytest.fixture(scope="module")
def t1():
    return pbd.Volume(converted(nilearn_mni("t1"), "t1.zarr", chunks=(32, 32, 32)))


@pytest.fixture(scope="module")
def gm():
    return pbd.Volume(converted(nilearn_mni("gm"), "gm.zarr", chunks=(32, 32, 32)))


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pbm-prefetch")]


def _collect(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def test_batches_hold_the_sampled_patches_as_float_tensors(t1):
    ref = load(nilearn_mni("t1"))
    sampler = pbd.UniformSampler(t1, (24, 20, 16), 10, seed=0, rank=0, world_size=1)
    batches = _collect(pbd.PatchLoader(t1, sampler, batch_size=4, threads=2))
    assert [b["image"].shape for b in batches] == [(4, 1, 24, 20, 16)] * 2 + [(2, 1, 24, 20, 16)]
    assert batches[0]["image"].dtype == torch.float32
    specs = [sampler[k] for k in range(10)]
    got = torch.cat([b["image"] for b in batches])
    for k, spec in enumerate(specs):
        s = spec.start
        np.testing.assert_array_equal(got[k, 0].numpy(), ref[s[0]:s[0] + 24, s[1]:s[1] + 20, s[2]:s[2] + 16])
        assert tuple(torch.cat([b["start"] for b in batches])[k].tolist()) == s


def test_augmented_batches_do_not_depend_on_the_number_of_threads(t1, gm):
    augment = pbd.Augment(flip_axes=(0, 1, 2), scale=(0.8, 1.2), shift=(-5, 5), gamma=(0.7, 1.4),
                          noise_std=(0.5, 2.0), zscore=True)
    runs = []
    for threads in (1, 3):
        sampler = pbd.UniformSampler(t1, (16, 16, 16), 12, seed=9, rank=0, world_size=1)
        runs.append(_collect(pbd.PatchLoader({"image": t1, "label": gm}, sampler, 4, threads=threads,
                                             augment=augment)))
    for a, b in zip(*runs):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert runs[0][0]["label"].dtype == torch.uint8  # labels keep an integer dtype


def test_flips_move_image_and_label_together(t1, gm):
    ref_t1, ref_gm = load(nilearn_mni("t1")), load(nilearn_mni("gm"))
    augment = pbd.Augment(flip_axes=(0, 1, 2), flip_probability=1.0)
    sampler = pbd.UniformSampler(t1, (16, 12, 8), 3, seed=2, rank=0, world_size=1)
    batch = next(iter(pbd.PatchLoader({"image": t1, "label": gm}, sampler, 3, augment=augment)))
    for k in range(3):
        s = sampler[k].start
        region = (slice(s[0], s[0] + 16), slice(s[1], s[1] + 12), slice(s[2], s[2] + 8))
        np.testing.assert_array_equal(batch["image"][k, 0].numpy(), np.flip(ref_t1[region]))
        np.testing.assert_array_equal(batch["label"][k, 0].numpy(), np.flip(ref_gm[region]))


def test_resume_mid_epoch_continues_with_the_identical_batches(t1):
    augment = pbd.Augment(noise_std=(1.0, 1.0))

    def loader():
        s = pbd.UniformSampler(t1, (8, 8, 8), 20, seed=4, rank=0, world_size=1)
        s.set_epoch(3)
        return pbd.PatchLoader(t1, s, 3, threads=2, prefetch_batches=3, augment=augment)

    expected = _collect(loader())
    run = loader()
    seen = []
    for batch in run:
        seen.append({k: v.clone() for k, v in batch.items()})
        if len(seen) == 3:
            state = run.state_dict()
            break
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(expected) - 3
    seen += _collect(resumed)
    assert len(seen) == len(expected)
    for a, b in zip(seen, expected):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])


def test_chunk_failure_in_a_worker_surfaces_in_the_loop_naming_sample_and_chunk(t1):
    broken = os.path.join(scratch_dir(), "loader-corrupt.zarr")
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(t1.path, broken)
    with open(os.path.join(broken, "0", "c", "3", "3", "3"), "wb") as f:
        f.write(b"not a blosc frame")
    vol = pbd.Volume(broken)
    sampler = pbd.GridSampler(vol, (32, 32, 32), rank=0, world_size=1)
    with pytest.raises(pbd.SampleError, match=r"sample \d+ .*start \(96, 96, 96\).*chunk 0/c/3/3/3 of store") as err:
        for _ in pbd.PatchLoader(vol, sampler, 2, threads=2):
            pass
    assert err.value.chunk_key == "0/c/3/3/3" and err.value.start == (96, 96, 96)
    assert isinstance(err.value.__cause__, pbd.ChunkError)
    assert not _prefetch_threads(), "prefetch threads outlived the failed loop"


def test_breaking_out_of_the_loop_stops_the_prefetch_threads(t1):
    sampler = pbd.UniformSampler(t1, (32, 32, 32), 64, seed=0, rank=0, world_size=1)
    loader = pbd.PatchLoader(t1, sampler, 2, threads=3, prefetch_batches=6)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert not _prefetch_threads()


def test_time_series_batches_are_voxel_series(t1):
    fmri = pbd.Volume(converted(nitime_fmri(), "fmri1.zarr"))
    ref = load(nitime_fmri())
    sampler = pbd.TimeSeriesSampler(fmri, ref.mean(axis=3) > 0, seed=1, rank=0, world_size=1)
    batch = next(iter(pbd.PatchLoader(fmri, sampler, 16, augment=pbd.Augment(zscore=True))))
    assert batch["image"].shape == (16, 40)
    for row, start in zip(batch["image"].numpy(), batch["start"].tolist()):
        series = ref[tuple(start[1:])].astype(np.float64)
        np.testing.assert_allclose(row, (series - series.mean()) / series.std(), **F32_TOL)


def test_kernels_match_numpy_references():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(11, 9, 7)).astype(np.float32)
    x64 = x.astype(np.float64)
    for axes in [(1, 0, 0), (0, 1, 1), (1, 1, 1)]:
        np.testing.assert_array_equal(aug.flip(x, axes), np.flip(x, [i for i, f in enumerate(axes) if f]))
    np.testing.assert_allclose(aug.zscore_(x.copy()), (x64 - x64.mean()) / x64.std(), **F32_TOL)
    lo, hi = x64.min(), x64.max()
    np.testing.assert_allclose(aug.gamma_(x.copy(), 1.7), lo + (hi - lo) * ((x64 - lo) / (hi - lo)) ** 1.7,
                               **F32_TOL)
    np.testing.assert_allclose(aug.scale_shift_(x.copy(), 1.3, -2.0), x64 * 1.3 - 2.0, **F32_TOL)
    z = np.zeros(200_000, np.float32)
    aug.gaussian_noise_(z, 2.0, seed=11)
    # N(0, 4): mean within 5 standard errors, std within 5 standard errors of the std.
    assert abs(z.mean()) < 5 * 2.0 / np.sqrt(z.size)
    assert abs(z.std() - 2.0) < 5 * 2.0 / np.sqrt(2 * z.size)
    again = np.zeros(200_000, np.float32)
    np.testing.assert_array_equal(aug.gaussian_noise_(again, 2.0, seed=11), z)
    nz = np.array([0, 0, 2, 4], np.float32)
    np.testing.assert_allclose(aug.zscore_(nz, nonzero=True), [0, 0, -1, 1])


def test_prefetch_depth_is_bounded_by_bytes_and_batches():
    mib = 2**20
    # Defaults: threads + 1 batches, at most 4 MiB of them, at least one.
    assert pbd.loader.DEFAULT_PREFETCH_BYTES == 4 * mib
    assert pbd.loader.prefetch_depth(mib // 2, threads=2) == 3           # 32^3 float32, batch 4
    assert pbd.loader.prefetch_depth(2 * mib, threads=2) == 2
    assert pbd.loader.prefetch_depth(4 * mib, threads=2) == 1            # 64^3 float32, batch 4
    assert pbd.loader.prefetch_depth(32 * mib, threads=2) == 1           # 128^3 float32, batch 4
    assert pbd.loader.prefetch_depth(256 * mib, threads=2) == 1          # bigger than the budget
    assert pbd.loader.prefetch_depth(mib, threads=2, prefetch_bytes=3 * mib) == 3
    assert pbd.loader.prefetch_depth(mib, threads=8, prefetch_bytes=3 * mib) == 3
    assert pbd.loader.prefetch_depth(mib, threads=2, prefetch_batches=6, prefetch_bytes=4 * mib) == 4
    # prefetch_batches alone keeps its original meaning: exactly that many.
    assert pbd.loader.prefetch_depth(256 * mib, threads=2, prefetch_batches=4) == 4


def test_loader_reports_its_batch_bytes_and_depth(t1, gm):
    sampler = pbd.UniformSampler(t1, (128, 128, 128), 8, seed=0, rank=0, world_size=1)
    loader = pbd.PatchLoader({"image": t1, "label": gm}, sampler, 4, threads=2)
    # float32 image + uint8 label, batch 4 of 128^3
    assert loader.batch_bytes == 4 * 128**3 * (4 + 1)
    assert loader.prefetch_depth == 1  # 40 MiB batches: more than the bound, still one ahead
    small = pbd.UniformSampler(t1, (32, 32, 32), 8, seed=0, rank=0, world_size=1)
    assert pbd.PatchLoader(t1, small, 4, threads=2).prefetch_depth == 3


class _RecordingVolume:
    """A Volume stand-in that records which batch each read belongs to and how many batches
    the training loop had received at that moment."""

    def __init__(self, vol, batch_of_start, consumed):
        self.vol, self.batch_of_start, self.consumed = vol, batch_of_start, consumed
        self.shape, self.dtype, self.path = vol.shape, vol.dtype, vol.path
        self.lead = []  # batch being read minus batches received by the loop
        self.lock = threading.Lock()

    def read_patch(self, start, size, out=None):
        with self.lock:
            self.lead.append(self.batch_of_start[tuple(start)] - self.consumed[0])
        return self.vol.read_patch(start, size, out=out)


@pytest.mark.parametrize("options, depth", [(dict(prefetch_bytes=2 * 2 * 16**3 * 4), 2),
                                            (dict(prefetch_batches=4), 4)])
def test_a_slow_loop_never_has_more_than_the_prefetch_depth_read_ahead(t1, options, depth):
    import time

    batch_size, n = 2, 24
    sampler = pbd.UniformSampler(t1, (16, 16, 16), n, seed=5, rank=0, world_size=1)
    batch_of_start = {sampler[k].start: k // batch_size for k in range(n)}
    assert len(batch_of_start) == n  # starts identify samples
    consumed = [0]
    rec = _RecordingVolume(t1, batch_of_start, consumed)
    loader = pbd.PatchLoader({"image": rec}, sampler, batch_size, threads=3, **options)
    assert loader.prefetch_depth == depth
    for batch in loader:
        consumed[0] += 1
        time.sleep(0.02)  # a training step: the prefetch threads run ahead as far as allowed
    assert consumed[0] == n // batch_size and len(rec.lead) == n
    # The loop holds batch r-1 while batches r .. r-1+depth are read (the last one may start
    # just before the loop counts batch r-1 as received, hence <= depth).
    assert max(rec.lead) <= depth
    assert max(rec.lead) >= depth - 1  # it does read ahead that far


def test_torch_batches_share_memory_with_the_buffers_the_threads_read_into(t1, monkeypatch):
    # No copy between the prefetch threads and the training loop: each tensor is a view of
    # the numpy array the samples were read into (torch.from_numpy), so a batch is resident once.
    buffers = []
    submit = pbd.PatchLoader._submit_batch

    def recording(self, pool, lo, hi):
        bufs, futures = submit(self, pool, lo, hi)
        buffers.append(bufs)
        return bufs, futures

    monkeypatch.setattr(pbd.PatchLoader, "_submit_batch", recording)
    sampler = pbd.UniformSampler(t1, (16, 16, 16), 12, seed=3, rank=0, world_size=1)
    ref = load(nilearn_mni("t1")).astype(np.float32)
    for k, batch in enumerate(pbd.PatchLoader(t1, sampler, 4, threads=2)):
        image = batch["image"]
        assert image.data_ptr() == buffers[k]["image"].__array_interface__["data"][0]
        s0 = tuple(int(v) for v in batch["start"][0])
        np.testing.assert_array_equal(image[0, 0].numpy(), ref[s0[0]:s0[0] + 16, s0[1]:s0[1] + 16, s0[2]:s0[2] + 16])
    assert len(buffers) == 3
