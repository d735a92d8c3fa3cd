"""Samplers: determinism, rank shards, resume, sampling distributions, grid reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import converted, load, nilearn_mni, nitime_fmri, warm_amplification

import pybrain_mpi.data as pbd

SHAPE = (50, 41, 33)


def _starts(sampler):
    return [s.start for s in sampler]


def test_uniform_sampler_is_deterministic_per_seed_and_epoch_and_stays_inside():
    a = pbd.UniformSampler(SHAPE, (16, 16, 16), 64, seed=7, rank=0, world_size=1)
    b = pbd.UniformSampler(SHAPE, (16, 16, 16), 64, seed=7, rank=0, world_size=1)
    first = _starts(a)
    assert first == _starts(b)
    a.set_epoch(1)
    assert _starts(a) != first
    for start in first:
        assert all(0 <= s <= d - 16 for s, d in zip(start, SHAPE))
    c = pbd.UniformSampler(SHAPE, (16, 16, 16), 64, seed=8, rank=0, world_size=1)
    assert _starts(c) != first


@pytest.mark.parametrize("world", [2, 3, 4])
def test_drop_shards_are_disjoint_equal_length_and_match_the_single_rank_epoch(world):
    whole = [s.start for s in pbd.UniformSampler(SHAPE, (8, 8, 8), 30, seed=1, rank=0, world_size=1)]
    shards = [list(pbd.UniformSampler(SHAPE, (8, 8, 8), 30, seed=1, rank=r, world_size=world))
              for r in range(world)]
    lengths = {len(s) for s in shards}
    assert lengths == {30 // world}
    indices = [spec.index for shard in shards for spec in shard]
    assert len(set(indices)) == len(indices), "a sample appears on two ranks"
    assert sorted(indices) == list(range(30 // world * world))
    for shard in shards:  # each rank computed exactly the samples the single rank would
        for spec in shard:
            assert spec.start == whole[spec.index]


@pytest.mark.parametrize("world", [3, 4, 7])
def test_pad_shards_are_equal_length_and_cover_every_grid_patch(world):
    grid = pbd.GridSampler(SHAPE, (16, 16, 16), overlap=4, rank=0, world_size=1)
    shards = [list(pbd.GridSampler(SHAPE, (16, 16, 16), overlap=4, rank=r, world_size=world))
              for r in range(world)]
    assert {len(s) for s in shards} == {-(-grid.global_length // world)}
    covered = {spec.index for shard in shards for spec in shard}
    assert covered == set(range(grid.global_length))


def test_resume_from_saved_state_continues_the_identical_sequence():
    ref = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=3, rank=1, world_size=2)
    ref.set_epoch(5)
    expected = _starts(ref)
    run = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=3, rank=1, world_size=2)
    run.set_epoch(5)
    it = iter(run)
    head = [next(it).start for _ in range(7)]
    state = run.state_dict()
    resumed = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + _starts(resumed) == expected
    other = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=3, rank=1, world_size=4)
    with pytest.raises(pbd.DataMismatch, match="world_size"):
        other.load_state_dict(state)


def test_weighted_sampler_centres_patches_on_the_grey_matter_map():
    img = pbd.Volume(converted(nilearn_mni("t1"), "t1.zarr", chunks=(32, 32, 32)))
    gm = pbd.Volume(converted(nilearn_mni("gm"), "gm.zarr", chunks=(32, 32, 32)))
    gm_ref = load(nilearn_mni("gm"))
    sampler = pbd.WeightedSampler(img, gm, (9, 9, 9), 300, seed=2, rank=0, world_size=1)
    # Odd patch inside the volume: the centre voxel is start + 4 unless clipped at an edge.
    centres = [tuple(s + 4 for s in spec.start) for spec in sampler]
    weights = np.array([gm_ref[c] for c in centres], dtype=np.float64)
    assert (weights > 0).all(), "a patch was centred on a voxel of zero weight"
    # Weighted draws favour high-probability voxels: their mean weight beats the map's mean
    # over nonzero voxels by far (E[w] under w-weighting is E[w^2]/E[w]).
    nz = gm_ref[gm_ref > 0].astype(np.float64)
    expected = (nz**2).mean() / nz.mean()
    stderr = np.sqrt(((nz**3).mean() / nz.mean() - expected**2) / len(weights))
    assert abs(weights.mean() - expected) < 5 * stderr


def test_weighted_sampler_frequencies_follow_the_weights_exactly_on_synthetic_map():
    weights = np.zeros((40, 40, 40), dtype=np.float32)
    weights[5, 5, 5] = 1.0
    weights[30, 30, 30] = 3.0
    sampler = pbd.WeightedSampler((40, 40, 40), weights, (1, 1, 1), 2000, seed=0, rank=0, world_size=1)
    starts = _starts(sampler)
    hits = np.array([start == (30, 30, 30) for start in starts])
    assert set(starts) == {(5, 5, 5), (30, 30, 30)}
    # Binomial(2000, 0.75): 5 standard deviations.
    assert abs(hits.mean() - 0.75) < 5 * np.sqrt(0.75 * 0.25 / 2000)


def test_label_sampler_balances_a_rare_label():
    labels = np.zeros((40, 40, 40), dtype=np.int16)
    labels[10:12, 10:12, 10:12] = 2  # 8 voxels of 64000
    sampler = pbd.LabelSampler((40, 40, 40), labels, (1, 1, 1), 2000, seed=1, rank=0, world_size=1)
    drawn = np.array([labels[spec.start] for spec in sampler])
    assert abs((drawn == 2).mean() - 0.5) < 5 * np.sqrt(0.25 / 2000)
    only = pbd.LabelSampler((40, 40, 40), labels, (1, 1, 1), 50, label_probabilities={2: 1.0},
                            rank=0, world_size=1)
    assert all(labels[spec.start] == 2 for spec in only)
    with pytest.raises(pbd.DataMismatch, match=r"labels \[7\] do not occur"):
        pbd.LabelSampler((40, 40, 40), labels, (1, 1, 1), 10, label_probabilities={7: 1.0},
                         rank=0, world_size=1)


@pytest.mark.parametrize("weighting", ["average", "gaussian"])
def test_grid_and_aggregator_reconstruct_the_volume(weighting):
    ref = np.random.default_rng(0).normal(size=(45, 38, 29)).astype(np.float32)
    sampler = pbd.GridSampler(ref.shape, (16, 16, 16), overlap=5, rank=0, world_size=1)
    agg = pbd.GridAggregator(ref.shape, (16, 16, 16), weighting)
    for spec in sampler:
        agg.add([spec.start], ref[(None,) + tuple(slice(s, s + n) for s, n in zip(spec.start, spec.size))])
    out = agg.result()
    if weighting == "average":
        np.testing.assert_array_equal(out.astype(np.float32), ref)  # float64 accumulation is exact
    else:
        np.testing.assert_allclose(out, ref, rtol=4 * np.finfo(np.float64).eps * 27, atol=0)


def test_grid_shards_merged_across_ranks_reconstruct_multichannel_predictions():
    ref = np.random.default_rng(1).normal(size=(2, 30, 30, 30))
    parts = []
    for rank in range(3):
        sampler = pbd.GridSampler(ref.shape[1:], (12, 12, 12), overlap=3, rank=rank, world_size=3)
        agg = pbd.GridAggregator(ref.shape[1:], (12, 12, 12), "gaussian", channels=2)
        for spec in sampler:
            agg.add([spec.start], ref[None, :, spec.start[0]:spec.start[0] + 12,
                                      spec.start[1]:spec.start[1] + 12, spec.start[2]:spec.start[2] + 12])
        parts.append(agg)
    merged = parts[0].merge_(parts[1]).merge_(parts[2])
    np.testing.assert_allclose(merged.result(), ref, rtol=1e-13, atol=0)
    with pytest.raises(pbd.DataMismatch, match="received no patch"):
        partial = pbd.GridAggregator((30, 30, 30), (12, 12, 12))
        partial.add([(0, 0, 0)], np.zeros((1, 12, 12, 12)))
        partial.result()


def test_time_series_sampler_yields_every_masked_voxel_once_per_epoch():
    fmri = pbd.Volume(converted(nitime_fmri(), "fmri1.zarr"))
    ref = load(nitime_fmri())
    mask = ref.std(axis=3) > np.percentile(ref.std(axis=3), 60)
    sampler = pbd.TimeSeriesSampler(fmri, mask, seed=4, rank=0, world_size=1)
    voxels = [spec.start[1:] for spec in sampler]
    assert sorted(voxels) == sorted(map(tuple, np.argwhere(mask)))
    spec = sampler[3]
    np.testing.assert_array_equal(fmri.read_patch(spec.start, spec.size).ravel(), ref[spec.start[1:]])
    sampler.set_epoch(1)
    assert [s.start[1:] for s in sampler] != voxels  # reshuffled


def test_construction_errors_catch_mismatched_inputs_before_the_epoch():
    t1 = pbd.Volume(converted(nilearn_mni("t1"), "t1.zarr", chunks=(32, 32, 32)))
    fmri = pbd.Volume(converted(nitime_fmri(), "fmri1.zarr"))
    with pytest.raises(pbd.DataMismatch, match="does not fit"):
        pbd.UniformSampler(t1, (256, 16, 16), 10, rank=0, world_size=1)
    with pytest.raises(pbd.DataMismatch, match="TimeSeriesSampler"):
        pbd.UniformSampler(fmri, (8, 4, 4, 4), 10, rank=0, world_size=1)
    with pytest.raises(pbd.DataMismatch, match="share one voxel grid"):
        pbd.WeightedSampler(t1, np.ones((10, 10, 18)), (8, 8, 8), 10, rank=0, world_size=1)
    with pytest.raises(pbd.DataMismatch, match="not on the fMRI grid"):
        pbd.TimeSeriesSampler(fmri, np.ones((10, 10, 17)), rank=0, world_size=1)
    with pytest.raises(pbd.DataMismatch, match="4D time-first"):
        pbd.TimeSeriesSampler(t1, rank=0, world_size=1)
    with pytest.raises(pbd.DataMismatch, match="zero everywhere"):
        pbd.WeightedSampler((8, 8, 8), np.zeros((8, 8, 8)), (2, 2, 2), 4, rank=0, world_size=1)


def test_local_window_visits_the_same_uniform_positions_in_z_order_per_window():
    random_order = pbd.UniformSampler(SHAPE, (8, 8, 8), 50, seed=3, rank=0, world_size=1)
    local = pbd.UniformSampler(SHAPE, (8, 8, 8), 50, seed=3, rank=0, world_size=1, local_window=16)
    a, b = _starts(random_order), _starts(local)
    assert a != b
    for lo in range(0, 50, 16):  # each window (the last one short) holds the same draws
        assert sorted(a[lo:lo + 16]) == sorted(b[lo:lo + 16])
        window = b[lo:lo + 16]
        assert window == sorted(window, key=pbd.samplers._morton_key)
    assert b == _starts(pbd.UniformSampler(SHAPE, (8, 8, 8), 50, seed=3, rank=0, world_size=1, local_window=16))
    # Indices and augmentation seeds stay with the epoch slot.
    assert [s.index for s in local] == list(range(50))
    assert [s.seed for s in local] == [s.seed for s in random_order]


def test_morton_key_interleaves_axis_bits():
    assert pbd.samplers._morton_key((1, 0, 0)) == 0b001
    assert pbd.samplers._morton_key((0, 1, 0)) == 0b010
    assert pbd.samplers._morton_key((0, 0, 1)) == 0b100
    assert pbd.samplers._morton_key((3, 0, 1)) == 0b001_101
    assert pbd.samplers._morton_key((2, 2, 2)) == 0b111_000


def test_local_window_resumes_and_refuses_a_state_with_another_window():
    s = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=1, rank=0, world_size=1, local_window=8)
    s.set_epoch(2)
    it = iter(s)
    for _ in range(11):
        next(it)
    state = s.state_dict()
    rest = [spec.start for spec in it]
    resumed = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=1, rank=0, world_size=1, local_window=8)
    resumed.load_state_dict(state)
    assert _starts(resumed) == rest
    other = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=1, rank=0, world_size=1, local_window=16)
    with pytest.raises(pbd.DataMismatch, match="local_window=8"):
        other.load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "local_window"}  # saved before the option
    plain = pbd.UniformSampler(SHAPE, (8, 8, 8), 40, seed=1, rank=0, world_size=1)
    plain.load_state_dict(legacy)
    assert plain.epoch == 2 and plain.position == 11


def test_local_window_lets_a_small_cache_be_reused_across_random_patches():
    path = converted(nilearn_mni("t1"), "t1_f32.zarr", chunks=(32, 32, 32), dtype="float32")
    amplification = {}
    for window in (0, 120):
        vol = pbd.Volume(path, cache_bytes=8 * 2**20, threads=1)  # a quarter of the volume
        amplification[window] = warm_amplification(vol, (64,) * 3, 120, seed=2, local_window=window)
    assert amplification[120] < 0.5 * amplification[0], amplification
