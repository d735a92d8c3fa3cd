"""Per-rank step logs (JSON lines) and the Chrome-trace timeline.

**Step log**: every rank appends to ``<output>/logs/rank<R>.jsonl``: first a ``start`` record
(rank, pid, host, step it starts from), then one line per logged step::

    {"step": 12, "epoch": 0, "loss": 0.93, "local_loss": 0.91, "lr": 0.001, "samples": 32,
     "data_s": ..., "forward_s": ..., "backward_s": ..., "comm_wait_s": ..., "optimizer_s": ...}

``backward_s`` is autograd's own time; ``comm_wait_s`` is how long the step then waited for
gradient allreduces still in flight plus the per-step agreement allreduce.

**Timeline** (``--timeline trace.json``): complete events (``"ph": "X"``) in microseconds of
wall-clock time, ``pid`` = rank, ``tid`` 0 for compute (data, forward, backward, optimizer)
and 1 for communication (each gradient bucket's allreduce from launch to completion).
Rank 0 gathers every rank's events and writes one file that Perfetto / chrome://tracing opens.

**TensorBoard** (``[output] tensorboard = true``): rank 0 also writes the step log's global
loss, learning rate and samples/s, and each epoch's train/validation loss, as scalars through
``torch.utils.tensorboard.SummaryWriter`` into ``<output>/tensorboard`` (``tensorboard
--logdir <output>/tensorboard``). The ``tensorboard`` package is optional
(``pip install 'pybrain-mpi[tensorboard]'``); without it the run is refused in one line.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["StepLog", "Timeline", "TensorBoardScalars", "TensorBoardMissing", "TENSORBOARD_MISSING"]


class StepLog:
    """Appends JSON lines to this rank's log file."""

    def __init__(self, directory: Path, rank: int):
        self.path = Path(directory) / f"rank{rank}.jsonl"
        self.rank = rank
        self._file = None

    def truncate_after(self, step: int) -> None:
        """Drop step lines past ``step`` (left by a run killed after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", -1) <= step or "event" in record:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def open(self, start_step: int, **extra) -> None:
        """Open for appending and write the ``start`` record."""
        self._file = open(self.path, "a", buffering=1)
        self.write({"event": "start", "rank": self.rank, "pid": os.getpid(),
                    "host": socket.gethostname(), "start_step": start_step, "time": time.time(),
                    **extra})

    def write(self, record: dict) -> None:
        """Write one record as a JSON line (flushed: readers see whole lines)."""
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


class Timeline:
    """Collects Chrome-trace events for this rank (perf_counter times -> wall-clock us)."""

    def __init__(self, rank: int, enabled: bool, max_events: int = 200_000):
        self.rank = rank
        self.enabled = enabled
        self.max_events = max_events
        self.events: list[dict] = []
        # perf_counter is precise but has an arbitrary origin; anchor it to the wall clock
        # so events of different ranks (and nodes with synchronised clocks) line up.
        self._offset_us = time.time() * 1e6 - time.perf_counter() * 1e6

    def add(self, name: str, start: float, end: float, tid: int = 0, **args) -> None:
        """Record ``name`` from ``start`` to ``end`` (perf_counter seconds)."""
        if not self.enabled or len(self.events) >= self.max_events:
            return
        self.events.append({"name": name, "ph": "X", "pid": self.rank, "tid": tid,
                            "ts": start * 1e6 + self._offset_us,
                            "dur": max(0.0, (end - start) * 1e6), "args": args})

    def add_buckets(self, buckets: list[dict], step: int) -> None:
        """Record each gradient bucket's allreduce from DistributedDataParallel.timeline."""
        for b in buckets:
            if b["finished_at"] >= b["launched_at"] > 0:
                self.add(f"allreduce bucket {b['bucket']}", b["launched_at"], b["finished_at"],
                         tid=1, step=step, bytes=b["bytes"], tensors=b["tensors"])

    @staticmethod
    def write_merged(path: Path, per_rank_events: list[list[dict]]) -> int:
        """Write all ranks' events as one Chrome trace; return the number of events."""
        events = []
        for rank, rank_events in enumerate(per_rank_events):
            events.append({"name": "process_name", "ph": "M", "pid": rank,
                           "args": {"name": f"rank {rank}"}})
            for tid, label in ((0, "compute"), (1, "communication")):
                events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                               "args": {"name": label}})
            events.extend(rank_events)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        os.replace(tmp, path)
        return sum(len(e) for e in per_rank_events)


TENSORBOARD_MISSING = ("[output] tensorboard = true needs the tensorboard package, which is not "
                       "installed: pip install 'pybrain-mpi[tensorboard]' (or set [output] "
                       "tensorboard = false)")


class TensorBoardMissing(ImportError):
    """``[output] tensorboard = true`` but the ``tensorboard`` package is not installed."""


class TensorBoardScalars:
    """Scalars for TensorBoard, written by rank 0 beside the JSON lines (see the module doc)."""

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorBoardMissing(f"{TENSORBOARD_MISSING} ({exc})") from None
        self.directory = Path(directory)
        self._writer = SummaryWriter(log_dir=str(self.directory))

    def step(self, step: int, loss: float, lr: float, samples_per_s: float | None) -> None:
        """One logged step: global training loss, learning rate, samples/s of all ranks."""
        self._writer.add_scalar("train/loss", loss, step)
        self._writer.add_scalar("train/lr", lr, step)
        if samples_per_s is not None:
            self._writer.add_scalar("train/samples_per_s", samples_per_s, step)

    def epoch(self, step: int, record: dict) -> None:
        """One finished epoch: its mean training loss and validation metrics (where defined)."""
        for key in ("train_loss", "val_loss", "val_r2", "val_mean_dice"):
            value = record.get(key)
            if isinstance(value, (int, float)) and value == value:
                self._writer.add_scalar(f"epoch/{key}", value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
