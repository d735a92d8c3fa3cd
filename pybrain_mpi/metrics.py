"""Metrics for brain models: regression (MSE, MAE, RMSE, R^2, Pearson r; per output and
summary) and segmentation (Dice and IoU per label, :class:`SegmentationStats`).

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

**Undefined is not NaN in a report.** :meth:`RegressionStats.compute` and
:meth:`SegmentationStats.compute` put ``None`` for a summary that has no defined value and say
why in ``report["undefined"]`` (``{"r2": "the target is constant over the 3 samples"}``), so a
summary never shows a bare nan; per-output arrays keep NaN for the undefined outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

__all__ = ["mse", "mae", "rmse", "r2_score", "pearson_r", "per_roi", "regression_report",
           "RegressionStats", "SegmentationStats", "dice_iou"]


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
        undefined = {}
        if n == 2:  # two points always lie on a line: r is +-1 whatever the model
            r_out = np.full_like(r_out, np.nan)
        r2, r = _summary(r2_out), _summary(r_out)
        constant_target = ss_tot <= 0
        constant_pred = var_p <= 0
        samples = f"{int(n)} sample{'s' if n != 1 else ''}"
        if not np.isfinite(r2):
            r2 = None
            undefined["r2"] = (f"the target is constant over the {samples}" if n > 1
                               else "one sample: R^2 needs at least 2")
        elif constant_target.any():
            undefined["r2"] = (f"{int(constant_target.sum())} of {self.n_outputs} outputs have a "
                               "constant target and are left out of the mean")
        if n == 2:
            r = None
            undefined["pearson_r"] = "2 samples: a correlation of two points is +-1 by construction"
        elif not np.isfinite(r):
            r = None
            undefined["pearson_r"] = (
                "one sample: a correlation needs at least 2" if n < 2 else
                f"the target is constant over the {samples}" if constant_target.all() else
                f"the prediction is constant over the {samples}" if constant_pred.all() else
                "the target or the prediction is constant in every output")
        elif (constant_target | constant_pred).any():
            undefined["pearson_r"] = (f"{int((constant_target | constant_pred).sum())} of "
                                      f"{self.n_outputs} outputs have a constant target or "
                                      "prediction and are left out of the mean")
        report = {
            "n_samples": int(n), "n_outputs": self.n_outputs,
            "mse": float(mse_out.mean()), "rmse": float(np.sqrt(mse_out.mean())),
            "mae": float((sabs / n).mean()), "r2": r2, "pearson_r": r,
            "per_output": {"mse": mse_out, "mae": sabs / n, "r2": r2_out, "pearson_r": r_out},
            "undefined": undefined,
        }
        if roi_labels is not None:
            report["per_roi"] = {"pearson_r": per_roi(r_out, roi_labels),
                                 "r2": per_roi(r2_out, roi_labels)}
        return report


def dice_iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label Dice ``2TP / (2TP + FP + FN)`` and IoU ``TP / (TP + FP + FN)``; NaN where a
    label is in neither the target nor the prediction (``TP + FP + FN = 0``)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    union = tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(union > 0, 2 * tp / np.where(union > 0, tp + union, 1.0), np.nan)
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
    return dice, iou


@dataclasses.dataclass
class SegmentationStats:
    """Additive voxel counts for Dice and IoU of ``n_classes`` labels (class indices
    ``0..n_classes-1``, 0 the background), accumulated over batches, volumes and ranks
    (allreduce :meth:`as_tensor` with op=sum, then :meth:`from_tensor`).

    ``labels`` names the classes in reports (the label values of the label map).
    """

    n_classes: int
    counts: np.ndarray | None = None  # rows: tp, fp, fn; columns: classes

    def __post_init__(self):
        if self.counts is None:
            self.counts = np.zeros((3, self.n_classes), dtype=np.float64)

    def update(self, pred, target) -> None:
        """Add predicted and true class indices of the same shape (any number of voxels)."""
        p = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred).reshape(-1)
        t = np.asarray(target.detach().cpu() if isinstance(target, torch.Tensor) else target).reshape(-1)
        if p.shape != t.shape:
            raise ValueError(f"prediction of {p.size} voxels, target of {t.size}")
        k = self.n_classes
        confusion = np.bincount(t.astype(np.int64) * k + p.astype(np.int64),
                                minlength=k * k).reshape(k, k).astype(np.float64)
        tp = np.diag(confusion)
        self.counts += np.stack([tp, confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp])

    def merge(self, other: "SegmentationStats") -> None:
        """Add another accumulator's counts."""
        self.counts += other.counts

    def as_tensor(self) -> torch.Tensor:
        """The counts as one float64 vector for an allreduce with op=sum."""
        return torch.from_numpy(self.counts.reshape(-1).copy())

    @classmethod
    def from_tensor(cls, vector, n_classes: int) -> "SegmentationStats":
        """Inverse of :meth:`as_tensor`."""
        v = np.asarray(vector.numpy() if isinstance(vector, torch.Tensor) else vector,
                       dtype=np.float64)
        return cls(n_classes, v.reshape(3, n_classes).copy())

    def compute(self, labels=None) -> dict:
        """Per-label and mean Dice and IoU. The means are over the foreground labels (class
        1 and up) with a defined value; a label in neither target nor prediction has none,
        and ``undefined`` says so."""
        labels = list(labels) if labels is not None else list(range(self.n_classes))
        tp, fp, fn = self.counts
        dice, iou = dice_iou(tp, fp, fn)
        undefined = {f"dice[{labels[c]}]": f"label {labels[c]} is in neither the target nor "
                     "the prediction" for c in range(self.n_classes) if not np.isfinite(dice[c])}
        foreground = [c for c in range(1, self.n_classes) if np.isfinite(dice[c])]
        mean_dice = float(np.mean(dice[foreground])) if foreground else None
        mean_iou = float(np.mean(iou[foreground])) if foreground else None
        if mean_dice is None:
            undefined["mean_dice"] = ("no foreground label is in the target or the prediction"
                                      if self.n_classes > 1 else "only a background class")
        plain = lambda a: {str(labels[c]): (float(a[c]) if np.isfinite(a[c]) else None)  # noqa: E731
                           for c in range(self.n_classes)}
        return {"mean_dice": mean_dice, "mean_iou": mean_iou, "dice": plain(dice),
                "iou": plain(iou), "n_voxels": int(tp.sum() + fn.sum()),
                "undefined": undefined}
