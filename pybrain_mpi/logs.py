"""Messages of every rank through stdlib :mod:`logging`, with a rank-aware prefix.

Every message pybrain-mpi prints goes through the ``pybrain_mpi`` logger (children:
``pybrain_mpi.trainer``, ...). :func:`configure` (the CLI calls it; ``-v``/``-q`` set the
verbosity) installs one handler that writes::

    [rank 1/4] pybrain-mpi: message                  (INFO and DEBUG, to stdout)
    [rank 1/4] pybrain-mpi: warning: message          (WARNING and up, to stderr)

so a Slurm log of many ranks can be grepped by rank (``grep '^\\[rank 3/'``). The rank and
world size are those of :func:`pybrain_mpi.init` once it has run, before that the launcher's
(``PMI_RANK``, ``OMPI_COMM_WORLD_RANK``, ``SLURM_PROCID``, torchrun's ``RANK``), else 0/1.

Which ranks print: rank 0 at the chosen level; every other rank only warnings and errors
(so each rank's own problem is still in the log), and, from ``-vv`` on, everything.

    verbosity   rank 0    other ranks
    -2 (-qq)    ERROR     ERROR
    -1 (-q)     WARNING   WARNING
     0          INFO      WARNING
     1 (-v)     DEBUG     WARNING      (and tracebacks of CLI errors)
     2 (-vv)    DEBUG     DEBUG

Python warnings (``warnings.warn``, e.g. a stalled gradient bucket) are routed through the
same handler, prefixed like every message. With ``-v`` each line also carries the time.
Library users who never call :func:`configure` get the same format (without routing their
warnings): :func:`get_logger` installs the handler on first use unless the application has
put one on the ``pybrain_mpi`` logger.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["LOGGER", "get_logger", "configure", "ensure_configured", "verbosity", "rank_and_size"]

LOGGER = "pybrain_mpi"
_HANDLER_MARK = "_pybrain_mpi_handler"
_state = {"verbosity": 0}


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``pybrain_mpi`` logger, or its child ``pybrain_mpi.<name>`` (the rank-aware
    handler is installed on first use unless one is there: :func:`ensure_configured`)."""
    ensure_configured()
    return logging.getLogger(LOGGER if not name else f"{LOGGER}.{name}")


def verbosity() -> int:
    """The verbosity set by :func:`configure` (``-v`` count minus ``-q`` count)."""
    return _state["verbosity"]


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue
    return None


def rank_and_size() -> tuple[int, int]:
    """This process's (rank, world size): MPI's after ``pbm.init``, else the launcher's."""
    try:
        from .communication import context
    except ImportError:  # a broken native core: the launcher's numbers still name the rank
        context = None
    if context is not None and context.is_initialized():
        return context.rank(), context.size()
    rank = _env_int("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK")
    size = _env_int("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "WORLD_SIZE")
    return (rank or 0), (size or 1)


class _RankFormatter(logging.Formatter):
    """``[rank R/W] pybrain-mpi: [level: ]message`` (with the time from ``-v`` on)."""

    def __init__(self, with_time: bool):
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        rank, size = rank_and_size()
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        when = f"{self.formatTime(record, '%H:%M:%S')} " if self.with_time else ""
        text = record.getMessage()
        if record.name == "py.warnings":  # "file:line: Category: text\n  source line"
            text = text.strip().splitlines()[0]
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = f"[rank {rank}/{size}] "
        lines = f"{when}pybrain-mpi: {level}{text}".splitlines() or [""]
        return "\n".join(prefix + line for line in lines)  # every line greppable by rank


class _RankFilter(logging.Filter):
    """Lets through what this rank prints at the configured verbosity (see the module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank, _ = rank_and_size()
        v = _state["verbosity"]
        if rank == 0 or v >= 2:
            threshold = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
                max(-2, min(v, 1)), logging.DEBUG)
        else:
            threshold = logging.ERROR if v <= -2 else logging.WARNING
        return record.levelno >= threshold


class _SplitHandler(logging.Handler):
    """INFO and below to stdout, WARNING and up to stderr (looked up at each record, so a
    test's captured streams are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def configure(level: int = 0, capture_warnings: bool = True) -> None:
    """Install the rank-aware handler on the ``pybrain_mpi`` logger (replacing an earlier one
    of ours) at verbosity ``level`` (``-v`` count minus ``-q`` count); with
    ``capture_warnings`` Python warnings go through it too."""
    _state["verbosity"] = int(level)
    handler = _SplitHandler()
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(_RankFormatter(with_time=level >= 1))
    handler.addFilter(_RankFilter())
    for name in (LOGGER, "py.warnings") if capture_warnings else (LOGGER,):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    if capture_warnings:
        logging.captureWarnings(True)


def ensure_configured() -> None:
    """:func:`configure` at the default verbosity unless the ``pybrain_mpi`` logger already
    has a handler (ours or the application's)."""
    if not logging.getLogger(LOGGER).handlers:
        configure(_state["verbosity"], capture_warnings=False)
