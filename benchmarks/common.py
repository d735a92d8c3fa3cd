"""Shared helpers of the benchmark programs: timing under MPI, tables and JSON output."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable


def parse_size(text: str) -> int:
    """'4K', '16M', '1G' or plain bytes -> bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in scale:
        return int(float(text[:-1]) * scale[text[-1]])
    return int(text)


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:g} {unit}"
    return f"{n} B"


def time_collective(comm, run: Callable[[], None], iterations: int, warmup: int = 2,
                    prepare: Callable[[], None] | None = None) -> list[float]:
    """Per-iteration durations (s), each the slowest rank's, with a barrier before each.

    `prepare` (untimed) runs before each call's barrier: e.g. restoring the input of an
    in-place collective whose result would otherwise be the next call's input.
    """
    import numpy as np

    for _ in range(warmup):
        if prepare is not None:
            prepare()
        comm.Barrier()
        run()
    durations = np.empty(iterations)
    for i in range(iterations):
        if prepare is not None:
            prepare()
        comm.Barrier()
        start = time.perf_counter()
        run()
        durations[i] = time.perf_counter() - start
    slowest = np.empty_like(durations)
    from mpi4py import MPI

    comm.Allreduce(durations, slowest, op=MPI.MAX)
    return slowest.tolist()


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Prints rows as an aligned table; columns are (key, header)."""
    cells = [[h for _, h in columns]]
    for row in rows:
        cells.append([row[k] if isinstance(row[k], str) else f"{row[k]:.4g}" for k, _ in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json_lines(path: str | os.PathLike, records: list[dict]) -> None:
    """Writes one JSON object per line (atomically: temp file + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_suffix(target.suffix + ".tmp")
    with open(temp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(temp, target)


def plot_panels(path: str | os.PathLike, panels: list[tuple[str, dict]], *, xlabel: str, ylabel: str,
                xlog: bool = False, ylog: bool = False) -> None:
    """A PNG of line panels, two per row: ``panels`` is ``[(title, {label: [(x, y), ...]})]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for label, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if xlog:
            ax.set_xscale("log", base=2)
        if ylog:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
