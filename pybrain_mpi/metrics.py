"""Regression metrics for brain models: MSE, MAE, RMSE, R^2, Pearson r; per output and summary.

Conventions (all computed in float64 whatever the input dtype):

- inputs are ``(N,)`` (one output) or ``(N, K)`` (K outputs: voxels, vertices, time points);
  any further dimensions are flattened into outputs;
- per-output values are arrays of length K; the *summary* is the uniform mean over outputs
  (for MSE/MAE that equals the mean over all elements);
- R^2 per output is ``1 - SS_res / SS_tot`` with ``SS_tot`` around that output's mean over
  the N samples; Pearson r per output correlates prediction and target over the N samples.
  An output whose target (for r: target or prediction) is constant has no defined value:
  it is NaN per output and left out of the summary;
- per-ROI aggregation averages a per-output metric over the outputs of each ROI label.

:class:`RegressionStats` accumulates additive sufficient statistics batch by batch, so
validation can stream over batches and ranks (allreduce :meth:`RegressionStats.as_tensor`
with op=sum, then :meth:`RegressionStats.from_tensor`) and give the same numbers as the
one-shot functions. The sums are raw float64 moments; they lose precision only when an
output's mean is about 1e7 times its standard deviation or more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

__all__ = ["mse", "mae", "rmse", "r2_score", "pearson_r", "per_roi", "regression_report",
           "RegressionStats"]


def _as_2d_float64(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        raise ValueError(f"{name} must have a sample dimension, got a scalar")
    return a.reshape(a.shape[0], -1)


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_2d_float64(pred, "pred"), _as_2d_float64(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape "
                         "(samples x outputs)")
    if p.shape[0] == 0:
        raise ValueError("metrics need at least one sample")
    return p, t


def _summary(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def mse(pred, target, per_output: bool = False):
    """Mean squared error: a float, or an array over outputs with ``per_output=True``."""
    p, t = _pair(pred, target)
    values = ((p - t) ** 2).mean(axis=0)
    return values if per_output else float(values.mean())


def mae(pred, target, per_output: bool = False):
    """Mean absolute error: a float, or an array over outputs with ``per_output=True``."""
    p, t = _pair(pred, target)
    values = np.abs(p - t).mean(axis=0)
    return values if per_output else float(values.mean())


def rmse(pred, target, per_output: bool = False):
    """Root mean squared error (summary: sqrt of the overall MSE)."""
    values = mse(pred, target, per_output=per_output)
    return np.sqrt(values) if per_output else float(np.sqrt(values))


def _r2_from_sums(ss_res: np.ndarray, ss_tot: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)


def r2_score(pred, target, per_output: bool = False):
    """Coefficient of determination per output, or its mean over outputs (NaN outputs skipped)."""
    p, t = _pair(pred, target)
    ss_res = ((t - p) ** 2).sum(axis=0)
    ss_tot = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    values = _r2_from_sums(ss_res, ss_tot)
    return values if per_output else _summary(values)


def _pearson_from_moments(cov: np.ndarray, var_p: np.ndarray, var_t: np.ndarray) -> np.ndarray:
    denom = np.sqrt(var_p * var_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def pearson_r(pred, target, per_output: bool = False):
    """Pearson correlation over samples per output, or its mean over outputs."""
    p, t = _pair(pred, target)
    dp, dt = p - p.mean(axis=0), t - t.mean(axis=0)
    values = _pearson_from_moments((dp * dt).sum(0), (dp * dp).sum(0), (dt * dt).sum(0))
    return values if per_output else _summary(values)


def per_roi(values, roi_labels) -> dict:
    """Mean of a per-output metric within each ROI: ``{label: mean}`` (NaN outputs skipped).

    ``roi_labels`` gives one label per output (e.g. an atlas region per vertex); labels are
    returned in sorted order.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    labels = np.asarray(roi_labels).reshape(-1)
    if labels.shape != values.shape:
        raise ValueError(f"roi_labels has {labels.size} entries but there are {values.size} "
                         "outputs; give one ROI label per output")
    return {label.item() if hasattr(label, "item") else label: _summary(values[labels == label])
            for label in np.unique(labels)}


def regression_report(pred, target, roi_labels=None) -> dict:
    """All metrics at once: summaries, per-output arrays and (with labels) per-ROI Pearson r/R^2."""
    stats = RegressionStats.from_batch(pred, target)
    return stats.compute(roi_labels)


@dataclasses.dataclass
class RegressionStats:
    """Additive float64 sufficient statistics for the metrics of this module.

    ``update(pred, target)`` adds a batch; ``merge`` adds another accumulator; ``as_tensor``
    packs everything into one float64 vector that an allreduce(sum) combines across ranks.
    """

    n_outputs: int
    count: float = 0.0
    sums: np.ndarray | None = None  # rows: p, t, pp, tt, pt, |p - t|, (p - t)^2

    _ROWS = 7

    def __post_init__(self):
        if self.sums is None:
            self.sums = np.zeros((self._ROWS, self.n_outputs), dtype=np.float64)

    @classmethod
    def from_batch(cls, pred, target) -> "RegressionStats":
        """Statistics of one batch."""
        p, _ = _pair(pred, target)
        stats = cls(p.shape[1])
        stats.update(pred, target)
        return stats

    def update(self, pred, target) -> None:
        """Add a batch ``(N, K)`` of predictions and targets."""
        p, t = _pair(pred, target)
        if p.shape[1] != self.n_outputs:
            raise ValueError(f"batch has {p.shape[1]} outputs, accumulator has {self.n_outputs}")
        self.count += p.shape[0]
        self.sums += np.stack([p.sum(0), t.sum(0), (p * p).sum(0), (t * t).sum(0),
                               (p * t).sum(0), np.abs(p - t).sum(0), ((p - t) ** 2).sum(0)])

    def merge(self, other: "RegressionStats") -> None:
        """Add another accumulator's statistics (same number of outputs)."""
        if other.n_outputs != self.n_outputs:
            raise ValueError(f"cannot merge {other.n_outputs} outputs into {self.n_outputs}")
        self.count += other.count
        self.sums += other.sums

    def as_tensor(self) -> torch.Tensor:
        """One float64 vector ``[count, sums...]`` for an allreduce with op=sum."""
        return torch.from_numpy(np.concatenate([[self.count], self.sums.reshape(-1)]))

    @classmethod
    def from_tensor(cls, vector, n_outputs: int) -> "RegressionStats":
        """Inverse of :meth:`as_tensor` (e.g. after summing it over ranks)."""
        v = np.asarray(vector.numpy() if isinstance(vector, torch.Tensor) else vector,
                       dtype=np.float64)
        if v.size != 1 + cls._ROWS * n_outputs:
            raise ValueError(f"vector of {v.size} values does not hold stats of "
                             f"{n_outputs} outputs")
        return cls(n_outputs, float(v[0]), v[1:].reshape(cls._ROWS, n_outputs).copy())

    def compute(self, roi_labels=None) -> dict:
        """Metrics from the accumulated statistics (same conventions as the functions)."""
        if self.count == 0:
            raise ValueError("no samples accumulated")
        n = self.count
        # The squared error has its own sum: spp - 2 spt + stt cancels badly for good fits.
        sp, st, spp, stt, spt, sabs, sse = self.sums
        mse_out = sse / n
        ss_tot = np.maximum(stt - st * st / n, 0.0)
        var_p = np.maximum(spp - sp * sp / n, 0.0)
        cov = spt - sp * st / n
        r2_out = _r2_from_sums(sse, ss_tot)
        r_out = _pearson_from_moments(cov, var_p, ss_tot)
        report = {
            "n_samples": int(n), "n_outputs": self.n_outputs,
            "mse": float(mse_out.mean()), "rmse": float(np.sqrt(mse_out.mean())),
            "mae": float((sabs / n).mean()), "r2": _summary(r2_out),
            "pearson_r": _summary(r_out),
            "per_output": {"mse": mse_out, "mae": sabs / n, "r2": r2_out, "pearson_r": r_out},
        }
        if roi_labels is not None:
            report["per_roi"] = {"pearson_r": per_roi(r_out, roi_labels),
                                 "r2": per_roi(r2_out, roi_labels)}
        return report
