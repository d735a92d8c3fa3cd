"""Training engine: data-parallel wrapper and the pieces around it."""

from .consistency import check_same_parameters
from .ddp import DistributedDataParallel

__all__ = ["DistributedDataParallel", "check_same_parameters"]
