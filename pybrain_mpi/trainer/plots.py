"""Pictures (matplotlib, Agg backend: no display): the loss curve written at the end of a run,
and a prediction over its image in three orthogonal slices (``pybrain-mpi predict --png``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_losses", "plot_overlay"]


def plot_losses(path: Path, step_losses: list[float], epochs: list[dict], title: str) -> Path:
    """Training loss per step and train/validation loss per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(1, len(step_losses) + 1), step_losses, lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("training loss (mean over ranks)")
    left.set_yscale("log" if step_losses and min(step_losses) > 0 else "linear")
    if epochs:
        xs = [e["epoch"] + 1 for e in epochs]
        right.plot(xs, [e["train_loss"] for e in epochs], "o-", label="train")
        if any(e.get("val_loss") is not None for e in epochs):
            right.plot(xs, [e.get("val_loss") for e in epochs], "s-", label="validation")
        right.legend()
    right.set_xlabel("epoch")
    right.set_ylabel("loss")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_overlay(path: Path, image, overlay, title: str, *, centre=None, labels: bool = True,
                 voxel_size=(1.0, 1.0, 1.0)) -> Path:
    """Three orthogonal slices through ``centre`` (default: the middle of the overlay's nonzero
    region) of a 3D ``image`` in grey with ``overlay`` on top: labels (nonzero voxels in
    colour, half transparent) or, with ``labels=False``, values in a colour map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    image = np.asarray(image, dtype=np.float32)
    overlay = np.asarray(overlay)
    if centre is None:
        where = np.argwhere(overlay != 0) if labels else np.argwhere(np.isfinite(overlay))
        centre = ((where.min(axis=0) + where.max(axis=0)) // 2 if len(where)
                  else np.array(image.shape) // 2)
    low, high = np.percentile(image, [1, 99.5]) if image.size else (0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, ax in enumerate(axes):
        take = lambda a: np.take(a, int(centre[axis]), axis=axis).T  # noqa: E731
        spacing = [v for i, v in enumerate(voxel_size) if i != axis]
        aspect = spacing[1] / spacing[0] if spacing[0] else 1.0
        ax.imshow(take(image), cmap="gray", vmin=low, vmax=max(high, low + 1e-6), origin="lower",
                  aspect=aspect)
        shown = take(overlay).astype(np.float32)
        if labels:
            shown = np.ma.masked_where(shown == 0, shown)
            ax.imshow(shown, cmap="autumn", alpha=0.5, origin="lower", aspect=aspect,
                      vmin=0, vmax=max(1.0, float(overlay.max())), interpolation="nearest")
        else:
            ax.imshow(shown, cmap="viridis", alpha=0.5, origin="lower", aspect=aspect)
        ax.set_title(f"{'xyz'[axis]} = {int(centre[axis])}")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
