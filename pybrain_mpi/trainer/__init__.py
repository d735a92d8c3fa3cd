"""The trainer behind ``pybrain-mpi train``: loop, data adapters, logs, timeline, preemption.

    from pybrain_mpi.config import load_config
    from pybrain_mpi.trainer import train
    summary = train(load_config("examples/dca_fmri.toml"), resume=True)
"""

from .codecs import build_codec
from ..data.errors import DataError
from .data import FMRISeries, TrainingData, VolumePatches, build_data
from .trainer import (Trainer, TrainingDiverged, TrainingSetupError, checkpoint_path,
                      format_summary, train)

__all__ = ["Trainer", "TrainingSetupError", "TrainingDiverged", "train", "checkpoint_path",
           "format_summary", "build_codec", "DataError", "FMRISeries",
           "TrainingData", "VolumePatches", "build_data"]
