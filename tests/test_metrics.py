"""Metrics against plain-Python float64 reference formulas."""

import math
import random

import numpy as np
import pytest
import torch

from pybrain_mpi import metrics

EPS64 = np.finfo(np.float64).eps


def _columns(rows):
    return [list(col) for col in zip(*rows)]


def _ref_per_output(pred_rows, target_rows):
    """Reference per-output MSE, MAE, R^2, Pearson r with explicit Python loops."""
    out = {"mse": [], "mae": [], "r2": [], "r": []}
    for p, t in zip(_columns(pred_rows), _columns(target_rows)):
        n = len(t)
        mt, mp = sum(t) / n, sum(p) / n
        out["mse"].append(sum((a - b) ** 2 for a, b in zip(p, t)) / n)
        out["mae"].append(sum(abs(a - b) for a, b in zip(p, t)) / n)
        ss_res = sum((b - a) ** 2 for a, b in zip(p, t))
        ss_tot = sum((b - mt) ** 2 for b in t)
        out["r2"].append(1 - ss_res / ss_tot)
        cov = sum((a - mp) * (b - mt) for a, b in zip(p, t))
        out["r"].append(cov / math.sqrt(sum((a - mp) ** 2 for a in p) * ss_tot))
    return out


@pytest.fixture
def data():
    rng = random.Random(11)
    target = [[rng.gauss(3.0, 2.0) for _ in range(7)] for _ in range(50)]
    pred = [[t + rng.gauss(0.0, 1.0) * (1 + k) for k, t in enumerate(row)] for row in target]
    return pred, target


def test_per_output_metrics_match_reference(data):
    pred, target = data
    ref = _ref_per_output(pred, target)
    tol = dict(rtol=1e3 * EPS64, atol=0)
    np.testing.assert_allclose(metrics.mse(pred, target, per_output=True), ref["mse"], **tol)
    np.testing.assert_allclose(metrics.mae(pred, target, per_output=True), ref["mae"], **tol)
    np.testing.assert_allclose(metrics.rmse(pred, target, per_output=True),
                               [math.sqrt(v) for v in ref["mse"]], **tol)
    np.testing.assert_allclose(metrics.r2_score(pred, target, per_output=True), ref["r2"], **tol)
    np.testing.assert_allclose(metrics.pearson_r(pred, target, per_output=True), ref["r"], **tol)


def test_summaries_are_uniform_means_over_outputs(data):
    pred, target = data
    ref = _ref_per_output(pred, target)
    flat_sq = [(a - b) ** 2 for pr, tr in zip(pred, target) for a, b in zip(pr, tr)]
    assert metrics.mse(pred, target) == pytest.approx(sum(flat_sq) / len(flat_sq), rel=1e3 * EPS64)
    assert metrics.rmse(pred, target) == pytest.approx(math.sqrt(sum(flat_sq) / len(flat_sq)),
                                                       rel=1e3 * EPS64)
    assert metrics.mae(pred, target) == pytest.approx(sum(ref["mae"]) / 7, rel=1e3 * EPS64)
    assert metrics.r2_score(pred, target) == pytest.approx(sum(ref["r2"]) / 7, rel=1e3 * EPS64)
    assert metrics.pearson_r(pred, target) == pytest.approx(sum(ref["r"]) / 7, rel=1e3 * EPS64)


def test_float32_torch_inputs_are_evaluated_in_float64(data):
    pred, target = data
    p32, t32 = torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    ref = _ref_per_output(p32.double().tolist(), t32.double().tolist())
    np.testing.assert_allclose(metrics.r2_score(p32, t32, per_output=True), ref["r2"],
                               rtol=1e3 * EPS64)


def test_perfect_and_mean_predictions_give_r2_one_and_zero():
    t = np.arange(12.0).reshape(6, 2)
    assert metrics.r2_score(t, t) == 1.0
    assert metrics.r2_score(np.broadcast_to(t.mean(0), t.shape), t) == pytest.approx(0.0, abs=EPS64)
    assert metrics.pearson_r(-t, t) == pytest.approx(-1.0, abs=EPS64)


def test_constant_target_output_is_nan_and_left_out_of_summary():
    t = np.array([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    p = np.array([[1.5, 4.0], [2.0, 6.0], [3.0, 5.0]])
    per = metrics.r2_score(p, t, per_output=True)
    assert math.isnan(per[1]) and not math.isnan(per[0])
    assert metrics.r2_score(p, t) == per[0]
    assert math.isnan(metrics.pearson_r(p, t, per_output=True)[1])


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        metrics.mse(np.zeros((4, 2)), np.zeros((4, 3)))


def test_per_roi_averages_per_output_values_by_label():
    values = [0.1, 0.5, 0.3, float("nan"), 0.9]
    labels = ["V1", "V1", "FFA", "FFA", "V1"]
    got = metrics.per_roi(values, labels)
    assert got == {"FFA": pytest.approx(0.3), "V1": pytest.approx((0.1 + 0.5 + 0.9) / 3)}
    with pytest.raises(ValueError, match="one ROI label per output"):
        metrics.per_roi(values, labels[:3])


def test_streamed_stats_over_batches_and_ranks_equal_one_shot_metrics(data):
    pred, target = np.array(data[0]), np.array(data[1])
    # Two "ranks", each streaming uneven batches; then an allreduce(sum) of the vectors.
    rank_stats = []
    for lo, hi in [(0, 23), (23, 50)]:
        s = metrics.RegressionStats(7)
        for b in range(lo, hi, 8):
            s.update(pred[b:min(b + 8, hi)], target[b:min(b + 8, hi)])
        rank_stats.append(s.as_tensor())
    merged = metrics.RegressionStats.from_tensor(rank_stats[0] + rank_stats[1], 7)
    labels = ["a", "b", "a", "c", "b", "a", "c"]
    report = merged.compute(labels)
    ref = _ref_per_output(data[0], data[1])
    # Raw moments cancel a little (mean 3, std 2): allow 1e6 eps, far below any real effect.
    tol = 1e6 * EPS64
    assert report["n_samples"] == 50
    np.testing.assert_allclose(report["per_output"]["r2"], ref["r2"], rtol=tol)
    np.testing.assert_allclose(report["per_output"]["pearson_r"], ref["r"], rtol=tol)
    np.testing.assert_allclose(report["per_output"]["mse"], ref["mse"], rtol=tol)
    np.testing.assert_allclose(report["per_output"]["mae"], ref["mae"], rtol=tol)
    assert report["r2"] == pytest.approx(sum(ref["r2"]) / 7, rel=tol)
    assert report["per_roi"]["pearson_r"]["a"] == pytest.approx(
        (ref["r"][0] + ref["r"][2] + ref["r"][5]) / 3, rel=tol)
    one_shot = metrics.regression_report(pred, target)
    assert one_shot["mse"] == pytest.approx(report["mse"], rel=tol)
