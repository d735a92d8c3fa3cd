"""Test-time stand-in for the ``horovod`` package: maps ``horovod.torch`` (and the modules
Horovod's own tests and examples import) to :mod:`pybrain_mpi.horovod`.

Put on ``PYTHONPATH`` only by ``tests/test_horovod_upstream.py``, so Horovod's unmodified
test suite and example scripts run against pybrain-mpi. Nothing here is installed.
"""

import sys

import pybrain_mpi.horovod as _hvd

sys.modules[__name__ + ".torch"] = _hvd
if hasattr(_hvd, "elastic"):
    sys.modules[__name__ + ".torch.elastic"] = _hvd.elastic
torch = _hvd
__version__ = "0.28.1+pybrain_mpi"
