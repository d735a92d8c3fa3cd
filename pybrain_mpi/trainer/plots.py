"""The loss-curve PNG written at the end of a run (matplotlib, Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_losses"]


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
