"""Horovod's timeline: a Chrome-trace (``chrome://tracing``) JSON file written by rank 0.

Each collective appears as a row named ``<op>.<tensor name>`` with a ``NEGOTIATE_<OP>``
phase (submitted until every rank has submitted it) and an ``<OP>`` phase (execution);
``mark_cycles`` adds a ``CYCLE_START`` instant event per negotiation cycle that ran work.
Started by ``HOROVOD_TIMELINE=<file>`` at :func:`init` (``DYNAMIC``: only through
:func:`start_timeline`), or by :func:`start_timeline`; the file is valid JSON once
:func:`stop_timeline` (or shutdown) closed it.
"""

from __future__ import annotations

import json
import os
import threading
import time

__all__ = ["start_timeline", "stop_timeline", "Timeline"]


class Timeline:
    """Writes timeline events of this rank's coordinator to ``path``."""

    def __init__(self, path: str, mark_cycles: bool):
        self.path = path
        self.mark_cycles = mark_cycles
        self.lock = threading.Lock()
        self.rows: dict[str, int] = {}
        self.open: dict[str, str] = {}
        self.start = time.time()
        self.file = open(path, "w")
        self.file.write("[\n")
        self._write({"name": "process_name", "ph": "M", "pid": 0,
                     "args": {"name": "pybrain_mpi.horovod",
                              "start_time_since_epoch_in_micros": int(self.start * 1e6)}})

    def _write(self, event: dict) -> None:
        self.file.write(json.dumps(event) + ",\n")
        self.file.flush()

    def _ts(self) -> int:
        return int((time.time() - self.start) * 1e6)

    def _row(self, tensor: str, kind: str) -> tuple[int, str]:
        label = tensor if tensor.startswith(kind.lower() + ".") else f"{kind.lower()}.{tensor}"
        if label not in self.rows:
            self.rows[label] = len(self.rows) + 1
            self._write({"name": "process_name", "ph": "M", "pid": self.rows[label], "args": {"name": label}})
        return self.rows[label], label

    def begin(self, tensor: str, phase: str) -> None:
        """Opens ``phase`` for ``tensor`` (closing the phase it was in)."""
        kind = phase.replace("NEGOTIATE_", "")
        with self.lock:
            if self.file is None:
                return
            pid, _ = self._row(tensor, kind)
            if tensor in self.open:
                self._write({"name": self.open[tensor], "ph": "E", "ts": self._ts(), "pid": pid, "tid": 1})
            self.open[tensor] = phase
            self._write({"name": phase, "ph": "B", "ts": self._ts(), "pid": pid, "tid": 1})
            self.kinds = getattr(self, "kinds", {})
            self.kinds[tensor] = kind

    def end(self, tensor: str) -> None:
        """Closes the phase ``tensor`` is in."""
        with self.lock:
            if self.file is None or tensor not in self.open:
                return
            pid, _ = self._row(tensor, self.kinds.get(tensor, "op"))
            self._write({"name": self.open.pop(tensor), "ph": "E", "ts": self._ts(), "pid": pid, "tid": 1})

    def cycle(self) -> None:
        """Marks the start of a negotiation cycle that ran work (with ``mark_cycles``)."""
        if not self.mark_cycles:
            return
        with self.lock:
            if self.file is not None:
                self._write({"name": "CYCLE_START", "ph": "i", "ts": self._ts(), "pid": 0, "tid": 1, "s": "g"})

    def close(self) -> None:
        """Closes open phases and the JSON array."""
        with self.lock:
            if self.file is None:
                return
            for tensor in list(self.open):
                pid, _ = self._row(tensor, self.kinds.get(tensor, "op"))
                self._write({"name": self.open.pop(tensor), "ph": "E", "ts": self._ts(), "pid": pid, "tid": 1})
            self.file.write(json.dumps({"name": "timeline_end", "ph": "M", "pid": 0, "args": {}}) + "\n]\n")
            self.file.close()
            self.file = None


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Starts writing the timeline to ``file_path`` (rank 0 writes; a running one is replaced)."""
    from . import _coordinator_or_init, rank

    coordinator = _coordinator_or_init()
    if rank() != 0:
        return
    old, coordinator.timeline = coordinator.timeline, None
    if old is not None:
        old.close()
    directory = os.path.dirname(os.path.abspath(file_path))
    os.makedirs(directory, exist_ok=True)
    coordinator.timeline = Timeline(file_path, mark_cycles)


def stop_timeline() -> None:
    """Stops the timeline and closes its file (valid JSON from then on)."""
    from . import _coordinator

    if _coordinator is None or _coordinator.timeline is None:
        return
    timeline, _coordinator.timeline = _coordinator.timeline, None
    timeline.close()
